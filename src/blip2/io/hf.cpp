#include "blip2/io/hf.h"

#include <functional>
#include <set>

#include "blip2/io/pth.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

bool is_hf_llm_directory(const std::string& dir) {
  const fs::path cfg = fs::path(dir) / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(cfg, ec)) return false;
  return is_llm_config(read_json_file(cfg.string()));
}

HfLlm load_hf_llm(const std::string& dir) {
  const fs::path d(dir);
  const std::string cfg_path = (d / "config.json").string();
  std::error_code ec;
  check(fs::is_regular_file(cfg_path, ec), dir + ": no config.json (expected a Hugging Face LLM directory)");
  HfLlm m;
  m.config = text_config_from_hf(read_json_file(cfg_path), cfg_path);
  TensorMap raw;
  if (fs::exists(d / "model.safetensors", ec) || fs::exists(d / "model.safetensors.index.json", ec)) {
    raw = load_safetensors_dir(dir);
  } else if (fs::exists(d / "pytorch_model.bin", ec)) {
    raw = load_pth((d / "pytorch_model.bin").string());
  } else if (fs::exists(d / "pytorch_model.bin.index.json", ec)) {
    raw = load_sharded_bin(dir);
  } else {
    throw Error(dir + ": no weights (model.safetensors, its index, pytorch_model.bin or its index)");
  }
  for (auto& [name, t] : canonical_from_hf(std::move(raw), dir)) m.tensors["language_model." + name] = t;
  return m;
}

TensorMap canonical_from_hf(TensorMap tensors, const std::string& source) {
  TensorMap out;
  const std::string fused = "self_attn.qkv.bias";
  const std::string pack = "self_attn.W_pack.weight";  // Baichuan: [q; k; v] rows
  for (auto& [name, t] : tensors) {
    if (ends_with(name, pack)) {
      check(t.dim() == 2 && t.size(0) == 3 * t.size(1),
            source + ": tensor '" + name + "' should be [3 x hidden, hidden], got " +
                std::to_string(t.size(0)) + " x " + std::to_string(t.dim() == 2 ? t.size(1) : 0));
      const int64_t h = t.size(1);
      const std::string prefix = name.substr(0, name.size() - std::string("W_pack.weight").size());
      const char* parts[] = {"q_proj.weight", "k_proj.weight", "v_proj.weight"};
      for (int i = 0; i < 3; ++i) out[prefix + parts[i]] = t.narrow(0, i * h, h);
      continue;
    }
    if (ends_with(name, fused)) {
      check(t.dim() == 1 && t.size(0) % 3 == 0,
            source + ": tensor '" + name + "' should be [3 x width], got " + std::to_string(t.size(0)));
      const int64_t d = t.size(0) / 3;
      const std::string prefix = name.substr(0, name.size() - std::string("qkv.bias").size());
      check(t.narrow(0, d, d).abs().max().item<double>() == 0.0,
            source + ": tensor '" + name + "' has a non-zero key bias, which BLIP-2's ViT (q and v biases "
            "only) has no place for");
      out[prefix + "q_bias"] = t.narrow(0, 0, d).clone();
      out[prefix + "v_bias"] = t.narrow(0, 2 * d, d).clone();
      continue;
    }
    out[name] = t;
  }
  return out;
}

// The shards an index file (`weight_map`: tensor -> file) lists, each read by `load_one`; every
// listed tensor must be in its shard.
static TensorMap load_indexed(const fs::path& dir, const fs::path& index,
                              const std::function<TensorMap(const std::string&)>& load_one) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(index));
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(index.string() + ": malformed JSON at byte " + std::to_string(e.byte));
  }
  check(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
        index.string() + ": missing the 'weight_map' object");
  std::set<std::string> shards;
  for (const auto& [name, file] : j["weight_map"].items()) {
    check(file.is_string(), index.string() + ": weight_map['" + name + "'] is not a file name");
    shards.insert(file.get<std::string>());
  }
  TensorMap out;
  std::error_code ec;
  for (const auto& shard : shards) {
    check(fs::is_regular_file(dir / shard, ec),
          index.string() + ": shard " + shard + " is missing from " + dir.string());
    for (auto& [name, t] : load_one((dir / shard).string())) out[name] = t;
  }
  for (const auto& [name, file] : j["weight_map"].items())
    check(out.count(name), index.string() + ": '" + name + "' is listed in " +
                               file.get<std::string>() + " but that shard lacks it");
  return out;
}

