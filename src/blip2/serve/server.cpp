// The only translation unit that includes httplib.h besides client.cpp (its pkg-config flags
// change struct layouts, so they are given to these two files alone).
#include "blip2/serve/server.h"

#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <iostream>
#include <random>
#include <thread>

#include <httplib.h>

#include "blip2/api/api.h"
#include "blip2/serve/engine.h"
#include "blip2/serve/openai.h"
#include "blip2/serve/web_page.h"
#include "blip2/tasks/zero_shot.h"
#include "blip2/text/llm_tokenizer.h"
#include "blip2/util/common.h"

namespace blip2::serve {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string model_id(const std::string& name_or_path) {
  auto p = fs::path(name_or_path).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  return p.filename().string();
}

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) {
  send_json(res, e.status, e.body());
  if (e.status == 503) res.set_header("Retry-After", "1");
}

// The label a request's path is counted under: one of the served paths, else "other" (a client
// must not be able to add series, or text, to /metrics).
std::string endpoint_label(const std::string& path) {
  static const std::vector<std::string> known = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                                 "/v1/completions", "/v1/embeddings", "/v1/classify", "/v1/match"};
  return std::find(known.begin(), known.end(), path) != known.end() ? path : "other";
}

// The text of one SSE event.
std::string event(const json& j) { return "data: " + j.dump() + "\n\n"; }

// httplib listens with a backlog of 5 (fixed in Debian's compiled library): a burst of clients
// connecting at once would wait for SYN retransmits. listen() again on the bound socket raises it.
class Listener : public httplib::Server {
 public:
  void raise_backlog(int n) { ::listen(svr_sock_, n); }
};

class Service {
 public:
  explicit Service(const ServeOptions& o) : o_(o), engine_({o.max_batch, o.max_queue}, metrics_) {}

  void routes(httplib::Server& svr);
  void load();
  void drain_and_stop(httplib::Server& svr);
  std::atomic<bool> ready{false};

 private:
  using Fn = std::function<void(const httplib::Request&, httplib::Response&, bool& streaming)>;
  httplib::Server::Handler route(const std::string& endpoint, bool needs_key, Fn fn);
  void check_key(const httplib::Request& req) const;
  void check_model(const json& body, const std::string& id, bool loaded, const std::string& what) const;
  void text(const httplib::Request& req, httplib::Response& res, bool& streaming, bool chat);
  void stream(httplib::Response& res, std::shared_ptr<GenJob> job, bool chat, const std::string& id,
              int64_t created, Clock::time_point t0, const std::string& endpoint);
  json finished_response(GenJob& job, bool chat, const std::string& id, int64_t created, int64_t prompt_tokens) const;
  json stage1(torch::Tensor images, Stage1Fn fn);
  torch::Tensor stage1_image(const json& body);
  void embeddings(const httplib::Request& req, httplib::Response& res);
  void classify(const httplib::Request& req, httplib::Response& res);
  void match(const httplib::Request& req, httplib::Response& res);

  ServeOptions o_;
  Metrics metrics_;
  Engine engine_;
  std::optional<Blip2GenerationModel> text_;
  std::optional<Blip2Model> stage1_;
  std::string text_id_, stage1_id_;
  GenerationOptions defaults_;
  int64_t queries_ = 0;
  ImagePolicy policy_;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> in_flight_{0};
  std::atomic<uint64_t> next_id_{1};
  int64_t created_ = std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch()).count();
};

void Service::load() {
  policy_.allow_files = o_.allow_files;
  if (!o_.model.empty()) {
    GenerationModelOptions g;
    g.device = o_.device;
    g.weights = o_.weights;
    g.tokenizer = o_.tokenizer;
    text_ = Blip2GenerationModel::from_pretrained(o_.model, g);
    text_id_ = model_id(o_.model);
    defaults_ = text_->generation_options();
    queries_ = text_->config().qformer_config.query_length;
    std::cerr << "[serve] text model " << text_id_ << " (" << text_->source() << ")" << std::endl;
  }
  if (!o_.stage1.empty()) {
    FromPretrainedOptions f;
    f.device = o_.device;
    f.weights = o_.weights;
    stage1_ = Blip2Model::from_pretrained(o_.stage1, f);
    stage1_->module()->eval();
    stage1_id_ = model_id(o_.stage1);
    std::cerr << "[serve] stage-1 model " << stage1_id_ << " (" << stage1_->source() << ")" << std::endl;
  }
  engine_.start(text_, stage1_);
  ready = true;
}

