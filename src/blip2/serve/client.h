// A small HTTP/1.1 client (cpp-httplib underneath, kept out of this header): the load test, the
// benchmarks, the tests' WebDriver client and the server tests speak to servers with it.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace blip2::serve {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

struct HttpResponse {
  int status = 0;      // 0: no response (see error)
  std::string body;
  HeaderList headers;
  std::string error;   // the transport error when there was no response ("" otherwise)
  std::string header(const std::string& name) const;  // "" when absent (case-insensitive)
};

class HttpClient {
 public:
  // One keep-alive connection to host:port, reopened as needed.
  HttpClient(const std::string& host, int port, double timeout_s = 120);
  ~HttpClient();
  HttpClient(HttpClient&&) noexcept;
  HttpClient& operator=(HttpClient&&) noexcept;

  HttpResponse get(const std::string& path, const HeaderList& headers = {});
  HttpResponse del(const std::string& path, const HeaderList& headers = {});
  HttpResponse post(const std::string& path, const std::string& body,
                    const std::string& content_type = "application/json", const HeaderList& headers = {});
  // The body is handed to on_data as it arrives; on_data returning false drops the connection
  // (a client that goes away mid-stream).
  HttpResponse post_stream(const std::string& path, const std::string& body,
                           const std::function<bool(const std::string&)>& on_data,
                           const HeaderList& headers = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Bytes sent as they are over a new TCP connection; returns everything read back until the peer
// closes or timeout_s passes (tests of requests no well-behaved client sends).
std::string raw_http(const std::string& host, int port, const std::string& request, double timeout_s = 10);

// The `data:` payloads of a server-sent event stream, in order.
std::vector<std::string> sse_data(const std::string& stream);

}  // namespace blip2::serve
