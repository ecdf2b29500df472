// adopt_architecture: a run's model takes the architecture its checkpoint's own config describes.
//
// Every field that changes the numbers is listed here once, by part. An architecture field the
// run config set that disagrees with the checkpoint is an error; one it left to its preset takes
// the checkpoint's value. Settings (token ids, dropout, the image size the position embedding is
// interpolated to) are the checkpoint's only where the run did not set them.
#include <functional>
#include <sstream>

#include "blip2/config/config.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace {

std::string show(const std::string& v) { return "'" + v + "'"; }
std::string show(bool v) { return v ? "true" : "false"; }
std::string show(int64_t v) { return std::to_string(v); }
std::string show(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

class Adopter {
 public:
  Adopter(RunConfig& run, std::string source) : run_(run), source_(std::move(source)) {}

  // An architecture field whose value is `mine` in the run and `theirs` in the checkpoint; `keys`
  // are the config keys that set it (under `section`), `take` adopts the checkpoint's.
  template <class T>
  void arch(const std::string& section, std::initializer_list<const char*> keys, const T& mine,
            const T& theirs, const std::function<void()>& take) {
    const std::string first = path(section, *keys.begin());
    if (mine == theirs) {
      record(section, keys);
      return;
    }
    for (const char* k : keys) {
      auto it = run_.given.find(path(section, k));
      if (it == run_.given.end()) continue;
      // The key the run set, with its own value; for a derived field (vocabulary rows, FFN width)
      // also what it makes.
      const std::string key = path(section, k);
      std::string set_value = show(mine);
      if (key != first) {
        const auto flat = flatten(run_.model.model_config);
        auto v = flat.find(key);
        set_value = (v != flat.end() ? v->second : "?") + " (making " + first.substr(first.rfind('.') + 1) + " " +
                    show(mine) + ")";
      }
      throw Error(key + ": " + set_value + " in " + it->second + ", but " + show(theirs) + " in " + source_ +
                  " (the checkpoint's architecture); remove the key to take the checkpoint's");
    }
    taken_.push_back(section + "." + *keys.begin() + " " + show(mine) + " -> " + show(theirs));
    take();
    record(section, keys);
  }
  template <class T>
  void arch(const std::string& section, const char* key, T& mine, const T& theirs) {
    arch(section, {key}, mine, theirs, [&] { mine = theirs; });
  }
  // A setting: the checkpoint's value unless the run set one.
  template <class T>
  void setting(const std::string& section, const char* key, T& mine, const T& theirs) {
    if (mine == theirs || run_.given.count(path(section, key))) return;
    taken_.push_back((section.empty() ? std::string() : section + ".") + key + " " + show(mine) + " -> " +
                     show(theirs));
    mine = theirs;
  }

  void report() const {
    if (!taken_.empty()) log_info(source_ + ": taken from the checkpoint's config: " + join(taken_, ", "));
  }

 private:
  static std::string path(const std::string& section, const char* key) {
    return "model.model_config." + (section.empty() ? std::string() : section + ".") + key;
  }
  void record(const std::string& section, std::initializer_list<const char*> keys) {
    for (const char* k : keys) run_.given.emplace(path(section, k), source_);  // keeps an earlier source
  }

  RunConfig& run_;
  std::string source_;
  std::vector<std::string> taken_;
};

void adopt_vision(Adopter& a, VisionConfig& v, const VisionConfig& f, bool settings) {
  const std::string s = "vision_config";
  a.setting(s, "image_size", v.image_size, f.image_size);  // another size interpolates the positions
  a.arch(s, "patch_size", v.patch_size, f.patch_size);
  a.arch(s, "num_channels", v.num_channels, f.num_channels);
  a.arch(s, "hidden_size", v.hidden_size, f.hidden_size);
  a.arch(s, "num_hidden_layers", v.num_hidden_layers, f.num_hidden_layers);
  a.arch(s, "num_attention_heads", v.num_attention_heads, f.num_attention_heads);
  a.arch(s, "intermediate_size", v.intermediate_size, f.intermediate_size);
  a.arch(s, "layer_norm_eps", v.layer_norm_eps, f.layer_norm_eps);
  a.arch(s, "post_layernorm_eps", v.post_layernorm_eps, f.post_layernorm_eps);
  a.arch(s, "hidden_act", v.hidden_act, f.hidden_act);
  a.arch(s, "qkv_bias", v.qkv_bias, f.qkv_bias);
  if (!settings) return;
  a.setting(s, "attention_dropout", v.attention_dropout, f.attention_dropout);
}

void adopt_qformer(Adopter& a, Blip2Config& c, const Blip2Config& from, bool settings) {
  auto& q = c.qformer_config;
  const auto& f = from.qformer_config;
  const std::string s = "qformer_config";
  a.arch(s, "num_hidden_layers", q.num_hidden_layers, f.num_hidden_layers);
  a.arch(s, "num_attention_heads", q.num_attention_heads, f.num_attention_heads);
  a.arch(s, "hidden_size", q.hidden_size, f.hidden_size);
  a.arch(s, "intermediate_size", q.intermediate_size, f.intermediate_size);
  a.arch(s, "query_length", q.query_length, f.query_length);
  a.arch(s, "cross_attention_freq", q.cross_attention_freq, f.cross_attention_freq);
  a.arch(s, {"encoder_width"}, c.encoder_width(), from.encoder_width(),
         [&] { q.encoder_width = from.encoder_width(); });
  a.arch(s, {"vocab_size", "special_token_nums", "resize_token_embeddings"}, q.embedding_vocab_size(),
         f.embedding_vocab_size(), [&] {
           q.vocab_size = f.vocab_size;
           q.special_token_nums = f.special_token_nums;
           q.resize_token_embeddings = f.resize_token_embeddings;
         });
  a.arch(s, "max_position_embeddings", q.max_position_embeddings, f.max_position_embeddings);
  a.arch(s, "layer_norm_eps", q.layer_norm_eps, f.layer_norm_eps);
  a.arch(s, "hidden_act", q.hidden_act, f.hidden_act);
  if (!c.text_config) a.arch(s, "head_embed_dim", q.head_embed_dim, f.head_embed_dim);  // stage 2 has no ITC heads
  if (!settings) return;
  a.setting(s, "bos_token_id", q.bos_token_id, f.bos_token_id);
  a.setting(s, "sep_token_id", q.sep_token_id, f.sep_token_id);
  a.setting(s, "pad_token_id", q.pad_token_id, f.pad_token_id);
  a.setting(s, "hidden_dropout_prob", q.hidden_dropout_prob, f.hidden_dropout_prob);
  a.setting(s, "attention_probs_dropout_prob", q.attention_probs_dropout_prob, f.attention_probs_dropout_prob);
}

void adopt_text(Adopter& a, TextConfig& t, const TextConfig& f, bool settings) {
  const std::string s = "text_config";
  a.arch(s, "type", t.type, f.type);
  a.arch(s, "hidden_size", t.hidden_size, f.hidden_size);
  a.arch(s, "num_layers", t.num_layers, f.num_layers);
  a.arch(s, "num_heads", t.num_heads, f.num_heads);
  a.arch(s, "vocab_size", t.vocab_size, f.vocab_size);
  a.arch(s, {"intermediate_size", "multiple_of"}, t.ffn_size(), f.ffn_size(),
         [&] { t.intermediate_size = f.ffn_size(); });
  a.arch(s, "max_position_embeddings", t.max_position_embeddings, f.max_position_embeddings);
  a.arch(s, "tie_word_embeddings", t.tie_word_embeddings, f.tie_word_embeddings);
  a.arch(s, {"hidden_act"}, t.activation(), f.activation(), [&] { t.hidden_act = f.activation(); });
  if (f.is_opt()) {
    a.arch(s, "layer_norm_eps", t.layer_norm_eps, f.layer_norm_eps);
    a.arch(s, "enable_bias", t.enable_bias, f.enable_bias);
    a.arch(s, "do_layer_norm_before", t.do_layer_norm_before, f.do_layer_norm_before);
    a.arch(s, "layer_norm_elementwise_affine", t.layer_norm_elementwise_affine, f.layer_norm_elementwise_affine);
    a.arch(s, "remove_final_layer_norm", t.remove_final_layer_norm, f.remove_final_layer_norm);
  } else {
    a.arch(s, "rms_norm_eps", t.rms_norm_eps, f.rms_norm_eps);
    a.arch(s, "rope_theta", t.rope_theta, f.rope_theta);
    a.arch(s, {"num_key_value_heads"}, t.kv_heads(), f.kv_heads(), [&] { t.num_key_value_heads = f.kv_heads(); });
    a.arch(s, {"head_dim"}, t.head_size(), f.head_size(), [&] { t.head_dim = f.head_size(); });
    a.arch(s, "attention_bias", t.attention_bias, f.attention_bias);
    a.arch(s, "mlp_bias", t.mlp_bias, f.mlp_bias);
    a.arch(s, "rope_type", t.rope_type, f.rope_type);
    if (f.rope_type != "default") a.arch(s, "rope_factor", t.rope_factor, f.rope_factor);
    if (f.rope_type == "llama3") {
      a.arch(s, "rope_low_freq_factor", t.rope_low_freq_factor, f.rope_low_freq_factor);
      a.arch(s, "rope_high_freq_factor", t.rope_high_freq_factor, f.rope_high_freq_factor);
      a.arch(s, "rope_original_max_position_embeddings", t.rope_original_max_position_embeddings,
             f.rope_original_max_position_embeddings);
    }
  }
  if (!settings) return;
  a.setting(s, "bos_token_id", t.bos_token_id, f.bos_token_id);
  a.setting(s, "eos_token_id", t.eos_token_id, f.eos_token_id);
  a.setting(s, "pad_token_id", t.pad_token_id, f.pad_token_id);
  a.setting(s, "image_token_id", t.image_token_id, f.image_token_id);
  a.setting(s, "dropout", t.dropout, f.dropout);
  a.setting(s, "attention_dropout", t.attention_dropout, f.attention_dropout);
  a.setting(s, "layerdrop", t.layerdrop, f.layerdrop);
}

}  // namespace

