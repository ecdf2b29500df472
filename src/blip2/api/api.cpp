#include "blip2/api/api.h"

#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <iostream>

#include "blip2/data/caption_datasets.h"
#include "blip2/data/synthetic.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/io/safetensors.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/stage1.h"
#include "blip2/tasks/stage2.h"
#include "blip2/tasks/zero_shot.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace blip2 {
namespace fs = std::filesystem;

constexpr uint64_t kRandomInitSeed = 42;  // the embedded config's seed

Blip2Config model_config_of(const std::string& what) {
  if (const auto* p = find_preset(what)) return p->config;
  std::error_code ec;
  fs::path yaml = what;
  if (fs::is_directory(what, ec)) {
    fs::path dir = locate_weights(what);
    if (fs::exists(dir / "config.yaml")) yaml = dir / "config.yaml";
    else if (fs::exists(dir / "config.json"))
      return blip2_config_from_hf(read_json_file((dir / "config.json").string()), (dir / "config.json").string());
    else throw Error(what + ": no config.yaml or config.json to take the architecture from");
  }
  if (!fs::is_regular_file(yaml, ec))
    throw Error(what + ": neither a model of the support list (blip2 list-models) nor a model "
                "directory or config file");
  const std::string text = read_file(yaml);
  if (text.find("model_config:") != std::string::npos) {
    auto c = parse_run_config(text, yaml.string()).model.model_config;
    validate_model_config(c, yaml.string());
    return c;
  }
  return parse_model_config(text, yaml.string());
}

// ---- Blip2Model ----

Blip2Model::Blip2Model(Blip2Qformer module, std::shared_ptr<WordPieceTokenizer> tokenizer,
                       std::string source, std::vector<std::string> missing_weights)
    : module_(std::move(module)), tokenizer_(std::move(tokenizer)), source_(std::move(source)),
      missing_(std::move(missing_weights)) {}

std::optional<std::vector<std::string>> Blip2Model::random_weights() const {
  if (source_ == "random") return std::nullopt;
  return missing_;
}

Blip2Model Blip2Model::from_pretrained(const std::string& name_or_path,
                                       const FromPretrainedOptions& o) {
  return guarded("from_pretrained(" + name_or_path + ")", [&] {
    std::error_code ec;
    std::string weights;  // "" = random weights
    Blip2Config config;
    if (const Preset* preset = find_preset(name_or_path)) {
      const fs::path dir = fs::path(blip2_home()) / name_or_path;
      if (fs::is_directory(dir, ec)) {
        weights = dir.string();
        const bool has_config = fs::exists(dir / "config.yaml") || fs::exists(dir / "config.json");
        config = has_config ? model_config_of(weights) : preset->config;
      } else {
        if (!(o.allow_random_init || name_or_path == "tiny"))
          resolve_weights(name_or_path);  // throws, saying which files to place where
        config = preset->config;
      }
    } else {
      check(fs::exists(name_or_path, ec),
            name_or_path + ": not a model of the support list (" + join(support_list(), ", ") +
                ") and no such file or directory");
      weights = locate_weights(name_or_path);
      if (auto a = checkpoint_architecture(weights)) {  // config.json / config.yaml (beside a model.safetensors)
        check(a->parts.vision, weights + ": an LLM on its own, not a BLIP-2 model");
        config = a->config;
      } else {  // a bare weight file (.pth, .safetensors) carries no architecture: o.config's
        config = model_config_of(fs::is_directory(weights, ec) ? weights : o.config);
      }
    }
    config.checkpoint_name_or_path.clear();  // the weights are loaded below, once
    config.allow_partial_load = o.allow_partial_load;  // the caller's policy, not a saved config's
    if (!o.weights.empty()) {
      check(o.weights == "float" || o.weights == "int8", "weights: '" + o.weights + "' is not float|int8");
      if (config.weights != "float")
        throw Error(name_or_path + ": its weights are " + config.weights + " already (blip2 quantize wrote them); "
                    "leave FromPretrainedOptions::weights out");
      config.weights = o.weights;
    }
    const torch::Device device = pick_device(o.device);

    TokenizerConfig tc;
    const fs::path beside = fs::is_directory(weights, ec) ? fs::path(weights) / "vocab.txt" : fs::path();
    if (!o.vocab_file.empty()) tc.vocab_file = o.vocab_file;
    else if (!beside.empty() && fs::exists(beside, ec)) tc.vocab_file = beside.string();
    else if (config.qformer_config.vocab_size != static_cast<int64_t>(SyntheticShapes::vocabulary().size()))
      throw Error(name_or_path + ": no vocab.txt beside the weights; give the BERT vocabulary "
                  "(bert-base-uncased's vocab.txt for the published weights) as the vocab file");
    std::shared_ptr<WordPieceTokenizer> tokenizer;
    try {
      tokenizer = model_tokenizer(tc, config.qformer_config, "from_pretrained");
    } catch (const Error& e) {
      throw Error((weights.empty() ? name_or_path : weights) + ": " + e.what());
    }

    WeightLedger ledger(o.allow_partial_load);
    // What stays random is drawn from a fixed seed (the embedded config's), so that a random
    // model is the same in every process (a server and its client, a test and the CLI); the
    // caller's generator is left as it was.
    auto gen = at::detail::getDefaultCPUGenerator();
    const auto saved = gen.get_state();
    gen.set_current_seed(kRandomInitSeed);
    struct Restore {
      at::Generator g;
      at::Tensor state;
      ~Restore() { g.set_state(state); }
    } restore{gen, saved};
    Blip2Qformer module = build_loaded<Blip2Qformer>(!weights.empty() && !o.allow_partial_load, [&](bool draw) {
      ledger = WeightLedger(o.allow_partial_load);
      auto m = build_model(config, ledger, torch::kCPU, draw);
      if (!weights.empty()) load_model_weights(*m, weights, ledger);
      return m;
    }, ledger);
    if (weights.empty()) log_info(name_or_path + ": random weights (nothing under " + blip2_home() + ")");
    CoveragePolicy policy;
    policy.allow_partial = o.allow_partial_load;
    ledger.check(*module, policy);
    module->to(device);
    module->eval();
    if (!ledger.loaded_any()) return Blip2Model(module, tokenizer, "random");
    return Blip2Model(module, tokenizer, weights.empty() ? config.vision_config.checkpoint_name_or_path : weights,
                      ledger.random());
  });
}

