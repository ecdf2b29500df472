// One entry point for every weight file users have, returning canonical names:
//   - a Hugging Face directory (config.json + model.safetensors or sharded index)
//   - a blip2cpp checkpoint directory (model.safetensors [+ trainer_state.pt, config.yaml])
//   - a .safetensors file (ours or Hugging Face's)
//   - a .pth / .bin file (LAVIS: blip2_pretrained.pth, finetuned files, eva_vit_g.pth; or a
//     Hugging Face pytorch_model.bin)
#pragma once

#include <string>

#include "blip2/io/safetensors.h"

namespace blip2 {

TensorMap load_checkpoint_tensors(const std::string& path);

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

}  // namespace blip2
