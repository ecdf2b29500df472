// Image feature extraction at full size (issue 14): EVA ViT-g/14 + Q-Former of a Hugging Face
// Blip2ForImageTextRetrieval directory (tools/bench_features_hf.py --write makes a random one and
// times transformers on it), the same work as bench_features_hf.py: ViT -> Q-Former over the
// queries -> the normalised vision projection, no gradient, random 224-px images.
//
//   blip2_bench_features DIR [--batch 1] [--repeats 3]
//
// Prints the median seconds per batch after a warm-up, images/s, and GFLOP/s counted as 2 FLOPs per
// multiply-add of every product (ViT and Q-Former), to set against bench_limits.
#include <algorithm>
#include <chrono>
#include <iostream>

#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/factory.h"
#include "blip2/util/common.h"

using namespace blip2;

int main(int argc, char** argv) try {
  check(argc >= 2, "usage: blip2_bench_features DIR [--batch B] [--repeats R]");
  const std::string dir = argv[1];
  int64_t batch = 1, repeats = 3;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    check(i + 1 < argc, a + " needs a value");
    if (a == "--batch") batch = std::stoll(argv[++i]);
    else if (a == "--repeats") repeats = std::stoll(argv[++i]);
    else throw Error("unknown option " + a);
  }
  check(batch >= 1 && repeats >= 1, "--batch and --repeats must be >= 1");
  const auto t_load = std::chrono::steady_clock::now();
  auto hf = load_hf_directory(dir);
  WeightLedger ledger;
  auto model = build_loaded<Blip2Qformer>(true, [&](bool draw) {
    ledger = WeightLedger(/*allow_partial=*/true);  // Hugging Face drops the stage-1 LM head and temp
    auto m = build_model(hf.config, ledger, torch::kCPU, draw);
    ledger.load(*m, hf.tensors, dir);
    return m;
  }, ledger);
  model->eval();
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const int64_t s = hf.config.vision_config.image_size;
  auto images = torch::randn({batch, 3, s, s});
  auto features = [&] { return model->image_features(model->query_pass(model->encode_image(images), false).hidden); };
  features();
  std::vector<double> t;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    features();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  const double sec = t[t.size() / 2];
  // Products per image: ViT blocks (qkv, proj, fc1, fc2 over N tokens, attention N^2), Q-Former
  // (query self-attention, cross-attention to N tokens every cross_attention_freq layers, FFN).
  const auto& v = hf.config.vision_config;
  const auto& q = hf.config.qformer_config;
  const double n = v.num_patches() + 1, d = v.hidden_size, f = v.intermediate_size, nq = q.query_length,
               h = q.hidden_size, qf = q.intermediate_size;
  const double vit = v.num_hidden_layers * (2 * n * d * (4 * d + 2 * f) + 4 * n * n * d);
  double qformer = 0;
  for (int64_t l = 0; l < q.num_hidden_layers; ++l) {
    qformer += 2 * nq * h * (4 * h + 2 * qf) + 4 * nq * nq * h;
    if (l % q.cross_attention_freq == 0) qformer += 2 * nq * h * 2 * h + 2 * n * d * 2 * h + 4 * nq * n * h;
  }
  const double flop = batch * (vit + qformer);
  std::cout << "blip2cpp: batch " << batch << ", threads " << torch::get_num_threads() << ": load "
            << format_float(load_s, 1) << " s; " << format_float(sec, 2) << " s per batch, "
            << format_float(batch / sec, 3) << " images/s, " << format_float(flop / 1e9 / batch, 0)
            << " GFLOP per image, " << format_float(flop / sec / 1e9, 1) << " GFLOP/s\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << first_line(e.what()) << "\n";
  return 1;
}
