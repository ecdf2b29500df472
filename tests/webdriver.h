// A small W3C WebDriver client for the browser tests: chromedriver started as a child process
// (`--port=0`), one headless Chromium session spoken to over HTTP with blip2::serve::HttpClient.
// Every WebDriver error ({"value":{"error","message"}}) or transport failure throws
// std::runtime_error with a one-line message.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace blip2::serve {
class HttpClient;
}

namespace blip2::testing {

class ChildProcess;

// True when /usr/bin/chromium and /usr/bin/chromedriver exist and are executable.
bool browser_available();

// `chromedriver --port=0`, running until stop() or destruction; port() is where it listens once
// the constructor returns (it has printed its port and GET /status says ready).
class ChromeDriver {
 public:
  explicit ChromeDriver(const std::string& path = "/usr/bin/chromedriver", double timeout_s = 30);
  ~ChromeDriver();
  ChromeDriver(const ChromeDriver&) = delete;
  ChromeDriver& operator=(const ChromeDriver&) = delete;

  int port() const { return port_; }
  // SIGTERM, then waits; returns the exit status (-1 when it had to be killed). Idempotent.
  int stop();
  // What chromedriver (and the browser it started) printed so far; reading it also drains the
  // pipe so that a chatty browser never blocks on it.
  std::string output();

 private:
  std::unique_ptr<ChildProcess> child_;
  int port_ = 0;
  bool stopped_ = false;
};

// One headless Chromium session on its own chromedriver and its own fresh profile directory.
// Element ids are WebDriver element references (the "element-6066-…" values).
class WebDriverSession {
 public:
  explicit WebDriverSession(double timeout_s = 60);
  ~WebDriverSession();  // deletes the session, stops chromedriver, removes the profile
  WebDriverSession(const WebDriverSession&) = delete;
  WebDriverSession& operator=(const WebDriverSession&) = delete;

  void navigate(const std::string& url);
  std::string current_url();
  std::string find(const std::string& css);                    // throws when nothing matches
  std::vector<std::string> find_all(const std::string& css);   // empty when nothing matches
  void send_keys(const std::string& element, const std::string& text);  // a file input: an absolute path
  void clear(const std::string& element);
  void click(const std::string& element);
  // The attribute's value ("" when absent), as GET /attribute/{name} gives it.
  std::string attribute(const std::string& element, const std::string& name);
  std::string text(const std::string& element);  // the rendered text, as the user sees it
  // Runs `script` as the body of a function (use `return` for a result) with `args` as
  // `arguments`; pass elements as element_ref(id). Returns the JSON-converted result.
  nlohmann::json execute(const std::string& script, const nlohmann::json& args = nlohmann::json::array());
  std::string screenshot_png();  // PNG bytes of the viewport
  // Polls the JavaScript expression `condition` (e.g. "document.title === 'x'") every 100 ms
  // until it is truthy (true) or timeout_s passes (false). A script error throws.
  bool wait_until(const std::string& condition, double timeout_s);

  static nlohmann::json element_ref(const std::string& element);
  const std::string& session_id() const { return session_; }
  ChromeDriver& driver() { return *driver_; }

 private:
  nlohmann::json command(const std::string& method, const std::string& path,
                         const nlohmann::json& body = nlohmann::json::object());
  std::string element_path(const std::string& element) const;

  std::unique_ptr<ChromeDriver> driver_;
  std::unique_ptr<serve::HttpClient> http_;
  std::string profile_dir_;
  std::string session_;
};

}  // namespace blip2::testing
