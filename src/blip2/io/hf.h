// Hugging Face BLIP-2 checkpoints (Salesforce/blip2-*, or any save_pretrained directory):
// config.json -> Blip2Config, and weights -> blip2cpp's canonical names.
//
// Canonical names are Hugging Face's, so the mapping is small: the ViT's fused
// `self_attn.qkv.bias` = [q_bias, 0, v_bias] is split into `q_bias` and `v_bias` (the first
// Hugging Face release stored them separately, which is accepted as it is).
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "blip2/config/config.h"
#include "blip2/io/hf_config.h"
#include "blip2/io/safetensors.h"

namespace blip2 {

// True if `dir` holds a Hugging Face causal LM (config.json of model_type opt/llama/baichuan).
bool is_hf_llm_directory(const std::string& dir);
// Its config and weights, named as inside BLIP-2 (language_model.*).
struct HfLlm {
  TextConfig config;
  TensorMap tensors;
};
HfLlm load_hf_llm(const std::string& dir);

// Renames/splits Hugging Face tensors into canonical ones (also Baichuan's fused W_pack into
// q_proj/k_proj/v_proj). `source` names the file in errors.
TensorMap canonical_from_hf(TensorMap tensors, const std::string& source);
// model.safetensors, or the shards listed by model.safetensors.index.json.
TensorMap load_safetensors_dir(const std::string& dir);
// pytorch_model.bin.index.json and its .bin shards.
TensorMap load_sharded_bin(const std::string& dir);
// True if `dir` looks like a Hugging Face model directory (config.json + safetensors).
bool is_hf_directory(const std::string& dir);

struct HfModel {
  Blip2Config config;
  TensorMap tensors;  // canonical names
};
HfModel load_hf_directory(const std::string& dir);

// An LLM as a Hugging Face directory (config.json of LlamaForCausalLM / OPTForCausalLM +
// model.safetensors) from tensors named as inside the LLM (model.*, lm_head.*).
void export_hf_llm(const TextConfig& t, const TensorMap& tensors, const std::string& dir);

// The other way: tensors with Hugging Face's names (q_bias/v_bias folded into qkv.bias; the
// stage-1 LM head and temp dropped, as transformers has no place for them).
TensorMap hf_from_canonical(const TensorMap& tensors);
// Writes `dir`/config.json + `dir`/model.safetensors (atomically, file by file).
void export_hf_directory(const Blip2Config& c, const TensorMap& tensors, const std::string& dir);

}  // namespace blip2
