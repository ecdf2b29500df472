#include "blip2/models/llm/llama.h"

#include "blip2/dist/dist.h"

namespace blip2 {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, const InitOptions& init) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}, init.options));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) const {
  auto xf = x.to(torch::kFloat32);
  xf = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * xf.to(x.scalar_type());
}

std::pair<torch::Tensor, torch::Tensor> rotary_cos_sin(const torch::Tensor& inv_freq,
                                                       const torch::Tensor& positions,
                                                       torch::Dtype dtype) {
  auto freqs = positions.to(torch::kFloat32).unsqueeze(-1) * inv_freq;
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

LlamaAttentionImpl::LlamaAttentionImpl(const TextConfig& c, const InitOptions& init)
    : heads(c.num_heads / dist::tp_size()), kv_heads(c.kv_heads() / dist::tp_size()) {
  const int64_t h = c.hidden_size, d = c.head_size(), all = c.num_heads, all_kv = c.kv_heads();
  const bool bias = c.attention_bias;
  // Each tp rank holds heads / tp query heads and their key/value heads (a slice of the rows).
  q_proj = register_module("q_proj", Linear(h, all * d, bias, init, Parallel::column));
  k_proj = register_module("k_proj", Linear(h, all_kv * d, bias, init, Parallel::column));
  v_proj = register_module("v_proj", Linear(h, all_kv * d, bias, init, Parallel::column));
  o_proj = register_module("o_proj", Linear(all * d, h, bias, init, Parallel::row));
}

torch::Tensor LlamaAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                          const torch::Tensor& sin, const torch::Tensor& additive_mask,
                                          KVCache* cache) {
  const auto xs = dist::copy_to_tp(x);  // q, k and v read one input
  auto q = apply_rotary(split_heads(q_proj->forward_copied(xs), heads), cos, sin);
  auto k = apply_rotary(split_heads(k_proj->forward_copied(xs), kv_heads), cos, sin);
  auto v = split_heads(v_proj->forward_copied(xs), kv_heads);
  return o_proj(merge_heads(cached_attention(q, k, v, additive_mask, cache, heads / kv_heads)));
}

LlamaMLPImpl::LlamaMLPImpl(const TextConfig& c, const InitOptions& init) : act(activation(c.activation())) {
  const int64_t h = c.hidden_size, f = c.ffn_size();
  gate_proj = register_module("gate_proj", Linear(h, f, c.mlp_bias, init, Parallel::column));
  up_proj = register_module("up_proj", Linear(h, f, c.mlp_bias, init, Parallel::column));
  down_proj = register_module("down_proj", Linear(f, h, c.mlp_bias, init, Parallel::row));
}

torch::Tensor LlamaMLPImpl::forward(const torch::Tensor& x) {
  const auto xs = dist::copy_to_tp(x);
  return down_proj(act(gate_proj->forward_copied(xs)) * up_proj->forward_copied(xs));
}

torch::Tensor rope_inv_freq(const TextConfig& c) {
  const int64_t d = c.head_size();
  auto inv = 1.0 / torch::pow(c.rope_theta, torch::arange(0, d, 2, torch::kLong).to(torch::kFloat32) / d);
  if (c.rope_type == "linear") return inv / c.rope_factor;
  if (c.rope_type != "llama3") return inv;
  // Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth blend between.
  const double factor = c.rope_factor, low = c.rope_low_freq_factor, high = c.rope_high_freq_factor;
  const double old_len = static_cast<double>(c.rope_original_max_position_embeddings);
  const double low_wavelen = old_len / low, high_wavelen = old_len / high;
  auto wavelen = 2 * M_PI / inv;
  auto scaled = torch::where(wavelen > low_wavelen, inv / factor, inv);
  auto smooth = (old_len / wavelen - low) / (high - low);
  auto smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
  auto medium = (wavelen < high_wavelen).logical_not() & (wavelen > low_wavelen).logical_not();
  return torch::where(medium, smoothed, scaled);
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const TextConfig& c, const InitOptions& init) {
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, init));
  self_attn = register_module("self_attn", LlamaAttention(c, init));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, init));
  mlp = register_module("mlp", LlamaMLP(c, init));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                             const torch::Tensor& sin, const torch::Tensor& additive_mask,
                                             KVCache* cache) {
  auto h = x + self_attn(input_layernorm(x), cos, sin, additive_mask, cache);
  return h + mlp(post_attention_layernorm(h));
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const TextConfig& c, const InitOptions& init)
    : CausalLMImpl(c) {
  auto model = register_module("model", std::make_shared<torch::nn::Module>());
  embed_tokens = model->register_module("embed_tokens", Embedding(c.vocab_size, c.hidden_size, init, true));
  layers = model->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(LlamaDecoderLayer(c, init));
  norm = model->register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, init));
  if (!c.tie_word_embeddings)
    lm_head = register_module("lm_head", Linear(c.hidden_size, c.vocab_size, false, init, Parallel::column));
  inv_freq = rope_inv_freq(c);
}

torch::Tensor LlamaForCausalLMImpl::embed(const torch::Tensor& ids) { return embed_tokens(ids); }

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& embeds, const torch::Tensor& keep,
                                            const torch::Tensor& positions, LlmCache* cache,
                                            bool last_only, bool vocab_local) {
  const int64_t n = embeds.size(1);
  if (cache) cache->ensure_layers(layers->size());
  if (inv_freq.device() != embeds.device()) inv_freq = inv_freq.to(embeds.device());  // once per device
  auto [cos, sin] = rotary_cos_sin(inv_freq, positions, embeds.scalar_type());
  auto additive_mask = decoder_mask(keep, n, embeds.scalar_type(), cache);
  auto h = embeds;
  for (size_t i = 0; i < layers->size(); ++i)
    h = layers[i]->as<LlamaDecoderLayer>()->forward(h, cos, sin, additive_mask, cache ? &cache->layers[i] : nullptr);
  if (last_only) h = h.narrow(1, n - 1, 1);
  h = norm(h);
  return output_logits(h, lm_head, embed_tokens, vocab_local);
}

}  // namespace blip2
