// A `blip2 serve` (or any) child process for the tests: started with its arguments, its stdout
// read until it prints "listening on http://HOST:PORT", stopped with SIGTERM. Header-only.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace blip2::testing {

class ChildProcess {
 public:
  // Starts argv[0] with argv; stdout and stderr are read through one pipe (kept in output()).
  explicit ChildProcess(const std::vector<std::string>& argv) {
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("pipe failed");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
    posix_spawn_file_actions_addclose(&fa, fds[0]);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const int rc = posix_spawn(&pid_, argv[0].c_str(), &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(fds[1]);
    fd_ = fds[0];
    if (rc != 0) throw std::runtime_error("cannot start " + argv[0]);
  }
  ~ChildProcess() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) ::close(fd_);
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // Reads output until `needle` appears (true) or the process ends / timeout passes (false).
  bool wait_for(const std::string& needle, double timeout_s) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (output_.find(needle) == std::string::npos) {
      if (std::chrono::steady_clock::now() > deadline || eof_) return false;
      read_some(100);
    }
    return true;
  }
  // Everything printed so far (reads what is waiting first).
  const std::string& output() {
    while (read_some(0)) {
    }
    return output_;
  }
  // Sends `sig` and waits up to timeout_s for the exit; returns the exit status (128 + signal when
  // killed by one; -1 when it did not end in time, after which it is killed).
  int stop(int sig = SIGTERM, double timeout_s = 30) {
    ::kill(pid_, sig);
    return wait(timeout_s);
  }
  int wait(double timeout_s) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    int status = 0;
    for (;;) {
      read_some(0);
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        exited_ = true;
        return -1;
      }
      ::usleep(20000);
    }
    exited_ = true;
    while (read_some(0)) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  pid_t pid() const { return pid_; }

 private:
  bool read_some(int timeout_ms) {  // false at end of output or when nothing came in time
    if (eof_) return false;
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[4096];
    const auto n = ::read(fd_, buf, sizeof buf);
    if (n <= 0) {
      eof_ = true;
      return false;
    }
    output_.append(buf, static_cast<size_t>(n));
    return true;
  }
  pid_t pid_ = -1;
  int fd_ = -1;
  bool exited_ = false;
  bool eof_ = false;
  std::string output_;
};

// `blip2 serve ARGS --port 0` started and listening: port() is where.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> args, double timeout_s = 120) {
    std::vector<std::string> argv{BLIP2_CLI, "serve"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--port", "0"});
    child_ = std::make_unique<ChildProcess>(argv);
    const std::string mark = "listening on http://";
    if (!child_->wait_for(mark, timeout_s)) throw std::runtime_error("server did not start: " + child_->output());
    const auto& out = child_->output();
    const auto at = out.find(mark) + mark.size();
    const auto colon = out.find(':', at);
    host_ = out.substr(at, colon - at);
    port_ = std::stoi(out.substr(colon + 1));
  }
  int port() const { return port_; }
  const std::string& host() const { return host_; }
  ChildProcess& process() { return *child_; }
  // Waits until GET /health says 200 (the models are loaded).
  template <class Client>
  bool wait_ready(Client& c, double timeout_s = 120) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (std::chrono::steady_clock::now() < deadline) {
      if (c.get("/health").status == 200) return true;
      ::usleep(50000);
    }
    return false;
  }

 private:
  std::unique_ptr<ChildProcess> child_;
  std::string host_;
  int port_ = 0;
};

}  // namespace blip2::testing
