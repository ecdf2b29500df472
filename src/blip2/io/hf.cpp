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
  // Every Blip2Config carries a text_config (OPT's defaults when unset); only the models with a
  // language model use it.
  bool has_llm = false;
  for (const auto& a : j.value("architectures", nlohmann::json::array()))
    if (a.is_string() && (a == "Blip2ForConditionalGeneration" || a == "Blip2Model")) has_llm = true;
  if (has_llm && j.contains("text_config") && j["text_config"].is_object()) {
    c.text_config = text_config_from_hf(j["text_config"], source + ": text_config");
    c.text_config->seq_length = q.query_length + c.max_txt_len;
    take(j, "image_token_index", c.text_config->image_token_id, source);
  }
  return c;
}

TextConfig text_config_from_hf(const nlohmann::json& j, const std::string& where) {
  check(j.is_object(), where + ": not a JSON object");
  const std::string type = j.value("model_type", "");
  TextConfig t;
  auto must = [&](bool ok, const std::string& key, const std::string& why) {
    if (!ok) throw Error(where + "." + key + ": " + why);
  };
  if (type == "opt") {
    t.type = "OPTConfig";
    t.tie_word_embeddings = true;  // OPTConfig's default
    t.bos_token_id = 2;
    t.pad_token_id = 1;
    t.max_position_embeddings = 2048;
    take(j, "ffn_dim", t.intermediate_size, where);
    int64_t proj = -1;
    take(j, "word_embed_proj_dim", proj, where);
    take(j, "hidden_size", t.hidden_size, where);
    must(proj < 0 || proj == t.hidden_size, "word_embed_proj_dim",
         "differs from hidden_size (OPT-350m's projections are not supported)");
    bool before = true;
    take(j, "do_layer_norm_before", before, where);
    must(before, "do_layer_norm_before", "false (post-LayerNorm OPT) is not supported");
    std::string act = "relu";
    take(j, "activation_function", act, where);
    must(act == "relu", "activation_function", "'" + act + "' is not relu");
    bool remove_final = false;
    take(j, "_remove_final_layer_norm", remove_final, where);
    must(!remove_final, "_remove_final_layer_norm", "true is not supported");
  } else if (type == "llama" || type == "baichuan") {
    t.type = "LlamaConfig";
    take(j, "intermediate_size", t.intermediate_size, where);
    take(j, "rms_norm_eps", t.rms_norm_eps, where);
    take(j, "rope_theta", t.rope_theta, where);
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
      take(j["rope_parameters"], "rope_theta", t.rope_theta, where + ".rope_parameters");
      const std::string rope = j["rope_parameters"].value("rope_type", "default");
      must(rope == "default", "rope_parameters.rope_type", "'" + rope + "' scaling is not supported");
    }
    must(!j.contains("rope_scaling") || j["rope_scaling"].is_null(), "rope_scaling", "is not supported");
    for (const char* key : {"attention_bias", "mlp_bias"}) {
      bool b = false;
      take(j, key, b, where);
      must(!b, key, "true is not supported (Llama-7B and Baichuan-7B have no biases)");
    }
    std::string act = "silu";
    take(j, "hidden_act", act, where);
    must(act == "silu", "hidden_act", "'" + act + "' is not silu");
  } else {
    throw Error(where + ".model_type: '" + type + "' is not an LLM blip2cpp implements (opt, llama, baichuan)");
  }
  take(j, "hidden_size", t.hidden_size, where);
  take(j, "num_hidden_layers", t.num_layers, where);
  take(j, "num_attention_heads", t.num_heads, where);
  take(j, "vocab_size", t.vocab_size, where);
  take(j, "max_position_embeddings", t.max_position_embeddings, where);
  take(j, "tie_word_embeddings", t.tie_word_embeddings, where);
  take(j, "bos_token_id", t.bos_token_id, where);
  take(j, "pad_token_id", t.pad_token_id, where);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    must(!j["eos_token_id"].empty(), "eos_token_id", "empty list");
    t.eos_token_id = j["eos_token_id"][0].get<int64_t>();
  } else {
    take(j, "eos_token_id", t.eos_token_id, where);
  }
  int64_t kv_heads = t.num_heads;
  take(j, "num_key_value_heads", kv_heads, where);
  must(kv_heads == t.num_heads, "num_key_value_heads",
       "grouped-query attention (" + std::to_string(kv_heads) + " key/value heads for " +
           std::to_string(t.num_heads) + ") is not supported");
  int64_t head_dim = 0;
  take(j, "head_dim", head_dim, where);
  must(head_dim == 0 || head_dim * t.num_heads == t.hidden_size, "head_dim",
       "differs from hidden_size / num_attention_heads");
  t.seq_length = t.max_position_embeddings;
  return t;
}