TensorMap load_safetensors_dir(const std::string& dir) {
  const fs::path d(dir);
  if (fs::exists(d / "model.safetensors")) return load_safetensors((d / "model.safetensors").string());
  const fs::path index = d / "model.safetensors.index.json";
  check(fs::exists(index), dir + ": no model.safetensors or model.safetensors.index.json");
  return load_indexed(d, index, [](const std::string& f) { return load_safetensors(f); });
}

TensorMap load_sharded_bin(const std::string& dir) {
  const fs::path d(dir);
  return load_indexed(d, d / "pytorch_model.bin.index.json", [](const std::string& f) { return load_pth(f); });
}

bool is_hf_directory(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  return fs::is_regular_file(d / "config.json", ec) &&
         (fs::exists(d / "model.safetensors", ec) || fs::exists(d / "model.safetensors.index.json", ec));
}

HfModel load_hf_directory(const std::string& dir) {
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  HfModel m;
  m.config = blip2_config_from_hf(read_json_file(cfg_path), cfg_path);
  m.tensors = canonical_from_hf(load_safetensors_dir(dir), dir);
  return m;
}

TensorMap hf_from_canonical(const TensorMap& tensors) {
  TensorMap out;
  for (const auto& [name, t] : tensors) {
    if (name.rfind("cls.", 0) == 0 || name == "temp") continue;
    const std::string q = "self_attn.q_bias";
    if (name.size() > q.size() && name.compare(name.size() - q.size(), q.size(), q) == 0) {
      const std::string prefix = name.substr(0, name.size() - std::string("q_bias").size());
      auto v = tensors.find(prefix + "v_bias");
      check(v != tensors.end(), "'" + name + "' has no matching v_bias");
      out[prefix + "qkv.bias"] = torch::cat({t, torch::zeros_like(t), v->second});
      continue;
    }
    if (name.size() > 6 && name.compare(name.size() - 6, 6, "v_bias") == 0 &&
        name.find("self_attn.") != std::string::npos)
      continue;
    out[name] = t;
  }
  return out;
}

void export_hf_llm(const TextConfig& t, const TensorMap& tensors, const std::string& dir) {
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  atomic_write(fs::path(dir) / "config.json", hf_config_from_text(t).dump(2) + "\n");
}

void export_hf_directory(const Blip2Config& c, const TensorMap& tensors, const std::string& dir) {
  Blip2Config cfg = c;
  // What transformers' configs cannot say: OPT's LayerNorm eps is fixed at 1e-5; the ViT and
  // post_layernorm share one eps (LAVIS' ln_vision uses 1e-5 where its ViT uses 1e-6, and
  // transformers' own conversion of LAVIS weights makes it 1e-6, as this export does).
  if (cfg.text_config && cfg.text_config->is_opt())
    check(cfg.text_config->layer_norm_eps == 1e-5,
          "export: text_config.layer_norm_eps " + format_float(cfg.text_config->layer_norm_eps, 8) +
              " cannot be expressed in transformers' OPTConfig (its LayerNorms use 1e-5)");
  if (cfg.vision_config.post_layernorm_eps != cfg.vision_config.layer_norm_eps)
    log_warn("export: ln_vision's eps " + format_float(cfg.vision_config.post_layernorm_eps, 8) +
             " becomes the ViT's " + format_float(cfg.vision_config.layer_norm_eps, 8) +
             ": transformers' Blip2VisionConfig has one layer_norm_eps for both (its own conversion of LAVIS "
             "weights does the same); ln_vision's output changes slightly");
  TensorMap out = hf_from_canonical(tensors);
  if (cfg.text_config && cfg.text_config->image_token_id < 0) {
    // transformers' Blip2ForConditionalGeneration places the queries at <image> placeholder ids:
    // the vocabulary grows by one zero row for it (as its own conversion resized the tables).
    auto& t = *cfg.text_config;
    t.image_token_id = t.vocab_size;
    t.vocab_size += 1;
    for (const char* name : {"language_model.model.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight",
                             "language_model.lm_head.weight"}) {
      auto it = out.find(name);
      if (it == out.end()) continue;
      it->second = torch::cat({it->second, torch::zeros({1, it->second.size(1)}, it->second.options())});
    }
    log_info("export: the LLM's vocabulary grew by one row for the <image> placeholder (id " +
             std::to_string(t.image_token_id) + ")");
  }
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}});
  atomic_write(fs::path(dir) / "config.json", hf_config_from_blip2(cfg).dump(2) + "\n");
}

}  // namespace blip2
