// Helpers shared by the test files.
#pragma once

#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <iostream>

#include "blip2/util/common.h"

namespace blip2::testing {

// The message of the blip2::Error that f throws, or "<no error>".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

struct CliResult {
  int code;
  std::string out;  // stdout and stderr
};

// Runs `program` with `args` (shell syntax), capturing stdout and stderr.
inline CliResult run_program(const std::string& program, const std::string& args) {
  std::string cmd = program + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  while (fgets(buf.data(), buf.size(), p)) out += buf.data();
  int status = pclose(p);
  return {WEXITSTATUS(status), out};
}

// Runs the blip2 binary with `args`.
inline CliResult run_cli(const std::string& args) { return run_program(BLIP2_CLI, args); }

// A fresh, empty directory under the system temp dir, unique to this process.
inline std::filesystem::path temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("blip2_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// The parity fixtures tools/make_parity_fixtures.py wrote.
inline const std::filesystem::path kParity = std::filesystem::path(BLIP2_FIXTURE_DIR) / "parity";

// Largest absolute difference of two tensors of the same shape (printed, for the test log).
inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  const double d = (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
  std::cout << "  max |diff| " << d << "\n";
  return d;
}

// A run interrupted after head.size() steps and resumed (tail) follows the uninterrupted one
// (full): the same losses (1e-5 after the resume) and learning rates, step for step.
template <class StepLog>
void expect_same_trajectory(const std::vector<StepLog>& full, const std::vector<StepLog>& head,
                            const std::vector<StepLog>& tail) {
  ASSERT_EQ(head.size() + tail.size(), full.size());
  for (size_t i = 0; i < head.size(); ++i) EXPECT_DOUBLE_EQ(head[i].loss, full[i].loss) << i;
  for (size_t i = 0; i < tail.size(); ++i) {
    const auto& want = full[head.size() + i];
    EXPECT_EQ(tail[i].step, want.step);
    EXPECT_NEAR(tail[i].loss, want.loss, 1e-5) << "step " << tail[i].step;
    EXPECT_DOUBLE_EQ(tail[i].lr, want.lr);
  }
}

}  // namespace blip2::testing