void Service::check_key(const httplib::Request& req) const {
  if (o_.api_key.empty()) return;
  const std::string want = "Bearer " + o_.api_key;
  const std::string got = req.get_header_value("Authorization");
  unsigned diff = got.size() != want.size();
  for (size_t i = 0; i < want.size(); ++i) diff |= static_cast<unsigned>(i < got.size() ? got[i] ^ want[i] : 1);
  if (diff) throw ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "", "invalid_api_key");
}

void Service::check_model(const json& body, const std::string& id, bool loaded, const std::string& what) const {
  if (!loaded)
    throw ApiError(404, "no " + what + " is loaded (start the server with " +
                            (what == "text model" ? "--model" : "--stage1") + ")", "model", "model_not_found");
  if (body.contains("model") && !body.at("model").is_null()) {
    if (!body.at("model").is_string()) throw ApiError(400, "'model' must be a string", "model");
    const auto m = body.at("model").get<std::string>();
    if (m != id) throw ApiError(404, "the model '" + m + "' does not exist here; this endpoint serves '" + id + "'",
                                "model", "model_not_found");
  }
}

httplib::Server::Handler Service::route(const std::string& endpoint, bool needs_key, Fn fn) {
  return [this, endpoint, needs_key, fn](const httplib::Request& req, httplib::Response& res) {
    const auto t0 = Clock::now();
    ++in_flight_;
    bool streaming = false;
    try {
      if (draining_) throw ApiError(503, "the server is shutting down");
      if (needs_key) check_key(req);
      if (!ready && endpoint != "/health") throw ApiError(503, "the models are still loading");
      fn(req, res, streaming);
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const std::exception& e) {
      send_json(res, 500, error_body(500, first_line(e.what())));
    }
    if (!streaming) {
      metrics_.request(endpoint, res.status, since(t0));
      --in_flight_;
    }
  };
}

json Service::finished_response(GenJob& job, bool chat, const std::string& id, int64_t created,
                                int64_t prompt_tokens) const {
  json choices = json::array();
  int64_t completion = 0;
  for (size_t i = 0; i < job.choices.size(); ++i) {
    const auto& c = job.choices[i];
    completion += static_cast<int64_t>(c.tokens.size());
    if (chat)
      choices.push_back({{"index", i}, {"message", {{"role", "assistant"}, {"content", c.text}}},
                         {"finish_reason", c.finish_reason}});
    else
      choices.push_back({{"index", i}, {"text", c.text}, {"finish_reason", c.finish_reason}, {"logprobs", nullptr}});
  }
  return {{"id", id},
          {"object", chat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", text_id_},
          {"choices", choices},
          {"usage", {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion},
                     {"total_tokens", prompt_tokens + completion}}}};
}

