#include "blip2/io/hf_config.h"

#include <set>

#include "blip2/models/layers.h"  // the activation table
#include "blip2/util/common.h"

namespace blip2 {
namespace {

using nlohmann::json;

// The keys of one config section. Each key a transformers release (4.27 to 5.24) defines for the
// section's class must be read, declared known, or refused. A key no release defines is one
// transformers does not read either (hub configs carry a few, e.g. facebook/opt's
// activation_dropout, huggyllama's max_sequence_length): finish() names them in a warning.
class Fields {
 public:
  Fields(const json& j, std::string where, std::string family)
      : j_(j), where_(std::move(where)), family_(std::move(family)) {
    if (!j_.is_object()) throw Error(where_ + ": not a JSON object");
  }

  bool has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }
  const json& at(const std::string& key) const { return j_[key]; }

  // Reads a present, non-null key into `out`.
  template <class T>
  bool read(const std::string& key, T& out) {
    seen_.insert(key);
    if (!has(key)) return false;
    try {
      if constexpr (std::is_same_v<T, int64_t>) {
        check(j_[key].is_number_integer(), "");
      } else if constexpr (std::is_same_v<T, double>) {
        check(j_[key].is_number(), "");
      } else if constexpr (std::is_same_v<T, bool>) {
        check(j_[key].is_boolean(), "");
      }
      out = j_[key].get<T>();
    } catch (const std::exception&) {
      throw Error(where_ + "." + key + ": " + j_[key].dump() + " has the wrong type");
    }
    return true;
  }
  // An activation name, checked against the table.
  void read_activation(const std::string& key, std::string& out) {
    if (read(key, out) && !is_activation(out))
      refuse(key, "is not an activation blip2cpp implements (" + join(activation_names(), ", ") + ")");
  }
  // Keys that leave the forward pass unchanged.
  void known(std::initializer_list<const char*> keys) {
    for (const char* k : keys) seen_.insert(k);
  }
  // A key accepted only at `value` (or absent/null when `null_ok`).
  void require(const std::string& key, const json& value, const std::string& why) {
    seen_.insert(key);
    if (!has(key) || j_[key] == value) return;
    refuse(key, why);
  }
  // model_type, when present, must be this section's.
  void model_type(const std::string& expected) {
    require("model_type", expected, "is not " + expected + " (this section is a " + family_ + ")");
  }
  [[noreturn]] void refuse(const std::string& key, const std::string& why) const {
    throw Error(where_ + "." + key + ": " + (j_.contains(key) ? j_[key].dump() : std::string("(absent)")) + " " + why);
  }

  // transformers' PretrainedConfig keys, shared by every section (4.x writes them all in nested
  // configs; 5.x keeps a few).
  void generic() {
    known({"_name_or_path", "architectures", "transformers_version", "_commit_hash", "output_attentions",
           "output_hidden_states", "return_dict", "torchscript", "dtype", "torch_dtype", "use_bfloat16",
           "tf_legacy_loss", "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class",
           "prefix", "task_specific_params", "chunk_size_feed_forward", "_attn_implementation_autoset",
           "_from_model_config", "use_cache", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
           "tie_encoder_decoder", "decoder_start_token_id", "sep_token_id", "gradient_checkpointing",
           "tie_word_embeddings"});  // read where it matters (the LLM); the other sections have no heads
    require("is_encoder_decoder", false, "is not supported (BLIP-2's models here are decoder-only)");
    require("pruned_heads", json::object(), "is not supported: pruned attention heads");
    // Generation defaults a model config may carry (4.x); blip2cpp takes generation settings from
    // the run config's text_config, so only transformers' defaults are accepted here.
    static const std::vector<std::pair<const char*, json>> generation = {
        {"max_length", 20}, {"min_length", 0}, {"do_sample", false}, {"early_stopping", false},
        {"num_beams", 1}, {"num_beam_groups", 1}, {"diversity_penalty", 0.0}, {"temperature", 1.0},
        {"top_k", 50}, {"top_p", 1.0}, {"typical_p", 1.0}, {"repetition_penalty", 1.0},
        {"length_penalty", 1.0}, {"no_repeat_ngram_size", 0}, {"encoder_no_repeat_ngram_size", 0},
        {"bad_words_ids", nullptr}, {"num_return_sequences", 1}, {"output_scores", false},
        {"return_dict_in_generate", false}, {"forced_bos_token_id", nullptr},
        {"forced_eos_token_id", nullptr}, {"remove_invalid_values", false},
        {"exponential_decay_length_penalty", nullptr}, {"suppress_tokens", nullptr},
        {"begin_suppress_tokens", nullptr}};
    for (const auto& [key, value] : generation)
      require(key, value, std::string("is a generation setting, which blip2cpp takes from the run config's "
                                      "text_config (num_beams, max_new_tokens, ...), not from config.json; "
                                      "transformers' default is ") + value.dump());
  }

