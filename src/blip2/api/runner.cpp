#include "blip2/api/runner.h"

#include <iostream>

#include "blip2/api/api.h"
#include "blip2/dist/dist.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/stage1.h"
#include "blip2/tasks/stage2.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"
#include "blip2/vision/image.h"

namespace blip2 {
namespace fs = std::filesystem;

namespace {

// The run's results: written by rank 0 only (every rank computes them).
void write_output(const fs::path& path, const std::string& text) {
  if (dist::is_main_process()) atomic_write(path, text);
}

}  // namespace

RunConfig resolve_config(const std::string& path, const RunOverrides& o) {
  const std::string source = path.empty() ? "<embedded tiny config>" : path;
  RunConfig cfg = path.empty() ? parse_run_config(embedded_tiny_config(), source)
                               : load_run_config(path);
  if (o.run_mode) cfg.run_mode = *o.run_mode;
  if (o.train_dataset_dir) cfg.train_dataset.data_loader.dataset_dir = *o.train_dataset_dir;
  if (o.eval_dataset_dir) cfg.eval_dataset.data_loader.dataset_dir = *o.eval_dataset_dir;
  if (o.device_target) cfg.device_target = *o.device_target;
  if (o.load_checkpoint) cfg.load_checkpoint = *o.load_checkpoint;
  if (o.output_dir) cfg.output_dir = *o.output_dir;
  if (o.seed) cfg.seed = *o.seed;
  if (o.resume_training) cfg.resume_training = *o.resume_training;
  if (o.allow_partial_load) cfg.model.model_config.allow_partial_load = *o.allow_partial_load;
  if (o.weights) {
    cfg.model.model_config.weights = *o.weights;
    cfg.given["model.model_config.weights"] = kQuantiseAtLoad;
  }
  for (auto [set, key] : {std::pair{o.device_target.has_value(), "device_target"},
                          {o.load_checkpoint.has_value(), "load_checkpoint"}})
    if (set) cfg.given[key] = "the command line";
  validate(cfg, source);
  for (const auto* dir : {&cfg.train_dataset.data_loader.dataset_dir,
                          &cfg.eval_dataset.data_loader.dataset_dir}) {
    std::error_code ec;
    if (!dir->empty() && !fs::is_directory(*dir, ec))
      throw Error(*dir + ": dataset directory not found or unreadable");
  }
  return cfg;
}

static void print_eval(const nlohmann::json& ev) {
  const auto& r = ev["itc_retrieval"];
  std::cout << "eval loss " << format_float(ev["loss"]) << " (itc " << format_float(ev["loss_itc"])
            << ", itm " << format_float(ev["loss_itm"]) << ", lm " << format_float(ev["loss_lm"])
            << ")\n"
            << "held-out ITC retrieval over " << r["num_images"].get<int64_t>()
            << " images: image->text R@1 " << format_float(r["txt_r1"], 1) << "% R@5 "
            << format_float(r["txt_r5"], 1) << "%, text->image R@1 " << format_float(r["img_r1"], 1)
            << "% R@5 " << format_float(r["img_r5"], 1) << "%\n";
}

namespace {

// The config the run uses, once its model is built (with the architecture its checkpoints gave
// it): printed and written to OUTPUT_DIR/resolved_config.yaml.
void announce(const RunConfig& cfg) {
  // The task has joined the processes: only rank 0 prints results.
  if (!dist::is_main_process()) std::cout.setstate(std::ios::failbit);
  const std::string resolved = to_yaml(cfg);
  std::cout << "---- resolved config ----\n" << resolved << "-------------------------\n";
  write_output(fs::path(cfg.output_dir) / "resolved_config.yaml", resolved);
}

std::vector<std::string> split_commas(const std::string& list) {
  std::vector<std::string> out;
  for (size_t a = 0, b; a <= list.size(); a = b + 1) {
    b = list.find(',', a);
    if (b == std::string::npos) b = list.size();
    if (b > a) out.push_back(list.substr(a, b - a));
  }
  return out;
}

void write_result(const RunConfig& cfg, const std::string& name, const nlohmann::json& j) {
  std::cout << j.dump(2) << "\n";
  write_output(fs::path(cfg.output_dir) / name, j.dump(2) + "\n");
}

void print_captioning(const nlohmann::json& r) {
  std::cout << "held-out caption loss " << format_float(r["loss"]) << " over " << r["num_images"].get<int64_t>()
            << " images\n";
  if (!r.contains("caption_accuracy")) return;
  for (const auto& e : r["examples"])
    std::cout << "  " << (e["correct"].get<bool>() ? "ok   " : "WRONG") << " \"" << e["caption"].get<std::string>()
              << "\"  (reference: \"" << e["reference"].get<std::string>() << "\")\n";
  std::cout << "held-out captioning (" << r["decoding"].get<std::string>() << "): colour and shape right in "
            << format_float(r["caption_accuracy"], 1) << "% of " << r["num_images"].get<int64_t>() << " images\n";
}

// Stage 2 (a config with a text_config): training, caption evaluation, image-to-text generation.
int run_stage2(RunConfig& cfg, const std::vector<std::string>& inputs, const RunOverrides& o) {
  const std::string& task = cfg.trainer.type;
  const std::string& mode = cfg.run_mode;
  if (task != "contrastive_language_image_pretrain" && task != "image_to_text_generation")
    throw Error("trainer.type: task '" + task + "' does not take a stage-2 model (one with text_config); "
                "use contrastive_language_image_pretrain or image_to_text_generation");
  if (task == "image_to_text_generation" && mode == "train")
    throw Error("run_mode train: task image_to_text_generation has eval and predict (train with "
                "contrastive_language_image_pretrain)");
  Stage2Task trainer(cfg);
  announce(trainer.config());
  if (mode == "predict") {
    const std::string prompt = o.predict_text.empty() ? "" : o.predict_text.front();
    auto results = trainer.predict(inputs, prompt);
    std::string text;
    for (const auto& r : results) text += r["image"].get<std::string>() + "\t" + r["text"].get<std::string>() + "\n";
    std::cout << "output result is:\n" << text;
    const auto txt = fs::path(cfg.output_dir) / "image_to_text_generation_result.txt";
    write_output(txt, text);
    write_output(fs::path(cfg.output_dir) / "image_to_text_generation_result.json", results.dump(2) + "\n");
    std::cout << "output result is saved at: " << txt.string() << "\n";
    return 0;
  }
  if (mode == "train") trainer.train();
  auto r = trainer.evaluate();
  print_captioning(r);
  write_output(fs::path(cfg.output_dir) / "eval_results.json", r.dump(2) + "\n");
  return 0;
}

}  // namespace

int run(const std::string& path, const RunOverrides& overrides) {
  RunConfig cfg = resolve_config(path, overrides);
  set_max_image_pixels(cfg.max_image_pixels);
  fs::create_directories(cfg.output_dir);

  const std::string& task = cfg.trainer.type;
  const std::string& mode = cfg.run_mode;
  auto modes_error = [&](const std::string& available) {
    return Error("run_mode " + mode + ": task " + task + " has " + available);
  };
  const std::vector<std::string> inputs =
      overrides.predict_data ? split_commas(*overrides.predict_data) : std::vector<std::string>{};
  if (is_stage2(cfg)) return run_stage2(cfg, inputs, overrides);
  if (mode == "predict" && task != "zero_shot_image_classification")  // which also predicts on eval_dataset
    check(!inputs.empty() || !overrides.predict_text.empty(),
          "--predict_data: give an image, several images (comma-separated) or a directory");

  if (task == "image_to_text_retrieval" || task == "blip2_retrieval") {
    if (mode != "eval") throw modes_error("eval only (use --run_mode eval)");
    cfg.trainer.type = "image_to_text_retrieval";
    Trainer trainer(cfg);
    announce(trainer.config());
    write_result(cfg, "retrieval_results.json", trainer.evaluate());
    return 0;
  }
  if (task == "zero_shot_image_classification") {
    if (mode != "eval" && mode != "predict") throw modes_error("eval and predict");
    Trainer trainer(cfg);
    announce(trainer.config());
    if (mode == "eval") {
      write_result(cfg, "zero_shot_eval_results.json", trainer.evaluate());
      return 0;
    }
    auto results = trainer.predict(inputs);
    std::string text;
    for (const auto& r : results) text += r["result"].dump() + "\n";  // the seed's result file
    std::cout << "output result is: " << text;
    const auto txt = fs::path(cfg.output_dir) / "zero_shot_image_classification_result.txt";
    write_output(txt, text);
    write_output(fs::path(cfg.output_dir) / "zero_shot_image_classification_result.json", results.dump(2) + "\n");
    std::cout << "output result is saved at: " << txt.string() << "\n";
    return 0;
  }
  if (task != "contrastive_language_image_pretrain")
    throw Error("trainer.type: task '" + task + "' is not available in this build (available: "
                "contrastive_language_image_pretrain, image_to_text_retrieval, "
                "zero_shot_image_classification)");

  Trainer trainer(cfg);
  announce(trainer.config());
  if (mode == "predict") {  // LAVIS' extract_features
    auto report = trainer.predict(inputs, "", overrides.predict_text);
    write_result(cfg, "features.json", report);
    return 0;
  }
  if (mode == "train") trainer.train();
  auto ev = trainer.evaluate();
  print_eval(ev);
  write_output(fs::path(cfg.output_dir) / "eval_results.json", ev.dump(2) + "\n");
  if (mode != "train") return 0;
  for (const auto& t : cfg.runner_config.eval_tasks) {  // further held-out evaluations
    RunConfig c = cfg;
    c.trainer.type = t;
    c.run_mode = "eval";
    c.load_checkpoint.clear();
    auto r = Trainer(c, trainer.model()).evaluate();
    if (t == "zero_shot_image_classification") {
      std::cout << "held-out zero-shot classification over " << r["num_images"].get<int64_t>()
                << " images, " << r["num_labels"].get<int64_t>() << " labels: top-1 "
                << format_float(r["top1_accuracy"], 1) << "%, top-5 " << format_float(r["top5_accuracy"], 1)
                << "%\n";
      write_output(fs::path(cfg.output_dir) / "zero_shot_eval_results.json", r.dump(2) + "\n");
    } else {
      std::cout << "held-out retrieval, ITM re-ranked: image->text R@1 " << format_float(r["txt_r1"], 1)
                << "% R@5 " << format_float(r["txt_r5"], 1) << "%, text->image R@1 "
                << format_float(r["img_r1"], 1) << "% R@5 " << format_float(r["img_r5"], 1) << "%\n";
      write_output(fs::path(cfg.output_dir) / "retrieval_results.json", r.dump(2) + "\n");
    }
  }
  return 0;
}

}  // namespace blip2
