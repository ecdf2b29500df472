#include "blip2/io/hf.h"

#include <set>

#include "blip2/util/common.h"

namespace blip2 {
namespace fs = std::filesystem;

namespace {

template <class T>
void take(const nlohmann::json& j, const char* key, T& out, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return;
  try {
    out = j[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(where + "." + key + ": unexpected type " + std::string(j[key].type_name()));
  }
}

}  // namespace

Blip2Config blip2_config_from_hf(const nlohmann::json& j, const std::string& source) {
  check(j.is_object(), source + ": config.json is not a JSON object");
  Blip2Config c;  // blip2cpp's defaults are transformers' for the ViT-g model
  auto& v = c.vision_config;
  const nlohmann::json vj = j.value("vision_config", nlohmann::json::object());
  const std::string vw = source + ": vision_config";
  take(vj, "hidden_size", v.hidden_size, vw);
  take(vj, "intermediate_size", v.intermediate_size, vw);
  take(vj, "num_hidden_layers", v.num_hidden_layers, vw);
  take(vj, "num_attention_heads", v.num_attention_heads, vw);
  take(vj, "image_size", v.image_size, vw);
  take(vj, "patch_size", v.patch_size, vw);
  take(vj, "layer_norm_eps", v.layer_norm_eps, vw);
  v.post_layernorm_eps = v.layer_norm_eps;  // HF's post_layernorm uses the ViT's eps
  take(vj, "hidden_act", v.hidden_act, vw);
  bool qkv_bias = true;
  take(vj, "qkv_bias", qkv_bias, vw);
  check(qkv_bias, vw + ".qkv_bias: false is not supported (BLIP-2's ViT has q/v biases)");

  auto& q = c.qformer_config;
  const nlohmann::json qj = j.value("qformer_config", nlohmann::json::object());
  const std::string qw = source + ": qformer_config";
  take(qj, "vocab_size", q.vocab_size, qw);
  q.resize_token_embeddings = false;  // the checkpoint's table is already its final size
  q.special_token_nums = 0;
  q.bos_token_id = q.vocab_size - 1;  // [DEC] is the last row when the table has one
  take(qj, "hidden_size", q.hidden_size, qw);
  take(qj, "num_hidden_layers", q.num_hidden_layers, qw);
  take(qj, "num_attention_heads", q.num_attention_heads, qw);
  take(qj, "intermediate_size", q.intermediate_size, qw);
  take(qj, "max_position_embeddings", q.max_position_embeddings, qw);
  take(qj, "cross_attention_frequency", q.cross_attention_freq, qw);
  take(qj, "encoder_hidden_size", q.encoder_width, qw);
  take(qj, "layer_norm_eps", q.layer_norm_eps, qw);
  take(qj, "hidden_dropout_prob", q.hidden_dropout_prob, qw);
  take(qj, "attention_probs_dropout_prob", q.attention_probs_dropout_prob, qw);
  take(qj, "pad_token_id", q.pad_token_id, qw);
  take(qj, "hidden_act", q.hidden_act, qw);
  take(j, "num_query_tokens", q.query_length, source);
  take(j, "image_text_hidden_size", q.head_embed_dim, source);
  c.max_txt_len = std::min<int64_t>(c.max_txt_len, q.max_position_embeddings);
  return c;
}

TensorMap canonical_from_hf(TensorMap tensors, const std::string& source) {
  TensorMap out;
  const std::string fused = "self_attn.qkv.bias";
  for (auto& [name, t] : tensors) {
    if (name.size() > fused.size() && name.compare(name.size() - fused.size(), fused.size(), fused) == 0) {
      check(t.dim() == 1 && t.size(0) % 3 == 0,
            source + ": tensor '" + name + "' should be [3 x width], got " + std::to_string(t.size(0)));
      const int64_t d = t.size(0) / 3;
      const std::string prefix = name.substr(0, name.size() - std::string("qkv.bias").size());
      if (t.narrow(0, d, d).abs().max().item<double>() > 1e-6)
        log_warn(source + ": '" + name + "' has a non-zero key bias; BLIP-2's ViT has none, dropped");
      out[prefix + "q_bias"] = t.narrow(0, 0, d).clone();
      out[prefix + "v_bias"] = t.narrow(0, 2 * d, d).clone();
      continue;
    }
    out[name] = t;
  }
  return out;
}

TensorMap load_safetensors_dir(const std::string& dir) {
  const fs::path d(dir);
  if (fs::exists(d / "model.safetensors")) return load_safetensors((d / "model.safetensors").string());
  const fs::path index = d / "model.safetensors.index.json";
  check(fs::exists(index), dir + ": no model.safetensors or model.safetensors.index.json");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(index));
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(index.string() + ": malformed JSON at byte " + std::to_string(e.byte));
  }
  check(j.contains("weight_map") && j["weight_map"].is_object(),
        index.string() + ": missing the 'weight_map' object");
  std::set<std::string> shards;
  for (const auto& [name, file] : j["weight_map"].items()) {
    check(file.is_string(), index.string() + ": weight_map['" + name + "'] is not a file name");
    shards.insert(file.get<std::string>());
  }
  TensorMap out;
  for (const auto& shard : shards) {
    auto part = load_safetensors((d / shard).string());
    for (auto& [name, t] : part) out[name] = t;
  }
  for (const auto& [name, file] : j["weight_map"].items())
    check(out.count(name), index.string() + ": '" + name + "' is listed in " +
                               file.get<std::string>() + " but that shard lacks it");
  return out;
}

