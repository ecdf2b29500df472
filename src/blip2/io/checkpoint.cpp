#include "blip2/io/checkpoint.h"

#include <malloc.h>

#include <cstdlib>
#include <map>
#include <regex>

#include "blip2/io/hf.h"
#include "blip2/io/pth.h"
#include "blip2/models/layers.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace fs = std::filesystem;

std::string blip2_home() {
  if (const char* h = std::getenv("BLIP2_HOME"); h && *h) return h;
  const char* home = std::getenv("HOME");
  return (fs::path(home ? home : ".") / ".cache" / "blip2cpp").string();
}

std::string resolve_weights(const std::string& name_or_path) {
  std::error_code ec;
  if (fs::exists(name_or_path, ec)) return name_or_path;
  const bool looks_like_name = name_or_path.find('/') == std::string::npos &&
                               fs::path(name_or_path).extension().empty();
  if (!looks_like_name) throw Error(name_or_path + ": checkpoint not found");
  const fs::path dir = fs::path(blip2_home()) / name_or_path;
  if (fs::is_directory(dir, ec)) return dir.string();
  std::string files;
  if (name_or_path == "vit_g_p16" || name_or_path == "eva_vit_g")
    files = "LAVIS' eva_vit_g.pth";
  else if (name_or_path.rfind("blip2_stage1", 0) == 0)
    files = "LAVIS' blip2_pretrained.pth and eva_vit_g.pth (run `blip2 convert blip2_pretrained.pth "
            "eva_vit_g.pth --out " + dir.string() + "`), or a Hugging Face Salesforce/blip2-itm-vit-g "
            "directory";
  else if (name_or_path == "llama_7b" || name_or_path == "baichuan_7b")
    files = "the LLM as a Hugging Face directory (config.json, safetensors or pytorch_model*.bin "
            "shards, tokenizer.model)";
  else if (name_or_path.rfind("blip2_opt_", 0) == 0)
    files = "a Hugging Face Salesforce/blip2-opt-* directory, or run `blip2 convert "
            "blip2_pretrained_opt*.pth eva_vit_g.pth OPT_DIR --model " + name_or_path + " --out " +
            dir.string() + "` on LAVIS' files and the facebook/opt-* directory";
  else if (name_or_path.find("stage2") != std::string::npos)
    files = "the stage-2 weights (a stage-2 training output, or `blip2 convert` of LAVIS' stage-2 "
            ".pth); the LLM goes under its own name (llama_7b, baichuan_7b) and the ViT under eva_vit_g";
  else
    files = "the model's weights (a Hugging Face directory, a .pth, or `blip2 convert` output)";
  throw Error(name_or_path + ": no local weights at " + dir.string() + "; place " + files +
              " there (set BLIP2_HOME to use another root; nothing is downloaded)");
}

TensorMap load_checkpoint_tensors(const std::string& name_or_path) {
  std::error_code ec;
  const std::string path = resolve_weights(name_or_path);
  const fs::path p(path);
  if (fs::is_directory(p, ec)) {
    if (is_hf_llm_directory(path)) return load_hf_llm(path).tensors;  // an LLM alone
    if (is_hf_directory(path) && !fs::exists(p / "trainer_state.pt"))
      return canonical_from_hf(load_safetensors_dir(path), path);
    if (fs::exists(p / "model.safetensors")) return load_safetensors((p / "model.safetensors").string());
    for (const char* bin : {"pytorch_model.bin", "model.pth"})
      if (fs::exists(p / bin)) return load_checkpoint_tensors((p / bin).string());
    throw Error(path + ": no weights here (expected model.safetensors, an index of shards, or a .pth)");
  }
  check(fs::is_regular_file(p, ec), path + ": checkpoint not found");
  const std::string ext = p.extension().string();
  if (ext == ".safetensors") return canonical_from_hf(load_safetensors(path), path);
  if (ext == ".pth" || ext == ".bin" || ext == ".pt") {
    TensorMap raw = load_pth(path);
    try {
      return canonical_from_hf(canonical_from_lavis(raw), path);
    } catch (const Error& e) {
      const std::string msg = e.what();
      throw Error(msg.rfind(path, 0) == 0 ? msg : path + ": " + msg);
    }
  }
  throw Error(path + ": unknown checkpoint format (expected .safetensors, .pth, .bin or a directory)");
}

