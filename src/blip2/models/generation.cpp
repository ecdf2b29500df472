#include "blip2/models/generation.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <limits>

#include "blip2/util/common.h"

namespace blip2 {
namespace {

constexpr double kMasked = -1e9;  // transformers' "never pick" score in beam search

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The model's state while decoding: all embeddings so far (for use_cache = false), the keep mask
// over every position, the cache.
struct Decoder {
  CausalLMImpl& lm;
  bool use_cache;
  torch::Tensor embeds, keep;
  LlmCache cache;

  // First call: the whole prefix + prompt. Returns fp32 scores of the last position [N, V].
  torch::Tensor prefill(const torch::Tensor& e, const torch::Tensor& k) {
    embeds = e;
    keep = k;
    auto pos = positions_from_keep(keep, keep.size(1));
    return lm.forward(e, keep, pos, use_cache ? &cache : nullptr, true).select(1, 0).to(torch::kFloat32);
  }
  // One new token per row.
  torch::Tensor step(const torch::Tensor& tokens) {
    auto e = lm.embed(tokens.unsqueeze(1));
    keep = torch::cat({keep, torch::ones({keep.size(0), 1}, keep.options())}, 1);
    torch::Tensor out;
    if (use_cache) {
      out = lm.forward(e, keep, positions_from_keep(keep, 1), &cache, true);
    } else {
      embeds = torch::cat({embeds, e}, 1);
      out = lm.forward(embeds, keep, positions_from_keep(keep, keep.size(1)), nullptr, true);
    }
    return out.select(1, 0).to(torch::kFloat32);
  }
  void select_rows(const torch::Tensor& rows) {
    keep = keep.index_select(0, rows);
    if (use_cache) cache.select_rows(rows);
    else embeds = embeds.index_select(0, rows);
  }
};

torch::Tensor eos_tensor(const GenerationOptions& o, torch::Device d) {
  return torch::tensor(o.eos_token_ids, torch::TensorOptions().dtype(torch::kLong)).to(d);
}

// Scores of the step after `generated` new tokens: repetition penalty over prompt + output, and
// EOS banned before min_new_tokens.
torch::Tensor process(torch::Tensor scores, const torch::Tensor& prompt, const torch::Tensor& prompt_keep,
                      const torch::Tensor& out, int64_t generated, const GenerationOptions& o,
                      const torch::Tensor& eos) {
  if (o.repetition_penalty != 1.0) {
    auto seen = out.defined() && out.size(1) ? torch::cat({prompt, out.clamp_min(0)}, 1) : prompt;
    auto seen_keep = out.defined() && out.size(1)
                         ? torch::cat({prompt_keep, (out >= 0).to(torch::kLong)}, 1)
                         : prompt_keep;
    if (o.prefix_token_id >= 0) {
      seen = torch::cat({seen, torch::full({seen.size(0), 1}, o.prefix_token_id, seen.options())}, 1);
      seen_keep = torch::cat({seen_keep, torch::ones({seen.size(0), 1}, seen_keep.options())}, 1);
    }
    scores = apply_repetition_penalty(scores, seen, seen_keep, o.repetition_penalty);
  }
  if (generated < o.min_new_tokens && eos.numel())
    scores.index_fill_(1, eos, -std::numeric_limits<float>::infinity());
  return scores;
}

void check_options(const GenerationOptions& o) {
  check(o.num_beams >= 1, "generation: num_beams must be >= 1, got " + std::to_string(o.num_beams));
  check(o.max_new_tokens >= 1, "generation: max_new_tokens must be >= 1, got " + std::to_string(o.max_new_tokens));
  check(o.min_new_tokens >= 0 && o.min_new_tokens <= o.max_new_tokens,
        "generation: min_new_tokens must be in [0, max_new_tokens]");
  check(o.repetition_penalty > 0, "generation: repetition_penalty must be positive");
  check(o.temperature > 0, "generation: temperature must be positive");
  check(o.top_p > 0 && o.top_p <= 1, "generation: top_p must be in (0, 1]");
  check(!(o.do_sample && o.num_beams > 1),
        "generation: sampling with num_beams > 1 (beam sampling) is not supported; use num_beams 1");
}

std::vector<std::vector<int64_t>> greedy_or_sample(Decoder& dec, const torch::Tensor& ids,
                                                   const torch::Tensor& keep, torch::Tensor scores,
                                                   const GenerationOptions& o, GenerationStats* stats) {
  const int64_t b = ids.size(0);
  const auto dev = ids.device();
  auto eos = eos_tensor(o, dev);
  auto finished = torch::zeros({b}, torch::TensorOptions().dtype(torch::kBool).device(dev));
  auto out = torch::empty({b, 0}, ids.options());
  at::Generator gen;
  if (o.do_sample) gen = at::detail::createCPUGenerator(o.seed);
  const auto t0 = std::chrono::steady_clock::now();
  torch::Tensor fed;  // what the model saw last (finished rows keep decoding; their output is -1)
  for (int64_t t = 0; t < o.max_new_tokens; ++t) {
    if (t > 0) scores = dec.step(fed);
    scores = process(scores, ids, keep, out, t, o, eos);
    if (o.do_sample) {
      auto probs = torch::softmax(apply_top_k_top_p(scores / o.temperature, o.top_k, o.top_p), -1);
      fed = torch::multinomial(probs.cpu(), 1, false, gen).squeeze(1).to(dev);
    } else {
      fed = scores.argmax(-1);
    }
    auto emitted = torch::where(finished, torch::full_like(fed, -1), fed);
    out = torch::cat({out, emitted.unsqueeze(1)}, 1);
    if (eos.numel()) finished = finished | torch::isin(emitted, eos);
    if (finished.all().item<bool>()) break;
  }
  if (stats) {
    stats->decode_s += seconds_since(t0);
    stats->steps += out.size(1) - 1;
  }
  std::vector<std::vector<int64_t>> result(b);
  auto cpu = out.cpu();
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t t = 0; t < cpu.size(1); ++t) {
      int64_t tok = cpu[i][t].item<int64_t>();
      if (tok < 0) break;
      result[i].push_back(tok);
      if (std::find(o.eos_token_ids.begin(), o.eos_token_ids.end(), tok) != o.eos_token_ids.end()) break;
    }
  }
  return result;
}

