#include "blip2/tasks/stage2.h"

#include <optional>

#include <fstream>
#include <set>
#include <sstream>

#include "blip2/data/caption_datasets.h"
#include "blip2/data/synthetic.h"
#include "blip2/dist/dist.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/io/safetensors.h"
#include "blip2/tasks/factory.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace blip2 {
namespace fs = std::filesystem;

bool is_stage2(const RunConfig& cfg) {
  const auto& arch = cfg.model.arch.type;
  return cfg.model.model_config.text_config.has_value() || arch == "Blip2Llm" ||
         arch == "Blip2ImageToTextGeneration";
}

std::shared_ptr<LlmTokenizer> stage2_tokenizer(const DatasetConfig& d, const Blip2Config& c,
                                               const std::string& section) {
  const TextConfig& t = *c.text_config;
  std::shared_ptr<LlmTokenizer> tok;
  std::error_code ec;
  // A directory holding an LLM tokenizer: the LLM's own, else the whole model's (a Hugging
  // Face Blip2ForConditionalGeneration directory keeps its tokenizer files beside the weights).
  auto tokenizer_dir = [&](const std::string& name) -> std::string {
    if (name.empty()) return "";
    std::string dir;
    try {
      dir = resolve_weights(name);
    } catch (const Error&) {
      return "";
    }
    const fs::path p(dir);
    if (fs::is_directory(p, ec) && (fs::exists(p / "tokenizer.model", ec) || fs::exists(p / "vocab.json", ec)))
      return dir;
    return "";
  };
  const auto& file = d.tokenizer.vocab_file;
  if (!file.empty()) {
    std::error_code e2;
    tok = load_llm_tokenizer(fs::exists(file, e2) ? file : resolve_weights(file));
  } else if (auto dir = tokenizer_dir(t.checkpoint_name_or_path); !dir.empty()) {
    tok = load_llm_tokenizer(dir);
  } else if (auto dir2 = tokenizer_dir(c.checkpoint_name_or_path); !dir2.empty()) {
    tok = load_llm_tokenizer(dir2);
  } else if (d.data_loader.type == "SyntheticShapes") {
    TokenizerConfig tc;  // the built-in vocabulary, without the Q-Former's [DEC]
    tc.bos_token = "";
    tok = std::make_shared<WordPieceLlmTokenizer>(make_tokenizer(tc));
  } else {
    throw Error(section + ".tokenizer.vocab_file is empty and neither the LLM directory (text_config."
                "checkpoint_name_or_path) nor the model directory has a tokenizer.model or vocab.json: "
                "give the LLM's tokenizer");
  }
  if (tok->vocab_size() > t.vocab_size)
    throw Error(section + ".tokenizer (" + tok->source + ") has " + std::to_string(tok->vocab_size()) +
                " tokens but the LLM's vocabulary (text_config.vocab_size) has " + std::to_string(t.vocab_size) +
                ": this tokenizer does not belong to this LLM");
  for (int64_t id : {tok->bos_id, tok->eos_id})
    check(id < t.vocab_size, section + ".tokenizer: special id " + std::to_string(id) +
                                 " is outside the LLM's vocabulary of " + std::to_string(t.vocab_size));
  return tok;
}

