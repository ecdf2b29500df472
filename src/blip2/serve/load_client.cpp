#include "blip2/serve/load_client.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <thread>

#include "blip2/serve/client.h"

namespace blip2::serve {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// What a good answer is compared on: the text of each choice, or the scores / vectors.
json answer_of(const LoadRequest& r, const HttpResponse& res) {
  if (r.stream) {
    std::string text;
    bool done = false;
    for (const auto& d : sse_data(res.body)) {
      if (d == "[DONE]") {
        done = true;
        continue;
      }
      auto j = json::parse(d, nullptr, false);
      if (j.is_discarded() || !j.contains("choices")) return json();
      const auto& c = j["choices"][0];
      if (c.contains("delta") && c["delta"].contains("content")) text += c["delta"]["content"].get<std::string>();
    }
    return done ? json(text) : json();
  }
  auto j = json::parse(res.body, nullptr, false);
  if (j.is_discarded()) return json();
  if (r.kind == "caption" || r.kind == "chat_sample") {
    json texts = json::array();
    for (const auto& c : j["choices"])
      texts.push_back(c.contains("text") ? c["text"] : c["message"]["content"]);
    return texts;
  }
  if (r.kind == "embed") {
    json v = json::array();
    for (const auto& d : j["data"]) v.push_back(d["embedding"]);
    return v;
  }
  return j["results"];
}

// Equal texts and labels; numbers within tol.
bool same(const json& a, const json& b, double tol) {
  if (a.is_number() && b.is_number()) return std::abs(a.get<double>() - b.get<double>()) <= tol;
  if (a.type() != b.type()) return false;
  if (a.is_array() || a.is_object()) {
    if (a.size() != b.size()) return false;
    if (a.is_array()) {
      for (size_t i = 0; i < a.size(); ++i)
        if (!same(a[i], b[i], tol)) return false;
      return true;
    }
    for (const auto& [k, v] : a.items())
      if (!b.contains(k) || !same(v, b[k], tol)) return false;
    return true;
  }
  return a == b;
}

}  // namespace

LoadRequest load_request(const LoadOptions& o, const std::string& kind, int variant) {
  static const std::vector<std::string> prompts = {"", "a photo of", "Question: what is it? Answer:", "the"};
  static const std::vector<std::vector<std::string>> labels = {
      {"red", "green", "blue"}, {"circle", "square"}, {"a dog", "a cat", "a car", "a tree"}};
  const std::string data_url = "data:image/png;base64," + o.image_base64;
  LoadRequest r;
  r.kind = kind;
  const auto v = static_cast<size_t>(variant);
  if (kind == "caption") {
    r.path = "/v1/completions";
    r.body = {{"prompt", prompts[v % prompts.size()]}, {"image", o.image_base64}, {"max_tokens", o.max_tokens},
              {"temperature", 0}, {"num_beams", 1}};  // greedy whatever the model's default decoding
  } else if (kind == "chat_stream" || kind == "chat_sample") {
    r.path = "/v1/chat/completions";
    json content = json::array({{{"type", "text"}, {"text", prompts[(v + 1) % prompts.size()]}},
                                {{"type", "image_url"}, {"image_url", {{"url", data_url}}}}});
    r.body = {{"messages", {{{"role", "user"}, {"content", content}}}}, {"max_tokens", o.max_tokens},
              {"temperature", 0.9}, {"top_k", 20}, {"seed", 1000 + variant}};
    r.stream = kind == "chat_stream";
    if (r.stream) r.body["stream"] = true;
    else r.body["n"] = 2;
  } else if (kind == "classify") {
    r.path = "/v1/classify";
    r.body = {{"image", data_url}, {"candidate_labels", labels[v % labels.size()]}};
  } else if (kind == "match") {
    r.path = "/v1/match";
    r.body = {{"image", o.image_base64}, {"texts", labels[v % labels.size()]}};
  } else if (kind == "embed") {
    r.path = "/v1/embeddings";
    r.body = {{"input", json::array({labels[v % labels.size()][0], {{"image", o.image_base64}}})}};
  } else if (kind == "bad") {
    r.must_fail = true;
    switch (variant % 3) {
      case 0: r.path = "/v1/completions"; r.body = "{not json"; break;  // sent as raw text below
      case 1: r.path = "/v1/classify"; r.body = {{"image", "bm90IGFuIGltYWdl"}, {"candidate_labels", {"x"}}}; break;
      default: r.path = "/v1/completions"; r.body = {{"prompt", "x"}, {"image", o.image_base64}, {"logprobs", 5}}; break;
    }
  } else {
    throw std::invalid_argument("load: unknown request kind '" + kind + "'");
  }
  return r;
}

