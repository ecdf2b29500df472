#include "blip2/serve/client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <httplib.h>

namespace blip2::serve {
namespace {

httplib::Headers to_httplib(const HeaderList& h) {
  httplib::Headers out;
  for (const auto& [k, v] : h) out.emplace(k, v);
  return out;
}

HttpResponse from_result(const httplib::Result& r) {
  HttpResponse out;
  if (!r) {
    out.error = httplib::to_string(r.error());
    return out;
  }
  out.status = r->status;
  out.body = r->body;
  for (const auto& [k, v] : r->headers) out.headers.emplace_back(k, v);
  return out;
}

}  // namespace

std::string HttpResponse::header(const std::string& name) const {
  for (const auto& [k, v] : headers)
    if (strcasecmp(k.c_str(), name.c_str()) == 0) return v;
  return "";
}

struct HttpClient::Impl {
  httplib::Client client;
  Impl(const std::string& host, int port) : client(host, port) {}
};

HttpClient::HttpClient(const std::string& host, int port, double timeout_s)
    : impl_(std::make_unique<Impl>(host, port)) {
  const auto t = std::chrono::duration<double>(timeout_s);
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(t);
  impl_->client.set_keep_alive(true);
  impl_->client.set_tcp_nodelay(true);
  impl_->client.set_connection_timeout(us);
  impl_->client.set_read_timeout(us);
  impl_->client.set_write_timeout(us);
}
HttpClient::~HttpClient() = default;
HttpClient::HttpClient(HttpClient&&) noexcept = default;
HttpClient& HttpClient::operator=(HttpClient&&) noexcept = default;

HttpResponse HttpClient::get(const std::string& path, const HeaderList& headers) {
  return from_result(impl_->client.Get(path, to_httplib(headers)));
}

HttpResponse HttpClient::del(const std::string& path, const HeaderList& headers) {
  return from_result(impl_->client.Delete(path, to_httplib(headers)));
}

HttpResponse HttpClient::post(const std::string& path, const std::string& body, const std::string& content_type,
                              const HeaderList& headers) {
  return from_result(impl_->client.Post(path, to_httplib(headers), body, content_type));
}

HttpResponse HttpClient::post_stream(const std::string& path, const std::string& body,
                                     const std::function<bool(const std::string&)>& on_data,
                                     const HeaderList& headers) {
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.headers = to_httplib(headers);
  req.headers.emplace("Content-Type", "application/json");
  req.body = body;
  HttpResponse out;
  req.response_handler = [&](const httplib::Response& r) {
    out.status = r.status;
    for (const auto& [k, v] : r.headers) out.headers.emplace_back(k, v);
    return true;
  };
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    std::string chunk(data, n);
    out.body += chunk;
    return on_data(chunk);
  };
  auto r = impl_->client.send(req);
  if (!r && out.status == 0) out.error = httplib::to_string(r.error());
  return out;
}

std::string raw_http(const std::string& host, int port, const std::string& request, double timeout_s) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host.c_str(), &addr.sin_addr);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    size_t sent = 0;
    while (sent < request.size()) {
      const auto n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += static_cast<size_t>(n);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    char buf[65536];
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const auto n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  return out;
}

std::vector<std::string> sse_data(const std::string& stream) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < stream.size()) {
    size_t end = stream.find('\n', pos);
    if (end == std::string::npos) end = stream.size();
    std::string line = stream.substr(pos, end - pos);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.rfind("data:", 0) == 0) {
      std::string d = line.substr(5);
      if (!d.empty() && d[0] == ' ') d.erase(0, 1);
      out.push_back(d);
    }
    pos = end + 1;
  }
  return out;
}

}  // namespace blip2::serve