  void finish() const {
    std::vector<std::string> unknown;
    for (const auto& [key, value] : j_.items())
      if (!seen_.count(key)) unknown.push_back(key + " = " + value.dump());
    if (!unknown.empty())
      log_warn(where_ + ": " + join(unknown, ", ") + ": not a field of " + family_ +
               " in any transformers release (4.27 to 5.24), so transformers does not read it and neither "
               "does blip2cpp");
  }

 private:
  const json& j_;
  std::string where_, family_;
  std::set<std::string> seen_;
};

VisionConfig vision_from_hf(const json& j, const std::string& where) {
  VisionConfig v;  // blip2cpp's defaults are transformers' for ViT-g
  Fields f(j, where, "Blip2VisionConfig");
  f.generic();
  f.model_type("blip_2_vision_model");
  // dropout and projection_dim (transformers 4.x) are read by no release's Blip2 model; its patch
  // embedding always takes 3 channels, whatever num_channels says.
  f.known({"initializer_range", "initializer_factor", "bos_token_id", "eos_token_id", "pad_token_id", "dropout",
           "projection_dim", "num_channels"});
  f.read("hidden_size", v.hidden_size);
  f.read("intermediate_size", v.intermediate_size);
  f.read("num_hidden_layers", v.num_hidden_layers);
  f.read("num_attention_heads", v.num_attention_heads);
  f.read("image_size", v.image_size);
  f.read("patch_size", v.patch_size);
  f.read("layer_norm_eps", v.layer_norm_eps);
  v.post_layernorm_eps = v.layer_norm_eps;  // transformers' post_layernorm uses the ViT's eps
  f.read_activation("hidden_act", v.hidden_act);
  f.read("qkv_bias", v.qkv_bias);
  f.read("attention_dropout", v.attention_dropout);
  f.finish();
  return v;
}

QFormerConfig qformer_from_hf(const json& j, const std::string& where) {
  QFormerConfig q;
  Fields f(j, where, "Blip2QFormerConfig");
  f.generic();
  f.model_type("blip_2_qformer");
  // use_qformer_text_input decides whether the text FFN exists; the weights say the same (a
  // stage-1 model needs it, a stage-2 model never runs it).
  // classifier_dropout (transformers 4.x) is read by no release's Blip2 model.
  f.known({"initializer_range", "bos_token_id", "eos_token_id", "use_qformer_text_input", "classifier_dropout"});
  f.require("position_embedding_type", "absolute", "is not supported (only absolute position embeddings)");
  f.read("vocab_size", q.vocab_size);
  q.resize_token_embeddings = false;  // the checkpoint's table is already its final size
  q.special_token_nums = 0;
  q.bos_token_id = q.vocab_size - 1;  // [DEC] is the last row
  f.read("hidden_size", q.hidden_size);
  f.read("num_hidden_layers", q.num_hidden_layers);
  f.read("num_attention_heads", q.num_attention_heads);
  f.read("intermediate_size", q.intermediate_size);
  f.read("max_position_embeddings", q.max_position_embeddings);
  f.read("cross_attention_frequency", q.cross_attention_freq);
  q.encoder_width = 1408;  // Blip2QFormerConfig's default (ViT-g's width)
  f.read("encoder_hidden_size", q.encoder_width);
  f.read("layer_norm_eps", q.layer_norm_eps);
  f.read("hidden_dropout_prob", q.hidden_dropout_prob);
  f.read("attention_probs_dropout_prob", q.attention_probs_dropout_prob);
  f.read("pad_token_id", q.pad_token_id);
  f.read_activation("hidden_act", q.hidden_act);
  f.finish();
  return q;
}

void read_token_ids(Fields& f, TextConfig& t) {
  f.read("bos_token_id", t.bos_token_id);
  f.read("pad_token_id", t.pad_token_id);
  if (f.has("eos_token_id") && f.at("eos_token_id").is_array()) {
    const auto& ids = f.at("eos_token_id");
    f.known({"eos_token_id"});
    if (ids.size() != 1 || !ids[0].is_number_integer())
      f.refuse("eos_token_id", "is not supported: blip2cpp stops at one EOS id");
    t.eos_token_id = ids[0].get<int64_t>();
  } else {
    f.read("eos_token_id", t.eos_token_id);
  }
}

void read_opt(Fields& f, TextConfig& t) {
  t.type = "OPTConfig";
  t.tie_word_embeddings = true;  // OPTConfig's defaults
  t.bos_token_id = 2;
  t.pad_token_id = 1;
  t.max_position_embeddings = 2048;
  t.hidden_size = 768;
  t.num_layers = 12;
  t.num_heads = 12;
  t.vocab_size = 50272;
  t.intermediate_size = 3072;
  t.hidden_act = "relu";
  t.dropout = 0.1;
  // activation_dropout is in facebook/opt-* configs but read by neither transformers' OPT nor here.
  f.known({"init_std", "activation_dropout"});
  f.read("hidden_size", t.hidden_size);
  f.read("ffn_dim", t.intermediate_size);
  int64_t proj = t.hidden_size;
  f.read("word_embed_proj_dim", proj);
  if (proj != t.hidden_size)
    f.refuse("word_embed_proj_dim", "differs from hidden_size " + std::to_string(t.hidden_size) +
                                        ": OPT-350m's project_in/project_out are not implemented");
  f.read("do_layer_norm_before", t.do_layer_norm_before);
  f.read("_remove_final_layer_norm", t.remove_final_layer_norm);
  f.read("enable_bias", t.enable_bias);
  f.read("layer_norm_elementwise_affine", t.layer_norm_elementwise_affine);
  f.read_activation("activation_function", t.hidden_act);
  f.read("dropout", t.dropout);
  f.read("attention_dropout", t.attention_dropout);
  f.read("layerdrop", t.layerdrop);
}

void read_rope(Fields& f, TextConfig& t, const std::string& where) {
  double theta = 10000.0;
  const bool top_theta = f.read("rope_theta", theta);  // transformers 4.x keeps it at the top level
  double partial = 1.0;
  f.read("partial_rotary_factor", partial);
  json params = json::object();
  std::string key;
  for (const char* k : {"rope_parameters", "rope_scaling"}) {  // 5.x, 4.x
    f.known({k});
    if (f.has(k)) {
      if (!f.at(k).is_object()) f.refuse(k, "is not an object");
      params = f.at(k);
      key = k;
      break;
    }
  }
  t.rope_theta = theta;
  if (key.empty()) {
    if (partial != 1.0) f.refuse("partial_rotary_factor", "is not supported (Llama rotates the whole head)");
    return;
  }
  Fields p(params, where + "." + key, "RoPE parameters");
  p.read("rope_theta", t.rope_theta);
  p.read("partial_rotary_factor", partial);
  if (partial != 1.0) p.refuse("partial_rotary_factor", "is not supported (Llama rotates the whole head)");
  std::string type = "default";
  if (!p.read("rope_type", type)) p.read("type", type);
  p.known({"rope_type", "type"});
  if (type != "default" && type != "linear" && type != "llama3")
    p.refuse(p.has("rope_type") ? "rope_type" : "type",
             "scaling is not implemented (default, linear and llama3 are)");
  t.rope_type = type;
  if (type != "default") {
    if (!p.read("factor", t.rope_factor)) p.refuse("factor", "is needed by " + type + " scaling");
  } else {
    p.known({"factor"});
  }
  // A config with both (5.x and 4.x spellings, as blip2cpp's export writes) must say one thing.
  if (top_theta && theta != t.rope_theta) f.refuse("rope_theta", "disagrees with " + key + ".rope_theta");
  if (key == "rope_parameters" && f.has("rope_scaling")) {
    const auto& sc = f.at("rope_scaling");
    const std::string other = sc.is_object() ? sc.value("rope_type", sc.value("type", std::string("default"))) : "";
    if (other != type || (type != "default" && sc.value("factor", 0.0) != t.rope_factor))
      f.refuse("rope_scaling", "disagrees with rope_parameters");
  }
  if (type == "llama3") {
    p.read("low_freq_factor", t.rope_low_freq_factor);
    p.read("high_freq_factor", t.rope_high_freq_factor);
    t.rope_original_max_position_embeddings = t.max_position_embeddings;
    p.read("original_max_position_embeddings", t.rope_original_max_position_embeddings);
  }
  p.finish();
}

// Baichuan-7B is Llama with a fused W_pack; Baichuan-13B (ALiBi) and Baichuan2 (a normalised
// lm_head) share its model_type and differ in what they compute.
void check_baichuan(Fields& f, const json& j) {
  std::vector<std::string> archs;
  if (j.contains("architectures") && j["architectures"].is_array())
    for (const auto& a : j["architectures"])
      if (a.is_string()) archs.push_back(a.get<std::string>());
  auto has_arch = [&](const std::string& a) { return std::find(archs.begin(), archs.end(), a) != archs.end(); };
  if (has_arch("BaiChuanForCausalLM")) return;  // Baichuan-7B
  if (has_arch("BaichuanForCausalLM")) {
    if (j.contains("hidden_size") && j["hidden_size"] == 4096)
      f.refuse("architectures", "is Baichuan2-7B, whose lm_head is normalised (NormHead): not implemented "
                                "(Baichuan-7B, BaiChuanForCausalLM, is)");
    f.refuse("architectures", "is Baichuan-13B or Baichuan2-13B, which use ALiBi attention biases instead of "
                              "rotary embeddings: not implemented (Baichuan-7B, BaiChuanForCausalLM, is)");
  }
  f.refuse("architectures", "does not say which Baichuan this is: only Baichuan-7B (BaiChuanForCausalLM) "
                            "is implemented");
}

void read_llama(Fields& f, TextConfig& t, const json& j, const std::string& type, const std::string& where) {
  t.type = "LlamaConfig";
  t.hidden_act = "silu";
  if (type == "baichuan") {
    check_baichuan(f, j);
    t.max_position_embeddings = 4096;
    f.known({"auto_map"});
  }
  // pretraining_tp > 1 only splits the matmuls in transformers 4.x; 5.x does not read it.
  f.known({"initializer_range", "pretraining_tp"});
  f.read("hidden_size", t.hidden_size);
  f.read("intermediate_size", t.intermediate_size);
  f.read("rms_norm_eps", t.rms_norm_eps);
  f.read_activation("hidden_act", t.hidden_act);
  f.read("attention_bias", t.attention_bias);
  f.read("mlp_bias", t.mlp_bias);
  f.read("attention_dropout", t.attention_dropout);
  f.read("num_attention_heads", t.num_heads);
  f.read("max_position_embeddings", t.max_position_embeddings);
  if (f.read("num_key_value_heads", t.num_key_value_heads) && t.num_key_value_heads <= 0)
    f.refuse("num_key_value_heads", "must be positive");
  if (f.read("head_dim", t.head_dim) && t.head_dim <= 0) f.refuse("head_dim", "must be positive");
  read_rope(f, t, where);
}

}  // namespace