std::vector<std::vector<int64_t>> beam_search(Decoder& dec, const torch::Tensor& ids,
                                              const torch::Tensor& keep, torch::Tensor logits,
                                              int64_t batch, const GenerationOptions& o,
                                              GenerationStats* stats) {
  const int64_t k = o.num_beams, k2 = 2 * k, n = o.max_new_tokens;
  const auto dev = logits.device();
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  const auto fopt = torch::TensorOptions().dtype(torch::kFloat32).device(dev);
  const auto bopt = torch::TensorOptions().dtype(torch::kBool).device(dev);
  auto eos = eos_tensor(o, dev);
  const int64_t vocab = logits.size(1);

  auto running = torch::zeros({batch, k, 0}, lopt);           // new tokens of each live beam
  auto running_scores = torch::full({batch, k}, kMasked, fopt);
  running_scores.select(1, 0).zero_();
  auto fin_tokens = torch::full({batch, k, n}, -1, lopt);      // the k best finished hypotheses
  auto fin_scores = torch::full({batch, k}, kMasked, fopt);
  auto fin_len = torch::zeros({batch, k}, lopt);
  auto is_fin = torch::zeros({batch, k}, bopt);
  auto improvable = torch::ones({batch}, bopt);
  auto top_k_mask = torch::cat({torch::ones({k}, bopt), torch::zeros({k}, bopt)});
  auto batch_offset = (torch::arange(batch, lopt) * k).unsqueeze(1);
  auto gather = [](const torch::Tensor& t, const torch::Tensor& idx) {  // t [B, M, ...], idx [B, K']
    auto index = idx;
    for (int64_t d = 2; d < t.dim(); ++d) index = index.unsqueeze(-1);
    std::vector<int64_t> shape = t.sizes().vec();
    shape[1] = idx.size(1);
    return t.gather(1, index.expand(shape));
  };
  const auto t0 = std::chrono::steady_clock::now();
  int64_t cur = 0;
  for (;;) {
    auto flat_out = running.reshape({batch * k, cur});
    auto logp = process(torch::log_softmax(logits, -1), ids, keep, flat_out, cur, o, eos);
    auto acc = (logp.view({batch, k, vocab}) + running_scores.unsqueeze(2)).view({batch, k * vocab});
    auto [top_scores, top_idx] = acc.topk(k2, 1);
    auto src_beam = top_idx.div(vocab, "floor");
    auto token = top_idx.remainder(vocab);
    auto cand = torch::cat({gather(running, src_beam), token.unsqueeze(2)}, 2);  // [B, 2K, cur+1]
    auto hits = eos.numel() ? torch::isin(token, eos) : torch::zeros_like(token, bopt);
    if (cur + 1 >= n) hits = torch::ones_like(hits);

    // Live beams: the best k candidates that did not just finish.
    auto live_scores = top_scores + hits.to(torch::kFloat32) * kMasked;
    auto next = std::get<1>(live_scores.topk(k, 1));
    running = gather(cand, next);
    running_scores = live_scores.gather(1, next);
    auto rows = (gather(src_beam, next) + batch_offset).reshape({-1});

    // Finished: candidates among the top k that hit EOS (or the length limit), length-normalised.
    auto just = hits & top_k_mask.unsqueeze(0);
    auto norm = top_scores / std::pow(static_cast<double>(cur + 1), o.length_penalty);
    norm = norm + improvable.logical_not().to(torch::kFloat32).unsqueeze(1) * kMasked;
    norm = norm + just.logical_not().to(torch::kFloat32) * kMasked;
    auto cand_padded = torch::full({batch, k2, n}, -1, lopt);
    cand_padded.narrow(2, 0, cur + 1).copy_(cand);
    auto merged_scores = torch::cat({fin_scores, norm}, 1);
    auto pick = std::get<1>(merged_scores.topk(k, 1));
    fin_tokens = gather(torch::cat({fin_tokens, cand_padded}, 1), pick);
    fin_scores = merged_scores.gather(1, pick);
    fin_len = torch::cat({fin_len, torch::full({batch, k2}, cur + 1, lopt)}, 1).gather(1, pick);
    is_fin = torch::cat({is_fin, just}, 1).gather(1, pick);

    ++cur;
    auto best_possible = running_scores.select(1, 0) / std::pow(static_cast<double>(cur), o.length_penalty);
    auto worst = torch::where(is_fin, std::get<0>(fin_scores.min(1, true)).expand({batch, k}),
                              torch::full({batch, k}, kMasked, fopt));
    improvable = improvable & (best_possible.unsqueeze(1) > worst).any(1);
    if (!improvable.any().item<bool>() || hits.all().item<bool>()) break;
    dec.select_rows(rows);
    logits = dec.step(running.select(2, cur - 1).reshape({-1}));
  }
  if (stats) {
    stats->decode_s += seconds_since(t0);
    stats->steps += cur - 1;
  }
  std::vector<std::vector<int64_t>> result(batch);
  auto tok = fin_tokens.select(1, 0).cpu();
  auto len = fin_len.select(1, 0).cpu();
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t t = 0; t < len[i].item<int64_t>(); ++t) result[i].push_back(tok[i][t].item<int64_t>());
  return result;
}

}  // namespace