static nlohmann::json read_json(const std::string& path) {
  try {
    return nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(path + ": malformed JSON at byte " + std::to_string(e.byte));
  }
}

bool is_hf_llm_directory(const std::string& dir) {
  const fs::path cfg = fs::path(dir) / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(cfg, ec)) return false;
  const auto j = read_json(cfg.string());
  const std::string type = j.is_object() ? j.value("model_type", "") : "";
  return type == "opt" || type == "llama" || type == "baichuan";
}

HfLlm load_hf_llm(const std::string& dir) {
  const fs::path d(dir);
  const std::string cfg_path = (d / "config.json").string();
  std::error_code ec;
  check(fs::is_regular_file(cfg_path, ec), dir + ": no config.json (expected a Hugging Face LLM directory)");
  HfLlm m;
  m.config = text_config_from_hf(read_json(cfg_path), cfg_path);
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
  nlohmann::json j = {
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
  if (c.text_config) {  // stage 2: Blip2ForConditionalGeneration, query path only
    auto text = hf_config_from_text(*c.text_config);
    text.erase("architectures");
    j["architectures"] = {"Blip2ForConditionalGeneration"};
    j["text_config"] = text;
    j["qformer_config"]["use_qformer_text_input"] = false;
    j.erase("image_text_hidden_size");
    if (c.text_config->image_token_id >= 0) j["image_token_index"] = c.text_config->image_token_id;
  }
  return j;
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

nlohmann::json hf_config_from_text(const TextConfig& t) {
  nlohmann::json j = {{"vocab_size", t.vocab_size}, {"hidden_size", t.hidden_size},
                      {"num_hidden_layers", t.num_layers}, {"num_attention_heads", t.num_heads},
                      {"max_position_embeddings", t.max_position_embeddings},
                      {"tie_word_embeddings", t.tie_word_embeddings}, {"bos_token_id", t.bos_token_id},
                      {"eos_token_id", t.eos_token_id}, {"pad_token_id", t.pad_token_id}};
  if (t.is_opt()) {
    j.update({{"architectures", {"OPTForCausalLM"}}, {"model_type", "opt"}, {"ffn_dim", t.ffn_size()},
              {"word_embed_proj_dim", t.hidden_size}, {"do_layer_norm_before", true},
              {"activation_function", "relu"}, {"enable_bias", true}, {"dropout", 0.0},
              {"attention_dropout", 0.0}, {"layer_norm_elementwise_affine", true}});
  } else {
    j.update({{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
              {"intermediate_size", t.ffn_size()}, {"num_key_value_heads", t.num_heads},
              {"rms_norm_eps", t.rms_norm_eps}, {"rope_theta", t.rope_theta}, {"hidden_act", "silu"},
              {"attention_bias", false}, {"mlp_bias", false}});
  }
  return j;
}

void export_hf_llm(const TextConfig& t, const TensorMap& tensors, const std::string& dir) {
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  atomic_write(fs::path(dir) / "config.json", hf_config_from_text(t).dump(2) + "\n");
}

void export_hf_directory(const Blip2Config& c, const TensorMap& tensors, const std::string& dir) {
  Blip2Config cfg = c;
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
