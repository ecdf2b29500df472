#include "blip2/util/common.h"

#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>

#include <c10/util/Exception.h>

namespace blip2 {
namespace fs = std::filesystem;

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

void rethrow_as_error(const std::string& what) {
  try {
    throw;
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error(what + ": " + first_line(e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    throw Error(what + ": out of memory");
  } catch (const std::exception& e) {
    throw Error(what + ": " + first_line(e.what()));
  }
}

static std::string timestamp() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%H:%M:%S", std::localtime(&t));
  return buf;
}

namespace {
int log_rank = -1;  // -1: a single process
}  // namespace

void set_log_rank(int rank) { log_rank = rank; }

void log_info(const std::string& msg) {
  if (log_rank > 0) return;
  std::cerr << "[" << timestamp() << "] " << msg << "\n";
}
void log_warn(const std::string& msg) {
  std::cerr << "[" << timestamp() << "] warning: " << (log_rank > 0 ? "rank " + std::to_string(log_rank) + ": " : "")
            << msg << "\n";
}

void atomic_write_with(const fs::path& path, const std::function<void(const fs::path&)>& write) {
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
  fs::path tmp = path;
  tmp += ".tmp." + std::to_string(::getpid());
  try {
    write(tmp);
    fs::rename(tmp, path);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

void atomic_write(const fs::path& path, const std::string& bytes) {
  atomic_write_with(path, [&](const fs::path& tmp) {
    std::ofstream out(tmp, std::ios::binary);
    check(bool(out), "cannot write " + tmp.string());
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    check(bool(out), "write failed: " + tmp.string() + " (disk full?)");
  });
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  check(bool(in), path.string() + ": cannot open file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string format_float(double v, int precision) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

Progress::Progress(std::string label, int64_t total, int64_t log_every)
    : label_(std::move(label)),
      total_(total),
      log_every_(std::max<int64_t>(1, log_every)),
      tty_(::isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()) {}

void Progress::update(int64_t done, const std::string& status) {
  if (log_rank > 0) return;
  if (tty_) {
    const int width = 24;
    int filled = total_ > 0 ? static_cast<int>(width * done / total_) : 0;
    std::string bar(filled, '#');
    bar.resize(width, '.');
    std::cerr << "\r" << label_ << " [" << bar << "] " << done << "/" << total_ << " " << status
              << "\033[K" << std::flush;
  } else if (done % log_every_ == 0 || done == total_) {
    log_info(label_ + " " + std::to_string(done) + "/" + std::to_string(total_) + " " + status);
  }
}

void Progress::finish() {
  if (tty_ && log_rank <= 0) std::cerr << "\n";
}

std::string join(const std::vector<std::string>& parts, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? sep : "") + parts[i];
  return out;
}

}  // namespace blip2
