// A bounded load on a running `blip2 serve`: N concurrent clients x M requests each, the
// endpoints mixed (captions, streamed chat with sampling, classify, match, embeddings) with bad
// requests interleaved. Every good request's answer is checked against the answer the same
// request got alone (the references are taken first, one request at a time): a caption must be
// the same text, scores the same within a tolerance. Used by the test suite (small) and by
// bench/bench_serve (latency and throughput).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace blip2::serve {

struct LoadOptions {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string api_key;
  int clients = 4;
  int requests_per_client = 8;
  // Request kinds in rotation (a client starts at its own offset): caption, chat_stream,
  // chat_sample, classify, match, embed, bad. Kinds needing a model the server lacks are
  // left out by the caller.
  std::vector<std::string> mix = {"caption", "chat_stream", "classify", "match", "embed", "bad"};
  int max_tokens = 8;
  std::string image_base64;  // the image every request sends (e.g. a fixture PNG)
  int variants = 3;          // distinct prompts / seeds / label sets per kind
  double tolerance = 1e-4;   // scores and embeddings vs their reference
};

struct LoadResult {
  int64_t requests = 0, ok = 0, expected_4xx = 0, server_errors = 0, unexpected = 0, wrong = 0;
  int64_t completion_tokens = 0;
  double wall_s = 0;
  std::map<std::string, std::vector<double>> latency_s;  // by kind
  std::vector<std::string> problems;                     // the first few, for the report
  double percentile(const std::string& kind, double q) const;
  nlohmann::json summary() const;
};

// The request of kind/variant (path and body) and whether it must succeed.
struct LoadRequest {
  std::string kind, path;
  nlohmann::json body;
  bool stream = false, must_fail = false;
};
LoadRequest load_request(const LoadOptions& o, const std::string& kind, int variant);

// Runs the load: references first (sequentially), then the concurrent rounds.
LoadResult run_load(const LoadOptions& o);

}  // namespace blip2::serve
