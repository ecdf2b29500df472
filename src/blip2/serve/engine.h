// The serving engine: one thread owns the models and runs every forward pass; HTTP threads parse,
// decode images and wait. Each iteration it frees the rows of cancelled requests, admits waiting
// text requests into the decode batch (their images encoded in one batched pass, each prompt
// prefilled and joined to the running SlotDecoder), runs the stage-1 jobs, runs beam-search
// requests as their own group (generate()), then decodes one token for every active row.
// A bounded queue: submit() refuses beyond it (the caller answers 503 + Retry-After).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "blip2/api/api.h"
#include "blip2/models/slot_decoder.h"
#include "blip2/serve/metrics.h"

namespace blip2::serve {

// One text request (its n choices), shared by its HTTP thread and the engine.
struct GenJob {
  struct Choice {
    std::vector<int64_t> tokens;
    std::string text;              // decoded, leading space trimmed, cut at a stop string; trimmed when done
    bool done = false;
    std::string finish_reason;     // stop | length
  };
  // Set before submit().
  torch::Tensor image;             // [3, S, S] preprocessed on the CPU, or undefined (text only)
  std::vector<int64_t> prompt;     // LLM token ids, BOS first
  GenerationOptions options;
  int64_t n = 1;
  std::vector<std::string> stop;
  std::chrono::steady_clock::time_point arrived = std::chrono::steady_clock::now();

  // Filled by the engine under `m`; `cv` is notified on every change (`version` counts them).
  std::mutex m;
  std::condition_variable cv;
  std::vector<Choice> choices;
  std::string error;               // the engine failed on it
  int error_status = 500;          // 503 when the server stopped before it finished
  bool finished = false;           // every choice done, or error set
  uint64_t version = 0;
  bool first_token_seen = false;
  std::atomic<bool> cancelled{false};  // the client went away: the engine frees its rows
};

// What a stage-1 request computes, given the model and its images through the ViT
// (ln_vision'd, [B, N, D] on the model's device; undefined when it sent none).
using Stage1Fn = std::function<nlohmann::json(Blip2Model&, const torch::Tensor& image_embeds)>;

struct EngineOptions {
  int64_t max_batch = 8;     // decode rows (1 = no batching across requests)
  int64_t max_queue = 64;    // waiting requests before 503
};

class Engine {
 public:
  Engine(EngineOptions options, Metrics& metrics);
  ~Engine();
  // Starts the engine thread with the models (either may be absent).
  void start(std::optional<Blip2GenerationModel> text_model, std::optional<Blip2Model> stage1_model);
  // False when the queue is full.
  bool submit(std::shared_ptr<GenJob> job);
  // A stage-1 request: its images ([B, 3, S, S] preprocessed on the CPU, or undefined) go
  // through the ViT in one pass with those of the other stage-1 requests taken in the same
  // iteration. nullopt when the queue is full; the future holds the result or the exception.
  std::optional<std::future<nlohmann::json>> submit(torch::Tensor images, Stage1Fn fn);
  // Finishes what is queued and running, then ends the thread.
  void stop();
  // Fails everything queued and running with `message` (a 503) and takes nothing more; stop()
  // then returns at once (the bounded end of a SIGTERM drain).
  void abort(const std::string& message);
  int64_t queue_length() const;

 private:
  struct Stage1Job {
    torch::Tensor images;
    Stage1Fn fn;
    std::promise<nlohmann::json> result;
  };
  struct Active {
    std::shared_ptr<GenJob> job;
    size_t choice;
  };
  void loop();
  void admit(std::vector<std::shared_ptr<GenJob>>& jobs);
  void start_beams(const std::shared_ptr<GenJob>& job);
  void step_beams();
  void deliver(const std::shared_ptr<GenJob>& job, size_t choice, int64_t token, bool row_finished, int64_t seq);
  void fail(const std::shared_ptr<GenJob>& job, const std::string& message, int status = 500);
  void fail_everything(const std::string& message);
  void abandon(const std::shared_ptr<GenJob>& job, const std::string& message);  // frees its rows, fails it
  void drop_cancelled();
  void run_stage1(std::vector<std::shared_ptr<Stage1Job>>& jobs);

  EngineOptions options_;
  Metrics& metrics_;
  std::optional<Blip2GenerationModel> text_;
  std::optional<Blip2Model> stage1_;
  std::unique_ptr<SlotDecoder> decoder_;
  std::map<int64_t, Active> active_;  // sequence id -> its request and choice
  std::vector<std::pair<std::shared_ptr<GenJob>, BeamSearch>> beams_;  // beam groups, stepped with the rest

  mutable std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<GenJob>> gen_queue_;
  std::deque<std::shared_ptr<Stage1Job>> stage1_queue_;
  bool stopping_ = false;
  std::string abort_;  // set by abort()
  std::thread thread_;
};

}  // namespace blip2::serve
