#include "blip2/models/generation.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <chrono>
#include <deque>
#include <limits>
#include <optional>

#include "blip2/util/common.h"

namespace blip2 {
namespace {

constexpr double kMasked = -1e9;  // transformers' "never pick" score in beam search

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The model's state while decoding. With the cache, every position the generation can reach is
// reserved up front: keys/values are written in place, the keep mask and the step mask are built
// once and sliced, the next position is a device counter; no step reads anything on the host.
// Without it (use_cache = false), all embeddings so far go through the model each step.
struct Decoder {
  CausalLMImpl& lm;
  bool use_cache;
  torch::Tensor embeds;  // use_cache = false: every embedding so far
  torch::Tensor keep;    // [N, capacity]: the prompt's keep mask, then ones
  torch::Tensor next;    // [N, 1] position of the next token
  int64_t len = 0;       // positions so far
  LlmCache cache;

  // First call: the whole prefix + prompt, room for `capacity` positions in all. Returns fp32
  // scores of the last position [N, V].
  torch::Tensor prefill(const torch::Tensor& e, const torch::Tensor& k, int64_t capacity) {
    embeds = e;
    len = k.size(1);
    keep = torch::cat({k, torch::ones({k.size(0), capacity - len}, k.options())}, 1);
    next = k.sum(1, /*keepdim=*/true);
    if (use_cache) {
      cache.capacity = capacity;
      cache.unpadded = k.all().item<bool>();  // once, before the loop
      if (!cache.unpadded) cache.step_mask = causal_mask(keep, 1, e.scalar_type());  // [N, 1, 1, capacity]
    }
    auto pos = positions_from_keep(k, len);
    return lm.forward(e, k, pos, use_cache ? &cache : nullptr, true).select(1, 0).to(torch::kFloat32);
  }
  // One new token per row.
  torch::Tensor step(const torch::Tensor& tokens) {
    auto e = lm.embed(tokens.unsqueeze(1));
    ++len;
    auto k = keep.narrow(1, 0, len);
    torch::Tensor out;
    if (use_cache) {
      out = lm.forward(e, k, next, &cache, true);
    } else {
      embeds = torch::cat({embeds, e}, 1);
      out = lm.forward(embeds, k, positions_from_keep(k, len), nullptr, true);
    }
    next = next + 1;
    return out.select(1, 0).to(torch::kFloat32);
  }
  void select_rows(const torch::Tensor& rows) {
    keep = keep.index_select(0, rows);
    next = next.index_select(0, rows);
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

}  // namespace

void check_generation_options(const GenerationOptions& o) {
  check(o.num_beams >= 1, "generation: num_beams must be >= 1, got " + std::to_string(o.num_beams));
  check(o.max_new_tokens >= 1, "generation: max_new_tokens must be >= 1, got " + std::to_string(o.max_new_tokens));
  check(o.min_new_tokens >= 0 && o.min_new_tokens <= o.max_new_tokens,
        "generation: min_new_tokens must be in [0, max_new_tokens]");
  check(o.repetition_penalty > 0, "generation: repetition_penalty must be positive");
  check(o.temperature > 0, "generation: temperature must be positive");
  check(o.top_p > 0 && o.top_p <= 1, "generation: top_p must be in (0, 1]");
  check(o.stop_check_delay >= 0, "generation: stop_check_delay must be >= 0");
  check(!(o.do_sample && o.num_beams > 1),
        "generation: sampling with num_beams > 1 (beam sampling) is not supported; use num_beams 1");
}

namespace {

// "Stop now?" (every row finished) read without waiting for the device: each step's answer is
// copied to pinned host memory behind an event, and the loop acts on the newest answer that has
// arrived, a step or two late. That costs nothing but those steps: a finished row emits nothing,
// and beam search adds no hypothesis once it is done. On the CPU there is nothing to wait for and
// the answer is read at once, or `delay` steps late (to test the device's behaviour).
class StopFlag {
 public:
  StopFlag(torch::Device d, int64_t delay) : device_(d), delay_(delay) {
    if (d.is_cpu()) return;
    host_ = torch::zeros({1}, torch::TensorOptions().dtype(torch::kBool).pinned_memory(true));
    event_.emplace(d.type());
  }
  void post(const torch::Tensor& stop) {  // a bool tensor: stop when all are true
    if (device_.is_cpu()) {
      queue_.push_back(stop.all());
      if (static_cast<int64_t>(queue_.size()) > delay_) {
        done_ = queue_.front().item<bool>();
        queue_.pop_front();
      }
      return;
    }
    if (pending_) return;  // the last answer has not arrived yet: keep that one in flight
    host_.copy_(stop.all().reshape({1}), /*non_blocking=*/true);
    event_->record(c10::impl::getDeviceGuardImpl(device_.type())->getStream(device_));
    pending_ = true;
  }
  bool done() {
    if (pending_ && event_->query()) {
      pending_ = false;
      done_ = host_.data_ptr<bool>()[0];
    }
    return done_;
  }