std::vector<std::string> Blip2Model::support_list() { return blip2::support_list(); }

void Blip2Model::show_support_list(std::ostream& out) {
  out << "Blip2Model support list:\n";
  for (const auto& p : presets()) out << "  " << p.name << "  (" << p.task << ") " << p.description << "\n";
}

torch::Tensor Blip2Model::preprocess(const std::vector<Image>& images) const {
  return guarded("Blip2Model::preprocess", [&] {
    check(!images.empty(), "preprocess: no images");
    std::vector<torch::Tensor> out;
    for (const auto& img : images) out.push_back(eval_transform(img, config().vision_config.image_size));
    return torch::stack(out).to(device());
  });
}

torch::Tensor Blip2Model::preprocess(const std::vector<std::string>& image_paths) const {
  std::vector<Image> images;
  for (const auto& p : image_paths) images.push_back(load_image(p));
  return preprocess(images);
}

std::pair<torch::Tensor, torch::Tensor> Blip2Model::tokenize(const std::vector<std::string>& texts,
                                                             int64_t max_length) const {
  return guarded("Blip2Model::tokenize", [&] {
    check(!texts.empty(), "tokenize: no texts");
    const int64_t positions = config().qformer_config.max_position_embeddings;
    if (max_length <= 0) max_length = config().max_txt_len;
    check(max_length <= positions, "tokenize: max_length " + std::to_string(max_length) +
                                       " exceeds the Q-Former's max_position_embeddings " + std::to_string(positions));
    std::vector<std::string> cleaned;
    for (const auto& t : texts) cleaned.push_back(clean_caption(t, 50, ""));
    auto enc = tokenizer_->encode_batch(cleaned, max_length, "max_length");
    return std::pair{enc.ids.to(device()), enc.keep.to(device())};
  });
}

Features Blip2Model::extract_features(const torch::Tensor& images, const std::vector<std::string>& texts,
                                      const std::string& mode) const {
  return guarded("Blip2Model::extract_features", [&] {
    check(mode == "image" || mode == "text" || mode == "multimodal",
          "feature mode '" + mode + "' is not image|text|multimodal");
    check(mode == "text" || images.defined(), "feature mode " + mode + " needs images");
    check(mode == "image" || !texts.empty(), "feature mode " + mode + " needs texts");
    check(mode != "multimodal" || images.size(0) == static_cast<int64_t>(texts.size()),
          "feature mode multimodal pairs images with texts: got " + std::to_string(images.size(0)) +
              " images and " + std::to_string(texts.size()) + " texts");
    torch::Tensor ids, mask;
    if (mode != "image") std::tie(ids, mask) = tokenize(texts, config().max_txt_len);
    Blip2Qformer m = module_;  // the holder is shared; calls are not const
    return m->extract_features(images, ids, mask, mode);
});
}