LoadReport load_into(torch::nn::Module& module, TensorMap tensors, const std::string& source) {
  LoadReport report;
  torch::NoGradGuard no_grad;
  std::set<std::string> known;
  // Tensor-parallel parameters take their slice of the whole tensor (of a memory-mapped file,
  // only that slice is read).
  const auto shards = tensor_shards(module);
  // Weight-only int8 layers: a float weight is quantised as it is copied, its scale written with it.
  auto buffers = module.named_buffers();
  std::set<std::string> quantised;
  auto visit = [&](const std::string& name, torch::Tensor& target) {
    known.insert(name);
    if (quantised.count(name)) return;
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      report.missing.push_back(name);
      return;
    }
    // Nothing but this map holds the tensor or its memory (a caller's copy of the map would):
    // it may become the model's own (below).
    const bool sole = it->second.use_count() == 1 && it->second.storage().use_count() == 1;
    torch::Tensor src = it->second;
    auto shard = shards.find(name);
    std::vector<int64_t> whole = target.sizes().vec();
    if (shard != shards.end()) whole[shard->second.dim] *= shard->second.size;
    if (src.sizes().vec() != whole)
      throw Error(source + ": tensor '" + name + "' has shape " + shape_str(src.sizes().vec()) +
                  " but the model expects " + shape_str(whole));
    if (shard != shards.end()) src = take_shard(src, shard->second);
    const bool int8_target = target.scalar_type() == torch::kInt8, int8_src = src.scalar_type() == torch::kInt8;
    if (int8_src && !int8_target)
      throw Error(source + ": tensor '" + name + "' is int8 (written by blip2 quantize) but the model's is " +
                  std::string(c10::toString(target.scalar_type())) + ": load it with model_config.weights: int8");
    if (int8_target && !int8_src && buffers.contains(name + "_scale")) {
      torch::Tensor q, scale;
      try {
        std::tie(q, scale) = quantize_int8(src);
      } catch (const Error& e) {
        throw Error(source + ": tensor '" + name + "': " + e.what());
      }
      target.copy_(q);
      buffers[name + "_scale"].copy_(scale);
      quantised.insert(name + "_scale");
      report.loaded.push_back(name + "_scale");
      release_file_pages(it->second);
      report.loaded.push_back(name);
      return;
    }
    if (sole && shard == shards.end() && target.device().is_cpu() && src.device().is_cpu() &&
        src.scalar_type() == target.scalar_type() && src.is_contiguous()) {
      // The model's tensor takes the storage instead of a copy: a memory-mapped file's pages
      // are then read where the model uses them (MAP_PRIVATE: a write copies the page), and the
      // model's never-touched allocation is freed.
      target.set_data(src);
    } else {
      target.copy_(src);
      release_file_pages(it->second);
    }
    report.loaded.push_back(name);
  };
  for (auto& p : module.named_parameters()) visit(p.key(), p.value());
  for (auto& b : module.named_buffers()) visit(b.key(), b.value());
  for (const auto& [name, t] : tensors)
    if (!known.count(name)) report.unexpected.push_back(name);
  tensors.clear();  // what was copied from (a .pth's tensors, converted copies) is freed before the trim
#ifdef __GLIBC__
  // Converting loads (int8 quantisation, dtype casts) free many temporaries of 4-32 MB, which
  // glibc keeps in its heap once its mmap threshold has grown: without this, an OPT-2.7B loaded
  // int8 stays at 6.7 GiB resident instead of 2.5.
  malloc_trim(0);