 private:
  torch::Device device_;
  int64_t delay_;
  std::deque<torch::Tensor> queue_;
  torch::Tensor host_;
  std::optional<c10::Event> event_;
  bool pending_ = false, done_ = false;
};


std::vector<std::vector<int64_t>> greedy_or_sample(Decoder& dec, const torch::Tensor& ids,
                                                   const torch::Tensor& keep, torch::Tensor scores,
                                                   const GenerationOptions& o, GenerationStats* stats) {
  const int64_t b = ids.size(0);
  const auto dev = ids.device();
  auto eos = eos_tensor(o, dev);
  auto finished = torch::zeros({b}, torch::TensorOptions().dtype(torch::kBool).device(dev));
  auto out = torch::full({b, o.max_new_tokens}, -1, ids.options());  // -1: nothing (finished)
  at::Generator gen;
  if (o.do_sample) gen = sampling_generator(o.seed, dev);
  StopFlag all_done(dev, o.stop_check_delay);
  const auto t0 = std::chrono::steady_clock::now();
  torch::Tensor fed;  // what the model saw last (finished rows keep decoding; their output is -1)
  int64_t t = 0;
  for (; t < o.max_new_tokens; ++t) {
    if (t > 0) {
      if (all_done.done()) break;
      scores = dec.step(fed);
    }
    scores = process(scores, ids, keep, out.narrow(1, 0, t), t, o, eos);
    fed = next_tokens(scores, o, gen);
    auto emitted = torch::where(finished, torch::full_like(fed, -1), fed);
    out.select(1, t).copy_(emitted);
    if (eos.numel()) {
      finished = finished | torch::isin(emitted, eos);
      all_done.post(finished);
    }
  }
  if (stats) {
    stats->decode_s += seconds_since(t0);
    stats->steps += t - 1;
  }
  std::vector<std::vector<int64_t>> result(b);
  auto cpu = out.narrow(1, 0, t).cpu().contiguous();
  const auto* p = cpu.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < t; ++j) {
      const int64_t tok = p[i * t + j];
      if (tok < 0) break;
      result[i].push_back(tok);
      if (std::find(o.eos_token_ids.begin(), o.eos_token_ids.end(), tok) != o.eos_token_ids.end()) break;
    }
  }
  return result;
}

// Beam search, one token per call of advance(): its state between steps (what beam_search kept
// in locals), so that a server can interleave a beam group with other work.
struct BeamState {
  Decoder dec;
  torch::Tensor ids, keep, logits;  // prompts [B*K, L] and the next step's logits [B*K, V]
  int64_t batch, k, k2, n, vocab;
  GenerationOptions o;
  torch::Tensor eos, running, running_scores, fin_tokens, fin_scores, fin_len, is_fin, improvable, top_k_mask,
      batch_offset;
  StopFlag stop;
  int64_t cur = 0;
  bool finished = false;

