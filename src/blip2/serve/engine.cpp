#include "blip2/serve/engine.h"

#include <set>

#include "blip2/serve/openai.h"
#include "blip2/util/common.h"

namespace blip2::serve {

Engine::Engine(EngineOptions options, Metrics& metrics) : options_(options), metrics_(metrics) {
  check(options_.max_batch >= 1, "serve: --max-batch must be >= 1");
  check(options_.max_queue >= 1, "serve: --max-queue must be >= 1");
}

Engine::~Engine() { stop(); }

void Engine::start(std::optional<Blip2GenerationModel> text_model, std::optional<Blip2Model> stage1_model) {
  text_ = std::move(text_model);
  stage1_ = std::move(stage1_model);
  if (text_) decoder_ = std::make_unique<SlotDecoder>(*text_->module()->language_model, options_.max_batch);
  thread_ = std::thread([this] { loop(); });
}

bool Engine::submit(std::shared_ptr<GenJob> job) {
  check(job->n >= 1 && job->n <= options_.max_batch, "serve: a request's n must be in [1, max_batch]");
  {
    std::lock_guard<std::mutex> lock(m_);
    if (stopping_ || static_cast<int64_t>(gen_queue_.size() + stage1_queue_.size()) >= options_.max_queue) return false;
    job->choices.resize(static_cast<size_t>(job->n));
    gen_queue_.push_back(std::move(job));
    metrics_.set_queue(static_cast<int64_t>(gen_queue_.size() + stage1_queue_.size()));
  }
  cv_.notify_one();
  return true;
}

std::optional<std::future<nlohmann::json>> Engine::submit(torch::Tensor images, Stage1Fn fn) {
  auto job = std::make_shared<Stage1Job>();
  job->images = std::move(images);
  job->fn = std::move(fn);
  auto fut = job->result.get_future();
  {
    std::lock_guard<std::mutex> lock(m_);
    if (stopping_ || static_cast<int64_t>(gen_queue_.size() + stage1_queue_.size()) >= options_.max_queue)
      return std::nullopt;
    stage1_queue_.push_back(std::move(job));
    metrics_.set_queue(static_cast<int64_t>(gen_queue_.size() + stage1_queue_.size()));
  }
  cv_.notify_one();
  return fut;
}

void Engine::abort(const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(m_);
    stopping_ = true;
    abort_ = message;
  }
  cv_.notify_all();
}

void Engine::fail_everything(const std::string& message) {
  std::deque<std::shared_ptr<GenJob>> queued;
  std::deque<std::shared_ptr<Stage1Job>> queued1;
  {
    std::lock_guard<std::mutex> lock(m_);
    queued.swap(gen_queue_);
    queued1.swap(stage1_queue_);
  }
  for (const auto& j : queued) fail(j, message, 503);
  for (const auto& j : queued1) j->result.set_exception(std::make_exception_ptr(ApiError(503, message)));
  for (auto& [id, a] : active_) {
    decoder_->release(id);
    fail(a.job, message, 503);
  }
  active_.clear();
  for (auto& [job, search] : beams_) fail(job, message, 503);
  beams_.clear();
}

