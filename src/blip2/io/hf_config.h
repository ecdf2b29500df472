// Hugging Face config.json <-> blip2cpp configs: the one place where transformers' configs are
// read and written.
//
// Read: Blip2Config (vision_config = Blip2VisionConfig, qformer_config = Blip2QFormerConfig,
// text_config = OPTConfig / LlamaConfig) and an LLM directory's own config.json (OPT, Llama,
// Baichuan-7B). Every key of those classes, and of transformers' generic PretrainedConfig (4.x and
// 5.x), is accounted for in a table (hf_config.cpp): read into the config, known to leave the
// numbers unchanged (initializer ranges, output flags, ...), accepted only at its default (the
// generation defaults a 4.x config carries, pruned_heads), or refused. A key in no table is an
// error too: it is a field blip2cpp does not know, which might change the numbers. Every refusal
// is one line naming the file, the key and the value.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "blip2/config/config.h"

namespace blip2 {

// A BLIP-2 config.json (Blip2ForImageTextRetrieval, Blip2ForConditionalGeneration, Blip2Model).
// `source` names the file in errors. text_config is read only for the models that have an LLM.
Blip2Config blip2_config_from_hf(const nlohmann::json& j, const std::string& source);
// The decoder LLM: Blip2Config's text_config, or the config.json of an OPTForCausalLM /
// LlamaForCausalLM / Baichuan-7B directory. `where` names the file (and section) in errors.
TextConfig text_config_from_hf(const nlohmann::json& j, const std::string& where);

// config.json parsed (an error naming the file when it is not JSON).
nlohmann::json read_json_file(const std::string& path);
// True if config.json's model_type is an LLM's (opt, llama, baichuan) rather than BLIP-2's.
bool is_llm_config(const nlohmann::json& j);

// The other way: config.json of a Blip2ForImageTextRetrieval (or Blip2ForConditionalGeneration
// for a stage-2 model), and of an LLM alone.
nlohmann::json hf_config_from_blip2(const Blip2Config& c);
nlohmann::json hf_config_from_text(const TextConfig& t);

}  // namespace blip2
