// `blip2 run`: the counterpart of MindFormers' run_mindformer.py. Loads a config (or the
// embedded tiny default), applies command-line overrides, validates, prints and saves the
// resolved config, and runs the task in the requested mode.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "blip2/config/config.h"

namespace blip2 {

struct RunOverrides {
  std::optional<std::string> run_mode, train_dataset_dir, eval_dataset_dir, predict_data,
      device_target, load_checkpoint, output_dir;
  std::optional<int64_t> seed;
  std::optional<bool> resume_training, allow_partial_load;
  std::optional<std::string> weights;  // model_config.weights (--weights int8: quantise at load)
  std::vector<std::string> predict_text;  // feature extraction: texts (with images: multimodal too)
};

// config_path "" = the embedded tiny config. Returns the process exit code.
int run(const std::string& config_path, const RunOverrides& overrides);

// Config + overrides, validated (what `run` executes).
RunConfig resolve_config(const std::string& config_path, const RunOverrides& overrides);

}  // namespace blip2