CaptionTargets caption_targets(const LlmTokenizer& tok, const std::vector<std::string>& captions,
                               int64_t prompt_tokens, int64_t max_length, int64_t eos_id, int64_t repeats) {
  std::vector<std::vector<int64_t>> rows;
  size_t longest = 0;
  for (const auto& c : captions) {
    auto one = tok.encode(c, /*add_bos=*/true);
    one.push_back(eos_id);
    if (max_length > 0 && static_cast<int64_t>(one.size()) > max_length) one.resize(static_cast<size_t>(max_length));
    std::vector<int64_t> ids;
    for (int64_t r = 0; r < repeats; ++r) ids.insert(ids.end(), one.begin(), one.end());
    longest = std::max(longest, ids.size());
    rows.push_back(std::move(ids));
  }
  const int64_t b = static_cast<int64_t>(rows.size()), l = static_cast<int64_t>(longest);
  const int64_t pad = tok.pad_id >= 0 ? tok.pad_id : eos_id;
  CaptionTargets t{torch::full({b, l}, pad, torch::kLong), torch::zeros({b, l}, torch::kLong),
                   torch::full({b, l}, -100, torch::kLong)};
  auto ids = t.ids.accessor<int64_t, 2>();
  auto keep = t.keep.accessor<int64_t, 2>();
  auto labels = t.labels.accessor<int64_t, 2>();
  for (int64_t i = 0; i < b; ++i) {
    const auto& r = rows[static_cast<size_t>(i)];
    for (int64_t j = 0; j < static_cast<int64_t>(r.size()); ++j) {
      ids[i][j] = r[static_cast<size_t>(j)];
      keep[i][j] = 1;
      if (j > prompt_tokens) labels[i][j] = r[static_cast<size_t>(j)];  // j = 0 is BOS
    }
  }
  return t;
}

bool caption_names_class(const std::string& caption, const std::string& label_name,
                         const std::vector<std::string>& class_names) {
  std::set<std::string> colours, shapes;
  for (const auto& n : class_names) {
    const auto sp = n.find(' ');
    if (sp == std::string::npos) continue;
    colours.insert(n.substr(0, sp));
    shapes.insert(n.substr(sp + 1));
  }
  std::string colour, shape, word;
  std::istringstream in(caption);
  while (in >> word) {
    if (colour.empty() && colours.count(word)) colour = word;
    if (shape.empty() && shapes.count(word)) shape = word;
  }
  return !colour.empty() && !shape.empty() && colour + " " + shape == label_name;
}

Stage2Task::Stage2Task(RunConfig cfg)
    : cfg_(std::move(cfg)), device_(pick_device(cfg_.device_target)),
      ledger_(cfg_.model.model_config.allow_partial_load) {
  join_processes(cfg_);
  torch::manual_seed(cfg_.seed);
  check(cfg_.model.model_config.text_config.has_value(),
        "model.model_config.text_config: a stage-2 model needs its LLM described");
  adopt_checkpoint_architectures(cfg_);
  const auto& mc = cfg_.model.model_config;
  const bool train = cfg_.run_mode == "train";
  tokenizer_ = stage2_tokenizer(train ? cfg_.train_dataset : cfg_.eval_dataset, mc,
                                train ? "train_dataset" : "eval_dataset");
  const bool resuming = train && cfg_.resume_training;
  model_ = build_loaded<Blip2Llm>(skip_draws(cfg_), [&](bool draw) {
    ledger_ = WeightLedger(mc.allow_partial_load);
    auto m = build_stage2_model(mc, ledger_, device_, draw);
    if (!cfg_.load_checkpoint.empty() && !resuming) load_model_weights(*m, cfg_.load_checkpoint, ledger_);
    return m;
  }, ledger_);
  if (!resuming) ledger_.check(*model_, coverage_policy(cfg_, train));
  model_->to(device_);
}

void Stage2Task::load_weights(const std::string& path) {
  require_checkpoint_architecture(model_->config(), path);
  load_model_weights(*model_, path, ledger_);
  ledger_.check(*model_, coverage_policy(cfg_, false));
}

BatchLoader Stage2Task::make_loader(const DatasetConfig& d, bool train) const {
  return make_batch_loader(cfg_, d, train, nullptr);
}

int64_t Stage2Task::prompt_tokens(const DatasetConfig& d) const {
  const auto& mc = cfg_.model.model_config;
  if (mc.prompt && mc.prompt_length > 0) return mc.prompt_length;  // the seed's, set by hand
  const std::string p = clean_caption(d.text_transforms.prompt, d.text_transforms.max_words);
  return p.empty() ? 0 : static_cast<int64_t>(tokenizer_->encode(p).size());
}

