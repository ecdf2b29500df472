// Peak memory of loading a full-size checkpoint (issue 4): the weights must not be held twice.
//
//   blip2_bench_load --write DIR [--model blip2_stage1_vit_g]   # random weights, our format
//   blip2_bench_load --load DIR                                 # prints peak RSS / weight size
//
// --load runs in a fresh process: it builds the model (no random init, as from_pretrained does;
// --draw draws it first, as before issue 14),
// loads DIR's model.safetensors into it (memory-mapped; a tensor in the model's dtype becomes
// the model's without a copy, any other is copied and its file pages given back) and reports the
// peak resident set size against the size of the weights and against the process before loading.
#include <chrono>
#include <filesystem>
#include <iostream>

#include "blip2/api/api.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/safetensors.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/stage1.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"
#include "bench_util.h"

namespace fs = std::filesystem;

using blip2::bench::current_rss_gib;
using blip2::bench::peak_rss_gib;

int main(int argc, char** argv) try {
  std::string mode = argc > 2 ? argv[1] : "", dir = argc > 2 ? argv[2] : "";
  std::string model = argc > 4 && std::string(argv[3]) == "--model" ? argv[4] : "blip2_stage1_vit_g";
  if (mode == "--write") {
    auto config = blip2::model_config_of(model);
    blip2::Blip2Qformer m(config);
    fs::create_directories(dir);
    blip2::save_safetensors((fs::path(dir) / "model.safetensors").string(), blip2::state_dict(*m));
    blip2::atomic_write(fs::path(dir) / "config.yaml", blip2::to_yaml(config));
    std::cout << "wrote " << dir << " (" << model << ")\n";
    return 0;
  }
  if (mode != "--load") {
    std::cerr << "usage: " << argv[0] << " --write DIR [--model NAME] | --load DIR [--draw]\n";
    return 2;
  }
  const auto file = fs::path(dir) / "model.safetensors";
  const double weights = static_cast<double>(fs::file_size(file)) / (1024.0 * 1024.0 * 1024.0);
  const double before = current_rss_gib();
  auto t0 = std::chrono::steady_clock::now();
  auto config = blip2::model_config_of(dir);
  config.checkpoint_name_or_path.clear();
  // As from_pretrained and `blip2 run` in eval/predict build it: the random initialisation that
  // the load overwrites is not drawn (--draw draws it, as training builds do).
  const bool draw = argc > 3 && std::string(argv[3]) == "--draw";
  blip2::WeightLedger ledger;
  double built = 0;
  auto m = blip2::build_loaded<blip2::Blip2Qformer>(!draw, [&](bool d) {
    ledger = blip2::WeightLedger();
    auto model = blip2::build_model(config, ledger, torch::kCPU, d);
    built = current_rss_gib();
    blip2::load_model_weights(*model, dir, ledger);
    return model;
  }, ledger);
  ledger.check(*m, {});
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double peak = peak_rss_gib();
  std::cout << "weights file " << blip2::format_float(weights, 3) << " GiB; RSS before "
            << blip2::format_float(before, 3) << " GiB, after building the model "
            << blip2::format_float(built, 3) << " GiB, after loading " << blip2::format_float(current_rss_gib(), 3)
            << " GiB; peak " << blip2::format_float(peak, 3) << " GiB = "
            << blip2::format_float(peak / weights, 3) << "x the weights ("
            << blip2::format_float((peak - before) / weights, 3) << "x above the process before loading); "
            << blip2::format_float(secs, 1) << " s\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
