// Generation speed of the stage-2 model (issue 6): time to first token and decoding tokens/s,
// on a Hugging Face Blip2ForConditionalGeneration directory (tools/bench_generate_hf.py --write
// makes a random one; the same script times transformers' generate on it for the ratio).
//
//   blip2_bench_generate DIR [--batch 1] [--new 32] [--beams 1] [--repeats 5] [--no-cache]
//                        [--dtype fp32|bf16] [--weights float|int8] [--copy]
//
// --dtype bf16 holds the ViT and the LLM in bf16 (model_config.frozen_dtype: bfloat16); --weights
// int8 quantises their linear layers (W8A16, model_config.weights: int8). The Q-Former stays fp32.
//
// Every row produces exactly --new tokens (min = max new tokens, EOS never ends a row early), the
// prompt is BOS after the image queries. Time to first token = a generate() of one new token
// (ViT + Q-Former + prefill + one step); decoding tokens/s = batch x (new - 1) / (time of the
// full generate - time to first token). Medians over --repeats after one warm-up run.
#include <algorithm>
#include <chrono>
#include <iostream>

#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/models/blip2_llm.h"
#include "blip2/tasks/factory.h"
#include "blip2/util/common.h"
#include "bench_util.h"

using namespace blip2;

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) try {
  check(argc >= 2, "usage: blip2_bench_generate DIR [--batch B] [--new N] [--beams K] [--repeats R] [--no-cache] "
                   "[--dtype fp32|bf16] [--weights float|int8] [--copy]");
  const std::string dir = argv[1];
  int64_t batch = 1, new_tokens = 32, beams = 1, repeats = 5;
  bool cache = true, copy = false;
  std::string dtype = "fp32", weights = "float";
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] {
      check(i + 1 < argc, a + " needs a value");
      return std::stoll(argv[++i]);
    };
    if (a == "--batch") batch = next();
    else if (a == "--new") new_tokens = next();
    else if (a == "--beams") beams = next();
    else if (a == "--repeats") repeats = next();
    else if (a == "--no-cache") cache = false;
    else if (a == "--copy") copy = true;
    else if (a == "--dtype" && i + 1 < argc) dtype = argv[++i];
    else if (a == "--weights" && i + 1 < argc) weights = argv[++i];
    else throw Error("unknown option " + a);
  }
  check(dtype == "fp32" || dtype == "bf16", "--dtype must be fp32 or bf16");
  check(weights == "float" || weights == "int8", "--weights must be float or int8");
  // As `blip2 run` and from_pretrained build it for prediction: the frozen ViT and LLM created in
  // their dtype (int8 layers waiting for the load, which quantises), no random initialisation.
  const auto t0 = std::chrono::steady_clock::now();
  auto hf = load_hf_directory(dir);
  Blip2Config config = hf.config;
  config.frozen_dtype = dtype == "bf16" ? "bfloat16" : "float32";
  config.weights = weights;
  WeightLedger ledger;
  Blip2Llm model = build_stage2_model(config, ledger, torch::kCPU, /*draw=*/false);
  // --copy keeps the file's map, so every tensor is copied into the model's own memory instead
  // of the model taking the memory-mapped file's pages (load_into).
  const TensorMap kept = copy ? hf.tensors : TensorMap{};
  auto report = load_weights_into(*model, std::move(hf.tensors), dir);
  check(report.missing.empty(), dir + ": " + report.summary());
  model->eval();
  std::cout << "loaded in " << format_float(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1)
            << " s; resident " << format_float(bench::current_rss_gib(), 2) << " GiB (peak "
            << format_float(bench::peak_rss_gib(), 2) << " GiB)\n";
  torch::manual_seed(0);
  const int64_t s = hf.config.vision_config.image_size;
  auto images = torch::randn({batch, 3, s, s});
  auto ids = torch::full({batch, 1}, hf.config.text_config->bos_token_id, torch::kLong);
  auto keep = torch::ones_like(ids);
  GenerationOptions o;
  o.num_beams = beams;
  o.use_cache = cache;
  o.eos_token_ids = {hf.config.text_config->eos_token_id};
  auto timed = [&](int64_t n) {
    o.max_new_tokens = o.min_new_tokens = n;
    const auto t0 = std::chrono::steady_clock::now();
    auto out = model->generate(images, ids, keep, o);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& r : out) check(static_cast<int64_t>(r.size()) == n, "a row ended early");
    return secs;
  };
  timed(new_tokens);  // warm-up
  std::vector<double> first, full;
  for (int64_t r = 0; r < repeats; ++r) {
    first.push_back(timed(1));
    full.push_back(timed(new_tokens));
  }
  const double ttft = median(first), total = median(full);
  const double tps = static_cast<double>(batch * (new_tokens - 1)) / std::max(total - ttft, 1e-9);
  std::cout << "blip2cpp: batch " << batch << ", " << new_tokens << " new tokens, beams " << beams << ", " << dtype
            << (weights == "int8" ? ", int8 weights" : "")
            << (cache ? "" : ", no cache") << ", threads " << torch::get_num_threads() << "\n"
            << "  time to first token " << format_float(ttft * 1000, 2) << " ms\n"
            << "  decoding " << format_float(tps, 1) << " tokens/s (generate of " << new_tokens << " tokens: "
            << format_float(total * 1000, 1) << " ms)\n"
            << "  resident " << format_float(bench::current_rss_gib(), 2) << " GiB, peak "
            << format_float(bench::peak_rss_gib(), 2) << " GiB\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
