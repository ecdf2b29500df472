// The blip2 command line: a thin layer over the library.
//   blip2 run --config FILE --run_mode train|eval|predict [...]   (as run_mindformer.py)
//   blip2 list-models                                              (the support list)
#include <CLI/CLI.hpp>

#include <iostream>

#include "blip2/config/config.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/runner.h"
#include "blip2/text/text.h"
#include "blip2/util/common.h"

namespace {

// One line, however the library failed.
std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

int list_models() {
  std::cout << "support list of Blip2Qformer is:\n";
  for (const auto& p : blip2::presets()) {
    const auto& c = p.config;
    std::cout << "  " << p.name << "  [" << p.task << "]\n    " << p.description << "\n    vision "
              << c.vision_config.image_size << "px patch " << c.vision_config.patch_size
              << " width " << c.vision_config.hidden_size << " depth "
              << c.vision_config.num_hidden_layers << "; qformer " << c.qformer_config.num_hidden_layers
              << " layers width " << c.qformer_config.hidden_size << ", "
              << c.qformer_config.query_length << " queries\n";
  }
  return 0;
}

int tokenize_texts(const std::string& vocab, const std::vector<std::string>& texts,
                   int64_t max_length, const std::string& padding, bool lower) {
  auto tok = blip2::WordPieceTokenizer::from_file(vocab, lower);
  auto enc = tok.encode_batch(texts, max_length, padding == "none" ? "longest" : padding);
  for (int64_t i = 0; i < enc.ids.size(0); ++i) {
    const int64_t n = padding == "none" ? enc.mask[i].sum().item<int64_t>() : enc.ids.size(1);
    std::vector<int64_t> ids(enc.ids[i].data_ptr<int64_t>(), enc.ids[i].data_ptr<int64_t>() + n);
    std::cout << nlohmann::json(ids).dump() << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"blip2cpp: BLIP-2 (EVA ViT + Q-Former + LLM) on LibTorch"};
  app.require_subcommand(1);

  auto* run = app.add_subcommand("run", "train, evaluate or predict with a config (run_mindformer.py)");
  std::string config;
  blip2::RunOverrides o;
  std::string run_mode, device, train_dir, eval_dir, predict_data, ckpt, out_dir;
  int64_t seed = 0;
  bool resume = false;
  run->add_option("--config", config, "YAML config (default: the embedded tiny config)");
  run->add_option("--run_mode", run_mode, "train | eval | predict")
      ->check(CLI::IsMember({"train", "eval", "predict"}));
  run->add_option("--train_dataset_dir", train_dir, "root of the training data");
  run->add_option("--eval_dataset_dir", eval_dir, "root of the evaluation data");
  run->add_option("--predict_data", predict_data, "image, images or directory to predict on");
  run->add_option("--device_target", device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  run->add_option("--load_checkpoint", ckpt, "checkpoint directory or .safetensors file");
  run->add_flag("--resume_training", resume, "continue training from --load_checkpoint");
  run->add_option("--output_dir", out_dir, "where results, logs and checkpoints go");
  run->add_option("--seed", seed, "random seed");

  auto* list = app.add_subcommand("list-models", "print the support list of named models");

  auto* tokenize = app.add_subcommand("tokenize", "BERT WordPiece ids of texts, one JSON line each");
  std::string vocab, padding = "none";
  int64_t max_length = 0;
  bool cased = false;
  std::vector<std::string> texts;
  tokenize->add_option("--vocab", vocab, "vocab.txt (one token per line)")->required();
  tokenize->add_option("--max_length", max_length, "truncate (and pad) to this many ids");
  tokenize->add_option("--padding", padding, "max_length | longest | none")
      ->check(CLI::IsMember({"max_length", "longest", "none"}));
  tokenize->add_flag("--cased", cased, "keep case and accents (do_lower_case false)");
  tokenize->add_option("texts", texts, "texts to tokenize")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    if (*list) return list_models();
    if (*tokenize) return tokenize_texts(vocab, texts, max_length, padding, !cased);
    if (!run_mode.empty()) o.run_mode = run_mode;
    if (!device.empty()) o.device_target = device;
    if (!train_dir.empty()) o.train_dataset_dir = train_dir;
    if (!eval_dir.empty()) o.eval_dataset_dir = eval_dir;
    if (!predict_data.empty()) o.predict_data = predict_data;
    if (!ckpt.empty()) o.load_checkpoint = ckpt;
    if (!out_dir.empty()) o.output_dir = out_dir;
    if (run->count("--seed")) o.seed = seed;
    if (resume) o.resume_training = true;
    return blip2::run(config, o);
  } catch (const blip2::Error& e) {
    std::cerr << "error: " << first_line(e.what()) << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << first_line(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << first_line(e.what()) << "\n";
  }
  return 1;
}
