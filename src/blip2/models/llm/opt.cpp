#include "blip2/models/llm/opt.h"

#include "blip2/dist/dist.h"

namespace blip2 {

OptAttentionImpl::OptAttentionImpl(const TextConfig& c, const InitOptions& init)
    : heads(c.num_heads / dist::tp_size()) {
  const int64_t h = c.hidden_size;
  const bool bias = c.enable_bias;
  q_proj = register_module("q_proj", Linear(h, h, bias, init, Parallel::column));
  k_proj = register_module("k_proj", Linear(h, h, bias, init, Parallel::column));
  v_proj = register_module("v_proj", Linear(h, h, bias, init, Parallel::column));
  out_proj = register_module("out_proj", Linear(h, h, bias, init, Parallel::row));
}

torch::Tensor OptAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& additive_mask, KVCache* cache) {
  const auto xs = dist::copy_to_tp(x);  // q, k and v read one input
  auto ctx = cached_attention(split_heads(q_proj->forward_copied(xs), heads), split_heads(k_proj->forward_copied(xs), heads),
                              split_heads(v_proj->forward_copied(xs), heads), additive_mask, cache);
  return out_proj(merge_heads(ctx));
}

OptDecoderLayerImpl::OptDecoderLayerImpl(const TextConfig& c, const InitOptions& init)
    : act(activation(c.activation())), norm_before(c.do_layer_norm_before) {
  const int64_t h = c.hidden_size, f = c.ffn_size();
  const bool affine = c.layer_norm_elementwise_affine;
  self_attn = register_module("self_attn", OptAttention(c, init));
  self_attn_layer_norm = register_module("self_attn_layer_norm", LayerNorm(h, c.layer_norm_eps, init, affine));
  fc1 = register_module("fc1", Linear(h, f, c.enable_bias, init, Parallel::column));
  fc2 = register_module("fc2", Linear(f, h, c.enable_bias, init, Parallel::row));
  final_layer_norm = register_module("final_layer_norm", LayerNorm(h, c.layer_norm_eps, init, affine));
}

torch::Tensor OptDecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& additive_mask, KVCache* cache) {
  if (norm_before) {
    auto h = x + self_attn(self_attn_layer_norm(x), additive_mask, cache);
    return h + fc2(act(fc1(final_layer_norm(h))));
  }
  auto h = self_attn_layer_norm(x + self_attn(x, additive_mask, cache));  // post-LN (OPT-350m)
  return final_layer_norm(h + fc2(act(fc1(h))));
}

OptForCausalLMImpl::OptForCausalLMImpl(const TextConfig& c, const InitOptions& init) : CausalLMImpl(c) {
  auto decoder = register_module("model", std::make_shared<torch::nn::Module>())
                     ->register_module("decoder", std::make_shared<torch::nn::Module>());
  embed_tokens = decoder->register_module("embed_tokens", Embedding(c.vocab_size, c.hidden_size, init, true));
  embed_positions = decoder->register_module(
      "embed_positions", Embedding(c.max_position_embeddings + kPositionOffset, c.hidden_size, init));
  layers = decoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(OptDecoderLayer(c, init));
  if (c.do_layer_norm_before && !c.remove_final_layer_norm)
    final_layer_norm = decoder->register_module(
        "final_layer_norm", LayerNorm(c.hidden_size, c.layer_norm_eps, init, c.layer_norm_elementwise_affine));
  if (!c.tie_word_embeddings)
    lm_head = register_module("lm_head", Linear(c.hidden_size, c.vocab_size, false, init, Parallel::column));
}

torch::Tensor OptForCausalLMImpl::embed(const torch::Tensor& ids) { return embed_tokens(ids); }

torch::Tensor OptForCausalLMImpl::forward(const torch::Tensor& embeds, const torch::Tensor& keep,
                                          const torch::Tensor& positions, LlmCache* cache,
                                          bool last_only, bool vocab_local) {
  const int64_t n = embeds.size(1);
  if (cache) cache->ensure_layers(layers->size());
  auto h = embeds + embed_positions(positions + kPositionOffset);
  auto additive_mask = decoder_mask(keep, n, embeds.scalar_type(), cache);
  for (size_t i = 0; i < layers->size(); ++i)
    h = layers[i]->as<OptDecoderLayer>()->forward(h, additive_mask, cache ? &cache->layers[i] : nullptr);
  if (last_only) h = h.narrow(1, n - 1, 1);
  if (!final_layer_norm.is_empty()) h = final_layer_norm(h);
  return output_logits(h, lm_head, embed_tokens, vocab_local);
}

}  // namespace blip2