void Service::text(const httplib::Request& req, httplib::Response& res, bool& streaming, bool chat) {
  const auto t0 = Clock::now();
  const auto body = parse_body(req.body);
  check_model(body, text_id_, text_.has_value(), "text model");
  TextRequest tr = chat ? parse_chat(body, defaults_) : parse_completion(body, defaults_);
  auto job = std::make_shared<GenJob>();
  job->arrived = t0;
  if (tr.image) {
    auto img = decode_image_field(*tr.image, tr.image_field, policy_);
    job->image = eval_transform(img, text_->config().vision_config.image_size);
  }
  const auto batch = encode_prompts(*text_->tokenizer(), {tr.prompt}, /*add_bos=*/true);
  const int64_t l = batch.keep.sum().item<int64_t>();
  auto ids = batch.ids.narrow(1, batch.ids.size(1) - l, l).contiguous();
  job->prompt.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + l);
  if (trim_text(tr.prompt).empty() && !job->image.defined())
    throw ApiError(400, "nothing to condition on: give a text or an image", chat ? "messages" : "prompt");
  if (tr.n > o_.max_batch)
    throw ApiError(400, "'n' is " + std::to_string(tr.n) + " but this server decodes at most " +
                            std::to_string(o_.max_batch) + " rows together (--max-batch)", "n");
  const int64_t p = job->image.defined() ? queries_ : 0;
  try {
    check_context(*text_->config().text_config, p, l, tr.options);
  } catch (const std::exception& e) {
    throw ApiError(400, first_line(e.what()), "max_tokens", "context_length_exceeded");
  }
  if (tr.options.do_sample && !tr.seeded) tr.options.seed = std::random_device{}();
  try {
    check_generation_options(tr.options);
  } catch (const std::exception& e) {
    throw ApiError(400, first_line(e.what()));
  }
  job->options = tr.options;
  job->n = tr.n;
  job->stop = tr.stop;
  if (!engine_.submit(job)) throw ApiError(503, "the server is busy (the queue is full); retry shortly");
  const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id_++);
  const int64_t created =
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  if (tr.stream) {
    streaming = true;
    stream(res, job, chat, id, created, t0, chat ? "/v1/chat/completions" : "/v1/completions");
    return;
  }
  std::unique_lock<std::mutex> lock(job->m);
  job->cv.wait(lock, [&] { return job->finished; });
  if (!job->error.empty()) throw ApiError(job->error_status, job->error);
  send_json(res, 200, finished_response(*job, chat, id, created, p + l));
}

void Service::stream(httplib::Response& res, std::shared_ptr<GenJob> job, bool chat, const std::string& id,
                     int64_t created, Clock::time_point t0, const std::string& endpoint) {
  struct State {
    std::vector<std::string> sent;
    std::vector<bool> closed;
    bool started = false, ended = false;
    uint64_t seen = ~0ull;
  };
  auto st = std::make_shared<State>();
  st->sent.resize(static_cast<size_t>(job->n));
  st->closed.resize(static_cast<size_t>(job->n), false);
  const std::string object = chat ? "chat.completion.chunk" : "text_completion";
  auto chunk = [=, this](size_t index, const json& delta_or_text, const json& finish) {
    json choice = {{"index", index}, {"finish_reason", finish}};
    if (chat) choice["delta"] = delta_or_text;
    else choice["text"] = delta_or_text, choice["logprobs"] = nullptr;
    return event({{"id", id}, {"object", object}, {"created", created}, {"model", text_id_}, {"choices", {choice}}});
  };
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [=](size_t, httplib::DataSink& sink) {
        for (;;) {
          std::string out;
          {
            std::unique_lock<std::mutex> lock(job->m);
            // Woken by each new token; every 20 ms otherwise, to notice a client that went away.
            job->cv.wait_for(lock, std::chrono::milliseconds(20), [&] { return job->version != st->seen; });
            st->seen = job->version;
            if (!st->started && chat) {
              for (size_t i = 0; i < st->sent.size(); ++i) out += chunk(i, {{"role", "assistant"}, {"content", ""}}, nullptr);
            }
            st->started = true;
            if (!job->error.empty()) {
              out += event(error_body(job->error_status, job->error));
              st->ended = true;
            } else {
              for (size_t i = 0; i < job->choices.size(); ++i) {
                if (st->closed[i]) continue;
                const auto& c = job->choices[i];
                const std::string shown = c.done ? c.text : stable_prefix(c.text, job->stop);
                if (shown.size() > st->sent[i].size() && shown.compare(0, st->sent[i].size(), st->sent[i]) == 0) {
                  const std::string delta = shown.substr(st->sent[i].size());
                  out += chat ? chunk(i, {{"content", delta}}, nullptr) : chunk(i, delta, nullptr);
                  st->sent[i] = shown;
                }
                if (c.done) {
                  out += chat ? chunk(i, json::object(), c.finish_reason) : chunk(i, "", c.finish_reason);
                  st->closed[i] = true;
                }
              }
              st->ended = job->finished;
            }
          }
          if (st->ended) out += "data: [DONE]\n\n";
          if (!out.empty()) {
            if (!sink.write(out.data(), out.size())) {
              job->cancelled = true;
              return false;
            }
            if (st->ended) sink.done();
            return true;
          }
          if (!sink.is_writable()) {
            job->cancelled = true;
            return false;
          }
        }
      },
      [=, this](bool success) {
        if (!success || !st->ended) job->cancelled = true;
        metrics_.request(endpoint, success ? 200 : 499, since(t0));
        --in_flight_;
      });
}