Stage1Output Blip2Model::losses(const torch::Tensor& images, const std::vector<std::string>& captions) const {
  return guarded("Blip2Model::losses", [&] {
    check(images.defined() && images.dim() == 4 && images.size(0) == static_cast<int64_t>(captions.size()),
          "losses: give images [B,3,S,S] and B captions");
    auto [ids, mask] = tokenize(captions, config().max_txt_len);
    Blip2Qformer m = module_;
    return m->forward(images, ids, mask);
  });
}

void Blip2Model::save_pretrained(const std::string& dir) const {
  guarded("Blip2Model::save_pretrained(" + dir + ")", [&] {
    fs::create_directories(dir);
    save_safetensors((fs::path(dir) / "model.safetensors").string(), state_dict(*module_),
                     {{"format", "blip2cpp"}, {"arch", "Blip2Qformer"}});
    atomic_write(fs::path(dir) / "config.yaml", to_yaml(config()));
  });
}

// ---- Trainer ----

namespace {

bool use_stage2_model(RunConfig& cfg, const std::string& name_or_path, bool allow_random);

// The model section of `cfg` is replaced by the program, not set by the user: nothing in it is given.
void forget_model_keys(RunConfig& cfg) {
  for (auto it = cfg.given.begin(); it != cfg.given.end();)
    it = it->first.rfind("model.", 0) == 0 || it->first.rfind("processor.", 0) == 0 ? cfg.given.erase(it)
                                                                                   : std::next(it);
}

// The run config of an API Trainer: the user's YAML (its model section on top of `preset` when
// the model argument names one), or the embedded tiny config, whose model section is not the
// user's (nothing in it counts as given).
RunConfig trainer_config(const std::string& task, const TrainerOptions& o, const std::string& preset = "") {
  RunConfig cfg;
  if (o.config.empty()) {
    cfg = parse_run_config(embedded_tiny_config(), "<embedded tiny config>");
    forget_model_keys(cfg);
    if (!preset.empty()) {
      cfg.model.model_config = find_preset(preset)->config;
      cfg.trainer.model_name = preset;
    }
  } else {
    std::error_code ec;
    check(fs::is_regular_file(o.config, ec), o.config + ": config file not found");
    cfg = parse_run_config(read_file(o.config), o.config, preset);
  }
  cfg.trainer.type = task;
  // Only pretraining trains; the other tasks read eval_dataset (its tokenizer) and may not start
  // any part of the model from random values.
  if (task != "contrastive_language_image_pretrain") cfg.run_mode = "eval";
  if (!o.output_dir.empty()) cfg.output_dir = o.output_dir;
  if (o.train_dataset) cfg.train_dataset = *o.train_dataset;
  if (o.eval_dataset) cfg.eval_dataset = *o.eval_dataset;
  if (o.seed) cfg.seed = *o.seed;
  if (!o.device.empty()) cfg.device_target = o.device;
  return cfg;
}

// Do two names or paths lead to the same weights?
bool same_weights(const std::string& a, const std::string& b) {
  if (a == b) return true;
  try {
    std::error_code ec;
    return fs::equivalent(locate_weights(a), locate_weights(b), ec);
  } catch (const Error&) {
    return false;
  }
}

// The Trainer's model argument names the weights: a path the run config gives under `key` must
// lead to the same ones.
void set_weights(RunConfig& cfg, std::string& field, const std::string& key, const std::string& weights) {
  auto given = cfg.given.find(key);
  if (given != cfg.given.end() && !field.empty() && !same_weights(field, weights))
    throw Error(key + ": '" + field + "' in " + given->second + ", but the Trainer was given the model '" +
                weights + "'");
  field = weights;
}

// A run config and a model built already: the model section the run set must be the model's.
void use_built_model(RunConfig& cfg, const Blip2Model& model) {
  const std::string source = "the model given to the Trainer (" + model.source() + ")";
  adopt_architecture(cfg, model.config(), source, {true, true, true, true});
  require_given_model_settings(cfg, model.config(), source);
  const bool partial = cfg.model.model_config.allow_partial_load;
  cfg.model.model_config = model.config();
  cfg.model.model_config.allow_partial_load = partial;  // a load policy, not the model's
  validate(cfg, cfg.source);
}

// Stage 1 by name or path, as `blip2 run` builds it: the weights become model_config's
// checkpoint (their config.json / config.yaml gives the architecture; a bare file takes the run
// config's, blip2_stage1_vit_g without one), and the BERT vocabulary beside them is the
// tokenizer unless the datasets name one.
void use_stage1_model(RunConfig& cfg, const std::string& task, const std::string& model, bool user_config) {
  std::error_code ec;
  std::string weights;
  if (find_preset(model)) {
    const fs::path dir = fs::path(blip2_home()) / model;
    if (fs::is_directory(dir, ec)) weights = dir.string();
    else if (!(task == "contrastive_language_image_pretrain" || model == "tiny"))  // training may start random
      resolve_weights(model);  // throws, saying which files to place where
  } else {
    weights = model;
    if (!user_config) cfg.model.model_config = find_preset("blip2_stage1_vit_g")->config;
  }
  if (weights.empty()) return;
  auto& mc = cfg.model.model_config;
  set_weights(cfg, mc.checkpoint_name_or_path, "model.model_config.checkpoint_name_or_path", weights);
  const fs::path vocab = fs::path(locate_weights(weights)) / "vocab.txt";
  for (auto* d : {&cfg.train_dataset, &cfg.eval_dataset})
    if (d->tokenizer.vocab_file.empty() && fs::exists(vocab, ec)) d->tokenizer.vocab_file = vocab.string();
}

const std::vector<std::string>& trainer_tasks() {
  static const std::vector<std::string> tasks = {"contrastive_language_image_pretrain",
                                                 "image_to_text_retrieval",
                                                 "zero_shot_image_classification",
                                                 "image_to_text_generation"};
  return tasks;
}

void check_task(const std::string& task) {
  for (const auto& t : trainer_tasks())
    if (t == task) return;
  throw Error("task '" + task + "' is not available (available: " + join(trainer_tasks(), ", ") + ")");
}

}  // namespace