#endif
  return report;
}

TensorMap state_dict(const torch::nn::Module& module, bool trainable_only) {
  TensorMap out;
  const auto shards = tensor_shards(module);  // gathered whole: collective over the tp group
  for (const auto& p : module.named_parameters()) {
    if (trainable_only && !p.value().requires_grad()) continue;
    auto s = shards.find(p.key());
    out.emplace(p.key(), s == shards.end() ? p.value() : gather_shards(p.value(), s->second));
  }
  for (const auto& b : module.named_buffers()) out.emplace(b.key(), b.value());
  return out;
}

LoadReport load_weights_into(torch::nn::Module& model, TensorMap tensors, const std::string& source) {
  const std::string pos = "vision_model.embeddings.position_embedding";
  auto params = model.named_parameters();
  if (tensors.count(pos) && params.contains(pos) &&
      tensors.at(pos).size(1) != params[pos].size(1)) {
    log_info(source + ": interpolating the position embedding from " +
             std::to_string(tensors.at(pos).size(1)) + " to " + std::to_string(params[pos].size(1)) +
             " tokens (bicubic)");
    tensors[pos] = interpolate_pos_embed(tensors.at(pos), params[pos].size(1));
  }
  return load_into(model, std::move(tensors), source);
}

std::string explain_missing(const std::vector<std::string>& missing) {
  int vit = 0, lm = 0, temp = 0, llm = 0, other = 0;
  for (const auto& k : missing) {
    if (k.rfind("vision_model.", 0) == 0 && k.rfind("vision_model.post_layernorm", 0) != 0) ++vit;
    else if (k.rfind("language_model.", 0) == 0) ++llm;
    else if (k.rfind("cls.", 0) == 0) ++lm;
    else if (k == "temp") ++temp;
    else ++other;
  }
  std::string s;
  if (vit) s += "no ViT weights (LAVIS stage-1/stage-2 files hold only trained weights: give the ViT as vision_config.checkpoint_name_or_path); ";
  if (lm) s += "no stage-1 LM head (retrieval checkpoints have none); ";
  if (llm) s += "no LLM weights (stage-2 files hold none: give the LLM's Hugging Face directory as text_config.checkpoint_name_or_path); ";
  if (temp) s += "no temperature (Hugging Face drops it; 0.07 is used); ";
  if (other) s += std::to_string(other) + " other tensors missing; ";
  return s;
}

namespace {

// A checkpoint directory, an output directory's checkpoint/ root (its `latest`), or a file.
std::string resolve_checkpoint(const std::string& path) {
  fs::path p(path);
  std::error_code ec;
  if (fs::is_regular_file(p, ec)) return p.string();
  check(fs::is_directory(p, ec), path + ": checkpoint not found");
  if (fs::exists(p / "model.safetensors")) return p.string();
  for (fs::path root : {p, p / "checkpoint"}) {
    if (fs::exists(root / "latest")) {
      std::string name = read_file(root / "latest");
      while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
      check(fs::exists(root / name / "model.safetensors"),
            (root / "latest").string() + " names '" + name + "', which has no model.safetensors");
      return (root / name).string();
    }
  }
  throw Error(path + ": not a checkpoint (no model.safetensors, no latest)");
}

std::string weights_location(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec) && !fs::exists(fs::path(path) / "model.safetensors") &&
      !is_hf_directory(path) &&
      (fs::exists(fs::path(path) / "latest") || fs::exists(fs::path(path) / "checkpoint" / "latest")))
    return resolve_checkpoint(path);
  return path;
}

}  // namespace

std::string locate_weights(const std::string& name_or_path) { return weights_location(resolve_weights(name_or_path)); }


