#include "blip2/tasks/runner.h"

#include <iostream>

#include "blip2/tasks/trainer.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace fs = std::filesystem;

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
  validate(cfg, source);
  for (const auto* dir : {&cfg.train_dataset.data_loader.dataset_dir,
                          &cfg.eval_dataset.data_loader.dataset_dir}) {
    std::error_code ec;
    if (!dir->empty() && !fs::is_directory(*dir, ec))
      throw Error(*dir + ": dataset directory not found or unreadable");
  }
  return cfg;
}

static void print_eval(const Stage1Eval& ev) {
  const auto& r = ev.itc_retrieval;
  std::cout << "eval loss " << format_float(ev.loss) << " (itc " << format_float(ev.loss_itc)
            << ", itm " << format_float(ev.loss_itm) << ", lm " << format_float(ev.loss_lm)
            << ")\n"
            << "held-out ITC retrieval over " << r.num_images << " images: image->text R@1 "
            << format_float(r.txt_r1, 1) << "% R@5 " << format_float(r.txt_r5, 1)
            << "%, text->image R@1 " << format_float(r.img_r1, 1) << "% R@5 "
            << format_float(r.img_r5, 1) << "%\n";
}

int run(const std::string& path, const RunOverrides& overrides) {
  RunConfig cfg = resolve_config(path, overrides);
  const std::string resolved = to_yaml(cfg);
  std::cout << "---- resolved config ----\n" << resolved << "-------------------------\n";
  fs::create_directories(cfg.output_dir);
  atomic_write(fs::path(cfg.output_dir) / "resolved_config.yaml", resolved);

  const std::string& task = cfg.trainer.type;
  if (task == "image_to_text_retrieval" || task == "blip2_retrieval") {
    if (cfg.run_mode != "eval")
      throw Error("run_mode " + cfg.run_mode + ": task image_to_text_retrieval only evaluates (use --run_mode eval)");
    PretrainTrainer trainer(cfg);
    auto report = trainer.evaluate_retrieval();
    std::cout << report.dump(2) << "\n";
    atomic_write(fs::path(cfg.output_dir) / "retrieval_results.json", report.dump(2) + "\n");
    return 0;
  }
  if (task == "zero_shot_image_classification") {
    PretrainTrainer trainer(cfg);
    if (cfg.run_mode == "eval") {
      auto report = trainer.evaluate_zero_shot();
      std::cout << report.dump(2) << "\n";
      atomic_write(fs::path(cfg.output_dir) / "zero_shot_eval_results.json", report.dump(2) + "\n");
      return 0;
    }
    if (cfg.run_mode != "predict")
      throw Error("run_mode " + cfg.run_mode + ": task zero_shot_image_classification has eval and predict");
    check(overrides.predict_data.has_value(), "--predict_data: give an image, several images or a directory");
    std::vector<std::string> inputs;
    for (size_t a = 0, b; a <= overrides.predict_data->size(); a = b + 1) {  // comma-separated
      b = overrides.predict_data->find(',', a);
      if (b == std::string::npos) b = overrides.predict_data->size();
      if (b > a) inputs.push_back(overrides.predict_data->substr(a, b - a));
    }
    auto results = trainer.predict_zero_shot(inputs);
    std::string text;
    for (const auto& r : results) text += r["result"].dump() + "\n";  // the seed's result file
    std::cout << "output result is: " << text;
    atomic_write(fs::path(cfg.output_dir) / "zero_shot_image_classification_result.txt", text);
    atomic_write(fs::path(cfg.output_dir) / "zero_shot_image_classification_result.json", results.dump(2) + "\n");
    std::cout << "output result is saved at: "
              << (fs::path(cfg.output_dir) / "zero_shot_image_classification_result.txt").string() << "\n";
    return 0;
  }
  if (task != "contrastive_language_image_pretrain")
    throw Error("trainer.type: task '" + task + "' is not available in this build (available: "
                "contrastive_language_image_pretrain, image_to_text_retrieval, "
                "zero_shot_image_classification)");
  if (cfg.run_mode == "predict")
    throw Error("run_mode predict: task contrastive_language_image_pretrain has no predict mode");

  PretrainTrainer trainer(cfg);
  if (cfg.run_mode == "train") {
    trainer.train();
    auto ev = trainer.evaluate();
    print_eval(ev);
    atomic_write(fs::path(cfg.output_dir) / "eval_results.json", ev.to_json().dump(2) + "\n");
  } else {
    auto ev = trainer.evaluate();
    print_eval(ev);
    atomic_write(fs::path(cfg.output_dir) / "eval_results.json", ev.to_json().dump(2) + "\n");
  }
  return 0;
}

}  // namespace blip2
