#include "blip2/models/eva_vit.h"

#include "blip2/dist/dist.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace F = torch::nn::functional;

EvaAttentionImpl::EvaAttentionImpl(const VisionConfig& c, const InitOptions& init)
    : heads(c.num_attention_heads / dist::tp_size()), dropout(c.attention_dropout) {
  const int64_t d = c.hidden_size;
  // Tensor parallel: the fused qkv split by heads within each of q, k and v; projection by rows.
  qkv = register_module("qkv", Linear(d, 3 * d, /*bias=*/false, init, Parallel::column, /*parts=*/3));
  const int64_t local = d / dist::tp_size();
  if (c.qkv_bias) {
    q_bias = register_parameter("q_bias", torch::zeros({local}, init.options));
    v_bias = register_parameter("v_bias", torch::zeros({local}, init.options));
  }
  projection = register_module("projection", Linear(d, d, true, init, Parallel::row));
}

std::map<std::string, TensorShard> EvaAttentionImpl::local_shards() const {
  if (dist::tp_size() == 1 || !q_bias.defined()) return {};
  TensorShard s;
  s.rank = dist::tp_rank();
  s.size = dist::tp_size();
  return {{"q_bias", s}, {"v_bias", s}};
}

torch::Tensor EvaAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t b = x.size(0), n = x.size(1);
  torch::Tensor bias;
  if (q_bias.defined()) bias = torch::cat({q_bias, torch::zeros_like(q_bias), v_bias});
  auto qkv_out = qkv->forward_with_bias(dist::copy_to_tp(x), bias).view({b, n, 3, heads, -1});
  qkv_out = qkv_out.permute({2, 0, 3, 1, 4});  // [3, B, H, N, hd]
  auto ctx = at::scaled_dot_product_attention(qkv_out[0], qkv_out[1], qkv_out[2], {},
                                              is_training() ? dropout : 0.0);
  return projection(merge_heads(ctx));
}

EvaMlpImpl::EvaMlpImpl(const VisionConfig& c, const InitOptions& init) : act(activation(c.hidden_act)) {
  fc1 = register_module("fc1", Linear(c.hidden_size, c.intermediate_size, true, init, Parallel::column));
  fc2 = register_module("fc2", Linear(c.intermediate_size, c.hidden_size, true, init, Parallel::row));
}

torch::Tensor EvaMlpImpl::forward(const torch::Tensor& x) { return fc2(act(fc1(x))); }

EvaBlockImpl::EvaBlockImpl(const VisionConfig& c, const InitOptions& init) {
  layer_norm1 = register_module("layer_norm1", LayerNorm(c.hidden_size, c.layer_norm_eps, init));
  self_attn = register_module("self_attn", EvaAttention(c, init));
  layer_norm2 = register_module("layer_norm2", LayerNorm(c.hidden_size, c.layer_norm_eps, init));
  mlp = register_module("mlp", EvaMlp(c, init));
}

torch::Tensor EvaBlockImpl::forward(const torch::Tensor& x) {
  auto h = x + self_attn(layer_norm1(x));
  return h + mlp(layer_norm2(h));
}

EvaEmbeddingsImpl::EvaEmbeddingsImpl(const VisionConfig& c, const InitOptions& init)
    : patch_size(c.patch_size) {
  torch::NoGradGuard no_grad;
  const int64_t d = c.hidden_size;
  class_embedding = register_parameter("class_embedding", torch::empty({1, 1, d}, init.options));
  position_embedding = register_parameter(
      "position_embedding", torch::empty({1, c.num_patches() + 1, d}, init.options));
  if (init.draw) {
    class_embedding.normal_(0.0, init.std);
    position_embedding.normal_(0.0, init.std);
  }
  // Registered under a child named patch_embedding so keys read patch_embedding.{weight,bias}.
  auto conv = std::make_shared<torch::nn::Module>();
  patch_weight = conv->register_parameter(
      "weight", torch::empty({d, c.num_channels, c.patch_size, c.patch_size}, init.options));
  if (init.draw) patch_weight.normal_(0.0, init.std);
  patch_bias = conv->register_parameter("bias", torch::zeros({d}, init.options));
  register_module("patch_embedding", conv);
}

torch::Tensor EvaEmbeddingsImpl::forward(const torch::Tensor& images) {
  auto x = F::conv2d(images, patch_weight,
                     F::Conv2dFuncOptions().bias(patch_bias).stride(patch_size));
  x = x.flatten(2).transpose(1, 2);  // [B, P, D]
  auto cls = class_embedding.expand({x.size(0), 1, x.size(2)}).to(x.dtype());
  x = torch::cat({cls, x}, 1);
  TORCH_CHECK(x.size(1) == position_embedding.size(1), "image gives ", x.size(1),
              " tokens but the position embedding has ", position_embedding.size(1));
  return x + position_embedding.to(x.dtype());
}

EvaVisionModelImpl::EvaVisionModelImpl(const VisionConfig& c, const InitOptions& init)
    : config(c) {
  if (const int64_t tp = dist::tp_size(); tp > 1) {
    check(c.num_attention_heads % tp == 0 && c.intermediate_size % tp == 0,
          "vision_config: num_attention_heads " + std::to_string(c.num_attention_heads) + " and intermediate_size " +
              std::to_string(c.intermediate_size) + " must be divisible by parallel_config.model_parallel " +
              std::to_string(tp));
  }
  embeddings = register_module("embeddings", EvaEmbeddings(c, init));
  layers = register_module("encoder", std::make_shared<torch::nn::Module>())
               ->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(EvaBlock(c, init));
  post_layernorm =
      register_module("post_layernorm", LayerNorm(c.hidden_size, c.post_layernorm_eps, init));
}

torch::Tensor EvaVisionModelImpl::forward_features(const torch::Tensor& images) {
  auto x = embeddings(images);
  for (const auto& layer : *layers) x = layer->as<EvaBlock>()->forward(x);
  return x;
}

}  // namespace blip2
