#include "webdriver.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <regex>
#include <stdexcept>
#include <thread>

#include "blip2/serve/client.h"
#include "blip2/serve/openai.h"
#include "server_process.h"

namespace blip2::testing {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const char* const kChromium = "/usr/bin/chromium";
const char* const kChromeDriver = "/usr/bin/chromedriver";
const char* const kElementKey = "element-6066-11e4-a52e-4f735466cecf";

// Newlines and runs of spaces folded into one space, cut to a readable length.
std::string one_line(const std::string& s, size_t max_len = 500) {
  std::string out;
  for (char c : s) {
    const bool space = c == '\n' || c == '\r' || c == '\t' || c == ' ';
    if (space) {
      if (!out.empty() && out.back() != ' ') out += ' ';
    } else {
      out += c;
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  if (out.size() > max_len) out = out.substr(0, max_len) + "...";
  return out;
}

bool executable(const char* path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec) && ::access(path, X_OK) == 0;
}

void sleep_s(double s) { std::this_thread::sleep_for(std::chrono::duration<double>(s)); }

}  // namespace

bool browser_available() { return executable(kChromium) && executable(kChromeDriver); }


// ---- ChromeDriver ----

ChromeDriver::ChromeDriver(const std::string& path, double timeout_s) {
  child_ = std::make_unique<ChildProcess>(std::vector<std::string>{path, "--port=0"});
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  const std::regex started("started successfully on port (\\d+)\\.");
  for (;;) {
    std::smatch m;
    const std::string out = child_->output();
    if (std::regex_search(out, m, started)) {
      port_ = std::stoi(m[1].str());
      break;
    }
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error("chromedriver did not report its port: " + one_line(out));
    sleep_s(0.05);
  }
  serve::HttpClient http("127.0.0.1", port_, 5);
  for (;;) {
    const auto r = http.get("/status");
    if (r.status == 200) {
      try {
        if (json::parse(r.body).at("value").value("ready", false)) break;
      } catch (const json::exception&) {
      }
    }
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error("chromedriver on port " + std::to_string(port_) + " never became ready: " +
                               one_line(r.error.empty() ? r.body : r.error));
    sleep_s(0.05);
  }
}

ChromeDriver::~ChromeDriver() { stop(); }

int ChromeDriver::stop() {
  if (stopped_ || !child_) return 0;
  stopped_ = true;
  return child_->stop(SIGTERM, 10);
}

std::string ChromeDriver::output() { return child_ ? child_->output() : std::string(); }

// ---- WebDriverSession ----

WebDriverSession::WebDriverSession(double timeout_s) {
  driver_ = std::make_unique<ChromeDriver>(kChromeDriver, timeout_s);
  http_ = std::make_unique<serve::HttpClient>("127.0.0.1", driver_->port(), timeout_s);
  std::string tmpl = (fs::temp_directory_path() / "blip2_chromium_XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("cannot create a browser profile directory");
  profile_dir_ = tmpl;
  const json caps = {
      {"capabilities",
       {{"alwaysMatch",
         {{"browserName", "chrome"},
          {"goog:chromeOptions",
           {{"binary", kChromium},
            {"args",
             {"--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--user-data-dir=" + profile_dir_, "--window-size=1200,1000"}}}}}}}}};
  try {
    session_ = command("POST", "/session", caps).at("sessionId").get<std::string>();
  } catch (...) {
    std::error_code ec;
    fs::remove_all(profile_dir_, ec);
    throw;
  }
}

WebDriverSession::~WebDriverSession() {
  if (!session_.empty()) {
    try {
      command("DELETE", "/session/" + session_);
    } catch (...) {  // the browser may be gone already; chromedriver is stopped next anyway
    }
  }
  http_.reset();
  if (driver_) driver_->stop();
  std::error_code ec;
  fs::remove_all(profile_dir_, ec);
}

json WebDriverSession::command(const std::string& method, const std::string& path, const json& body) {
  driver_->output();  // keep the child's pipe drained
  serve::HttpResponse r;
  if (method == "GET")
    r = http_->get(path);
  else if (method == "DELETE")
    r = http_->del(path);
  else
    r = http_->post(path, body.dump(), "application/json; charset=utf-8");
  const std::string what = "webdriver " + method + " " + path;
  if (r.status == 0) throw std::runtime_error(one_line(what + ": no response (" + r.error + ")"));
  json j;
  try {
    j = json::parse(r.body);
  } catch (const json::exception&) {
    throw std::runtime_error(one_line(what + ": HTTP " + std::to_string(r.status) + ", not JSON: " + r.body));
  }
  json value = j.is_object() && j.contains("value") ? j["value"] : json();
  const bool is_error = value.is_object() && value.contains("error");
  if (r.status >= 400 || is_error) {
    std::string error = "HTTP " + std::to_string(r.status), message;
    if (is_error && value["error"].is_string()) error = value["error"].get<std::string>();
    if (value.is_object() && value.contains("message") && value["message"].is_string())
      message = value["message"].get<std::string>();
    if (message.rfind(error, 0) == 0) message = message.substr(error.size());  // "no such element: no such element: …"
    if (message.rfind(": ", 0) == 0) message = message.substr(2);
    throw std::runtime_error(one_line(what + ": " + error + (message.empty() ? "" : ": " + message)));
  }
  return value;
}

std::string WebDriverSession::element_path(const std::string& element) const {
  return "/session/" + session_ + "/element/" + element;
}

json WebDriverSession::element_ref(const std::string& element) { return {{kElementKey, element}}; }

void WebDriverSession::navigate(const std::string& url) { command("POST", "/session/" + session_ + "/url", {{"url", url}}); }

std::string WebDriverSession::current_url() { return command("GET", "/session/" + session_ + "/url").get<std::string>(); }

std::string WebDriverSession::find(const std::string& css) {
  const auto v = command("POST", "/session/" + session_ + "/element", {{"using", "css selector"}, {"value", css}});
  return v.at(kElementKey).get<std::string>();
}

std::vector<std::string> WebDriverSession::find_all(const std::string& css) {
  const auto v = command("POST", "/session/" + session_ + "/elements", {{"using", "css selector"}, {"value", css}});
  std::vector<std::string> out;
  for (const auto& e : v) out.push_back(e.at(kElementKey).get<std::string>());
  return out;
}

void WebDriverSession::send_keys(const std::string& element, const std::string& text) {
  command("POST", element_path(element) + "/value", {{"text", text}});
}

void WebDriverSession::clear(const std::string& element) { command("POST", element_path(element) + "/clear"); }

void WebDriverSession::click(const std::string& element) { command("POST", element_path(element) + "/click"); }

std::string WebDriverSession::attribute(const std::string& element, const std::string& name) {
  const auto v = command("GET", element_path(element) + "/attribute/" + name);
  if (v.is_null()) return "";
  return v.is_string() ? v.get<std::string>() : v.dump();
}

std::string WebDriverSession::text(const std::string& element) {
  return command("GET", element_path(element) + "/text").get<std::string>();
}

json WebDriverSession::execute(const std::string& script, const json& args) {
  return command("POST", "/session/" + session_ + "/execute/sync", {{"script", script}, {"args", args}});
}

std::string WebDriverSession::screenshot_png() {
  auto png = blip2::serve::base64_decode(command("GET", "/session/" + session_ + "/screenshot").get<std::string>());
  if (!png) throw std::runtime_error("webdriver: the screenshot is not base64");
  return *png;
}

bool WebDriverSession::wait_until(const std::string& condition, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  const std::string script = "return !!(" + condition + ");";
  for (;;) {
    if (execute(script).get<bool>()) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    sleep_s(0.1);
  }
}

}  // namespace blip2::testing