std::optional<CheckpointArchitecture> checkpoint_architecture(const std::string& name_or_path) {
  const fs::path p = locate_weights(name_or_path);
  std::error_code ec;
  fs::path dir = p;
  if (!fs::is_directory(p, ec)) {  // a file: its directory's config when it is that directory's weights
    const std::string file = p.filename().string();
    if (file != "model.safetensors" && file != "pytorch_model.bin") return std::nullopt;
    dir = p.parent_path();
  }
  CheckpointArchitecture a;
  if (fs::exists(dir / "config.yaml", ec)) {
    a.source = (dir / "config.yaml").string();
    const std::string text = read_file(a.source);
    if (text.find("model_config:") != std::string::npos) {
      a.config = parse_run_config(text, a.source).model.model_config;
      validate_model_config(a.config, a.source);
    } else {
      a.config = parse_model_config(text, a.source);
    }
    a.parts = {true, true, a.config.text_config.has_value(), true};
    return a;
  }
  if (!fs::exists(dir / "config.json", ec)) return std::nullopt;
  a.source = (dir / "config.json").string();
  const auto j = read_json_file(a.source);
  if (is_llm_config(j)) {
    a.config.text_config = text_config_from_hf(j, a.source);
    a.parts = {false, false, true, false};
  } else {
    a.config = blip2_config_from_hf(j, a.source);
    a.parts = {true, true, a.config.text_config.has_value(), true};
  }
  return a;
}

// ---- the ledger ----

namespace {

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// The part a tensor belongs to, and what to say when a whole part has no weights.
struct Part {
  const char* name;
  const char* hint;
};
const Part& part_of(const std::string& name) {
  static const Part vit{"the ViT", "LAVIS stage-1 and stage-2 files hold none: give vision_config.checkpoint_name_or_path "
                                   "(e.g. eva_vit_g.pth)"};
  static const Part ln{"ln_vision", "LAVIS' eva_vit_g.pth holds none; the stage-1 weights do"};
  static const Part lm{"the stage-1 LM head", "Hugging Face and retrieval checkpoints have none"};
  static const Part temp{"the ITC temperature", "Hugging Face drops it; 0.07 is used"};
  static const Part proj{"language_projection", "a stage-1 checkpoint has none; stage-2 training creates it"};
  static const Part llm{"the LLM", "stage-2 files hold none: give text_config.checkpoint_name_or_path"};
  static const Part qformer{"the Q-Former", "give the stage-1 or stage-2 weights as model_config.checkpoint_name_or_path"};
  if (starts_with(name, "vision_model.post_layernorm.")) return ln;
  if (starts_with(name, "vision_model.")) return vit;
  if (starts_with(name, "cls.")) return lm;
  if (name == "temp") return temp;
  if (starts_with(name, "language_projection.")) return proj;
  if (starts_with(name, "language_model.")) return llm;
  return qformer;
}

// Tensors a load may bring that the model rightly lacks. `tensors` is the whole load (for twins).
std::string known_extra(const std::string& name, const TensorMap& tensors, const std::set<std::string>& model_names) {
  static const std::regex stage1_only(
      R"(^(embeddings\.|cls\.|temp$|vision_projection\.|text_projection\.|itm_head\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.))");
  const bool stage2_model = model_names.count("language_projection.weight") > 0;
  if (stage2_model && std::regex_search(name, stage1_only)) return "stage-1";
  // BLIP-2 uses EVA-CLIP-g's second-to-last layer: LAVIS builds 39 of its 40 blocks and loads
  // eva_vit_g.pth with strict=False, so the file's last block (and any final norm or head, which
  // no name rule maps) are not part of the model.
  static const std::regex vit_layer(R"(^vision_model\.encoder\.layers\.(\d+)\.)");
  std::smatch m;
  if (std::regex_search(name, m, vit_layer)) {
    const std::string next = "vision_model.encoder.layers." + m[1].str() + ".";
    const bool previous_exists = std::stoll(m[1].str()) > 0 &&
        std::any_of(model_names.begin(), model_names.end(), [&](const std::string& n) {
          return starts_with(n, "vision_model.encoder.layers." + std::to_string(std::stoll(m[1].str()) - 1) + ".");
        });
    const bool this_exists = std::any_of(model_names.begin(), model_names.end(),
                                         [&](const std::string& n) { return starts_with(n, next); });
    if (previous_exists && !this_exists) return "EVA-CLIP's last block";
  }
  if (starts_with(name, "visual_encoder.")) return "EVA-CLIP's head";
  if (name.size() > 13 && name.compare(name.size() - 13, 13, ".position_ids") == 0) {  // 0, 1, 2, ...: computed
    const auto& t = tensors.at(name);
    check(t.numel() > 0 && torch::equal(t.flatten().to(torch::kLong), torch::arange(t.numel(), torch::kLong)),
          "'" + name + "' is not 0, 1, 2, ... (blip2cpp computes the positions)");
    return "positions";
  }
  // Older Llama checkpoints save the rotary frequencies, which the config's rope settings give.
  if (name.find(".rotary_emb.inv_freq") != std::string::npos) return "rotary";
  if (name == "language_model.lm_head.weight") {  // tied: must equal the embeddings
    for (const char* twin : {"language_model.model.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight"}) {
      auto it = tensors.find(twin);
      if (it == tensors.end()) continue;
      const auto& head = tensors.at(name);
      check(head.sizes() == it->second.sizes() && torch::equal(head, it->second),
            "'" + name + "' differs from '" + twin + "', which the model ties it to (tie_word_embeddings)");
      return "tied";
    }
  }
  return "";
}

std::set<std::string> tensor_names(const torch::nn::Module& model) {
  std::set<std::string> names;
  for (const auto& p : model.named_parameters()) names.insert(p.key());
  for (const auto& b : model.named_buffers()) names.insert(b.key());
  return names;
}

}  // namespace

