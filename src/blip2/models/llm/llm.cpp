#include "blip2/models/llm/llm.h"

#include "blip2/models/llm/llama.h"
#include "blip2/models/llm/opt.h"
#include "blip2/dist/dist.h"
#include "blip2/util/common.h"

namespace blip2 {

int64_t LlmCache::length() const {
  if (layers.empty() || !layers[0].key.defined()) return 0;
  return layers[0].capacity > 0 ? layers[0].length : layers[0].key.size(2);
}

void LlmCache::select_rows(const torch::Tensor& rows) {
  for (auto& l : layers) {
    if (!l.key.defined()) continue;
    l.key = l.key.index_select(0, rows);
    l.value = l.value.index_select(0, rows);
  }
  if (step_mask.defined()) step_mask = step_mask.index_select(0, rows);
}

void LlmCache::ensure_layers(size_t n) {
  if (!layers.empty()) return;
  layers.resize(n);
  for (auto& l : layers) l.capacity = capacity;
}

std::shared_ptr<CausalLMImpl> make_causal_lm(const TextConfig& c, const InitOptions& init) {
  if (const int64_t tp = dist::tp_size(); tp > 1) {
    // Megatron's split: whole heads per rank; the vocabulary and the FFN in equal slices.
    auto need = [&](int64_t n, const std::string& key) {
      check(n % tp == 0, "text_config." + key + ": " + std::to_string(n) +
                             " is not divisible by parallel_config.model_parallel " + std::to_string(tp));
    };
    need(c.num_heads, "num_attention_heads");
    need(c.kv_heads(), "num_key_value_heads");
    need(c.vocab_size, "vocab_size");
    need(c.ffn_size(), c.is_opt() ? "ffn_dim" : "intermediate_size");
  }
  if (c.is_opt()) return std::make_shared<OptForCausalLMImpl>(c, init);
  if (c.type == "LlamaConfig") return std::make_shared<LlamaForCausalLMImpl>(c, init);
  throw Error("text_config.type: '" + c.type + "' is not LlamaConfig or OPTConfig");
}

torch::Tensor causal_mask(const torch::Tensor& keep, int64_t new_len, torch::Dtype dtype) {
  const int64_t total = keep.size(1);
  const auto opts = torch::TensorOptions().device(keep.device());
  // Query i (absolute index total - new_len + i) sees keys j <= that index.
  auto qi = torch::arange(total - new_len, total, opts.dtype(torch::kLong)).unsqueeze(1);
  auto kj = torch::arange(total, opts.dtype(torch::kLong)).unsqueeze(0);
  auto allowed = (kj <= qi).unsqueeze(0) & keep.to(torch::kBool).unsqueeze(1);  // [B, L, T]
  auto lowest = std::numeric_limits<float>::lowest();
  if (dtype == torch::kBFloat16) lowest = -3.3895313892515355e38f;
  if (dtype == torch::kHalf) lowest = -65504.0f;
  return torch::zeros(allowed.sizes(), opts.dtype(dtype))
      .masked_fill(allowed.logical_not(), lowest)
      .unsqueeze(1);
}

torch::Tensor decoder_mask(const torch::Tensor& keep, int64_t n, torch::Dtype dtype, const LlmCache* cache) {
  if (cache && cache->unpadded) return {};
  if (cache && n == 1 && cache->step_mask.defined())
    return cache->step_mask.narrow(3, 0, keep.size(1)).to(dtype);
  return causal_mask(keep, n, dtype);
}

torch::Tensor positions_from_keep(const torch::Tensor& keep, int64_t new_len) {
  auto k = keep.to(torch::kLong);
  auto pos = (k.cumsum(1) - 1).masked_fill(k == 0, 0);
  return pos.narrow(1, keep.size(1) - new_len, new_len);
}

torch::Tensor output_logits(const torch::Tensor& hidden, const Linear& lm_head, const Embedding& embed_tokens,
                            bool vocab_local) {
  auto logits = lm_head.is_empty() ? blip2::linear(dist::copy_to_tp(hidden), embed_tokens->weight)
                                   : lm_head->forward(hidden);
  return vocab_local ? logits : dist::gather_from_tp(logits, -1);
}

torch::Tensor cached_attention(const torch::Tensor& q, torch::Tensor k, torch::Tensor v,
                               const torch::Tensor& additive_mask, KVCache* cache, int64_t n_rep) {
  if (cache && cache->write_pos.defined()) {
    check(k.size(2) == 1 && cache->key.defined() && cache->span <= cache->key.size(2),
          "KV cache: per-row writes take one position per row within the reserved columns");
    auto idx = cache->write_pos.view({-1, 1, 1, 1}).expand({k.size(0), k.size(1), 1, k.size(3)});
    cache->key.scatter_(2, idx, k);
    cache->value.scatter_(2, idx, v);
    k = cache->key.narrow(2, 0, cache->span);
    v = cache->value.narrow(2, 0, cache->span);
  } else if (cache && cache->capacity > 0) {
    const int64_t n = k.size(2);
    if (!cache->key.defined()) {
      auto shape = k.sizes().vec();
      shape[2] = cache->capacity;
      cache->key = torch::empty(shape, k.options());
      cache->value = torch::empty(shape, v.options());
      cache->length = 0;
    }
    check(cache->length + n <= cache->capacity, "KV cache: " + std::to_string(cache->length + n) +
                                                    " positions exceed the " + std::to_string(cache->capacity) +
                                                    " reserved");
    cache->key.narrow(2, cache->length, n).copy_(k);
    cache->value.narrow(2, cache->length, n).copy_(v);
    cache->length += n;
    k = cache->key.narrow(2, 0, cache->length);
    v = cache->value.narrow(2, 0, cache->length);
  } else if (cache) {
    if (cache->key.defined()) {
      k = torch::cat({cache->key, k}, 2);
      v = torch::cat({cache->value, v}, 2);
    }
    cache->key = k;
    cache->value = v;
  }
  if (n_rep > 1) {
    k = k.repeat_interleave(n_rep, 1);
    v = v.repeat_interleave(n_rep, 1);
  }
  const int64_t l = q.size(2), t = k.size(2);
  if (additive_mask.defined())
    return at::scaled_dot_product_attention(q, k, v, additive_mask.to(q.scalar_type()));
  if (l == 1 || l == t)  // one new position sees everything; L of L positions: SDPA's own causal mask
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/l > 1);
  // L new positions after a past, nothing padded: causal, aligned to the end.
  auto keep = torch::ones({1, t}, torch::TensorOptions().dtype(torch::kLong).device(q.device()));
  return at::scaled_dot_product_attention(q, k, v, causal_mask(keep, l, q.scalar_type()));
}

}  // namespace blip2
