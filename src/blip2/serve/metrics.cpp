#include "blip2/serve/metrics.h"

#include <cstdio>

namespace blip2::serve {
namespace {

const std::vector<double> kSeconds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::write(std::string& out, const std::string& name, const std::string& labels) const {
  const std::string sep = labels.empty() ? "" : ",";
  uint64_t cum = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cum += counts_[i];
    out += name + "_bucket{" + labels + sep + "le=\"" + (i < bounds_.size() ? num(bounds_[i]) : "+Inf") + "\"} " +
           std::to_string(cum) + "\n";
  }
  const std::string l = labels.empty() ? "" : "{" + labels + "}";
  out += name + "_sum" + l + " " + num(sum_) + "\n";
  out += name + "_count" + l + " " + std::to_string(count_) + "\n";
}

Metrics::Metrics()
    : first_token_(kSeconds), batch_({1, 2, 4, 8, 16, 32, 64, 128}), image_batch_({1, 2, 4, 8, 16, 32, 64, 128}) {}

std::string Metrics::error_kind(int status) {
  switch (status) {
    case 400: return "invalid_request";
    case 401: return "unauthorized";
    case 403: return "forbidden";
    case 404: return "not_found";
    case 411:
    case 415: return "unsupported_body";
    case 413: return "payload_too_large";
    case 503: return "overloaded";
    default: return status >= 500 ? "internal" : "client";
  }
}

void Metrics::request(const std::string& endpoint, int status, double seconds) {
  std::lock_guard<std::mutex> lock(m_);
  ++requests_[{endpoint, status}];
  if (status >= 400) ++errors_[error_kind(status)];
  latency_.try_emplace(endpoint, kSeconds).first->second.observe(seconds);
}

void Metrics::first_token(double seconds) {
  std::lock_guard<std::mutex> lock(m_);
  first_token_.observe(seconds);
}

void Metrics::decode_step(int64_t rows) {
  std::lock_guard<std::mutex> lock(m_);
  batch_.observe(static_cast<double>(rows));
  ++steps_;
}

void Metrics::image_batch(int64_t images) {
  std::lock_guard<std::mutex> lock(m_);
  image_batch_.observe(static_cast<double>(images));
}

void Metrics::tokens(int64_t n) {
  std::lock_guard<std::mutex> lock(m_);
  tokens_ += static_cast<uint64_t>(n);
}

void Metrics::cancelled(int64_t n) {
  std::lock_guard<std::mutex> lock(m_);
  cancelled_ += static_cast<uint64_t>(n);
}

void Metrics::set_queue(int64_t n) {
  std::lock_guard<std::mutex> lock(m_);
  queue_ = n;
}

void Metrics::set_active(int64_t n) {
  std::lock_guard<std::mutex> lock(m_);
  active_ = n;
}

std::string Metrics::text() const {
  std::lock_guard<std::mutex> lock(m_);
  std::string out;
  out += "# HELP blip2_requests_total HTTP requests answered, by endpoint and status.\n";
  out += "# TYPE blip2_requests_total counter\n";
  for (const auto& [k, v] : requests_)
    out += "blip2_requests_total{endpoint=\"" + k.first + "\",status=\"" + std::to_string(k.second) + "\"} " +
           std::to_string(v) + "\n";
  out += "# HELP blip2_errors_total Requests answered with an error, by kind.\n";
  out += "# TYPE blip2_errors_total counter\n";
  for (const auto& [k, v] : errors_) out += "blip2_errors_total{kind=\"" + k + "\"} " + std::to_string(v) + "\n";
  out += "# HELP blip2_queue_length Requests waiting for the engine.\n# TYPE blip2_queue_length gauge\n";
  out += "blip2_queue_length " + std::to_string(queue_) + "\n";
  out += "# HELP blip2_active_sequences Sequences in the decode batch.\n# TYPE blip2_active_sequences gauge\n";
  out += "blip2_active_sequences " + std::to_string(active_) + "\n";
  out += "# HELP blip2_tokens_generated_total Tokens generated.\n# TYPE blip2_tokens_generated_total counter\n";
  out += "blip2_tokens_generated_total " + std::to_string(tokens_) + "\n";
  out += "# HELP blip2_cancelled_requests_total Requests whose work was dropped because the client went away.\n";
  out += "# TYPE blip2_cancelled_requests_total counter\n";
  out += "blip2_cancelled_requests_total " + std::to_string(cancelled_) + "\n";
  out += "# HELP blip2_decode_batch_size Rows per decode step.\n# TYPE blip2_decode_batch_size histogram\n";
  batch_.write(out, "blip2_decode_batch_size", "");
  out += "# HELP blip2_image_batch_size Images encoded in one ViT pass (requests of an iteration together).\n";
  out += "# TYPE blip2_image_batch_size histogram\n";
  image_batch_.write(out, "blip2_image_batch_size", "");
  out += "# HELP blip2_time_to_first_token_seconds From arrival to the first token.\n";
  out += "# TYPE blip2_time_to_first_token_seconds histogram\n";
  first_token_.write(out, "blip2_time_to_first_token_seconds", "");
  out += "# HELP blip2_request_duration_seconds Request latency, by endpoint.\n";
  out += "# TYPE blip2_request_duration_seconds histogram\n";
  for (const auto& [k, h] : latency_) h.write(out, "blip2_request_duration_seconds", "endpoint=\"" + k + "\"");
  return out;
}

}  // namespace blip2::serve