  BeamState(Decoder d, torch::Tensor ids_, torch::Tensor keep_, torch::Tensor logits_, int64_t b,
            const GenerationOptions& opts)
      : dec(std::move(d)), ids(std::move(ids_)), keep(std::move(keep_)), logits(std::move(logits_)), batch(b),
        k(opts.num_beams), k2(2 * opts.num_beams), n(opts.max_new_tokens), vocab(logits.size(1)), o(opts),
        stop(logits.device(), opts.stop_check_delay) {
    const auto dev = logits.device();
    const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
    const auto fopt = torch::TensorOptions().dtype(torch::kFloat32).device(dev);
    const auto bopt = torch::TensorOptions().dtype(torch::kBool).device(dev);
    eos = eos_tensor(o, dev);
    running = torch::zeros({batch, k, 0}, lopt);           // new tokens of each live beam
    running_scores = torch::full({batch, k}, kMasked, fopt);
    running_scores.select(1, 0).zero_();
    fin_tokens = torch::full({batch, k, n}, -1, lopt);      // the k best finished hypotheses
    fin_scores = torch::full({batch, k}, kMasked, fopt);
    fin_len = torch::zeros({batch, k}, lopt);
    is_fin = torch::zeros({batch, k}, bopt);
    improvable = torch::ones({batch}, bopt);
    top_k_mask = torch::cat({torch::ones({k}, bopt), torch::zeros({k}, bopt)});
    batch_offset = (torch::arange(batch, lopt) * k).unsqueeze(1);
  }

  static torch::Tensor gather(const torch::Tensor& t, const torch::Tensor& idx) {  // t [B, M, ...], idx [B, K']
    auto index = idx;
    for (int64_t d = 2; d < t.dim(); ++d) index = index.unsqueeze(-1);
    std::vector<int64_t> shape = t.sizes().vec();
    shape[1] = idx.size(1);
    return t.gather(1, index.expand(shape));
  }

  // Scores the candidates of the current logits, keeps the best beams and finished hypotheses,
  // then (unless done) runs the model one step on the kept beams. True when done.
  bool advance() {
    if (finished) return true;
    const auto dev = logits.device();
    const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
    const auto fopt = torch::TensorOptions().dtype(torch::kFloat32).device(dev);
    const auto bopt = torch::TensorOptions().dtype(torch::kBool).device(dev);
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
    stop.post(improvable.any().logical_not() | hits.all());
    if (cur >= n || stop.done()) return finished = true;
    dec.select_rows(rows);
    logits = dec.step(running.select(2, cur - 1).reshape({-1}));
    return false;
  }