double LoadResult::percentile(const std::string& kind, double q) const {
  auto it = latency_s.find(kind);
  if (it == latency_s.end() || it->second.empty()) return 0;
  auto v = it->second;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<size_t>(std::min<double>(v.size() - 1, std::ceil(q * v.size()) - 1));
  return v[i];
}

json LoadResult::summary() const {
  json lat = json::object();
  for (const auto& [k, v] : latency_s)
    lat[k] = {{"n", v.size()}, {"p50_s", percentile(k, 0.5)}, {"p99_s", percentile(k, 0.99)}};
  return {{"requests", requests}, {"ok", ok}, {"expected_4xx", expected_4xx}, {"server_errors", server_errors},
          {"unexpected", unexpected}, {"wrong", wrong}, {"completion_tokens", completion_tokens},
          {"wall_s", wall_s}, {"requests_per_s", wall_s > 0 ? requests / wall_s : 0}, {"latency", lat},
          {"problems", problems}};
}

LoadResult run_load(const LoadOptions& o) {
  LoadResult result;
  std::mutex m;
  HeaderList headers;
  if (!o.api_key.empty()) headers.emplace_back("Authorization", "Bearer " + o.api_key);
  auto send = [&](HttpClient& c, const LoadRequest& r) {
    const std::string body = r.body.is_string() ? r.body.get<std::string>() : r.body.dump();
    if (r.stream) return c.post_stream(r.path, body, [](const std::string&) { return true; }, headers);
    return c.post(r.path, body, "application/json", headers);
  };
  // References: each kind and variant alone.
  std::map<std::pair<std::string, int>, json> reference;
  {
    HttpClient c(o.host, o.port);
    for (const auto& kind : o.mix) {
      if (kind == "bad") continue;
      for (int v = 0; v < o.variants; ++v) {
        const auto r = load_request(o, kind, v);
        const auto res = send(c, r);
        if (res.status != 200) throw std::runtime_error("load: the reference " + kind + " request got HTTP " +
                                                        std::to_string(res.status) + ": " + res.body.substr(0, 300));
        reference[{kind, v}] = answer_of(r, res);
      }
    }
  }
  auto note = [&](const std::string& p) {
    if (result.problems.size() < 10) result.problems.push_back(p);
  };
  const auto t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int ci = 0; ci < o.clients; ++ci) {
    threads.emplace_back([&, ci] {
      HttpClient c(o.host, o.port);
      for (int k = 0; k < o.requests_per_client; ++k) {
        const auto& kind = o.mix[static_cast<size_t>(ci + k) % o.mix.size()];
        const int variant = (ci * 7 + k) % o.variants;
        const auto r = load_request(o, kind, variant);
        const auto s0 = Clock::now();
        const auto res = send(c, r);
        const double dt = std::chrono::duration<double>(Clock::now() - s0).count();
        std::lock_guard<std::mutex> lock(m);
        ++result.requests;
        result.latency_s[kind].push_back(dt);
        if (res.status >= 500 || res.status == 0) {
          ++result.server_errors;
          note(kind + ": HTTP " + std::to_string(res.status) + " " + res.error + " " + res.body.substr(0, 200));
        } else if (r.must_fail) {
          if (res.status >= 400 && res.status < 500 && res.body.find("\"error\"") != std::string::npos) ++result.expected_4xx;
          else ++result.unexpected, note("bad request answered " + std::to_string(res.status));
        } else if (res.status != 200) {
          ++result.unexpected;
          note(kind + ": HTTP " + std::to_string(res.status) + " " + res.body.substr(0, 200));
        } else {
          ++result.ok;
          const auto got = answer_of(r, res);
          if (!same(got, reference.at({kind, variant}), o.tolerance)) {
            ++result.wrong;
            note(kind + " variant " + std::to_string(variant) + ": " + got.dump().substr(0, 200) + " != " +
                 reference.at({kind, variant}).dump().substr(0, 200));
          }
          if (!r.stream) {
            auto j = json::parse(res.body, nullptr, false);
            if (!j.is_discarded() && j.contains("usage") && j["usage"].contains("completion_tokens"))
              result.completion_tokens += j["usage"]["completion_tokens"].get<int64_t>();
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  result.wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
  return result;
}

}  // namespace blip2::serve
