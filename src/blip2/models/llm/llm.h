// The frozen decoder LLMs of stage 2, behind one interface: embed token ids, and run embeddings
// (the projected queries, then the prompt) through the decoder with a key/value cache.
//
// One file per family, parameter names as Hugging Face's *ForCausalLM (so a Hugging Face
// directory loads as it is): llama.{h,cpp} (Llama; Baichuan-7B is Llama whose W_pack is split at
// load time) and opt.{h,cpp}.
//
// Shapes: B batch, L new positions, T = past + L attended positions, H hidden, V vocabulary.
#pragma once

#include <memory>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/models/layers.h"

namespace blip2 {

// Keys/values of every layer, [B, heads, T, head_dim], appended to by each forward. Generation
// reserves the positions it will need (written in place, never reallocated) and says what it knows
// of the padding, so that no step rebuilds a mask:
//   unpadded   every position is a token: no mask at all (the prefill attends causally);
//   step_mask  otherwise, the additive padding mask [B, 1, 1, capacity] over every position a
//              one-token step can attend, built once; a step attends its first T columns.
struct LlmCache {
  std::vector<KVCache> layers;
  int64_t capacity = 0;  // > 0: positions reserved in every layer (see KVCache)
  bool unpadded = false;
  torch::Tensor step_mask;
  int64_t length() const;
  // Keeps (and reorders) batch rows: beam search continues the beams it chose.
  void select_rows(const torch::Tensor& rows);
  // Sizes `layers` for a model of n layers on its first forward.
  void ensure_layers(size_t n);
};

class CausalLMImpl : public torch::nn::Module {
 public:
  explicit CausalLMImpl(TextConfig c) : config(std::move(c)) {}
  // [B, L] ids -> [B, L, H] input embeddings.
  virtual torch::Tensor embed(const torch::Tensor& ids) = 0;
  // embeds [B, L, H]; keep [B, T] (1 = attend, 0 = padding) over the cached positions and these;
  // positions [B, L] (a token's index among the kept ones). With `cache`, its keys/values are
  // attended and this call's appended. Returns logits [B, L, V], or [B, 1, V] of the last
  // position when last_only. Under tensor parallelism the vocabulary is split over the tp group:
  // the logits are gathered whole, or with vocab_local kept as this rank's slice [.., V / tp]
  // (for next_token_loss's vocab_parallel, which never builds the whole [B, L, V]).
  virtual torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& keep,
                                const torch::Tensor& positions, LlmCache* cache,
                                bool last_only = false, bool vocab_local = false) = 0;
  TextConfig config;
};

// Llama or OPT as `c.type` says, parameters created with `init`.
std::shared_ptr<CausalLMImpl> make_causal_lm(const TextConfig& c, const InitOptions& init);

// Additive mask [B, 1, L, T] for the last L of T positions: causal, and padding (keep = 0)
// hidden. Masked entries are the dtype's lowest value (as transformers does), so a fully masked
// row (a left pad) stays finite.
torch::Tensor causal_mask(const torch::Tensor& keep, int64_t new_len, torch::Dtype dtype);
// The mask a decoder forward over the last n of keep's positions uses: none when `cache` says
// nothing is padded, its step mask for a one-token step, else causal_mask.
torch::Tensor decoder_mask(const torch::Tensor& keep, int64_t n, torch::Dtype dtype, const LlmCache* cache);
// Position of each of the last L columns of keep among the kept tokens (cumsum - 1; pads 0).
torch::Tensor positions_from_keep(const torch::Tensor& keep, int64_t new_len);

// Logits of the final hidden states: lm_head, or the token embeddings when tied (empty lm_head);
// under tensor parallelism gathered over the vocabulary unless vocab_local.
torch::Tensor output_logits(const torch::Tensor& hidden, const Linear& lm_head, const Embedding& embed_tokens,
                            bool vocab_local = false);

// Attention over cached + new keys/values: q [B,h,L,D], k/v [B,h/n_rep,L,D] appended to `cache`
// (when given), additive_mask added to the scores; an undefined mask means nothing is padded (the
// L new positions attend causally: SDPA's fused kernels, no mask tensor). Each key/value head serves
// n_rep query heads (grouped-query attention, as transformers' repeat_kv). Returns [B,h,L,D].
torch::Tensor cached_attention(const torch::Tensor& q, torch::Tensor k, torch::Tensor v,
                               const torch::Tensor& additive_mask, KVCache* cache, int64_t n_rep = 1);

}  // namespace blip2
