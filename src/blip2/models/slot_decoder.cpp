#include "blip2/models/slot_decoder.h"

#include <algorithm>
#include <limits>

#include "blip2/util/common.h"

namespace blip2 {

SlotDecoder::SlotDecoder(CausalLMImpl& lm, int64_t slots)
    : lm_(lm), slots_(slots), context_(lm.config.max_position_embeddings) {
  check(slots >= 1, "slot decoder: slots must be >= 1, got " + std::to_string(slots));
}

bool SlotDecoder::has(int64_t id) const {
  return std::any_of(rows_.begin(), rows_.end(), [&](const Row& r) { return r.id == id; });
}

void SlotDecoder::reserve(int64_t positions, const LlmCache& like) {
  if (positions <= capacity_ && !keys_.empty()) return;
  const int64_t cap = std::min(context_, std::max<int64_t>(positions, 2 * capacity_));
  std::vector<torch::Tensor> keys, values;
  for (size_t l = 0; l < like.layers.size(); ++l) {
    auto shape = like.layers[l].key.sizes().vec();  // [1, kv_heads, T, D]
    shape[0] = slots_;
    shape[2] = cap;
    // Zeros, not empty: the columns a row has not written are masked, and must be finite.
    keys.push_back(torch::zeros(shape, like.layers[l].key.options()));
    values.push_back(torch::zeros(shape, like.layers[l].value.options()));
    if (capacity_ > 0) {
      keys.back().narrow(2, 0, capacity_).copy_(keys_[l]);
      values.back().narrow(2, 0, capacity_).copy_(values_[l]);
    }
  }
  keys_ = std::move(keys);
  values_ = std::move(values);
  capacity_ = cap;
}

bool SlotDecoder::done(const Row& r, int64_t token) const {
  const auto& eos = r.o.eos_token_ids;
  return static_cast<int64_t>(r.out.size()) >= r.o.max_new_tokens ||
         std::find(eos.begin(), eos.end(), token) != eos.end();
}

int64_t SlotDecoder::pick(Row& r, torch::Tensor scores) {
  // generate()'s processors for one row: repetition penalty over prompt + output (+ the prefix's
  // placeholder id), EOS banned before min_new_tokens, then sampling or argmax.
  const auto& o = r.o;
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(scores.device());
  if (o.repetition_penalty != 1.0) {
    std::vector<int64_t> seen_v(r.out);
    if (r.prefix && o.prefix_token_id >= 0) seen_v.push_back(o.prefix_token_id);
    auto seen = torch::cat({r.prompt, torch::tensor(seen_v, lopt.device(torch::kCPU)).to(scores.device()).view({1, -1})}, 1);
    scores = apply_repetition_penalty(scores, seen, torch::ones_like(seen), o.repetition_penalty);
  }
  if (static_cast<int64_t>(r.out.size()) < o.min_new_tokens && !o.eos_token_ids.empty())
    scores.index_fill_(1, torch::tensor(o.eos_token_ids, lopt.device(torch::kCPU)).to(scores.device()),
                       -std::numeric_limits<float>::infinity());
  const int64_t t = next_tokens(scores, o, r.gen)[0].item<int64_t>();
  r.out.push_back(t);
  return t;
}

SlotDecoder::Emit SlotDecoder::admit(const torch::Tensor& prefix, const std::vector<int64_t>& prompt,
                                     const GenerationOptions& o) {
  return admit_group(prefix, {prompt}, {o})[0];
}

std::vector<SlotDecoder::Emit> SlotDecoder::admit_group(const torch::Tensor& prefix,
                                                        const std::vector<std::vector<int64_t>>& prompts,
                                                        const std::vector<GenerationOptions>& options) {
  const auto k = static_cast<int64_t>(prompts.size());
  check(k >= 1 && options.size() == prompts.size(), "slot decoder: one option set per prompt");
  check(!prefix.defined() || prefix.size(0) == k, "slot decoder: one prefix row per prompt");
  check(active() + k <= slots_, "slot decoder: " + std::to_string(k) + " sequences do not fit in the " +
                                    std::to_string(slots_ - active()) + " free slots");
  const int64_t p = prefix.defined() ? prefix.size(1) : 0;
  const auto l = static_cast<int64_t>(prompts[0].size());
  check(p + l > 0, "generation: nothing to condition on (no prefix and an empty prompt)");
  int64_t need = 0;
  for (const auto& o : options) {
    check_generation_options(o);
    check(o.num_beams == 1, "slot decoder: num_beams must be 1 (beam search runs through generate)");
    check_context(lm_.config, p, l, o);
    need = std::max(need, p + l + o.max_new_tokens);
  }
  std::vector<int64_t> flat;
  for (const auto& pr : prompts) {
    check(static_cast<int64_t>(pr.size()) == l, "slot decoder: prompts prefilled together must have one length");
    flat.insert(flat.end(), pr.begin(), pr.end());
  }
  torch::NoGradGuard no_grad;
  const auto dev = lm_.parameters().front().device();
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  auto ids = torch::tensor(flat, lopt.device(torch::kCPU)).to(dev).view({k, l});
  auto e = lm_.embed(ids);
  if (p) e = torch::cat({prefix.to(e.scalar_type()), e}, 1);
  auto keep = torch::ones({k, p + l}, lopt);
  // As generate()'s prefill: nothing is padded (equal lengths), so no mask.
  LlmCache cache;
  cache.capacity = p + l;
  cache.unpadded = true;
  auto scores = lm_.forward(e, keep, positions_from_keep(keep, p + l), &cache, true).select(1, 0).to(torch::kFloat32);
  reserve(need, cache);
  std::vector<Emit> out;
  for (int64_t i = 0; i < k; ++i) {
    const auto row = static_cast<int64_t>(rows_.size());
    for (size_t j = 0; j < cache.layers.size(); ++j) {
      keys_[j].select(0, row).narrow(1, 0, p + l).copy_(cache.layers[j].key.select(0, i));
      values_[j].select(0, row).narrow(1, 0, p + l).copy_(cache.layers[j].value.select(0, i));
    }
    const auto& o = options[static_cast<size_t>(i)];
    Row r{next_id_++, o, {}, ids.narrow(0, i, 1), {}, p + l, p > 0};
    if (o.do_sample) r.gen = sampling_generator(o.seed, dev);
    int64_t t = -1;
    try {
      t = pick(r, scores.narrow(0, i, 1));
    } catch (const std::exception& ex) {  // this sequence alone fails
      out.push_back({r.id, -1, true, first_line(ex.what())});
      continue;
    }
    const bool fin = done(r, t);
    out.push_back({r.id, t, fin, {}});
    if (!fin) rows_.push_back(std::move(r));
  }
  return out;
}

std::vector<SlotDecoder::Emit> SlotDecoder::step() {
  std::vector<Emit> out;
  if (rows_.empty()) return out;
  torch::NoGradGuard no_grad;
  const int64_t n = active();
  const auto dev = keys_[0].device();
  const auto lopt = torch::TensorOptions().dtype(torch::kLong);
  std::vector<int64_t> fed(n), pos(n);
  int64_t span = 0;
  for (int64_t i = 0; i < n; ++i) {
    fed[i] = rows_[i].out.back();
    pos[i] = rows_[i].len;
    span = std::max(span, rows_[i].len + 1);
  }
  auto tokens = torch::tensor(fed, lopt).to(dev).view({n, 1});
  auto write_pos = torch::tensor(pos, lopt).to(dev);
  auto keep = (torch::arange(span, lopt.device(dev)).unsqueeze(0) <= write_pos.unsqueeze(1)).to(torch::kLong);
  LlmCache cache;
  cache.layers.resize(keys_.size());
  for (size_t l = 0; l < keys_.size(); ++l) {
    auto& c = cache.layers[l];
    c.key = keys_[l].narrow(0, 0, n);
    c.value = values_[l].narrow(0, 0, n);
    c.capacity = capacity_;
    c.write_pos = write_pos;
    c.span = span;
  }
  auto scores = lm_.forward(lm_.embed(tokens), keep, write_pos.view({n, 1}), &cache, true)
                    .select(1, 0)
                    .to(torch::kFloat32);
  // Plain greedy rows (no penalty, past min_new_tokens) take one batched argmax and one copy to
  // the host; the others go through their processors one by one.
  std::vector<int64_t> plain;
  for (int64_t i = 0; i < n; ++i) {
    const auto& o = rows_[i].o;
    if (!o.do_sample && o.repetition_penalty == 1.0 &&
        static_cast<int64_t>(rows_[i].out.size()) >= o.min_new_tokens)
      plain.push_back(i);
  }
  std::vector<int64_t> greedy(static_cast<size_t>(n), -1);
  if (!plain.empty()) {
    auto idx = torch::tensor(plain, lopt).to(dev);
    auto best = scores.index_select(0, idx).argmax(-1).cpu().contiguous();
    const auto* b = best.data_ptr<int64_t>();
    for (size_t k = 0; k < plain.size(); ++k) greedy[static_cast<size_t>(plain[k])] = b[k];
  }
  std::vector<size_t> finished;
  for (int64_t i = 0; i < n; ++i) {
    auto& r = rows_[i];
    ++r.len;
    int64_t t = greedy[static_cast<size_t>(i)];
    try {
      if (t >= 0) r.out.push_back(t);
      else t = pick(r, scores.narrow(0, i, 1));
    } catch (const std::exception& e) {  // e.g. non-finite probabilities: this row alone leaves
      out.push_back({r.id, -1, true, first_line(e.what())});
      finished.push_back(static_cast<size_t>(i));
      continue;
    }
    const bool fin = done(r, t);
    out.push_back({r.id, t, fin, {}});
    if (fin) finished.push_back(static_cast<size_t>(i));
  }
  for (auto it = finished.rbegin(); it != finished.rend(); ++it) remove_row(*it);
  return out;
}

void SlotDecoder::remove_row(size_t i) {
  const size_t last = rows_.size() - 1;
  if (i != last) {  // the last row moves into the freed one: rows stay packed at [0, active)
    const int64_t len = rows_[last].len;
    for (size_t l = 0; l < keys_.size(); ++l) {
      keys_[l].select(0, static_cast<int64_t>(i)).narrow(1, 0, len).copy_(
          keys_[l].select(0, static_cast<int64_t>(last)).narrow(1, 0, len));
      values_[l].select(0, static_cast<int64_t>(i)).narrow(1, 0, len).copy_(
          values_[l].select(0, static_cast<int64_t>(last)).narrow(1, 0, len));
    }
    rows_[i] = std::move(rows_[last]);
  }
  rows_.pop_back();
}

void SlotDecoder::release(int64_t id) {
  for (size_t i = 0; i < rows_.size(); ++i)
    if (rows_[i].id == id) return remove_row(i);
}

}  // namespace blip2