std::vector<std::string> unexpected_tensors(const torch::nn::Module& model, const TensorMap& tensors,
                                           const std::string& source) {
  const auto names = tensor_names(model);
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : tensors) {
    if (names.count(name)) continue;
    std::string why;
    try {
      why = known_extra(name, tensors, names);
    } catch (const Error& e) {
      throw Error(source + ": " + e.what());
    }
    if (why.empty()) unexpected.push_back(name);
  }
  return unexpected;
}

std::string name_list(const std::vector<std::string>& names, size_t shown) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < shown; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > shown) s += ", ...";
  return s + " (" + std::to_string(names.size()) + (names.size() == 1 ? " tensor)" : " tensors)");
}

WeightLedger::WeightLedger(const torch::nn::Module& model, const std::vector<std::string>& random, bool allow_partial)
    : random_(random.begin(), random.end()), sources_{"(the model as loaded)"}, allow_partial_(allow_partial),
      bound_(true) {
  const auto names = tensor_names(model);
  for (auto it = random_.begin(); it != random_.end();) it = names.count(*it) ? std::next(it) : random_.erase(it);
}

LoadReport WeightLedger::load(torch::nn::Module& model, TensorMap tensors, const std::string& source,
                              const std::string& prefix) {
  if (!prefix.empty())
    for (auto it = tensors.begin(); it != tensors.end();) it = starts_with(it->first, prefix) ? std::next(it) : tensors.erase(it);
  blip2::check(!tensors.empty(), source + ": holds no weights" + (prefix.empty() ? "" : " under " + prefix + "*"));
  if (!bound_) random_ = tensor_names(model);
  bound_ = true;
  const auto unexpected = unexpected_tensors(model, tensors, source);
  std::vector<std::string> dropped;  // known extras: logged, never silent
  const auto names = tensor_names(model);
  const std::set<std::string> refused(unexpected.begin(), unexpected.end());
  for (const auto& [name, t] : tensors)
    if (!names.count(name) && !refused.count(name)) dropped.push_back(name);
  if (!dropped.empty())
    log_info(source + ": not part of the model, as expected: " + name_list(dropped) +
             " (stage-1 heads of a stage-2 model, computed positions, tied copies equal to their twin, "
             "EVA-CLIP's last block)");
  if (!unexpected.empty()) {
    const std::string msg = source + ": " + name_list(unexpected) + " that the model has no place for: the "
                            "checkpoint is another model, or its architecture differs from the config's";
    if (!allow_partial_)
      throw Error(msg + " (model_config.allow_partial_load: true ignores them)");
    log_warn(msg + "; ignored (allow_partial_load)");
  }
  LoadReport report = load_weights_into(model, std::move(tensors), source);
  for (const auto& name : report.loaded) random_.erase(name);
  sources_.push_back(source);
  log_info("weights from " + source + ": " + std::to_string(report.loaded.size()) + " tensors loaded");
  return report;
}