GenerationOptions GenerationOptions::from(const TextConfig& t) {
  GenerationOptions o;
  o.num_beams = t.num_beams;
  o.max_new_tokens = t.max_new_tokens;
  o.min_new_tokens = t.min_new_tokens;
  o.length_penalty = t.length_penalty;
  o.repetition_penalty = t.repetition_penalty;
  o.do_sample = t.do_sample;
  o.temperature = t.temperature;
  o.top_k = t.top_k;
  o.top_p = t.top_p;
  o.eos_token_ids = {t.eos_token_id};
  o.use_cache = t.use_past;
  o.max_context = std::min(t.max_position_embeddings, t.max_decode_length);
  o.prefix_token_id = t.image_token_id;
  return o;
}

torch::Tensor apply_repetition_penalty(torch::Tensor scores, const torch::Tensor& seen,
                                       const torch::Tensor& seen_keep, double penalty) {
  const int64_t vocab = scores.size(1);
  // Padding scatters into a spare column that is dropped.
  auto idx = torch::where(seen_keep.to(torch::kBool), seen, torch::full_like(seen, vocab));
  auto mask = torch::zeros({scores.size(0), vocab + 1}, scores.options().dtype(torch::kBool));
  mask.scatter_(1, idx, true);
  mask = mask.narrow(1, 0, vocab);
  auto penalised = torch::where(scores < 0, scores * penalty, scores / penalty);
  return torch::where(mask, penalised, scores);
}