void Stage2Task::pretrain_llm(const BatchLoader& loader) {
  const auto& rc = cfg_.runner_config;
  auto& lm = *model_->language_model;
  check(lm.parameters().front().scalar_type() == torch::kFloat32,
        "runner_config.llm_pretrain_epochs: the LLM is held in " +
            std::string(c10::toString(lm.parameters().front().scalar_type())) +
            "; pretraining it needs model_config.frozen_dtype: float32");
  const int64_t longest = 2 * cfg_.train_dataset.text_transforms.max_length;  // each caption twice
  check(longest <= lm.config.max_position_embeddings,
        "runner_config.llm_pretrain_epochs: two captions of train_dataset.text_transforms.max_length " +
            std::to_string(longest / 2) + " exceed the LLM's max_position_embeddings " +
            std::to_string(lm.config.max_position_embeddings));
  std::vector<bool> frozen;
  for (auto& p : lm.parameters()) {
    frozen.push_back(!p.requires_grad());
    p.set_requires_grad(true);
  }
  Objective obj;
  obj.name = "llm";
  obj.model = &lm;
  obj.step = [&](const Batch& batch) {
    // Each caption twice: besides the language, the LLM learns to take what a text says from
    // its context, which stage 2 then fills with the projected queries.
    auto t = caption_targets(*tokenizer_, batch.captions, 0, cfg_.train_dataset.text_transforms.max_length,
                             cfg_.model.model_config.text_config->eos_token_id, /*repeats=*/2);
    auto ids = to_device_async(t.ids, device_), keep = to_device_async(t.keep, device_);
    auto logits = lm.forward(lm.embed(ids), keep, positions_from_keep(keep, keep.size(1)), nullptr,
                             /*last_only=*/false, /*vocab_local=*/true);
    const bool global = cfg_.model.model_config.lm_loss_normalization == "global_tokens";
    return StepLosses{causal_lm_loss(logits, to_device_async(t.labels, device_), global, /*vocab_parallel=*/true), {}};
  };
  EngineOptions eo = EngineOptions::from(cfg_, device_);
  eo.epochs = rc.llm_pretrain_epochs;
  eo.max_steps = -1;
  eo.save_steps = 0;
  eo.output_dir = "";  // no checkpoints or metrics: the result is written below
  eo.schedule.learning_rate = rc.llm_pretrain_lr;
  eo.schedule.total_steps = -1;
  eo.schedule.warmup_steps = std::min<int64_t>(eo.schedule.warmup_steps,
                                               rc.llm_pretrain_epochs * (loader.batches_per_epoch() / eo.accumulation) / 10);
  log_info("pretraining the LLM on the training captions (" + std::to_string(rc.llm_pretrain_epochs) + " epochs)");
  blip2::train(obj, loader, eo);
  size_t i = 0;
  for (auto& p : lm.parameters()) p.set_requires_grad(!frozen[i++]);
  model_->train(false);
  ledger_.trained(*model_, "language_model.");
  TensorMap weights = state_dict(lm);  // every rank: tensor-parallel shards are gathered whole
  if (dist::is_main_process()) {
    for (auto& [name, t] : weights) t = t.detach().cpu();
    const auto dir = fs::path(cfg_.output_dir) / "llm";
    export_hf_llm(*cfg_.model.model_config.text_config, weights, dir.string());
    log_info("pretrained LLM written to " + dir.string() + " (a Hugging Face directory)");
  }
}

void Stage2Task::resume_weights(const std::string& dir) {
  require_checkpoint_architecture(model_->config(), dir);
  load_model_weights(*model_, dir, ledger_);
  // A checkpoint written without its frozen weights: the LLM pretrained here is in output_dir/llm.
  const auto llm_dir = fs::path(cfg_.output_dir) / "llm";
  std::error_code ec;
  if (cfg_.runner_config.llm_pretrain_epochs > 0 && !ledger_.covers(*model_, "language_model.") &&
      fs::exists(llm_dir / "config.json", ec))
    load_model_weights(*model_, llm_dir.string(), ledger_, "language_model.");
  CoveragePolicy policy = coverage_policy(cfg_, true);
  policy.llm_trained_here = false;  // a resumed run does not pretrain the LLM again
  ledger_.check(*model_, policy);
}

