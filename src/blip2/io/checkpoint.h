// One entry point for every weight file users have, returning canonical names:
//   - a Hugging Face directory (config.json + model.safetensors or sharded index)
//   - a blip2cpp checkpoint directory (model.safetensors [+ trainer_state.pt, config.yaml])
//   - a .safetensors file (ours or Hugging Face's)
//   - a .pth / .bin file (LAVIS: blip2_pretrained.pth, finetuned files, eva_vit_g.pth; or a
//     Hugging Face pytorch_model.bin)
#pragma once

#include <optional>
#include <set>
#include <string>

#include "blip2/config/config.h"
#include "blip2/io/safetensors.h"

namespace blip2 {

TensorMap load_checkpoint_tensors(const std::string& path);

// Puts matching tensors into `module`'s parameters and buffers; a shape mismatch is an error
// naming `source` and the key. A tensor-parallel parameter takes its slice of the whole tensor.
// A tensor nothing else holds (the map was handed over, e.g. std::move'd or a temporary) whose
// dtype, shape and device (CPU) are the model's becomes the model's tensor without a copy; for a
// memory-mapped safetensors file (private mapping: writes copy the page, never reach the file)
// its pages are then read when first used, for as long as the model lives: the file must not be
// rewritten in place meanwhile (a rename over it is safe). Anything else is copied, and the file
// pages of each tensor copied from a mapping are given back at once: loading holds one copy of
// the weights, not two (and a tp rank reads only its slices).
LoadReport load_into(torch::nn::Module& module, TensorMap tensors, const std::string& source);
// The module's tensors by name (its trainable parameters and the buffers, with trainable_only);
// tensor-parallel shards gathered whole under their canonical names, so every tp rank must call it.
TensorMap state_dict(const torch::nn::Module& module, bool trainable_only = false);

// A path as it is; a name (a preset or a weight name of the seed's configs, e.g.
// blip2_stage1_vit_g, vit_g_p16) becomes the directory $BLIP2_HOME/<name> (default
// ~/.cache/blip2cpp). A name with no local directory is an error that says which files to put
// there and how to convert them. Nothing is ever downloaded.
std::string resolve_weights(const std::string& name_or_path);
std::string blip2_home();

// Loads `tensors` into `model` (strict=False): the ViT position embedding is interpolated
// bicubically when the checkpoint was made for another image size (224 <-> 364), and the report
// explains the gaps a BLIP-2 checkpoint is expected to have.
LoadReport load_weights_into(torch::nn::Module& model, TensorMap tensors, const std::string& source);

// Why keys are missing, in words (e.g. "no ViT: LAVIS saves only trainable weights").
std::string explain_missing(const std::vector<std::string>& missing);

// Where the weights a name or path means are, the one place that decides it: a name becomes
// $BLIP2_HOME/<name> (resolve_weights); a training output directory, or its checkpoint/ root,
// becomes its latest checkpoint (checkpoint/latest); a checkpoint directory, a Hugging Face
// directory, a LAVIS .pth, a .safetensors file is itself. Errors name what is missing.
std::string locate_weights(const std::string& name_or_path);

// The architecture a checkpoint's own config describes: a Hugging Face directory's config.json
// (a BLIP-2 model: vision + Q-Former [+ LLM]; an LLM directory: the LLM alone), or a blip2cpp
// directory's config.yaml (a training checkpoint, convert or save_pretrained output, or the
// directory of its model.safetensors). Bare weight files (.pth, .bin, other .safetensors) carry
// none: std::nullopt. `path` is a name or path as resolve_weights takes it.
struct CheckpointArchitecture {
  Blip2Config config;
  ArchitectureParts parts;
  std::string source;  // the config file
};
std::optional<CheckpointArchitecture> checkpoint_architecture(const std::string& path);

// ---- which of a model's tensors hold loaded weights ----

// What may be left without checkpoint weights, as the task decides.
struct CoveragePolicy {
  bool allow_partial = false;     // model_config.allow_partial_load / --allow_partial_load
  bool training = false;          // a part that trains, with no weights at all, starts from its init
  bool llm_trained_here = false;  // runner_config.llm_pretrain_epochs > 0: the LLM is trained first
};

// Tracks which tensors of one model still hold their random initialisation over all the loads
// into it, and holds the loads to account:
//  - tensors of a load the model has no place for are an error, except known ones: stage-1 heads
//    given to a stage-2 model, position_ids and rotary inv_freq buffers (computed here), and a
//    tied lm_head equal to the embeddings it is tied to;
//  - check(): after the loads, a tensor still random is an error unless its whole part (ViT,
//    ln_vision, Q-Former, LM head, temperature, language_projection, LLM) came from no checkpoint
//    and may: the stage-1 LM head and temperature (Hugging Face has none), a part that trains
//    (policy.training), the LLM when it is pretrained here.
// With allow_partial both are warnings that name what stays random. A ledger of a model nothing
// was loaded into checks nothing (training from scratch).
class WeightLedger {
 public:
  // Nothing loaded yet; the first load takes the model's tensors as the ones to cover.
  explicit WeightLedger(bool allow_partial = false) : allow_partial_(allow_partial) {}
  // A model loaded before (by from_pretrained): `random` are the tensors its loads left random.
  WeightLedger(const torch::nn::Module& model, const std::vector<std::string>& random, bool allow_partial);
  // Loads `tensors` (canonical names) into `model`, those under `prefix` only (a part given on
  // its own, e.g. "vision_model."), and logs what it did.
  LoadReport load(torch::nn::Module& model, TensorMap tensors, const std::string& source,
                  const std::string& prefix = "");
  void check(const torch::nn::Module& model, const CoveragePolicy& policy) const;
  // The tensors under `prefix` now hold trained weights (the LLM pretrained here).
  void trained(const torch::nn::Module& model, const std::string& prefix);
  // True if no tensor under `prefix` is still random.
  bool covers(const torch::nn::Module& model, const std::string& prefix) const;
  bool loaded_any() const { return !sources_.empty(); }
  std::vector<std::string> random() const { return {random_.begin(), random_.end()}; }
  bool allow_partial() const { return allow_partial_; }

 private:
  std::set<std::string> random_;
  std::vector<std::string> sources_;
  bool allow_partial_ = false;
  bool bound_ = false;
};

// The tensors of `tensors` that `model` has no place for, less the known extras (see
// WeightLedger); an Error naming `source` when a tied copy differs from its twin.
std::vector<std::string> unexpected_tensors(const torch::nn::Module& model, const TensorMap& tensors,
                                           const std::string& source);

// The first few of `names` and their count: "a, b, c, ... (36 tensors)".
std::string name_list(const std::vector<std::string>& names, size_t shown = 4);

}  // namespace blip2