json Service::stage1(torch::Tensor images, Stage1Fn fn) {
  auto fut = engine_.submit(std::move(images), std::move(fn));
  if (!fut) throw ApiError(503, "the server is busy (the queue is full); retry shortly");
  return fut->get();  // rethrows what the job threw
}

torch::Tensor Service::stage1_image(const json& body) {
  if (!body.contains("image") || !body.at("image").is_string())
    throw ApiError(400, "'image' must be a string (a data: URL or base64)", "image");
  auto img = decode_image_field(body.at("image").get<std::string>(), "image", policy_);
  return eval_transform(img, stage1_->config().vision_config.image_size).unsqueeze(0);
}

std::vector<std::string> string_list(const json& body, const std::string& key, size_t max) {
  if (!body.contains(key) || !body.at(key).is_array() || body.at(key).empty() || body.at(key).size() > max)
    throw ApiError(400, "'" + key + "' must be an array of 1 to " + std::to_string(max) + " strings", key);
  std::vector<std::string> out;
  for (const auto& v : body.at(key)) {
    if (!v.is_string() || v.get<std::string>().empty())
      throw ApiError(400, "'" + key + "' must hold non-empty strings", key);
    out.push_back(v.get<std::string>());
  }
  return out;
}

void Service::classify(const httplib::Request& req, httplib::Response& res) {
  const auto body = parse_body(req.body);
  check_model(body, stage1_id_, stage1_.has_value(), "stage-1 model");
  only_fields(body, {"model", "image", "candidate_labels", "hypothesis_template", "itm_top_k"}, "classify");
  ZeroShotOptions zo;
  zo.candidate_labels = string_list(body, "candidate_labels", 1000);
  if (body.contains("hypothesis_template")) {
    if (!body.at("hypothesis_template").is_string() ||
        body.at("hypothesis_template").get<std::string>().find("{}") == std::string::npos)
      throw ApiError(400, "'hypothesis_template' must be a string with {} where the label goes", "hypothesis_template");
    zo.hypothesis_template = body.at("hypothesis_template").get<std::string>();
  }
  if (body.contains("itm_top_k")) {
    const auto& v = body.at("itm_top_k");
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > static_cast<int64_t>(zo.candidate_labels.size()))
      throw ApiError(400, "'itm_top_k' must be an integer in [0, number of labels]", "itm_top_k");
    zo.itm_top_k = v.get<int64_t>();
  }
  auto image = stage1_image(body);
  auto ranked = stage1(image, [zo](Blip2Model& m, const torch::Tensor& emb) {
    ZeroShotClassifier clf(m.module(), m.tokenizer(), zo);
    auto mod = m.module();
    auto feats = mod->image_features(mod->query_pass(emb, false).hidden);
    return clf.ranked(clf.probabilities(feats, emb)[0]);
  });
  json results = json::array();
  for (const auto& r : ranked) results.push_back({{"label", r["label"]}, {"score", r["score"]}});
  send_json(res, 200, {{"object", "classification"}, {"model", stage1_id_}, {"results", results}});
}

