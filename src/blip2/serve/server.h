// `blip2 serve`: BLIP-2 behind an OpenAI-compatible HTTP API (cpp-httplib), all of its jobs from
// one process: text generation (chat/completions, completions; streamed as server-sent events),
// embeddings, zero-shot classification and image-text matching, a web page at /, /health and
// Prometheus /metrics. The endpoints are documented in docs/serve_api.md and the README.
#pragma once

#include <cstdint>
#include <string>

namespace blip2::serve {

struct ServeOptions {
  std::string model;        // stage-2 model (text endpoints): preset name or path; "" = none
  std::string stage1;       // stage-1 model (embeddings, classify, match); "" = none
  std::string host = "127.0.0.1";
  int port = 8080;          // 0 = any free port (the line "listening on http://HOST:PORT" says which)
  std::string api_key;      // "" = no key; else /v1/* and /metrics need "Authorization: Bearer KEY"
  int64_t max_batch = 8;    // rows of the decode batch (1 = no batching across requests)
  int64_t max_queue = 64;   // requests waiting for the engine before 503 + Retry-After
  int64_t max_body = 8 << 20;            // bytes of a request body (413 beyond)
  int64_t max_image_pixels = 40'000'000; // width x height an image may declare (400 beyond, before decoding)
  std::string allow_files;  // directory file:// image URLs may name ("" = none)
  std::string device = "cpu";
  std::string weights;      // "" | float | int8 (as `blip2 run --weights`)
  std::string tokenizer;    // the LLM tokenizer when not beside the model
  int threads = 0;          // HTTP worker threads (0 = max_batch + max_queue + 8)
  double drain_timeout_s = 30;  // SIGTERM: how long in-flight requests may take to finish
};

// Binds, prints "listening on http://HOST:PORT", loads the models (GET /health is 503 until then)
// and serves until SIGTERM or SIGINT: then stops accepting, lets in-flight requests finish (up to
// drain_timeout_s) and returns 0. Errors before serving (a model that does not load, a port in
// use) throw blip2::Error.
int serve(const ServeOptions& options);

}  // namespace blip2::serve
