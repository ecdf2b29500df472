// Text generation with a CausalLM behind a prefix of embeddings (BLIP-2's projected queries):
// greedy, beam search and sampling, following transformers' `generate` step for step so the
// same settings give the same token ids:
//   - scores: logits -> repetition penalty -> min_new_tokens (EOS banned) -> [sampling:
//     temperature -> top-k -> top-p]; beam search applies the processors to log-softmax scores;
//   - beam search keeps 2 x num_beams candidates per step, finished hypotheses are scored
//     sum(log p) / new_tokens^length_penalty, and a batch row stops when its best running beam
//     can no longer beat its worst finished one (transformers' early_stopping=False heuristic);
//   - batched prompts are left-padded: `keep` marks the real tokens, positions count them only.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "blip2/models/llm/llm.h"

namespace blip2 {

struct GenerationOptions {
  int64_t num_beams = 5;
  int64_t max_new_tokens = 30;
  int64_t min_new_tokens = 1;
  double length_penalty = 1.0;
  double repetition_penalty = 1.0;  // > 1 discourages tokens already in the prompt or output
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 0;                // 0 = no top-k filter
  double top_p = 1.0;
  uint64_t seed = 0;                // sampling
  std::vector<int64_t> eos_token_ids;
  bool use_cache = true;            // false recomputes the whole sequence each step
  int64_t max_context = 0;          // prefix + prompt + new tokens may not exceed it (nor, in any
                                    // case, the LLM's max_position_embeddings; 0 = that alone)
  // The id the prefix positions stand for, as far as repetition_penalty goes: transformers
  // feeds <image> placeholder ids there and penalises them like prompt tokens (-1 = none).
  int64_t prefix_token_id = -1;
  // The loop never waits for the device to ask whether to stop: on a GPU the answer arrives
  // asynchronously, a step or two late (the extra steps change no output). On the CPU it is read
  // at once, or this many steps late (tests of the device's behaviour; >= 0; the CPU only).
  int64_t stop_check_delay = 0;

  // The text_config's generation settings (LAVIS captioning defaults unless the config says).
  static GenerationOptions from(const TextConfig& t);
};

struct GenerationStats {
  double prefill_s = 0;        // prefix + prompt through the model: time to the first token
  double decode_s = 0;         // the remaining steps
  int64_t new_tokens = 0;      // tokens produced over all rows (beam search: of the returned ones)
  int64_t steps = 0;           // decoding steps after the prefill
};

// prefix [B, P, H] (undefined = none); ids, keep [B, L] left-padded prompts (L may be 0).
// Returns each row's new tokens, ending with EOS when one was produced.
std::vector<std::vector<int64_t>> generate(CausalLMImpl& lm, const torch::Tensor& prefix,
                                           const torch::Tensor& ids, const torch::Tensor& keep,
                                           const GenerationOptions& o, GenerationStats* stats = nullptr);

// Beam search one step at a time (what generate() runs for num_beams > 1, with the same results):
// the constructor prefills, each step() scores one token for every beam and runs the model on
// the kept ones; a server interleaves a beam group with its other work this way.
class BeamSearch {
 public:
  BeamSearch(CausalLMImpl& lm, const torch::Tensor& prefix, const torch::Tensor& ids, const torch::Tensor& keep,
             const GenerationOptions& o);
  ~BeamSearch();
  BeamSearch(BeamSearch&&) noexcept;
  BeamSearch& operator=(BeamSearch&&) noexcept;
  bool step();  // true when finished (then result() holds each row's best hypothesis)
  bool done() const;
  std::vector<std::vector<int64_t>> result() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// The score processors, exposed for tests. seen [B, S] ids (seen_keep marks which count).
torch::Tensor apply_repetition_penalty(torch::Tensor scores, const torch::Tensor& seen,
                                       const torch::Tensor& seen_keep, double penalty);
torch::Tensor apply_top_k_top_p(torch::Tensor scores, int64_t top_k, double top_p);
// The next token of each row of processed fp32 scores [B, V]: argmax, or (do_sample) a draw from
// gen after temperature, top-k and top-p. [B] long.
torch::Tensor next_tokens(const torch::Tensor& scores, const GenerationOptions& o, at::Generator& gen);
// The generator sampling draws from, seeded with `seed`: the CPU's stream (transformers' on the
// CPU) or a clone of the device's own.
at::Generator sampling_generator(uint64_t seed, torch::Device d);
// Refuses options generate() cannot run (one line naming the option).
void check_generation_options(const GenerationOptions& o);
// Refuses a prefix + prompt + max_new_tokens beyond the positions a generation may use (the
// options' max_context, bounded by the LLM's max_position_embeddings), saying the counts.
void check_context(const TextConfig& llm, int64_t prefix, int64_t prompt, const GenerationOptions& o);

}  // namespace blip2