Trainer::Trainer(const std::string& task, const std::string& model, const TrainerOptions& o) {
  guarded("Trainer(" + task + ", " + model + ")", [&] {
    check_task(task);
    std::error_code ec;
    const Preset* preset = find_preset(model);
    RunConfig cfg = trainer_config(task, o, preset ? model : "");
    // Stage 2 when the model is (a preset with an LLM, a directory whose config has one) or the
    // task needs it; the run config must agree.
    bool stage2 = task == "image_to_text_generation" || (preset && preset->config.text_config);
    if (!preset && fs::exists(model, ec))
      if (auto a = checkpoint_architecture(model)) stage2 = stage2 || a->config.text_config.has_value();
    if (stage2 && task != "contrastive_language_image_pretrain" && task != "image_to_text_generation")
      throw Error("task " + task + " works on stage-1 models, and '" + model + "' is a stage-2 model (with an LLM)");
    if (!stage2 && !o.config.empty() && is_stage2(cfg))
      throw Error(o.config + ": a stage-2 run config (text_config), but '" + model + "' is a stage-1 model");
    if (stage2) {
      if (o.config.empty() && !preset) cfg.model.model_config = Blip2Config{};  // not the embedded tiny model's settings
      // Stage 2: the preset's architecture with $BLIP2_HOME/NAME's weights, or a path's.
      use_stage2_model(cfg, model, /*allow_random=*/task == "contrastive_language_image_pretrain");
      cfg.model.arch.type = "Blip2Llm";
      // The seed's image_to_text_generation passes the prompt as given unless told otherwise.
      if (task == "image_to_text_generation" && !o.eval_dataset) cfg.eval_dataset.data_loader.hypothesis_template = "{}";
      validate(cfg, cfg.source);
      stage2_ = std::make_unique<Stage2Task>(cfg);
      return;
    }
    if (preset || fs::exists(model, ec)) {
      use_stage1_model(cfg, task, model, !o.config.empty());
      validate(cfg, cfg.source);
      impl_ = std::make_unique<Stage1Task>(cfg);
      return;
    }
    throw Error("model '" + model + "' is neither a model of the support list (" +
                join(support_list(), ", ") + ") nor an existing path");
  });
}

Trainer::Trainer(const std::string& task, const Blip2Model& model, const TrainerOptions& o) {
  guarded("Trainer(" + task + ")", [&] {
    check_task(task);
    RunConfig cfg = trainer_config(task, o);
    use_built_model(cfg, model);
    impl_ = std::make_unique<Stage1Task>(cfg, model.module(), model.tokenizer(), model.random_weights());
  });
}