void Service::match(const httplib::Request& req, httplib::Response& res) {
  const auto body = parse_body(req.body);
  check_model(body, stage1_id_, stage1_.has_value(), "stage-1 model");
  only_fields(body, {"model", "image", "texts"}, "match");
  const auto texts = string_list(body, "texts", 256);
  auto image = stage1_image(body);
  auto scores = stage1(image, [texts](Blip2Model& m, const torch::Tensor& emb) {
    auto mod = m.module();
    auto [ids, keep] = m.tokenize(texts);
    const int64_t t = ids.size(0);
    auto itm = torch::softmax(mod->itm_logits(emb.expand({t, -1, -1}), ids, keep).to(torch::kFloat32), 1).select(1, 1);
    auto img = mod->image_features(mod->query_pass(emb, false).hidden)[0];  // [Q, E]
    auto txt = mod->text_features(mod->text_pass(ids, keep));             // [T, E]
    auto itc = std::get<0>(torch::matmul(img.to(torch::kFloat32), txt.to(torch::kFloat32).t()).max(0));
    json out = json::array();
    auto itm_c = itm.cpu().to(torch::kDouble), itc_c = itc.cpu().to(torch::kDouble);
    for (int64_t i = 0; i < t; ++i)
      out.push_back({{"itm_score", itm_c[i].item<double>()}, {"itc_score", itc_c[i].item<double>()}});
    return out;
  });
  json results = json::array();
  for (size_t i = 0; i < texts.size(); ++i) {
    auto r = scores[i];
    r["text"] = texts[i];
    results.push_back(r);
  }
  send_json(res, 200, {{"object", "match"}, {"model", stage1_id_}, {"results", results}});
}

void Service::embeddings(const httplib::Request& req, httplib::Response& res) {
  const auto body = parse_body(req.body);
  check_model(body, stage1_id_, stage1_.has_value(), "stage-1 model");
  only_fields(body, {"model", "input", "encoding_format", "pooling"}, "embeddings");
  auto choice = [&](const std::string& key, const std::string& first, const std::string& second) {
    if (!body.contains(key)) return first;
    const auto& v = body.at(key);
    if (!v.is_string() || (v.get<std::string>() != first && v.get<std::string>() != second))
      throw ApiError(400, "'" + key + "' must be \"" + first + "\" or \"" + second + "\"", key);
    return v.get<std::string>();
  };
  const std::string format = choice("encoding_format", "float", "base64");
  const std::string pooling = choice("pooling", "mean", "none");
  if (!body.contains("input")) throw ApiError(400, "'input' is required", "input");
  json input = body.at("input");
  if (input.is_string()) input = json::array({input});
  if (!input.is_array() || input.empty() || input.size() > 256)
    throw ApiError(400, "'input' must be a string or an array of 1 to 256 strings or {\"image\": ...} objects", "input");
  std::vector<std::string> texts;
  std::vector<torch::Tensor> images;
  std::vector<std::pair<bool, size_t>> order;  // (is image, index among its kind)
  for (size_t i = 0; i < input.size(); ++i) {
    const auto& v = input[i];
    const std::string where = "input[" + std::to_string(i) + "]";
    if (v.is_string()) {
      if (v.get<std::string>().empty()) throw ApiError(400, where + " is an empty string", where);
      order.push_back({false, texts.size()});
      texts.push_back(v.get<std::string>());
    } else if (v.is_object() && v.size() == 1 && v.contains("image") && v.at("image").is_string()) {
      auto img = decode_image_field(v.at("image").get<std::string>(), where + ".image", policy_);
      order.push_back({true, images.size()});
      images.push_back(eval_transform(img, stage1_->config().vision_config.image_size));
    } else if (v.is_object() && v.size() == 1 && v.contains("text") && v.at("text").is_string()) {
      order.push_back({false, texts.size()});
      texts.push_back(v.at("text").get<std::string>());
    } else {
      throw ApiError(400, where + " must be a string, {\"text\": ...} or {\"image\": ...}", where);
    }
  }
  const bool pooled = pooling == "mean";
  auto feats = stage1(images.empty() ? torch::Tensor() : torch::stack(images), [texts, pooled](Blip2Model& m,
                                                                                const torch::Tensor& emb) {
    auto rows = [](const torch::Tensor& t) {  // [N, ...] -> N float lists
      auto c = t.to(torch::kFloat32).cpu().contiguous().view({t.size(0), -1});
      json r = json::array();
      for (int64_t i = 0; i < c.size(0); ++i)
        r.push_back(std::vector<float>(c[i].data_ptr<float>(), c[i].data_ptr<float>() + c.size(1)));
      return r;
    };
    json out = {{"image", json::array()}, {"text", json::array()}, {"image_shape", json::array()}};
    if (emb.defined()) {  // image_embeds_proj [B, Q, E], as extract_features("image") computes it
      auto mod = m.module();
      auto f = mod->image_features(mod->query_pass(emb, false).hidden);
      out["image_shape"] = {f.size(1), f.size(2)};
      if (pooled) f = torch::nn::functional::normalize(f.mean(1), torch::nn::functional::NormalizeFuncOptions().dim(-1));
      out["image"] = rows(f);
    }
    if (!texts.empty())  // the [CLS] token's feature: the one ITC compares
      out["text"] = rows(m.extract_features({}, texts, "text").text_embeds_proj.select(1, 0));
    return out;
  });
  json data = json::array();
  int64_t tokens = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const auto& [is_image, k] = order[i];
    const auto v = feats[is_image ? "image" : "text"][k].get<std::vector<float>>();
    json e = {{"object", "embedding"}, {"index", i}};
    if (format == "base64") e["embedding"] = base64_encode(v.data(), v.size() * sizeof(float));
    else e["embedding"] = v;
    if (is_image && !pooled) e["shape"] = feats["image_shape"];  // [queries, dim], row-major
    data.push_back(e);
    if (!is_image) tokens += static_cast<int64_t>(stage1_->tokenizer()->encode(texts[k]).size());
  }
  send_json(res, 200, {{"object", "list"}, {"data", data}, {"model", stage1_id_},
                       {"usage", {{"prompt_tokens", tokens}, {"total_tokens", tokens}}}});
}