std::vector<StepLog> Stage2Task::train(const GradientProbe& probe) {
  auto loader = make_loader(cfg_.train_dataset, /*train=*/true);
  fs::create_directories(cfg_.output_dir);
  const std::string resume = cfg_.resume_training ? resume_checkpoint_dir(cfg_) : "";
  if (cfg_.runner_config.llm_pretrain_epochs > 0 && resume.empty()) pretrain_llm(loader);
  const int64_t prompt = prompt_tokens(cfg_.train_dataset);
  const auto eos = cfg_.model.model_config.text_config->eos_token_id;
  const int64_t max_len = cfg_.model.model_config.max_txt_len;
  log_info(std::string("stage 2: the LLM is ") + (cfg_.model.model_config.freeze_text ? "frozen" : "trained"));
  Objective obj;
  obj.name = "stage2";
  obj.model = model_.get();
  obj.step = [&](const Batch& batch) {
    auto t = caption_targets(*tokenizer_, batch.captions, prompt, max_len, eos);
    auto loss = model_->loss(batch.images, to_device_async(t.ids, device_), to_device_async(t.keep, device_),
                             to_device_async(t.labels, device_));
    return StepLosses{loss, {}};
  };
  obj.save = [this](const fs::path& dir) {
    const TensorMap weights = state_dict(*model_, !cfg_.runner_config.save_frozen_weights);  // every rank
    if (dir.empty()) return;
    save_safetensors((dir / "model.safetensors").string(), weights,
                     {{"format", "blip2cpp"}, {"arch", cfg_.model.arch.type}});
    atomic_write(dir / "config.yaml", to_yaml(cfg_));
  };
  obj.load = [this](const std::string& dir) { resume_weights(dir); };
  EngineOptions eo = EngineOptions::from(cfg_, device_);
  eo.resume_from = resume;
  eo.on_gradients = probe;
  return blip2::train(obj, loader, eo);
}

std::vector<std::string> generate_texts(Blip2LlmImpl& model, const LlmTokenizer& tok, const torch::Tensor& images,
                                        const std::vector<std::string>& prompts, const GenerationOptions& o,
                                        GenerationStats* stats) {
  model.eval();
  const auto device = model.query_tokens.device();
  auto batch = encode_prompts(tok, prompts, /*add_bos=*/true);
  auto ids = model.generate(images.to(device), batch.ids.to(device), batch.keep.to(device), o, stats);
  std::vector<std::string> out;
  for (const auto& row : ids) {
    std::string text = tok.decode(row);
    const auto a = text.find_first_not_of(" \n\t"), b = text.find_last_not_of(" \n\t");
    out.push_back(a == std::string::npos ? "" : text.substr(a, b - a + 1));
  }
  return out;
}

std::vector<std::string> Stage2Task::generate(const torch::Tensor& images, const std::vector<std::string>& prompts,
                                                 const GenerationOptions& o, GenerationStats* stats) {
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  return generate_texts(*model_, *tokenizer_, images, prompts, o, stats);
}