Trainer::Trainer(RunConfig config) {
  guarded("Trainer", [&] {
    check_task(config.trainer.type);
    if (is_stage2(config)) stage2_ = std::make_unique<Stage2Task>(std::move(config));
    else impl_ = std::make_unique<Stage1Task>(std::move(config));
  });
}

Trainer::Trainer(RunConfig config, const Blip2Model& model) {
  guarded("Trainer", [&] {
    check_task(config.trainer.type);
    use_built_model(config, model);
    impl_ = std::make_unique<Stage1Task>(std::move(config), model.module(), model.tokenizer(),
                                              model.random_weights());
  });
}

Trainer::~Trainer() = default;
Trainer::Trainer(Trainer&&) noexcept = default;

const RunConfig& Trainer::config() const { return stage2_ ? stage2_->config() : impl_->config(); }

Blip2Model Trainer::model() const {
  check(impl_ != nullptr, "Trainer::model(): a stage-2 trainer; use generation_model()");
  return Blip2Model(impl_->model(), impl_->tokenizer(), "trainer");
}

Blip2GenerationModel Trainer::generation_model() const {
  check(stage2_ != nullptr, "Trainer::generation_model(): a stage-1 trainer; use model()");
  return Blip2GenerationModel(stage2_->model(), stage2_->tokenizer(), "trainer");
}

nlohmann::json Trainer::train() {
  return guarded("Trainer::train", [&]() -> nlohmann::json {
    check(config().trainer.type == "contrastive_language_image_pretrain",
          "task " + config().trainer.type + " does not train (contrastive_language_image_pretrain does)");
    auto logs = stage2_ ? stage2_->train() : impl_->train();
    nlohmann::json out = {{"steps", logs.empty() ? 0 : logs.back().step}};
    if (!logs.empty()) {
      out["final"] = {{"loss", logs.back().loss}};
      for (const auto& [name, value] : logs.back().parts) out["final"][name] = value;
    }
    out["checkpoint"] = (fs::path(config().output_dir) / "checkpoint").string();
    return out;
  });
}

nlohmann::json Trainer::evaluate() {
  return guarded("Trainer::evaluate", [&]() -> nlohmann::json {
    if (stage2_) return stage2_->evaluate();
    const auto& task = config().trainer.type;
    if (task == "image_to_text_retrieval") return impl_->evaluate_retrieval();
    if (task == "zero_shot_image_classification") return impl_->evaluate_zero_shot();
    return impl_->evaluate().to_json();
  });
}

nlohmann::json Trainer::predict(const std::vector<std::string>& inputs, const std::string& checkpoint,
                                const std::vector<std::string>& texts) {
  return guarded("Trainer::predict", [&]() -> nlohmann::json {
    if (stage2_) {
      if (!checkpoint.empty()) stage2_->load_weights(checkpoint);
      check(texts.size() <= 1, "predict: image_to_text_generation takes one prompt for all images");
      return stage2_->predict(inputs, texts.empty() ? "" : texts[0]);
    }
    if (!checkpoint.empty()) impl_->load_weights(checkpoint);
    const auto& task = config().trainer.type;
    if (task == "zero_shot_image_classification") return impl_->predict_zero_shot(inputs);
    if (task != "contrastive_language_image_pretrain")
      throw Error("task " + task + " has no predict mode (zero_shot_image_classification and "
                  "contrastive_language_image_pretrain have)");
    check(!inputs.empty() || !texts.empty(), "predict: give images or texts to extract features of");
    Blip2Model m = model();
    m.module()->eval();
    AutocastGuard autocast(config().runner_config.bf16_autocast, m.device());
    nlohmann::json out = {{"images", nlohmann::json::array()}, {"texts", texts}};
    Features all;
    torch::Tensor pixels;
    if (!inputs.empty()) {
      ImageFolderDataset images(inputs, make_image_transform({}, false, m.config().vision_config.image_size));
      std::vector<torch::Tensor> batch;
      for (int64_t i = 0; i < images.size(); ++i) batch.push_back(images.get(i).image);
      pixels = torch::stack(batch).to(m.device());
      out["images"] = images.paths();
      Features f = m.extract_features(pixels, {}, "image");
      all.image_embeds = f.image_embeds;
      all.image_embeds_proj = f.image_embeds_proj;
    }
    if (!texts.empty()) {
      Features f = m.extract_features({}, texts, "text");
      all.text_embeds = f.text_embeds;
      all.text_embeds_proj = f.text_embeds_proj;
    }
    if (pixels.defined() && pixels.size(0) == static_cast<int64_t>(texts.size()))
      all.multimodal_embeds = m.extract_features(pixels, texts, "multimodal").multimodal_embeds;
    fs::create_directories(config().output_dir);
    const auto path = (fs::path(config().output_dir) / "features.safetensors").string();
    save_features(path, all);
    out["features"] = path;
    out["shapes"] = feature_shapes(all);
    return out;
  });
}

