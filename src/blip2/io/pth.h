// PyTorch checkpoints (torch.save, zip format: <archive>/data.pkl + <archive>/data/<key>).
//
// data.pkl is read by a small pickle machine that understands only what state dicts are made
// of: dicts (OrderedDict included), lists, tuples, numbers, strings, tensors and their storages.
// It never imports or calls anything: any other class becomes an inert placeholder, and a
// placeholder found where a tensor should be is an error naming the key.
#pragma once

#include <functional>
#include <string>

#include "blip2/io/safetensors.h"

namespace blip2 {

// The tensors of a .pth/.bin file, keyed by their state-dict names. LAVIS' wrapper
// {"model": ..., "optimizer": ...} (and {"state_dict": ...}) is unwrapped.
TensorMap load_pth(const std::string& path);
// The state dict in `pickle` (the bytes of data.pkl); `storage_bytes(key)` gives the raw bytes
// of storage `key` as a uint8 tensor. `path` names the source in errors. What load_pth runs
// after opening the zip (and what the fuzz target feeds).
TensorMap unpickle_state_dict(const std::string& pickle, const std::string& path,
                              const std::function<torch::Tensor(const std::string& key)>& storage_bytes);

// LAVIS names (blip2_pretrained.pth, finetuned files with visual_encoder.*, eva_vit_g.pth with
// no prefix) -> canonical names. Dropped: position_ids, the tied LM decoder weight.
TensorMap canonical_from_lavis(const TensorMap& lavis);

// Bicubic interpolation of a ViT position embedding [1, 1 + g*g, D] to [1, 1 + n*n, D]
// (LAVIS' interpolate_pos_embed: the CLS row kept, align_corners false).
torch::Tensor interpolate_pos_embed(const torch::Tensor& pos, int64_t new_tokens);

}  // namespace blip2