void WeightLedger::trained(const torch::nn::Module& model, const std::string& prefix) {
  if (!bound_) random_ = tensor_names(model);
  bound_ = true;
  for (auto it = random_.begin(); it != random_.end();) it = starts_with(*it, prefix) ? random_.erase(it) : std::next(it);
  sources_.push_back(prefix + "* (trained here)");
}

bool WeightLedger::covers(const torch::nn::Module& model, const std::string& prefix) const {
  const auto names = bound_ ? random_ : tensor_names(model);
  return std::none_of(names.begin(), names.end(), [&](const std::string& n) { return starts_with(n, prefix); });
}

void WeightLedger::check(const torch::nn::Module& model, const CoveragePolicy& policy) const {
  if (!loaded_any()) {
    if (!policy.training) log_warn("no weights were loaded: the model holds its random initialisation");
    return;
  }
  if (random_.empty()) return;
  // Per part: how many tensors it has, how many stay random, whether all of them train.
  struct Count {
    int64_t total = 0, random = 0;
    bool trains = true;
  };
  std::map<std::string, Count> parts;
  for (const auto& p : model.named_parameters()) {
    auto& c = parts[part_of(p.key()).name];
    c.total += 1;
    c.random += random_.count(p.key());
    c.trains = c.trains && p.value().requires_grad();
  }
  for (const auto& b : model.named_buffers()) {
    auto& c = parts[part_of(b.key()).name];
    c.total += 1;
    c.random += random_.count(b.key());
  }
  std::vector<std::string> bad, hints, fine;
  for (const auto& name : random_) {
    const Part& part = part_of(name);
    const Count& c = parts[part.name];
    const bool whole = c.random == c.total;
    const std::string pn = part.name;
    const bool may = whole && (pn == "the stage-1 LM head" || pn == "the ITC temperature" ||
                               (policy.training && c.trains) || (pn == "the LLM" && policy.llm_trained_here));
    if (may) {
      if (std::find(fine.begin(), fine.end(), pn) == fine.end()) fine.push_back(pn);
      continue;
    }
    bad.push_back(name);
    const std::string hint = pn + (whole ? " has no weights (" + std::string(part.hint) + ")" : " is only partly covered");
    if (std::find(hints.begin(), hints.end(), hint) == hints.end()) hints.push_back(hint);
  }
  if (!fine.empty())
    log_info("starting from their initialisation: " + join(fine, ", ") +
             (policy.training ? " (trained here or not in the checkpoint)" : " (not in the checkpoint)"));
  if (bad.empty()) return;
  const std::string msg = join(sources_, ", ") + ": the weights do not cover the model: " + name_list(bad) +
                          " would keep their random initialisation; " + join(hints, "; ");
  if (!policy.allow_partial && !allow_partial_)
    throw Error(msg + " (model_config.allow_partial_load: true starts them from random values)");
  log_warn(msg + "; they start from random values (allow_partial_load)");
}

}  // namespace blip2