// Frees the rows and beam groups of requests whose client went away.
void Engine::drop_cancelled() {
  std::set<GenJob*> dropped;
  for (auto it = active_.begin(); it != active_.end();) {
    if (it->second.job->cancelled) {
      dropped.insert(it->second.job.get());
      decoder_->release(it->first);
      it = active_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = beams_.begin(); it != beams_.end();) {
    if (it->first->cancelled) {
      dropped.insert(it->first.get());
      it = beams_.erase(it);
    } else {
      ++it;
    }
  }
  if (!dropped.empty()) metrics_.cancelled(static_cast<int64_t>(dropped.size()));
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lock(m_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int64_t Engine::queue_length() const {
  std::lock_guard<std::mutex> lock(m_);
  return static_cast<int64_t>(gen_queue_.size() + stage1_queue_.size());
}

void Engine::fail(const std::shared_ptr<GenJob>& job, const std::string& message, int status) {
  {
    std::lock_guard<std::mutex> lock(job->m);
    job->error = message;
    job->error_status = status;
    job->finished = true;
    ++job->version;
  }
  job->cv.notify_all();
}

void Engine::deliver(const std::shared_ptr<GenJob>& job, size_t choice, int64_t token, bool row_finished, int64_t seq) {
  const auto& tok = *text_->tokenizer();
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(job->m);
    auto& c = job->choices[choice];
    c.tokens.push_back(token);
    std::string text = tok.decode(c.tokens);
    const auto start = text.find_first_not_of(" \n\t");
    text = start == std::string::npos ? "" : text.substr(start);
    const bool stopped = cut_at_stop(text, job->stop);
    if (stopped || row_finished) {
      c.done = true;
      const auto& eos = job->options.eos_token_ids;
      c.finish_reason = stopped || std::find(eos.begin(), eos.end(), token) != eos.end() ? "stop" : "length";
      text = trim_text(text);
      release = stopped && !row_finished;
    }
    c.text = std::move(text);
    if (!job->first_token_seen) {
      job->first_token_seen = true;
      metrics_.first_token(std::chrono::duration<double>(std::chrono::steady_clock::now() - job->arrived).count());
    }
    job->finished = std::all_of(job->choices.begin(), job->choices.end(), [](const auto& x) { return x.done; });
    ++job->version;
  }
  metrics_.tokens(1);
  if (seq >= 0 && (release || row_finished)) {
    if (release) decoder_->release(seq);
    active_.erase(seq);
  }
  job->cv.notify_all();
}

void Engine::abandon(const std::shared_ptr<GenJob>& job, const std::string& message) {
  for (auto it = active_.begin(); it != active_.end();)
    if (it->second.job == job) {
      decoder_->release(it->first);
      it = active_.erase(it);
    } else {
      ++it;
    }
  fail(job, message);
}

void Engine::admit(std::vector<std::shared_ptr<GenJob>>& jobs) {
  // The images of every joining request in one pass through the ViT and the Q-Former.
  std::vector<torch::Tensor> images;
  for (const auto& j : jobs)
    if (j->image.defined()) images.push_back(j->image);
  torch::Tensor prefixes;
  auto module = text_->module();
  if (!images.empty()) {
    try {
      prefixes = module->image_prefix(torch::stack(images).to(text_->device()));
      metrics_.image_batch(prefixes.size(0));
    } catch (const std::exception& e) {
      for (const auto& j : jobs) fail(j, first_line(e.what()));
      return;
    }
  }
  // Every choice of every request is a sequence; those with an image or not and prompts of one
  // length are prefilled together.
  struct Seq {
    std::shared_ptr<GenJob> job;
    size_t choice;
    int64_t image;  // row of `prefixes`, -1 = none
  };
  std::map<std::pair<bool, size_t>, std::vector<Seq>> groups;
  int64_t next_image = 0;
  for (const auto& j : jobs) {
    const int64_t img = j->image.defined() ? next_image++ : -1;
    for (int64_t c = 0; c < j->n; ++c) groups[{img >= 0, j->prompt.size()}].push_back({j, static_cast<size_t>(c), img});
  }
  for (auto& [key, seqs] : groups) {
    std::vector<std::vector<int64_t>> prompts;
    std::vector<GenerationOptions> opts;
    std::vector<int64_t> rows;
    for (const auto& q : seqs) {
      prompts.push_back(q.job->prompt);
      auto o = q.job->options;
      if (q.image < 0) o.prefix_token_id = -1;
      o.seed = q.job->options.seed + static_cast<uint64_t>(q.choice);  // choice c: the next seed
      opts.push_back(o);
      if (q.image >= 0) rows.push_back(q.image);
    }
    torch::Tensor prefix;
    if (key.first) prefix = prefixes.index_select(0, torch::tensor(rows, torch::kLong).to(prefixes.device()));
    std::vector<SlotDecoder::Emit> emits;
    try {
      emits = decoder_->admit_group(prefix, prompts, opts);
    } catch (const std::exception& e) {
      for (const auto& q : seqs) abandon(q.job, first_line(e.what()));
      continue;
    }
    for (size_t i = 0; i < seqs.size(); ++i) {
      const auto& q = seqs[i];
      const auto& e = emits[i];
      {
        std::lock_guard<std::mutex> lock(q.job->m);
        if (!q.job->error.empty()) {  // an earlier choice of it failed
          if (!e.finished) decoder_->release(e.id);
          continue;
        }
      }
      if (!e.error.empty()) {
        abandon(q.job, e.error);
        continue;
      }
      if (!e.finished) active_[e.id] = {q.job, q.choice};
      deliver(q.job, q.choice, e.token, e.finished, e.finished ? -1 : e.id);
    }
  }
}

void Engine::run_stage1(std::vector<std::shared_ptr<Stage1Job>>& jobs) {
  // Every image of these requests through the ViT at once.
  std::vector<torch::Tensor> images;
  for (const auto& j : jobs)
    if (j->images.defined()) images.push_back(j->images);
  torch::Tensor embeds;
  if (!images.empty()) {
    try {
      embeds = stage1_->module()->encode_image(torch::cat(images).to(stage1_->device()));
      metrics_.image_batch(embeds.size(0));
    } catch (...) {
      for (auto& j : jobs) j->result.set_exception(std::current_exception());
      return;
    }
  }
  int64_t at = 0;
  for (auto& j : jobs) {
    try {
      torch::Tensor mine;
      if (j->images.defined()) {
        mine = embeds.narrow(0, at, j->images.size(0));
        at += j->images.size(0);
      }
      j->result.set_value(j->fn(*stage1_, mine));
    } catch (...) {
      j->result.set_exception(std::current_exception());
    }
  }
}

void Engine::start_beams(const std::shared_ptr<GenJob>& job) {
  try {
    auto module = text_->module();
    torch::Tensor prefix;
    auto o = job->options;
    if (job->image.defined()) {
      prefix = module->image_prefix(job->image.unsqueeze(0).to(text_->device()));
      metrics_.image_batch(1);
    } else {
      o.prefix_token_id = -1;
    }
    auto ids = torch::tensor(job->prompt, torch::kLong).view({1, -1}).to(text_->device());
    beams_.emplace_back(job, BeamSearch(*module->language_model, prefix, ids, torch::ones_like(ids), o));
  } catch (const std::exception& e) {
    fail(job, first_line(e.what()));
  }
}

void Engine::step_beams() {
  for (auto it = beams_.begin(); it != beams_.end();) {
    auto& [job, search] = *it;
    bool done = job->cancelled.load();
    try {
      if (!done && search.step()) {  // finished: its best hypothesis, token by token (stop strings apply)
        auto out = search.result()[0];
        if (out.empty()) out.push_back(job->options.eos_token_ids.empty() ? 0 : job->options.eos_token_ids[0]);
        for (size_t i = 0; i < out.size(); ++i) {
          {
            std::lock_guard<std::mutex> lock(job->m);
            if (job->choices[0].done) break;
          }
          deliver(job, 0, out[i], i + 1 == out.size(), -1);
        }
        done = true;
      }
    } catch (const std::exception& e) {
      fail(job, first_line(e.what()));
      done = true;
    }
    it = done ? beams_.erase(it) : std::next(it);
  }
}

void Engine::loop() {
  torch::NoGradGuard no_grad;
  for (;;) {
    std::vector<std::shared_ptr<GenJob>> joining, beams;
    std::vector<std::shared_ptr<Stage1Job>> stage1;
    {
      std::unique_lock<std::mutex> lock(m_);
      const bool busy = (decoder_ && decoder_->active() > 0) || !beams_.empty();
      if (!busy)
        cv_.wait_for(lock, std::chrono::milliseconds(100),
                     [&] { return stopping_ || !gen_queue_.empty() || !stage1_queue_.empty(); });
      if (stopping_ && !busy && gen_queue_.empty() && stage1_queue_.empty()) break;
      // In arrival order, as many text requests as there are free rows (one that does not fit
      // waits, and so do those behind it); beam requests and stage-1 jobs always run.
      int64_t free_rows = decoder_ ? decoder_->slots() - decoder_->active() : 0;
      int64_t free_groups = options_.max_batch - static_cast<int64_t>(beams_.size());
      while (!gen_queue_.empty()) {
        auto& j = gen_queue_.front();
        if (j->cancelled) {
          gen_queue_.pop_front();
          metrics_.cancelled(1);
          continue;
        }
        if (j->options.num_beams > 1) {
          if (free_groups <= 0) break;
          --free_groups;
          beams.push_back(j);
        } else if (j->n <= free_rows) {
          free_rows -= j->n;
          joining.push_back(j);
        } else {
          break;
        }
        gen_queue_.pop_front();
      }
      while (!stage1_queue_.empty()) {
        stage1.push_back(std::move(stage1_queue_.front()));
        stage1_queue_.pop_front();
      }
      metrics_.set_queue(static_cast<int64_t>(gen_queue_.size() + stage1_queue_.size()));
    }
    {
      std::string aborting;
      {
        std::lock_guard<std::mutex> lock(m_);
        aborting = abort_;
      }
      if (!aborting.empty()) {
        for (const auto& j : joining) fail(j, aborting, 503);
        for (const auto& j : beams) fail(j, aborting, 503);
        for (auto& j : stage1) j->result.set_exception(std::make_exception_ptr(ApiError(503, aborting)));
        fail_everything(aborting);
        break;
      }
    }
    drop_cancelled();
    if (!joining.empty()) admit(joining);
    if (!stage1.empty()) run_stage1(stage1);
    for (const auto& b : beams) start_beams(b);
    step_beams();
    if (decoder_ && decoder_->active() > 0) {
      metrics_.decode_step(decoder_->active());
      try {
        for (const auto& e : decoder_->step()) {
          auto it = active_.find(e.id);
          if (it == active_.end()) continue;
          auto a = it->second;
          if (!e.error.empty()) {  // this row failed: its request fails, its other choices leave
            active_.erase(it);
            abandon(a.job, e.error);
            continue;
          }
          deliver(a.job, a.choice, e.token, e.finished, e.id);
        }
      } catch (const std::exception& e) {
        for (auto& [id, a] : active_) {
          decoder_->release(id);
          fail(a.job, first_line(e.what()));
        }
        active_.clear();
      }
    }
    metrics_.set_active(decoder_ ? decoder_->active() : 0);
  }
}

}  // namespace blip2::serve