bool is_hf_directory(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  return fs::is_regular_file(d / "config.json", ec) &&
         (fs::exists(d / "model.safetensors", ec) || fs::exists(d / "model.safetensors.index.json", ec));
}

HfModel load_hf_directory(const std::string& dir) {
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(cfg_path));
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(cfg_path + ": malformed JSON at byte " + std::to_string(e.byte));
  }
  HfModel m;
  m.config = blip2_config_from_hf(j, cfg_path);
  m.tensors = canonical_from_hf(load_safetensors_dir(dir), dir);
  return m;
}

nlohmann::json hf_config_from_blip2(const Blip2Config& c) {
  const auto& v = c.vision_config;
  const auto& q = c.qformer_config;
  return {
      {"architectures", {"Blip2ForImageTextRetrieval"}},
      {"model_type", "blip-2"},
      {"num_query_tokens", q.query_length},
      {"image_text_hidden_size", q.head_embed_dim},
      {"vision_config",
       {{"model_type", "blip_2_vision_model"}, {"hidden_size", v.hidden_size},
        {"intermediate_size", v.intermediate_size}, {"num_hidden_layers", v.num_hidden_layers},
        {"num_attention_heads", v.num_attention_heads}, {"image_size", v.image_size},
        {"patch_size", v.patch_size}, {"layer_norm_eps", v.layer_norm_eps}, {"qkv_bias", true},
        {"hidden_act", v.hidden_act}}},
      {"qformer_config",
       {{"model_type", "blip_2_qformer"}, {"vocab_size", q.embedding_vocab_size()},
        {"hidden_size", q.hidden_size}, {"num_hidden_layers", q.num_hidden_layers},
        {"num_attention_heads", q.num_attention_heads}, {"intermediate_size", q.intermediate_size},
        {"max_position_embeddings", q.max_position_embeddings},
        {"cross_attention_frequency", q.cross_attention_freq},
        {"encoder_hidden_size", c.encoder_width()}, {"layer_norm_eps", q.layer_norm_eps},
        {"hidden_dropout_prob", q.hidden_dropout_prob},
        {"attention_probs_dropout_prob", q.attention_probs_dropout_prob},
        {"pad_token_id", q.pad_token_id}, {"hidden_act", q.hidden_act},
        {"use_qformer_text_input", true}}},
  };
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

void export_hf_directory(const Blip2Config& c, const TensorMap& tensors, const std::string& dir) {
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "model.safetensors").string(), hf_from_canonical(tensors),
                   {{"format", "pt"}});
  atomic_write(fs::path(dir) / "config.json", hf_config_from_blip2(c).dump(2) + "\n");
}

}  // namespace blip2