  std::vector<std::vector<int64_t>> result() const {
    std::vector<std::vector<int64_t>> out(batch);
    auto tok = fin_tokens.select(1, 0).cpu();
    auto len = fin_len.select(1, 0).cpu();
    for (int64_t i = 0; i < batch; ++i)
      for (int64_t t = 0; t < len[i].item<int64_t>(); ++t) out[i].push_back(tok[i][t].item<int64_t>());
    return out;
  }
};

// The model's inputs for a generation: prefix + prompt embeddings and keep mask, each row
// repeated num_beams times for beam search; the prompt ids the repetition penalty sees.
struct Prepared {
  torch::Tensor embeds, keep, prompt, prompt_keep;
  GenerationOptions opts;
  int64_t batch = 0;
};

Prepared prepare(CausalLMImpl& lm, const torch::Tensor& prefix, const torch::Tensor& ids, const torch::Tensor& keep,
                 const GenerationOptions& o) {
  check_generation_options(o);
  check(ids.dim() == 2 && keep.sizes() == ids.sizes(), "generation: ids and keep must both be [batch, length]");
  check(o.stop_check_delay == 0 || ids.device().is_cpu(),
        "generation: stop_check_delay is for the CPU (a device's stop test is read asynchronously already)");
  Prepared r;
  r.batch = ids.size(0);
  const int64_t b = r.batch;
  const int64_t p = prefix.defined() ? prefix.size(1) : 0;
  check(p + ids.size(1) > 0, "generation: nothing to condition on (no prefix and an empty prompt)");
  check_context(lm.config, p, ids.size(1), o);
  auto e = lm.embed(ids);
  auto k = keep.to(torch::kLong);
  if (p) {
    check(prefix.size(0) == b, "generation: prefix and prompts differ in batch size");
    e = torch::cat({prefix.to(e.scalar_type()), e}, 1);
    k = torch::cat({torch::ones({b, p}, k.options()), k}, 1);
  }
  r.prompt = ids.to(torch::kLong);
  r.prompt_keep = keep.to(torch::kLong);
  r.opts = o;
  if (!p) r.opts.prefix_token_id = -1;
  if (o.num_beams > 1) {  // every row becomes num_beams rows
    auto rows = torch::arange(b, r.prompt.options()).repeat_interleave(o.num_beams);
    e = e.index_select(0, rows);
    k = k.index_select(0, rows);
    r.prompt = r.prompt.index_select(0, rows);
    r.prompt_keep = r.prompt_keep.index_select(0, rows);
  }
  r.embeds = e;
  r.keep = k;
  return r;
}

}  // namespace

void check_context(const TextConfig& llm, int64_t prefix, int64_t prompt, const GenerationOptions& o) {
  // The LLM's positions bound the context whatever the options say (OPT's are a table).
  const int64_t context = o.max_context > 0 ? std::min(o.max_context, llm.max_position_embeddings)
                                            : llm.max_position_embeddings;
  if (prefix + prompt + o.max_new_tokens > context)
    throw Error("generation: " + std::to_string(prefix) + " image queries + a prompt of " + std::to_string(prompt) +
                " tokens + max_new_tokens " + std::to_string(o.max_new_tokens) + " exceed the model's context of " +
                std::to_string(context) + " positions");
}

torch::Tensor next_tokens(const torch::Tensor& scores, const GenerationOptions& o, at::Generator& gen) {
  if (!o.do_sample) return scores.argmax(-1);
  auto probs = torch::softmax(apply_top_k_top_p(scores / o.temperature, o.top_k, o.top_p), -1);
  return torch::multinomial(probs, 1, false, gen).squeeze(1);
}

at::Generator sampling_generator(uint64_t seed, torch::Device d) {
  if (d.is_cpu()) return at::detail::createCPUGenerator(seed);
  auto g = at::globalContext().defaultGenerator(d).clone();
  g.set_current_seed(seed);
  return g;
}

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
  torch::NoGradGuard no_grad;
  auto in = prepare(lm, prefix, ids, keep, o);
  Decoder dec{lm, o.use_cache, {}, {}, {}, 0, {}};
  const auto t0 = std::chrono::steady_clock::now();
  auto scores = dec.prefill(in.embeds, in.keep, in.embeds.size(1) + o.max_new_tokens);
  if (stats) stats->prefill_s += seconds_since(t0);
  std::vector<std::vector<int64_t>> out;
  if (o.num_beams > 1) {
    const auto t1 = std::chrono::steady_clock::now();
    BeamState beams(std::move(dec), in.prompt, in.prompt_keep, scores, in.batch, in.opts);
    while (!beams.advance()) {
    }
    if (stats) {
      stats->decode_s += seconds_since(t1);
      stats->steps += beams.cur - 1;
    }
    out = beams.result();
  } else {
    out = greedy_or_sample(dec, in.prompt, in.prompt_keep, scores, in.opts, stats);
  }
  if (stats)
    for (const auto& r : out) stats->new_tokens += static_cast<int64_t>(r.size());
  return out;
}

struct BeamSearch::State {
  std::optional<BeamState> beams;
};

BeamSearch::BeamSearch(CausalLMImpl& lm, const torch::Tensor& prefix, const torch::Tensor& ids,
                       const torch::Tensor& keep, const GenerationOptions& o)
    : s_(std::make_unique<State>()) {
  check(o.num_beams > 1, "beam search: num_beams must be > 1");
  torch::NoGradGuard no_grad;
  auto in = prepare(lm, prefix, ids, keep, o);
  Decoder dec{lm, o.use_cache, {}, {}, {}, 0, {}};
  auto scores = dec.prefill(in.embeds, in.keep, in.embeds.size(1) + o.max_new_tokens);
  s_->beams.emplace(std::move(dec), in.prompt, in.prompt_keep, scores, in.batch, in.opts);
}

BeamSearch::~BeamSearch() = default;
BeamSearch::BeamSearch(BeamSearch&&) noexcept = default;
BeamSearch& BeamSearch::operator=(BeamSearch&&) noexcept = default;

bool BeamSearch::step() {
  torch::NoGradGuard no_grad;
  return s_->beams->advance();
}

bool BeamSearch::done() const { return s_->beams->finished; }

std::vector<std::vector<int64_t>> BeamSearch::result() const { return s_->beams->result(); }

}  // namespace blip2