// ---- pipeline ----

std::vector<std::string> pipeline_tasks() { return {"zero_shot_image_classification", "feature_extraction"}; }

Pipeline::Pipeline(std::string task, Blip2Model model, PipelineOptions options)
    : task_(std::move(task)), model_(std::move(model)), options_(std::move(options)) {
  guarded("pipeline " + task_, [&] { init(); });
}

void Pipeline::init() {
  model_.module()->eval();
  if (task_ == "zero_shot_image_classification") {
    require_weights(model_.missing_weights(), {"vision_projection.", "text_projection."}, task_);
    if (options_.itm_top_k > 0) require_weights(model_.missing_weights(), {"itm_head."}, task_ + " with itm_top_k");
    ZeroShotOptions z;
    z.candidate_labels = options_.candidate_labels;
    z.hypothesis_template = options_.hypothesis_template;
    z.hypothesis_templates = options_.hypothesis_templates;
    z.itm_top_k = options_.itm_top_k;
    z.max_length = options_.max_length;
    classifier_ = std::make_shared<ZeroShotClassifier>(model_.module(), model_.tokenizer(), z);
  } else if (task_ == "feature_extraction") {
    check(options_.mode == "image" || options_.mode == "text" || options_.mode == "multimodal",
          "feature_extraction: mode '" + options_.mode + "' is not image|text|multimodal");
  } else {
    throw Error("pipeline task '" + task_ + "' is not available (available: " +
                join(pipeline_tasks(), ", ") + ")");
  }
}

nlohmann::json Pipeline::operator()(const std::vector<PipelineInput>& inputs,
                                    const std::vector<std::string>& texts) {
  return guarded("pipeline " + task_, [&] {
    std::vector<Image> images;
    std::vector<std::string> names;
    for (const auto& in : inputs) {
      if (const auto* path = std::get_if<std::string>(&in)) {
        images.push_back(load_image(*path));
        names.push_back(*path);
      } else {
        images.push_back(std::get<Image>(in));
        names.push_back("image " + std::to_string(names.size()));
      }
    }
    if (task_ == "zero_shot_image_classification") {
      check(!images.empty(), "zero_shot_image_classification: no images given");
      auto probs = classifier_->probabilities(model_.preprocess(images));
      nlohmann::json out = nlohmann::json::array();
      for (int64_t i = 0; i < probs.size(0); ++i) out.push_back(classifier_->ranked(probs[i], options_.top_k));
      return out;
    }
    torch::Tensor pixels = images.empty() ? torch::Tensor() : model_.preprocess(images);
    features_ = model_.extract_features(pixels, texts, options_.mode);
    return feature_shapes(features_);
  });
}

Pipeline pipeline(const std::string& task, const std::string& model, PipelineOptions options) {
  check(task == "zero_shot_image_classification" || task == "feature_extraction",
        "pipeline task '" + task + "' is not available (available: " + join(pipeline_tasks(), ", ") + ")");
  auto loaded = Blip2Model::from_pretrained(model, options.load);
  return Pipeline(task, std::move(loaded), std::move(options));
}

Pipeline pipeline(const std::string& task, const Blip2Model& model, PipelineOptions options) {
  return Pipeline(task, model, std::move(options));
}

TensorMap feature_tensors(const Features& f) {
  TensorMap t;
  const std::pair<const char*, const torch::Tensor*> fields[] = {
      {"image_embeds", &f.image_embeds}, {"image_embeds_proj", &f.image_embeds_proj},
      {"text_embeds", &f.text_embeds}, {"text_embeds_proj", &f.text_embeds_proj},
      {"multimodal_embeds", &f.multimodal_embeds}};
  for (const auto& [name, x] : fields)
    if (x->defined()) t[name] = x->detach().to(torch::kCPU).contiguous();
  return t;
}

nlohmann::json feature_shapes(const Features& f) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, t] : feature_tensors(f)) out[name] = t.sizes().vec();
  return out;
}