void Service::routes(httplib::Server& svr) {
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) { res.set_content(index_html(), "text/html; charset=utf-8"); });
  svr.Get("/health", route("/health", false, [this](const auto&, auto& res, bool&) {
    if (!ready) return send_json(res, 503, {{"status", "loading"}});
    send_json(res, 200, {{"status", "ok"}});
  }));
  svr.Get("/metrics", route("/metrics", true, [this](const auto&, auto& res, bool&) {
    res.set_content(metrics_.text(), "text/plain; version=0.0.4");
  }));
  svr.Get("/v1/models", route("/v1/models", true, [this](const auto&, auto& res, bool&) {
    json data = json::array();
    for (const auto& id : {text_id_, stage1_id_})
      if (!id.empty()) data.push_back({{"id", id}, {"object", "model"}, {"created", created_}, {"owned_by", "blip2cpp"}});
    send_json(res, 200, {{"object", "list"}, {"data", data}});
  }));
  svr.Post("/v1/chat/completions", route("/v1/chat/completions", true, [this](const auto& req, auto& res, bool& s) {
    text(req, res, s, true);
  }));
  svr.Post("/v1/completions", route("/v1/completions", true, [this](const auto& req, auto& res, bool& s) {
    text(req, res, s, false);
  }));
  svr.Post("/v1/embeddings", route("/v1/embeddings", true, [this](const auto& req, auto& res, bool&) { embeddings(req, res); }));
  svr.Post("/v1/classify", route("/v1/classify", true, [this](const auto& req, auto& res, bool&) { classify(req, res); }));
  svr.Post("/v1/match", route("/v1/match", true, [this](const auto& req, auto& res, bool&) { match(req, res); }));

  // Bodies whose size is not known up front are refused before they are read: the body limit
  // only covers Content-Length, and a compressed body would be inflated without one.
  svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (req.has_header("Transfer-Encoding") && req.get_header_value("Transfer-Encoding") != "identity") {
      send_json(res, 411, error_body(411, "send the body with a Content-Length (chunked bodies are refused)"));
      res.set_header("Connection", "close");  // the unread body must not be taken for the next request
      metrics_.request(endpoint_label(req.path), 411, 0);
      return httplib::Server::HandlerResponse::Handled;
    }
    if (req.has_header("Content-Encoding") && req.get_header_value("Content-Encoding") != "identity") {
      send_json(res, 415, error_body(415, "compressed bodies (Content-Encoding: " +
                                              req.get_header_value("Content-Encoding") + ") are refused"));
      res.set_header("Connection", "close");
      metrics_.request(endpoint_label(req.path), 415, 0);
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  svr.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string msg = "HTTP " + std::to_string(res.status);
    if (res.status == 404) msg = "no endpoint " + req.method + " " + req.path;
    if (res.status == 413) msg = "the body is over the server's limit of " + std::to_string(o_.max_body) + " bytes (--max-body)";
    if (res.status == 400) msg = "malformed HTTP request";
    res.set_content(error_body(res.status, msg).dump(), "application/json");
    if (res.status == 404 || res.status == 413) metrics_.request(endpoint_label(req.path), res.status, 0);
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string msg = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      msg = first_line(e.what());
    } catch (...) {
    }
    res.status = 500;
    res.set_content(error_body(500, msg).dump(), "application/json");
  });
}