nlohmann::json read_json_file(const std::string& path) {
  try {
    return nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(path + ": malformed JSON at byte " + std::to_string(e.byte));
  }
}

bool is_llm_config(const nlohmann::json& j) {
  const std::string type = j.is_object() && j.contains("model_type") && j["model_type"].is_string()
                               ? j["model_type"].get<std::string>() : "";
  return type == "opt" || type == "llama" || type == "baichuan";
}

TextConfig text_config_from_hf(const nlohmann::json& j, const std::string& where) {
  check(j.is_object(), where + ": not a JSON object");
  const std::string type = j.contains("model_type") && j["model_type"].is_string() ? j["model_type"].get<std::string>() : "";
  TextConfig t;
  const char* family = type == "opt" ? "OPTConfig" : "LlamaConfig";
  Fields f(j, where, family);
  f.known({"model_type"});
  if (type == "opt") {
    read_opt(f, t);
  } else if (type == "llama" || type == "baichuan") {
    read_llama(f, t, j, type, where);
  } else {
    f.refuse("model_type", "is not an LLM blip2cpp implements (opt, llama, baichuan)");
  }
  f.generic();
  f.read("num_hidden_layers", t.num_layers);
  f.read("num_attention_heads", t.num_heads);
  f.read("vocab_size", t.vocab_size);
  f.read("max_position_embeddings", t.max_position_embeddings);
  f.read("tie_word_embeddings", t.tie_word_embeddings);
  read_token_ids(f, t);
  f.finish();
  if (t.num_heads <= 0 || t.hidden_size <= 0) f.refuse("num_attention_heads", "must be positive");
  if (t.head_dim > 0 && t.head_dim * t.num_heads == t.hidden_size) t.head_dim = 0;  // the usual split
  if (t.num_key_value_heads == t.num_heads) t.num_key_value_heads = 0;
  t.seq_length = t.max_position_embeddings;
  return t;
}