void save_features(const std::string& path, const Features& f) {
  TensorMap t = feature_tensors(f);
  check(!t.empty(), path + ": no features to save");
  save_safetensors(path, t, {{"format", "blip2cpp-features"}});
}

// ---- stage 2 ----

namespace {

// Points a stage-2 run config at a model: a preset ($BLIP2_HOME/NAME, else random when allowed),
// a stage-2 checkpoint or training output directory (its config.yaml's architecture, its
// weights as load_checkpoint), or a Hugging Face directory (its config.json's architecture).
// Returns false when the model starts from random weights.
bool use_stage2_model(RunConfig& cfg, const std::string& name_or_path, bool allow_random) {
  std::error_code ec;
  if (const Preset* preset = find_preset(name_or_path)) {
    check(preset->config.text_config.has_value(),
          name_or_path + ": a stage-1 model; use Blip2Model::from_pretrained for it");
    if (cfg.trainer.model_name != name_or_path) {  // else the run config is built on this preset already
      cfg.model.model_config = preset->config;
      cfg.trainer.model_name = name_or_path;
      forget_model_keys(cfg);
    }
    const fs::path dir = fs::path(blip2_home()) / name_or_path;
    if (fs::is_directory(dir, ec)) {
      set_weights(cfg, cfg.model.model_config.checkpoint_name_or_path, "model.model_config.checkpoint_name_or_path",
                  dir.string());
    } else if (allow_random || name_or_path == "tiny_stage2") {
      return false;
    } else {
      resolve_weights(name_or_path);  // throws, saying which files to place where
    }
  } else {
    check(fs::exists(name_or_path, ec), name_or_path + ": not a model of the support list (" +
                                            join(support_list(), ", ") + ") and no such file or directory");
    const std::string weights = locate_weights(name_or_path);
    const fs::path yaml = fs::path(weights) / "config.yaml";
    if (fs::is_directory(weights, ec) && fs::exists(yaml, ec)) {  // a stage-2 checkpoint or model directory
      auto saved = checkpoint_architecture(weights);  // a training checkpoint's run config, or a model config
      check(saved && saved->config.text_config.has_value(), weights + ": a stage-1 checkpoint (no text_config)");
      auto& mc = cfg.model.model_config;
      if (!mc.text_config) mc.text_config = saved->config.text_config;  // with its generation settings
      adopt_architecture(cfg, saved->config, saved->source, saved->parts);  // a conflict with the run config is an error
      // The checkpoint holds the trained weights; the paths it was built from are kept (unless the
      // run names its own) when they still exist: a checkpoint without frozen weights needs them.
      const auto& from = saved->config;
      for (auto [mine, theirs, key] :
           {std::tuple{&mc.checkpoint_name_or_path, from.checkpoint_name_or_path, "checkpoint_name_or_path"},
            {&mc.vision_config.checkpoint_name_or_path, from.vision_config.checkpoint_name_or_path,
             "vision_config.checkpoint_name_or_path"},
            {&mc.text_config->checkpoint_name_or_path, from.text_config->checkpoint_name_or_path,
             "text_config.checkpoint_name_or_path"}}) {
        if (cfg.given.count(std::string("model.model_config.") + key) || theirs.empty()) continue;
        try {
          resolve_weights(theirs);
          *mine = theirs;
        } catch (const Error&) {
        }
      }
      set_weights(cfg, cfg.load_checkpoint, "load_checkpoint", weights);
    } else {
      check(is_hf_directory(weights), weights + ": not a Hugging Face directory or a blip2cpp stage-2 checkpoint");
      if (!cfg.model.model_config.text_config) cfg.model.model_config.text_config = TextConfig{};
      // its config.json decides the architecture
      set_weights(cfg, cfg.model.model_config.checkpoint_name_or_path, "model.model_config.checkpoint_name_or_path",
                  weights);
    }
  }
  return true;
}

}  // namespace