void Service::drain_and_stop(httplib::Server& svr) {
  draining_ = true;
  std::cerr << "[serve] stopping: finishing " << in_flight_.load() << " request(s) in flight" << std::endl;
  const auto deadline = Clock::now() + std::chrono::duration<double>(o_.drain_timeout_s);
  while (in_flight_ > 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (in_flight_ > 0) {
    std::cerr << "[serve] " << in_flight_.load() << " request(s) cut off after " << o_.drain_timeout_s << " s"
              << std::endl;
    engine_.abort("the server stopped (SIGTERM) before this request finished");
    const auto grace = Clock::now() + std::chrono::seconds(2);  // their answers go out
    while (in_flight_ > 0 && Clock::now() < grace) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  svr.stop();
  engine_.stop();
}

}  // namespace

int serve(const ServeOptions& o) {
  check(o.port >= 0 && o.port <= 65535, "serve: --port must be in [0, 65535]");
  check(o.max_body > 0, "serve: --max-body must be positive");
  check(o.max_image_pixels > 0, "serve: --max-image-pixels must be positive");
  check(o.drain_timeout_s >= 0, "serve: --drain-timeout must be >= 0");
  check(!o.model.empty() || !o.stage1.empty(), "serve: give --model (text) and/or --stage1 (scores, embeddings)");
  if (!o.allow_files.empty())
    check(fs::is_directory(o.allow_files), "serve: --allow-files " + o.allow_files + " is not a directory");
  set_max_image_pixels(o.max_image_pixels);

  // SIGTERM and SIGINT are taken by sigwait below: every thread started from here on blocks them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto service = std::make_unique<Service>(o);
  Listener svr;
  const size_t threads = o.threads > 0 ? static_cast<size_t>(o.threads) : static_cast<size_t>(o.max_batch + o.max_queue + 8);
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  svr.set_payload_max_length(static_cast<size_t>(o.max_body));
  svr.set_read_timeout(30);
  svr.set_write_timeout(30);
  svr.set_keep_alive_max_count(1000);
  svr.set_tcp_nodelay(true);  // small responses and SSE events go out at once (no Nagle delay)
  service->routes(svr);
  const int port = o.port == 0 ? svr.bind_to_any_port(o.host) : (svr.bind_to_port(o.host, o.port) ? o.port : -1);
  check(port > 0, "serve: cannot listen on " + o.host + ":" + std::to_string(o.port) + " (in use, or not an address here)");
  svr.raise_backlog(1024);
  std::thread listener([&] { svr.listen_after_bind(); });
  std::cout << "listening on http://" << o.host << ":" << port << std::endl;
  try {
    service->load();
  } catch (...) {
    svr.stop();
    listener.join();
    throw;
  }
  std::cerr << "[serve] ready: " << o.max_batch << " decode rows, queue " << o.max_queue << std::endl;
  int sig = 0;
  sigwait(&signals, &sig);
  service->drain_and_stop(svr);
  listener.join();
  std::cerr << "[serve] stopped" << std::endl;
  return 0;
}

}  // namespace blip2::serve
