#include "blip2/models/qformer.h"

namespace blip2 {
namespace F = torch::nn::functional;

BertSelfAttentionImpl::BertSelfAttentionImpl(const QFormerConfig& c, int64_t kv_width,
                                             const InitOptions& init)
    : heads(c.num_attention_heads), dropout(c.attention_probs_dropout_prob) {
  query = register_module("query", Linear(c.hidden_size, c.hidden_size, true, init));
  key = register_module("key", Linear(kv_width, c.hidden_size, true, init));
  value = register_module("value", Linear(kv_width, c.hidden_size, true, init));
}

torch::Tensor BertSelfAttentionImpl::forward(const torch::Tensor& hidden,
                                             const torch::Tensor& context,
                                             const torch::Tensor& additive_mask, const KVCache* past,
                                             KVCache* present) {
  auto q = split_heads(query(hidden), heads);
  torch::Tensor k, v;
  if (!context.defined()) {
    TORCH_CHECK(past, "attention needs a context or precomputed keys/values");
    k = past->key;
    v = past->value;
  } else {
    k = split_heads(key(context), heads);
    v = split_heads(value(context), heads);
    if (past) {
      k = torch::cat({past->key, k}, 2);
      v = torch::cat({past->value, v}, 2);
    }
  }
  if (present) *present = {k, v};
  std::optional<torch::Tensor> m;
  if (additive_mask.defined()) m = additive_mask.to(q.scalar_type());
  auto ctx = at::scaled_dot_product_attention(q, k, v, m, is_training() ? dropout : 0.0);
  return merge_heads(ctx);
}

BertOutputImpl::BertOutputImpl(int64_t in, int64_t out, double eps, double p,
                               const InitOptions& init)
    : dropout(p) {
  dense = register_module("dense", Linear(in, out, true, init));
  LayerNorm_ = register_module("LayerNorm", LayerNorm(out, eps, init));
}

torch::Tensor BertOutputImpl::forward(const torch::Tensor& x, const torch::Tensor& residual) {
  return LayerNorm_(F::dropout(dense(x), F::DropoutFuncOptions().p(dropout).training(
                                             is_training())) + residual);
}

BertAttentionImpl::BertAttentionImpl(const QFormerConfig& c, int64_t kv_width,
                                     const InitOptions& init) {
  attention = register_module("attention", BertSelfAttention(c, kv_width, init));
  output = register_module("output", BertOutput(c.hidden_size, c.hidden_size, c.layer_norm_eps,
                                                c.hidden_dropout_prob, init));
}

torch::Tensor BertAttentionImpl::forward(const torch::Tensor& hidden,
                                         const torch::Tensor& context, const torch::Tensor& additive_mask,
                                         const KVCache* past, KVCache* present) {
  return output(attention(hidden, context, additive_mask, past, present), hidden);
}

QFormerLayerImpl::QFormerLayerImpl(const QFormerConfig& c, int64_t encoder_width, bool cross,
                                   const InitOptions& init, bool text_path)
    : has_cross(cross), act(activation(c.hidden_act)) {
  attention = register_module("attention", BertAttention(c, c.hidden_size, init));
  if (cross) crossattention = register_module("crossattention", BertAttention(c, encoder_width, init));
  auto h = c.hidden_size, i = c.intermediate_size;
  if (text_path) {
    intermediate = register_module("intermediate", std::make_shared<torch::nn::Module>())
                       ->register_module("dense", Linear(h, i, true, init));
    output = register_module("output", BertOutput(i, h, c.layer_norm_eps, c.hidden_dropout_prob, init));
  }
  intermediate_query = register_module("intermediate_query", std::make_shared<torch::nn::Module>())
                           ->register_module("dense", Linear(h, i, true, init));
  output_query = register_module("output_query",
                                 BertOutput(i, h, c.layer_norm_eps, c.hidden_dropout_prob, init));
}

torch::Tensor QFormerLayerImpl::ffn(const torch::Tensor& x, bool query) {
  if (query) return output_query(act(intermediate_query(x)), x);
  TORCH_CHECK(!intermediate.is_empty(), "this Q-Former has the query path only (stage 2): no text input");
  return output(act(intermediate(x)), x);
}

torch::Tensor QFormerLayerImpl::forward(const torch::Tensor& hidden, const torch::Tensor& additive_mask,
                                        int64_t query_length, const torch::Tensor& image_embeds,
                                        const KVCache* past, KVCache* present,
                                        const KVCache* cross) {
  auto h = attention(hidden, hidden, additive_mask, past, present);
  if (query_length == 0) return ffn(h, /*query=*/false);
  auto q = h.narrow(1, 0, query_length);
  if (has_cross) {
    TORCH_CHECK(image_embeds.defined() || cross, "cross-attention layer needs image features");
    q = crossattention->forward(q, cross ? torch::Tensor() : image_embeds,
                                /*all image tokens visible*/ torch::Tensor(), cross, nullptr);
  }
  q = ffn(q, /*query=*/true);
  if (h.size(1) == query_length) return q;
  auto t = ffn(h.narrow(1, query_length, h.size(1) - query_length), /*query=*/false);
  return torch::cat({q, t}, 1);
}

QFormerModelImpl::QFormerModelImpl(const QFormerConfig& c, int64_t encoder_width,
                                   const InitOptions& init, bool text_path)
    : config(c) {
  layernorm = register_module("layernorm", LayerNorm(c.hidden_size, c.layer_norm_eps, init));
  layers = register_module("encoder", std::make_shared<torch::nn::Module>())
               ->register_module("layer", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    layers->push_back(QFormerLayer(c, encoder_width, i % c.cross_attention_freq == 0, init, text_path));
}

QFormerOutput QFormerModelImpl::forward(const torch::Tensor& embeds, const torch::Tensor& additive_mask,
                                        int64_t query_length, const torch::Tensor& image_embeds,
                                        const std::vector<KVCache>* past, bool use_cache,
                                        const std::vector<KVCache>* cross) {
  QFormerOutput out;
  auto h = F::dropout(layernorm(embeds), F::DropoutFuncOptions()
                                             .p(config.hidden_dropout_prob)
                                             .training(is_training()));
  if (use_cache) out.past.resize(layers->size());
  for (size_t i = 0; i < layers->size(); ++i) {
    h = layers[i]->as<QFormerLayer>()->forward(h, additive_mask, query_length, image_embeds,
                                               past ? &(*past)[i] : nullptr,
                                               use_cache ? &out.past[i] : nullptr,
                                               cross ? &(*cross)[i] : nullptr);
  }
  out.last_hidden_state = h;
  return out;
}

std::vector<KVCache> QFormerModelImpl::cross_kv(const torch::Tensor& image_embeds) {
  std::vector<KVCache> out(layers->size());
  for (size_t i = 0; i < layers->size(); ++i) {
    auto layer = layers[i]->as<QFormerLayer>();
    if (!layer->has_cross) continue;
    auto& attn = layer->crossattention->attention;
    out[i] = {split_heads(attn->key(image_embeds), attn->heads),
              split_heads(attn->value(image_embeds), attn->heads)};
  }
  return out;
}

TextEmbeddingsImpl::TextEmbeddingsImpl(const QFormerConfig& c, const InitOptions& init) {
  word_embeddings = register_module(
      "word_embeddings", Embedding(c.embedding_vocab_size(), c.hidden_size, init));
  position_embeddings = register_module(
      "position_embeddings", Embedding(c.max_position_embeddings, c.hidden_size, init));
}

torch::Tensor TextEmbeddingsImpl::forward(const torch::Tensor& ids, int64_t past_length) {
  auto positions = torch::arange(past_length, past_length + ids.size(1),
                                 torch::TensorOptions().dtype(torch::kLong).device(ids.device()));
  return word_embeddings(ids) + position_embeddings(positions).unsqueeze(0);
}

LMHeadImpl::LMHeadImpl(const QFormerConfig& c, const InitOptions& init) : act(activation(c.hidden_act)) {
  auto predictions = register_module("predictions", std::make_shared<torch::nn::Module>());
  auto transform = predictions->register_module("transform", std::make_shared<torch::nn::Module>());
  dense = transform->register_module("dense", Linear(c.hidden_size, c.hidden_size, true, init));
  LayerNorm_ = transform->register_module("LayerNorm",
                                          LayerNorm(c.hidden_size, c.layer_norm_eps, init));
  bias = predictions->register_parameter("bias",
                                         torch::zeros({c.embedding_vocab_size()}, init.options));
}

bool LMHeadImpl::init_parameter(const std::string& name) {
  if (name != "predictions.bias") return false;
  bias.zero_();
  return true;
}

torch::Tensor LMHeadImpl::forward(const torch::Tensor& hidden,
                                  const torch::Tensor& word_embeddings) {
  auto x = LayerNorm_(act(dense(hidden)));
  return blip2::linear(x, word_embeddings, bias);
}

std::vector<KVCache> select_rows(const std::vector<KVCache>& cross, const torch::Tensor& rows) {
  std::vector<KVCache> out(cross.size());
  for (size_t l = 0; l < cross.size(); ++l)
    if (cross[l].key.defined())
      out[l] = {cross[l].key.index_select(0, rows), cross[l].value.index_select(0, rows)};
  return out;
}

std::vector<KVCache> repeat_row(const std::vector<KVCache>& cross, int64_t i, int64_t k) {
  std::vector<KVCache> out(cross.size());
  for (size_t l = 0; l < cross.size(); ++l)
    if (cross[l].key.defined())
      out[l] = {cross[l].key.narrow(0, i, 1).expand({k, -1, -1, -1}),
                cross[l].value.narrow(0, i, 1).expand({k, -1, -1, -1})};
  return out;
}

}  // namespace blip2