Blip2GenerationModel Blip2GenerationModel::from_pretrained(const std::string& name_or_path,
                                                           const GenerationModelOptions& o) {
  return guarded("Blip2GenerationModel::from_pretrained(" + name_or_path + ")", [&] {
  RunConfig cfg = parse_run_config(embedded_tiny_config(), "<embedded>");
  forget_model_keys(cfg);
  cfg.model.model_config = Blip2Config{};  // the model's settings are not the embedded tiny model's
  cfg.runner_config.eval_tasks.clear();  // the embedded stage-1 config's; nothing is evaluated here
  cfg.run_mode = "predict";
  check(is_device_target(o.device), "device: '" + o.device + "' is not cpu|cuda|cuda:N");
  cfg.device_target = o.device;
  cfg.model.model_config.allow_partial_load = o.allow_partial_load;
  cfg.model.arch.type = "Blip2ImageToTextGeneration";
  const std::string source = use_stage2_model(cfg, name_or_path, o.allow_random_init) ? name_or_path : "random";
  if (!o.weights.empty()) {  // quantise at load: the checkpoint's own config then has to say float
    check(o.weights == "float" || o.weights == "int8", "weights: '" + o.weights + "' is not float|int8");
    cfg.model.model_config.weights = o.weights;
    cfg.given["model.model_config.weights"] = kQuantiseAtLoad;
  }
  const auto& text = *cfg.model.model_config.text_config;
  cfg.eval_dataset = DatasetConfig{};
  cfg.eval_dataset.tokenizer.vocab_file = o.tokenizer;
  if (text.vocab_size == static_cast<int64_t>(SyntheticShapes::vocabulary().size()) && o.tokenizer.empty())
    cfg.eval_dataset.data_loader.type = "SyntheticShapes";  // the tiny model's built-in vocabulary
  else
    cfg.eval_dataset.data_loader.type = "ImageFolder";
  Stage2Task loaded(cfg);
  auto module = loaded.model();
  module->eval();
  return Blip2GenerationModel(module, loaded.tokenizer(), source);
  });
}

Blip2GenerationModel::Blip2GenerationModel(Blip2Llm module, std::shared_ptr<LlmTokenizer> tokenizer,
                                           std::string source)
    : module_(std::move(module)), tokenizer_(std::move(tokenizer)), source_(std::move(source)) {}

torch::Tensor Blip2GenerationModel::preprocess(const std::vector<PipelineInput>& images) const {
  return guarded("Blip2GenerationModel::preprocess", [&] {
    check(!images.empty(), "preprocess: no images");
    std::vector<torch::Tensor> out;
    for (const auto& in : images)
      out.push_back(eval_transform(std::holds_alternative<Image>(in) ? std::get<Image>(in)
                                                                     : load_image(std::get<std::string>(in)),
                                   config().vision_config.image_size));
    return torch::stack(out).to(device());
  });
}

std::vector<std::string> Blip2GenerationModel::generate(const torch::Tensor& images,
                                                        const std::vector<std::string>& prompts,
                                                        const GenerationOptions& o) const {
  return guarded("Blip2GenerationModel::generate", [&] {
    const auto n = static_cast<size_t>(images.size(0));
    check(prompts.size() == n || prompts.size() <= 1,
          "generate: " + std::to_string(prompts.size()) + " prompts for " + std::to_string(n) + " images");
    std::vector<std::string> filled(n, prompts.empty() ? "" : prompts[0]);
    if (prompts.size() == n) filled = prompts;
    Blip2Llm m = module_;  // a handle: the same module
    return generate_texts(*m, *tokenizer_, images, filled, o);
  });
}

ImageToTextPipeline::ImageToTextPipeline(Blip2GenerationModel model, ImageToTextOptions options)
    : model_(std::move(model)), options_(std::move(options)) {}

nlohmann::json ImageToTextPipeline::operator()(const std::vector<PipelineInput>& images, const std::string& prompt) {
  return guarded("pipeline image_to_text_generation", [&] {
    check(!images.empty(), "image_to_text_generation: no images");
    const auto& tmpl = options_.hypothesis_template;
    const std::string text = prompt.empty() ? "" : (tmpl.find("{}") != std::string::npos ? fill_template(tmpl, prompt) : prompt);
    auto texts = model_.generate(model_.preprocess(images), {text},
                                 options_.generation ? *options_.generation : model_.generation_options());
    nlohmann::json out = nlohmann::json::array();
    for (const auto& t : texts) out.push_back({{"text", t}, {"prompt", text}});
    return out;
  });
}

ImageToTextPipeline image_to_text_pipeline(const std::string& model, ImageToTextOptions options) {
  auto loaded = Blip2GenerationModel::from_pretrained(model, options.load);  // before options is moved from
  return ImageToTextPipeline(std::move(loaded), std::move(options));
}

ImageToTextPipeline image_to_text_pipeline(const Blip2GenerationModel& model, ImageToTextOptions options) {
  return ImageToTextPipeline(model, std::move(options));
}

}  // namespace blip2