nlohmann::json Stage2Task::evaluate() {
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  const auto names = loader.dataset().label_names();
  const bool synthetic = cfg_.eval_dataset.data_loader.type == "SyntheticShapes";
  const int64_t prompt = prompt_tokens(cfg_.eval_dataset);
  const auto& t = *cfg_.model.model_config.text_config;
  auto o = GenerationOptions::from(t);
  const std::string prompt_text = clean_caption(cfg_.eval_dataset.text_transforms.prompt);
  double loss_sum = 0;
  int64_t batches = 0, images = 0, correct = 0;
  nlohmann::json examples = nlohmann::json::array();
  // Under data parallelism batch b goes to dp rank b % dp (its loss a local mean), and the sums
  // are combined; the examples are rank 0's.
  const int64_t parts = dist::dp_size(), part = dist::dp_rank();
  std::optional<dist::LocalScope> local(std::in_place);
  BatchLoader::Stream stream(loader, 0, part, -1, parts);
  Progress progress("eval", (loader.batches_per_epoch() - part + parts - 1) / parts, cfg_.runner_config.log_interval);
  while (!stream.done()) {
    Batch batch = stream.next();
    auto tg = caption_targets(*tokenizer_, batch.captions, prompt, cfg_.model.model_config.max_txt_len, t.eos_token_id);
    {
      AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
      loss_sum += model_->loss(batch.images.to(device_), tg.ids.to(device_), tg.keep.to(device_), tg.labels.to(device_))
                      .item<double>();
    }
    ++batches;
    if (synthetic) {
      auto texts = generate(batch.images, std::vector<std::string>(batch.captions.size(), prompt_text), o);
      for (size_t i = 0; i < texts.size(); ++i) {
        const auto& truth = names.at(static_cast<size_t>(batch.labels[static_cast<int64_t>(i)].item<int64_t>()));
        const bool ok = caption_names_class(texts[i], truth, names);
        correct += ok;
        if (examples.size() < 8)
          examples.push_back({{"caption", texts[i]}, {"reference", batch.captions[i]}, {"correct", ok}});
      }
    }
    images += batch.images.size(0);
    progress.update(batches, "");
  }
  progress.finish();
  local.reset();
  auto sums = torch::tensor({loss_sum, static_cast<double>(batches), static_cast<double>(images),
                             static_cast<double>(correct)}, torch::kFloat64);
  dist::combine_rows(sums);
  loss_sum = sums[0].item<double>();
  batches = static_cast<int64_t>(sums[1].item<double>());
  images = static_cast<int64_t>(sums[2].item<double>());
  correct = static_cast<int64_t>(sums[3].item<double>());
  nlohmann::json r = {{"loss", batches ? loss_sum / static_cast<double>(batches) : 0.0}, {"num_images", images}};
  if (synthetic) {
    r["caption_accuracy"] = images ? 100.0 * static_cast<double>(correct) / static_cast<double>(images) : 0.0;
    r["decoding"] = o.num_beams > 1 ? "beam search (" + std::to_string(o.num_beams) + " beams)" : std::string("greedy");
    r["examples"] = examples;
  }
  return r;
}

nlohmann::json Stage2Task::predict(const std::vector<std::string>& inputs, const std::string& prompt) {
  const auto& tmpl = cfg_.eval_dataset.data_loader.hypothesis_template;
  // The seed's pipeline: prompt = hypothesis_template.format(prompt); no prompt = none.
  const std::string text = prompt.empty() ? "" : (tmpl.find("{}") != std::string::npos ? fill_template(tmpl, prompt) : prompt);
  auto o = GenerationOptions::from(*cfg_.model.model_config.text_config);
  torch::NoGradGuard no_grad;
  nlohmann::json out = nlohmann::json::array();
  auto run_batch = [&](const std::vector<std::string>& names, const torch::Tensor& images) {
    auto texts = generate(images, std::vector<std::string>(names.size(), text), o);
    for (size_t i = 0; i < texts.size(); ++i) out.push_back({{"image", names[i]}, {"prompt", text}, {"text", texts[i]}});
  };
  const int64_t bs = std::max<int64_t>(1, cfg_.eval_dataset.batch_size > 0 ? cfg_.eval_dataset.batch_size
                                                                             : cfg_.runner_config.batch_size);
  if (inputs.empty()) {
    auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
    BatchLoader::Stream stream(loader, 0, 0);
    while (!stream.done()) {
      Batch batch = stream.next();
      std::vector<std::string> names;
      for (int64_t i = 0; i < batch.images.size(0); ++i)
        names.push_back(loader.dataset().describe(batch.indices[static_cast<size_t>(i)]));
      run_batch(names, batch.images);
    }
    return out;
  }
  ImageFolderDataset images(inputs, make_image_transform({}, false, cfg_.model.model_config.vision_config.image_size));
  for (int64_t start = 0; start < images.size(); start += bs) {
    std::vector<std::string> names;
    std::vector<torch::Tensor> batch;
    for (int64_t i = start; i < std::min(images.size(), start + bs); ++i) {
      names.push_back(images.paths()[static_cast<size_t>(i)]);
      batch.push_back(images.get(i).image);
    }
    run_batch(names, torch::stack(batch));
  }
  return out;
}

}  // namespace blip2