Blip2Config blip2_config_from_hf(const nlohmann::json& j, const std::string& source) {
  check(j.is_object(), source + ": config.json is not a JSON object");
  Blip2Config c;
  Fields f(j, source, "Blip2Config");
  f.generic();
  f.require("model_type", "blip-2", "is not blip-2 (this is not a BLIP-2 config)");
  f.known({"initializer_range", "initializer_factor", "tie_word_embeddings", "bos_token_id", "eos_token_id",
           "pad_token_id", "vision_config", "qformer_config", "text_config"});
  c.vision_config = vision_from_hf(j.value("vision_config", json::object()), source + ": vision_config");
  const json qj = j.value("qformer_config", json::object());
  c.qformer_config = qformer_from_hf(qj, source + ": qformer_config");
  if (c.qformer_config.encoder_width != c.vision_config.hidden_size)
    throw Error(source + ": qformer_config.encoder_hidden_size: " + std::to_string(c.qformer_config.encoder_width) +
                " differs from vision_config.hidden_size " + std::to_string(c.vision_config.hidden_size) +
                ": the Q-Former cross-attends the ViT's output");
  f.read("num_query_tokens", c.qformer_config.query_length);
  f.read("image_text_hidden_size", c.qformer_config.head_embed_dim);
  c.max_txt_len = std::min<int64_t>(c.max_txt_len, c.qformer_config.max_position_embeddings);
  // Every Blip2Config carries a text_config (OPT's defaults when unset); only the models with a
  // language model read it.
  bool has_llm = false;
  if (j.contains("architectures") && j["architectures"].is_array())
    for (const auto& a : j["architectures"])
      if (a.is_string() && (a == "Blip2ForConditionalGeneration" || a == "Blip2Model")) has_llm = true;
  int64_t image_token = -1;
  for (const char* key : {"image_token_index", "image_token_id"}) f.read(key, image_token);
  f.known({"use_decoder_only_language_model"});
  if (!has_llm && qj.is_object() && qj.contains("use_qformer_text_input") && qj["use_qformer_text_input"] == false)
    throw Error(source + ": qformer_config.use_qformer_text_input: false, but a stage-1 model (" +
                (j.contains("architectures") ? j["architectures"].dump() : std::string("no architectures")) +
                ") encodes text with the Q-Former's text path, which this setting removes");
  if (has_llm) {
    if (j.contains("use_decoder_only_language_model") && j["use_decoder_only_language_model"] == false)
      f.refuse("use_decoder_only_language_model", "(an encoder-decoder LLM such as Flan-T5) is not implemented");
    json text = j.value("text_config", json::object());
    if (text.is_object() && !text.contains("model_type")) text["model_type"] = "opt";  // Blip2Config's default
    c.text_config = text_config_from_hf(text, source + ": text_config");
    // Captions fit the LLM's positions after the queries.
    c.max_txt_len = std::max<int64_t>(1, std::min(c.max_txt_len, c.text_config->max_position_embeddings -
                                                                     c.qformer_config.query_length));
    c.text_config->seq_length = c.qformer_config.query_length + c.max_txt_len;
    c.text_config->image_token_id = image_token;
  }
  f.finish();
  validate_model_config(c, source);
  return c;
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
        {"patch_size", v.patch_size}, {"layer_norm_eps", v.layer_norm_eps}, {"qkv_bias", v.qkv_bias},
        {"hidden_act", v.hidden_act}, {"attention_dropout", v.attention_dropout}}},
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

