// The server's counters in Prometheus' text format (GET /metrics): requests by endpoint and
// status, errors by kind, queue length, active sequences, decode batch sizes, tokens generated,
// and latency histograms (whole request, time to first token). Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace blip2::serve {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  // name{labels,le="..."} lines, then _sum and _count.
  void write(std::string& out, const std::string& name, const std::string& labels) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();
  void request(const std::string& endpoint, int status, double seconds);
  void first_token(double seconds);
  void decode_step(int64_t rows);
  void image_batch(int64_t images);  // images encoded in one ViT pass
  void tokens(int64_t n);
  void cancelled(int64_t n);  // requests dropped because their client went away
  void set_queue(int64_t n);
  void set_active(int64_t n);
  std::string text() const;
  // The error kind a status counts as (invalid_request, unauthorized, forbidden, not_found,
  // payload_too_large, unsupported_body, overloaded, internal).
  static std::string error_kind(int status);

 private:
  mutable std::mutex m_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, uint64_t> errors_;
  std::map<std::string, Histogram> latency_;
  Histogram first_token_, batch_, image_batch_;
  uint64_t tokens_ = 0, steps_ = 0, cancelled_ = 0;
  int64_t queue_ = 0, active_ = 0;
};

}  // namespace blip2::serve
