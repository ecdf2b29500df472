// This machine's ceilings, measured (issue 14): fp32 matrix-product FLOP/s through LibTorch at the
// shapes the models use, by MKL's sgemm (torch::mm) and by oneDNN (blip2::linear, what inference
// runs), and memory bandwidth (a reduction that reads a large tensor once; a copy that reads and
// writes it; a one-row product that reads it as a weight). Every figure elsewhere is stated as a
// fraction of the best of these.
//
//   blip2_bench_limits [--threads N] [--gib 1] [--repeats 5]
//
// Medians over --repeats after one warm-up; FLOPs counted as 2 m n k per product; bytes as
// read (+ written) once.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "blip2/models/layers.h"
#include "blip2/util/common.h"

using namespace blip2;

static double median_seconds(int64_t repeats, const std::function<void()>& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int64_t i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) try {
  int64_t threads = 0, repeats = 5;
  double gib = 1.0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i], usage = " (usage: blip2_bench_limits [--threads N] [--gib G] [--repeats R])";
    check(a == "--threads" || a == "--gib" || a == "--repeats", "unknown option " + a + usage);
    check(i + 1 < argc, a + " needs a value" + usage);
    const std::string v = argv[++i];
    if (a == "--threads") threads = std::stoll(v);
    else if (a == "--gib") gib = std::stod(v);
    else repeats = std::stoll(v);
  }
  check(repeats >= 1 && gib > 0, "--repeats must be >= 1 and --gib > 0");
  if (threads > 0) torch::set_num_threads(static_cast<int>(threads));
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  std::printf("threads: %d\n\n| fp32 product [m x k] x [k x n] | what | MKL sgemm (torch::mm) GFLOP/s | "
              "oneDNN (blip2::linear) GFLOP/s |\n|---|---|---|---|\n",
              torch::get_num_threads());
  struct Shape {
    int64_t m, k, n;
    const char* what;
  };
  const std::vector<Shape> shapes{{2048, 2048, 2048, "square"},
                                  {257, 1408, 6144, "ViT-g fc1, one image"},
                                  {2056, 1408, 6144, "ViT-g fc1, 8 images"},
                                  {2056, 6144, 1408, "ViT-g fc2, 8 images"},
                                  {256, 768, 3072, "Q-Former FFN, 8 x 32 queries"},
                                  {1, 4096, 11008, "Llama-7B MLP, decode batch 1"},
                                  {4, 4096, 11008, "Llama-7B MLP, decode batch 4"},
                                  {1, 2560, 10240, "OPT-2.7B fc1, decode batch 1"},
                                  {1, 2560, 50272, "OPT-2.7B lm_head, decode batch 1"}};
  for (const auto& s : shapes) {
    auto a = torch::randn({s.m, s.k}), b = torch::randn({s.k, s.n}), w = b.t().contiguous();
    const double mkl = median_seconds(repeats, [&] { (void)torch::mm(a, b); });
    const double dnn = median_seconds(repeats, [&] { (void)blip2::linear(a, w); });
    const double flop = 2.0 * s.m * s.n * s.k;
    std::printf("| [%lld x %lld] x [%lld x %lld] | %s | %.1f | %.1f |\n", static_cast<long long>(s.m),
                static_cast<long long>(s.k), static_cast<long long>(s.k), static_cast<long long>(s.n), s.what,
                flop / mkl / 1e9, flop / dnn / 1e9);
  }
  const int64_t n = static_cast<int64_t>(gib * (1 << 30) / 4);
  auto x = torch::rand({n}), y = torch::empty_like(x);
  const double bytes = static_cast<double>(n) * 4;
  const double read = median_seconds(repeats, [&] { (void)x.sum().item<float>(); });
  const double copy = median_seconds(repeats, [&] { y.copy_(x); });
  // A decode step's access pattern: one row against a weight of --gib read once (oneDNN GEMV).
  auto weight = x.view({-1, 4096});
  auto row = torch::randn({1, 4096});
  const double gemv = median_seconds(repeats, [&] { (void)blip2::linear(row, weight); });
  std::printf("\n| memory, %.2f GiB fp32 | GB/s |\n|---|---|\n| read (sum) | %.1f |\n| copy (read + write) | %.1f |\n"
              "| read as a weight (1-row oneDNN product) | %.1f |\n",
              gib, bytes / read / 1e9, 2 * bytes / copy / 1e9, bytes / gemv / 1e9);
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << first_line(e.what()) << "\n";
  return 1;
}
