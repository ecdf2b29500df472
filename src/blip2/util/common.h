// Shared plumbing: the one-line error type, logging, progress, atomic file writes.
//
// Every error a user can cause (bad file, bad key, bad shape) is thrown as blip2::Error with a
// message that names the file/key/entry; the CLI prints it on one line and exits non-zero.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace blip2 {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws blip2::Error(msg) unless cond holds.
inline void check(bool cond, const std::string& msg) {
  if (!cond) throw Error(msg);
}

// Inside a catch block: rethrows the exception in flight as a blip2::Error "what: <its first line>"
// (LibTorch's c10::Error without its backtrace); a blip2::Error passes unchanged.
[[noreturn]] void rethrow_as_error(const std::string& what);

// Runs f, turning LibTorch's and the standard library's exceptions into one-line blip2::Errors
// that say which call (`what`) failed: the boundary of every public API function.
template <class F>
decltype(auto) guarded(const std::string& what, F&& f) {
  try {
    return f();
  } catch (...) {
    rethrow_as_error(what);
  }
}

// The first line of a message.
std::string first_line(const std::string& s);

// Logging to stderr with a timestamp; `info` is for progress a user wants to see.
void log_info(const std::string& msg);
void log_warn(const std::string& msg);
// In a multi-process run: rank > 0 prints no info lines or progress, and its warnings carry
// "rank N" (set by dist::init_from_env).
void set_log_rank(int rank);

// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
// crash never leaves a truncated file under the final name.
void atomic_write(const std::filesystem::path& path, const std::string& bytes);
// Same, for a writer that fills a file by path (e.g. a library that writes on its own).
void atomic_write_with(const std::filesystem::path& path,
                       const std::function<void(const std::filesystem::path& tmp)>& write);
std::string read_file(const std::filesystem::path& path);

// A progress line: a redrawn bar on a terminal, plain log lines every `log_every` steps
// otherwise (CI logs, files).
class Progress {
 public:
  Progress(std::string label, int64_t total, int64_t log_every = 10);
  // `status` is appended to the line (losses, lr, samples/s).
  void update(int64_t done, const std::string& status);
  void finish();

 private:
  std::string label_;
  int64_t total_, log_every_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

std::string format_float(double v, int precision = 4);
// "a, b, c"
std::string join(const std::vector<std::string>& parts, const std::string& sep);

}  // namespace blip2