void adopt_architecture(RunConfig& run, const Blip2Config& from, const std::string& from_source,
                        ArchitectureParts parts) {
  auto& c = run.model.model_config;
  Adopter a(run, from_source);
  // Run settings a checkpoint of the same stage carries (a stage-1 checkpoint says nothing about
  // how a stage-2 run freezes its ViT or how long its captions are).
  if (parts.settings && c.text_config.has_value() == from.text_config.has_value()) {
    a.setting("", "max_txt_len", c.max_txt_len, from.max_txt_len);
    a.setting("", "freeze_vision", c.freeze_vision, from.freeze_vision);
    a.setting("", "freeze_text", c.freeze_text, from.freeze_text);
  }
  // Weights written int8 (blip2 quantize) make the model's layers int8. A model said to be float
  // cannot hold them, and a request to quantise at load (--weights, the API's option) asks for
  // what is already done: both are errors. (Another int8 checkpoint, or a model built int8, agree.)
  if (from.weights != "float") {
    const std::string key = "model.model_config.weights";
    auto given = run.given.find(key);
    if (given != run.given.end()) {
      const bool request = given->second == kQuantiseAtLoad;
      if (request || c.weights != from.weights)
        throw Error(from_source + ": its weights are " + from.weights + " already (blip2 quantize wrote them); " +
                    (request ? "leave out --weights (it quantises float weights at load)"
                             : "the model is " + c.weights + " (model_config.weights, set by " + given->second + ")"));
    }
    c.weights = from.weights;
    if (given == run.given.end()) run.given[key] = from_source;
  }
  if (parts.vision) adopt_vision(a, c.vision_config, from.vision_config, parts.settings);
  if (parts.qformer) adopt_qformer(a, c, from, parts.settings);
  if (parts.text && c.text_config && from.text_config)
    adopt_text(a, *c.text_config, *from.text_config, parts.settings);
  // Lengths that follow the architecture unless the run set them.
  const auto& q = c.qformer_config;
  if (!run.given.count("model.model_config.max_txt_len")) {
    c.max_txt_len = std::min(c.max_txt_len, q.max_position_embeddings);
    if (c.text_config)  // captions fit the LLM's positions after the queries
      c.max_txt_len = std::max<int64_t>(
          1, std::min(c.max_txt_len, c.text_config->max_position_embeddings - q.query_length));
  }
  if (c.text_config && !run.given.count("model.model_config.text_config.seq_length"))
    c.text_config->seq_length = std::max(c.text_config->seq_length, q.query_length + c.max_txt_len);
  a.report();
}

}  // namespace blip2