nlohmann::json hf_config_from_text(const TextConfig& t) {
  nlohmann::json j = {{"vocab_size", t.vocab_size}, {"hidden_size", t.hidden_size},
                      {"num_hidden_layers", t.num_layers}, {"num_attention_heads", t.num_heads},
                      {"max_position_embeddings", t.max_position_embeddings},
                      {"tie_word_embeddings", t.tie_word_embeddings}, {"bos_token_id", t.bos_token_id},
                      {"eos_token_id", t.eos_token_id}, {"pad_token_id", t.pad_token_id}};
  if (t.is_opt()) {
    j.update({{"architectures", {"OPTForCausalLM"}}, {"model_type", "opt"}, {"ffn_dim", t.ffn_size()},
              {"word_embed_proj_dim", t.hidden_size}, {"do_layer_norm_before", t.do_layer_norm_before},
              {"_remove_final_layer_norm", t.remove_final_layer_norm},
              {"activation_function", t.activation()}, {"enable_bias", t.enable_bias},
              {"dropout", t.dropout}, {"attention_dropout", t.attention_dropout}, {"layerdrop", t.layerdrop},
              {"layer_norm_elementwise_affine", t.layer_norm_elementwise_affine}});
  } else {
    nlohmann::json rope = {{"rope_type", t.rope_type}, {"rope_theta", t.rope_theta}};
    if (t.rope_type != "default") rope["factor"] = t.rope_factor;
    if (t.rope_type == "llama3")
      rope.update({{"low_freq_factor", t.rope_low_freq_factor}, {"high_freq_factor", t.rope_high_freq_factor},
                   {"original_max_position_embeddings", t.rope_original_max_position_embeddings}});
    // rope_parameters for transformers 5, rope_theta and rope_scaling for 4.x (the same settings).
    nlohmann::json scaling = nullptr;
    if (t.rope_type != "default") {
      scaling = rope;
      scaling.erase("rope_theta");
      scaling["type"] = t.rope_type;
    }
    j.update({{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
              {"intermediate_size", t.ffn_size()}, {"num_key_value_heads", t.kv_heads()},
              {"head_dim", t.head_size()}, {"rms_norm_eps", t.rms_norm_eps}, {"rope_parameters", rope},
              {"rope_theta", t.rope_theta}, {"rope_scaling", scaling},
              {"hidden_act", t.activation()}, {"attention_bias", t.attention_bias}, {"mlp_bias", t.mlp_bias},
              {"attention_dropout", t.attention_dropout}});
  }
  return j;
}

}  // namespace blip2