torch::Tensor apply_top_k_top_p(torch::Tensor scores, int64_t top_k, double top_p) {
  const float ninf = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < scores.size(1)) {
    auto kth = std::get<0>(scores.topk(top_k, 1)).narrow(1, top_k - 1, 1);
    scores = scores.masked_fill(scores < kth, ninf);
  }
  if (top_p < 1.0) {
    auto [sorted, order] = scores.sort(1, /*descending=*/false);
    auto cum = sorted.softmax(-1).cumsum(-1);
    auto remove = cum <= (1 - top_p);
    remove.select(1, remove.size(1) - 1).fill_(false);  // keep at least the most likely token
    scores = scores.masked_fill(remove.scatter(1, order, remove), ninf);
  }
  return scores;
}

std::vector<std::vector<int64_t>> generate(CausalLMImpl& lm, const torch::Tensor& prefix,
                                           const torch::Tensor& ids, const torch::Tensor& keep,
                                           const GenerationOptions& o, GenerationStats* stats) {
  check_options(o);
  torch::NoGradGuard no_grad;
  check(ids.dim() == 2 && keep.sizes() == ids.sizes(), "generation: ids and keep must both be [batch, length]");
  const int64_t b = ids.size(0);
  const int64_t p = prefix.defined() ? prefix.size(1) : 0;
  check(p + ids.size(1) > 0, "generation: nothing to condition on (no prefix and an empty prompt)");
  // The LLM's positions bound the context whatever the options say (OPT's are a table).
  const int64_t context = o.max_context > 0 ? std::min(o.max_context, lm.config.max_position_embeddings)
                                            : lm.config.max_position_embeddings;
  if (p + ids.size(1) + o.max_new_tokens > context)
    throw Error("generation: " + std::to_string(p) + " image queries + a prompt of " +
                std::to_string(ids.size(1)) + " tokens + max_new_tokens " +
                std::to_string(o.max_new_tokens) + " exceed the model's context of " +
                std::to_string(context) + " positions");
  auto e = lm.embed(ids);
  auto k = keep.to(torch::kLong);
  if (p) {
    check(prefix.size(0) == b, "generation: prefix and prompts differ in batch size");
    e = torch::cat({prefix.to(e.scalar_type()), e}, 1);
    k = torch::cat({torch::ones({b, p}, k.options()), k}, 1);
  }
  auto prompt = ids.to(torch::kLong);
  auto prompt_keep = keep.to(torch::kLong);
  GenerationOptions opts = o;
  if (!p) opts.prefix_token_id = -1;
  if (o.num_beams > 1) {  // every row becomes num_beams rows
    auto rows = torch::arange(b, prompt.options()).repeat_interleave(o.num_beams);
    e = e.index_select(0, rows);
    k = k.index_select(0, rows);
    prompt = prompt.index_select(0, rows);
    prompt_keep = prompt_keep.index_select(0, rows);
  }
  Decoder dec{lm, o.use_cache, {}, {}, {}};
  const auto t0 = std::chrono::steady_clock::now();
  auto scores = dec.prefill(e, k);
  if (stats) stats->prefill_s += seconds_since(t0);
  auto out = o.num_beams > 1 ? beam_search(dec, prompt, prompt_keep, scores, b, opts, stats)
                             : greedy_or_sample(dec, prompt, prompt_keep, scores, opts, stats);
  if (stats)
    for (const auto& r : out) stats->new_tokens += static_cast<int64_t>(r.size());
  return out;
}

}  // namespace blip2
