// What a run config builds: models with their weights (architecture adopted from the
// checkpoints, loads checked to cover the model), tokenizers, and batch loaders.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/data/dataset.h"
#include "blip2/io/checkpoint.h"
#include "blip2/models/blip2_llm.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/text/text.h"

namespace blip2 {

// The dtype model_config.frozen_dtype means on `device` (auto: bfloat16 on CUDA, else float32).
torch::Dtype frozen_dtype(const Blip2Config& c, torch::Device device);

// The stage-1 model a config describes, with the weights its vision_config and model_config
// checkpoint_name_or_path name (random where none is named), loaded through `ledger` (whose
// check() the caller runs once every load is done). The frozen ViT is created on `device` in
// frozen_dtype, once; the rest in float32 on the CPU (the caller moves it).
// draw = false skips the random initialisation (InitOptions::draw; see build_loaded).
Blip2Qformer build_model(const Blip2Config& config, WeightLedger& ledger, torch::Device device = torch::kCPU,
                         bool draw = true);
// The stage-2 model the same way: the ViT (vision_config), the LLM (text_config.
// checkpoint_name_or_path, a Hugging Face directory), then the whole model
// (checkpoint_name_or_path: stage-1 or stage-2 weights).
Blip2Llm build_stage2_model(const Blip2Config& c, WeightLedger& ledger, torch::Device device = torch::kCPU,
                            bool draw = true);

// A model built and loaded by `build(draw)` (which starts `ledger` afresh). With skip_draws
// (evaluation or prediction with weights named, no partial load: the loads overwrite all but
// what the coverage policy lets stay random) it is built without the random initialisation, and
// the tensors the loads left random (a Hugging Face directory's missing stage-1 LM head and
// temperature) are then initialised alone, by their modules' rules (init_parameters): the same
// distributions, other random numbers than a whole-model draw would have given them. Where a
// module has no such rule, the model is built again with every draw, as it always was.
template <class Model, class Build>
Model build_loaded(bool skip_draws, const Build& build, const WeightLedger& ledger) {
  if (skip_draws) {
    Model m = build(false);
    if (ledger.loaded_any() && (ledger.random().empty() || init_parameters(*m, ledger.random()))) return m;
  }
  return build(true);
}

// Loads weights from wherever locate_weights finds them (a checkpoint, a training output
// directory's latest, a Hugging Face directory, a LAVIS .pth, a safetensors file; those under
// `prefix` only) through `ledger`.
LoadReport load_model_weights(torch::nn::Module& model, const std::string& path, WeightLedger& ledger,
                              const std::string& prefix = "");
// The architecture the run's checkpoints describe becomes the run's (adopt_architecture), in
// order: vision_config's, text_config's (an LLM directory), model_config's, then load_checkpoint's;
// the config is validated again after, and its max_image_pixels applied.
void adopt_checkpoint_architectures(RunConfig& cfg);
// Weights for a model built already: the architecture their config describes (if any) must be
// `built`'s, field for field, else an Error naming the field, both values and the file.
void require_checkpoint_architecture(const Blip2Config& built, const std::string& path);
// Whether the run's loads are to overwrite every tensor (build_loaded): evaluation or prediction,
// weights named (load_checkpoint or a checkpoint_name_or_path), no partial load.
bool skip_draws(const RunConfig& cfg);
// What a run may leave without checkpoint weights (CoveragePolicy) when `training` or not.
CoveragePolicy coverage_policy(const RunConfig& cfg, bool training);
// The tokenizer `tc` describes, checked against the Q-Former's vocabulary and special ids.
std::shared_ptr<WordPieceTokenizer> model_tokenizer(const TokenizerConfig& tc, const QFormerConfig& q,
                                                    const std::string& section);
// An error naming `task` when `missing` (what a checkpoint lacked) has a name under one of the
// prefixes, e.g. "itm_head." for ITM re-ranking.
void require_weights(const std::vector<std::string>& missing, const std::vector<std::string>& prefixes,
                     const std::string& task);

// The batch loader of a dataset section of `cfg` (training: shuffled, drop_remainder; else in
// order, every sample); `tokenizer` null leaves ids/keep undefined (stage 2 tokenises itself).
// On CUDA the batches come in pinned memory, ready for non-blocking copies.
BatchLoader make_batch_loader(const RunConfig& cfg, const DatasetConfig& d, bool train,
                              std::shared_ptr<const WordPieceTokenizer> tokenizer);

// Joins the processes a launcher started (dist::init_from_env with the config's use_parallel and
// parallel_config; every rank must run the same resolved config). Without a launcher: one process.
void join_processes(const RunConfig& cfg);

}  // namespace blip2
