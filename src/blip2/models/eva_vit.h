// EVA ViT-g/14, the frozen image encoder, as BLIP-2 builds it (LAVIS eva_vit.py).
//
// Names follow Hugging Face's Blip2VisionModel: embeddings.{class_embedding, position_embedding,
// patch_embedding}, encoder.layers.{i}.{layer_norm1, self_attn.{qkv, q_bias, v_bias, projection},
// layer_norm2, mlp.{fc1, fc2}}, post_layernorm (= LAVIS' ln_vision, trainable in stage 1).
// The qkv bias is [q_bias, 0, v_bias]: keys get no bias (BEiT/EVA convention).
#pragma once

#include "blip2/config/config.h"
#include "blip2/models/layers.h"

namespace blip2 {

class EvaAttentionImpl : public torch::nn::Module, public ShardedParameters {
 public:
  EvaAttentionImpl(const VisionConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x);  // [B, N, D] -> [B, N, D]
  std::map<std::string, TensorShard> local_shards() const override;  // q_bias, v_bias by heads
  Linear qkv{nullptr}, projection{nullptr};
  torch::Tensor q_bias, v_bias;  // undefined when qkv_bias is false
  int64_t heads;
  double dropout;  // on the attention probabilities, in training mode
};
TORCH_MODULE(EvaAttention);

class EvaMlpImpl : public torch::nn::Module {
 public:
  EvaMlpImpl(const VisionConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x);  // fc2(act(fc1(x)))
  Linear fc1{nullptr}, fc2{nullptr};
  Activation act;
};
TORCH_MODULE(EvaMlp);

class EvaBlockImpl : public torch::nn::Module {
 public:
  EvaBlockImpl(const VisionConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x);  // pre-LN: x += attn(ln1 x); x += mlp(ln2 x)
  LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  EvaAttention self_attn{nullptr};
  EvaMlp mlp{nullptr};
};
TORCH_MODULE(EvaBlock);

class EvaEmbeddingsImpl : public torch::nn::Module {
 public:
  EvaEmbeddingsImpl(const VisionConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& images);  // [B,3,S,S] -> [B, 1 + (S/p)^2, D]
  torch::Tensor class_embedding, position_embedding;   // [1,1,D], [1,1+P,D]
  torch::Tensor patch_weight, patch_bias;              // Conv2d(3, D, p, stride p)
  int64_t patch_size;
};
TORCH_MODULE(EvaEmbeddings);

class EvaVisionModelImpl : public torch::nn::Module {
 public:
  EvaVisionModelImpl(const VisionConfig& c, const InitOptions& init);
  // The ViT proper: tokens of the last block, no final norm. [B,3,S,S] -> [B, N, D]
  torch::Tensor forward_features(const torch::Tensor& images);
  // ln_vision on top (what the Q-Former sees).
  torch::Tensor forward(const torch::Tensor& images) {
    return post_layernorm(forward_features(images));
  }
  EvaEmbeddings embeddings{nullptr};
  torch::nn::ModuleList layers;
  LayerNorm post_layernorm{nullptr};
  VisionConfig config;
};
TORCH_MODULE(EvaVisionModel);

}  // namespace blip2
