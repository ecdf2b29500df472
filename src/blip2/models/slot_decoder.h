// Continuous batching on the KV-cache decoder (what vLLM and llama.cpp's server do): a fixed set
// of batch rows ("slots") decoded one token per step together, where a sequence joins at any step
// (its prefix + prompt prefilled alone, then copied into a free row) and leaves when it finishes,
// its row reused by the next one. Rows sit at different lengths: each writes its keys/values at its
// own column (KVCache::write_pos) and its keep mask hides the columns past its length.
//
// Each row has its own settings (greedy or sampling, temperature, top-k/p, repetition penalty,
// min/max new tokens, EOS) and its own generator seeded with its seed, and goes through the same
// score processors as generate(): a sequence produces the tokens generate() gives it alone at batch
// 1 with the same options (bit for bit up to the rounding of a batched matrix product).
// Beam search is not slotted (generate() runs beams).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "blip2/models/generation.h"
#include "blip2/models/llm/llm.h"

namespace blip2 {

class SlotDecoder {
 public:
  struct Emit {
    int64_t id;           // the sequence (as admit returned it)
    int64_t token;
    bool finished;        // EOS produced or max_new_tokens reached: the row is free again
    std::string error;    // this row's scores could not be sampled (token -1, finished): only it fails
  };

  SlotDecoder(CausalLMImpl& lm, int64_t slots);

  // Prefills a sequence and draws its first token. prefix [1, P, H] (undefined = none), prompt
  // ids (may be empty when there is a prefix); o.num_beams must be 1. Throws blip2::Error (nothing
  // changed) when the options are invalid, no slot is free, or the context is exceeded.
  Emit admit(const torch::Tensor& prefix, const std::vector<int64_t>& prompt, const GenerationOptions& o);
  // Several sequences whose prompts have one length, prefilled in one batch (no padding, so each
  // row is what it would be alone up to the rounding of a batched product): prefix [k, P, H] or
  // undefined, k prompts and k option sets. One Emit per sequence, in order.
  std::vector<Emit> admit_group(const torch::Tensor& prefix, const std::vector<std::vector<int64_t>>& prompts,
                                const std::vector<GenerationOptions>& options);
  // One token for every active sequence, in row order; finished ones leave.
  std::vector<Emit> step();
  // Frees the row of a sequence (a cancelled request); unknown ids are ignored.
  void release(int64_t id);

  int64_t slots() const { return slots_; }
  int64_t active() const { return static_cast<int64_t>(rows_.size()); }
  bool has(int64_t id) const;
  int64_t reserved_positions() const { return capacity_; }  // columns allocated per row

 private:
  struct Row {
    int64_t id;
    GenerationOptions o;
    at::Generator gen;
    torch::Tensor prompt;       // [1, L] long (the repetition penalty's "seen" ids)
    std::vector<int64_t> out;   // tokens produced
    int64_t len = 0;            // positions in the cache
    bool prefix = false;
  };
  int64_t pick(Row& r, torch::Tensor scores);  // scores [1, V] fp32 -> the next token
  bool done(const Row& r, int64_t token) const;
  void reserve(int64_t positions, const LlmCache& like);
  void remove_row(size_t i);

  CausalLMImpl& lm_;
  int64_t slots_;
  int64_t context_;
  int64_t capacity_ = 0;
  int64_t next_id_ = 0;
  std::vector<Row> rows_;
  std::vector<torch::Tensor> keys_, values_;  // per layer [slots, kv_heads, capacity_, head_dim]
};

}  // namespace blip2
