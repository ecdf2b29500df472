#include "blip2/tasks/trainer.h"

#include <ATen/autocast_mode.h>

#include <chrono>
#include <iostream>
#include <numeric>
#include <fstream>
#include <sstream>

#include "blip2/data/caption_datasets.h"
#include "blip2/data/synthetic.h"
#include "blip2/dist/dist.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/io/safetensors.h"
#include "blip2/tasks/retrieval.h"
#include "blip2/util/common.h"
#include "blip2/vision/image.h"

namespace blip2 {
namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The default generator of `device` (cuda:N's own, not the current device's).
torch::Tensor rng_state(torch::Device device) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}
void set_rng_state(torch::Device device, const torch::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

double mean_of(const std::vector<StepLog>& logs, size_t begin, size_t end,
               double StepLog::*field) {
  double s = 0;
  for (size_t i = begin; i < end; ++i) s += logs[i].*field;
  return end > begin ? s / static_cast<double>(end - begin) : 0.0;
}

}  // namespace

AutocastGuard::AutocastGuard(bool enabled, const torch::Device& device) : on_(enabled && device.is_cuda()) {
  if (!on_) return;
  prev_enabled_ = at::autocast::is_autocast_enabled(at::kCUDA);
  prev_dtype_ = at::autocast::get_autocast_dtype(at::kCUDA);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!on_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCUDA, prev_enabled_);
  at::autocast::set_autocast_dtype(at::kCUDA, prev_dtype_);
}

torch::Device parse_device(const std::string& target) {
  check(is_device_target(target), "device_target: '" + target + "' is not cpu|cuda|cuda:N (N < 128)");
  if (target == "cpu") return torch::Device(torch::kCPU);
  if (target == "cuda") return torch::Device(torch::kCUDA);
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(std::stoi(target.substr(5))));
}

torch::Device pick_device(const std::string& target) {
  const torch::Device device = parse_device(target);
  if (device.is_cuda()) {
    check(torch::cuda::is_available(),
          "device_target is " + target + " but no CUDA device is available to this torch build");
    const auto n = static_cast<int64_t>(torch::cuda::device_count());
    check(!device.has_index() || device.index() < n,
          "device_target is " + target + " but this machine has " + std::to_string(n) + " CUDA device" +
              (n == 1 ? "" : "s") + " (cuda:0 .. cuda:" + std::to_string(n - 1) + ")");
  }
  return device;
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
}

std::unique_ptr<torch::optim::AdamW> make_adamw(const torch::nn::Module& model, const OptimizerConfig& oc,
                                              double lr, int64_t* trainable) {
  std::vector<torch::Tensor> decay, no_decay;
  int64_t n = 0;
  for (const auto& p : model.named_parameters()) {
    if (!p.value().requires_grad()) continue;
    const bool no_wd = p.value().dim() < 2 || ends_with(p.key(), ".bias");
    (no_wd ? no_decay : decay).push_back(p.value());
    n += p.value().numel();
  }
  if (trainable) *trainable = n;
  auto opts = torch::optim::AdamWOptions(lr).betas({oc.betas[0], oc.betas[1]}).eps(oc.eps).weight_decay(oc.weight_decay);
  auto no_wd_opts = std::make_unique<torch::optim::AdamWOptions>(opts);
  no_wd_opts->weight_decay(0.0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(opts));
  groups.emplace_back(no_decay, std::move(no_wd_opts));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), opts);
}

double warmup_cosine_lr(const LrScheduleConfig& s, int64_t step, int64_t total_steps) {
  if (step < s.warmup_steps)
    return s.warmup_lr_init +
           (s.learning_rate - s.warmup_lr_init) * static_cast<double>(step) / s.warmup_steps;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - s.warmup_steps);
  double progress = std::clamp(static_cast<double>(step - s.warmup_steps) / decay_steps, 0.0, 1.0);
  return s.lr_end + (s.learning_rate - s.lr_end) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

Recall recall(const torch::Tensor& scores, const std::vector<std::vector<int64_t>>& gt) {
  auto s = scores.to(torch::kCPU, torch::kFloat32).contiguous();
  Recall r;
  const int64_t n = s.size(0);
  auto acc = s.accessor<float, 2>();
  for (int64_t q = 0; q < n; ++q) {
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t j : gt[q]) best = std::max(best, acc[q][j]);
    int64_t rank = 0;
    for (int64_t j = 0; j < s.size(1); ++j) rank += acc[q][j] > best;
    r.r1 += rank < 1;
    r.r5 += rank < 5;
    r.r10 += rank < 10;
  }
  for (double* v : {&r.r1, &r.r5, &r.r10}) *v = 100.0 * *v / std::max<int64_t>(1, n);
  return r;
}

RetrievalMetrics recall_at_k(const torch::Tensor& sim_i2t,
                             const std::vector<std::vector<int64_t>>& img2txt,
                             const std::vector<std::vector<int64_t>>& txt2img) {
  RetrievalMetrics m;
  m.num_images = sim_i2t.size(0);
  m.num_texts = sim_i2t.size(1);
  auto a = recall(sim_i2t, img2txt), b = recall(sim_i2t.t(), txt2img);
  m.txt_r1 = a.r1; m.txt_r5 = a.r5; m.txt_r10 = a.r10;
  m.img_r1 = b.r1; m.img_r5 = b.r5; m.img_r10 = b.r10;
  return m;
}

nlohmann::json Stage1Eval::to_json() const {
  const auto& r = itc_retrieval;
  return {{"loss", loss},
          {"loss_itc", loss_itc},
          {"loss_itm", loss_itm},
          {"loss_lm", loss_lm},
          {"itc_retrieval",
           {{"txt_r1", r.txt_r1}, {"txt_r5", r.txt_r5}, {"txt_r10", r.txt_r10},
            {"img_r1", r.img_r1}, {"img_r5", r.img_r5}, {"img_r10", r.img_r10},
            {"num_images", r.num_images}, {"num_texts", r.num_texts}}}};
}

std::shared_ptr<WordPieceTokenizer> model_tokenizer(const TokenizerConfig& tc, const QFormerConfig& q,
                                                    const std::string& section) {
  auto tok = make_tokenizer(tc);
  auto key = std::string("model.model_config.qformer_config.");
  check(tok->size() <= q.embedding_vocab_size(),
        key + "vocab_size: the tokenizer has " + std::to_string(tok->size()) +
            " tokens but the embedding table only " + std::to_string(q.embedding_vocab_size()) +
            " (" + section + ".tokenizer.vocab_file names the vocabulary)");
  check(tok->bos_id() == q.bos_token_id,
        key + "bos_token_id is " + std::to_string(q.bos_token_id) + " but the tokenizer's " +
            tc.bos_token + " is " + std::to_string(tok->bos_id()));
  check(tok->pad_id() == q.pad_token_id,
        key + "pad_token_id is " + std::to_string(q.pad_token_id) + " but the tokenizer's [PAD] is " +
            std::to_string(tok->pad_id()));
  return tok;
}

LoadReport load_model_weights(torch::nn::Module& model, const std::string& path, WeightLedger& ledger,
                              const std::string& prefix) {
  const std::string where = weights_location(resolve_weights(path));
  return ledger.load(model, load_checkpoint_tensors(where), where, prefix);
}

void adopt_checkpoint_architectures(RunConfig& cfg) {
  auto& mc = cfg.model.model_config;
  auto adopt = [&](const std::string& path, ArchitectureParts mask) {
    if (path.empty()) return;
    auto a = checkpoint_architecture(path);
    if (!a) return;
    const ArchitectureParts parts{a->parts.vision && mask.vision, a->parts.qformer && mask.qformer,
                                  a->parts.text && mask.text, a->parts.settings && mask.settings};
    adopt_architecture(cfg, a->config, a->source, parts);
  };
  adopt(mc.vision_config.checkpoint_name_or_path, {true, false, false, false});
  if (mc.text_config) adopt(mc.text_config->checkpoint_name_or_path, {false, false, true, false});
  adopt(mc.checkpoint_name_or_path, {true, true, true, true});
  adopt(cfg.load_checkpoint, {true, true, true, true});
  validate(cfg, cfg.source);
  set_max_image_pixels(cfg.max_image_pixels);
}

void require_checkpoint_architecture(const Blip2Config& built, const std::string& path) {
  auto a = checkpoint_architecture(path);
  if (!a) return;
  RunConfig run;
  run.model.model_config = built;
  for (const auto& [key, value] : flatten(built)) run.given[key] = "the model as built";
  adopt_architecture(run, a->config, a->source, a->parts);  // any difference is an error
}

CoveragePolicy coverage_policy(const RunConfig& cfg, bool training) {
  CoveragePolicy p;
  p.allow_partial = cfg.model.model_config.allow_partial_load;
  p.training = training;
  p.llm_trained_here = training && cfg.runner_config.llm_pretrain_epochs > 0;
  return p;
}

Blip2Qformer build_model(const Blip2Config& mc, WeightLedger& l) {
  Blip2Qformer model(mc, InitOptions{torch::TensorOptions().dtype(torch::kFloat32), 0.02});
  // The ViT alone (eva_vit_g.pth, or any checkpoint holding vision_model.*).
  if (!mc.vision_config.checkpoint_name_or_path.empty())
    load_model_weights(*model, mc.vision_config.checkpoint_name_or_path, l, "vision_model.");
  if (!mc.checkpoint_name_or_path.empty()) load_model_weights(*model, mc.checkpoint_name_or_path, l);
  return model;
}

PretrainTrainer::PretrainTrainer(RunConfig cfg)
    : cfg_(std::move(cfg)), device_(pick_device(cfg_.device_target)),
      ledger_(cfg_.model.model_config.allow_partial_load) {
  dist::init_from_env(cfg_.use_parallel, cfg_.parallel_config.data_parallel,
                      cfg_.parallel_config.model_parallel);
  torch::manual_seed(cfg_.seed);
  adopt_checkpoint_architectures(cfg_);
  const auto& mc = cfg_.model.model_config;
  // Training reads its tokenizer from train_dataset, evaluation from eval_dataset.
  const DatasetConfig& data = cfg_.run_mode == "train" ? cfg_.train_dataset : cfg_.eval_dataset;
  const std::string section = cfg_.run_mode == "train" ? "train_dataset" : "eval_dataset";
  if (data.tokenizer.vocab_file.empty() && data.data_loader.type != "SyntheticShapes")
    throw Error(section + ".tokenizer.vocab_file is empty: give the path of BERT's vocab.txt "
                "(bert-base-uncased for the published BLIP-2 weights); \"\" means the synthetic "
                "vocabulary, which only suits the SyntheticShapes data");
  tokenizer_ = model_tokenizer(data.tokenizer, mc.qformer_config, section);
  model_ = build_model(mc, ledger_);
  const bool resuming = cfg_.run_mode == "train" && cfg_.resume_training;
  if (!cfg_.load_checkpoint.empty() && !resuming) load_model_weights(*model_, cfg_.load_checkpoint, ledger_);
  if (!resuming) ledger_.check(*model_, coverage_policy(cfg_, cfg_.run_mode == "train"));
  model_->to(device_);
}

PretrainTrainer::PretrainTrainer(RunConfig cfg, Blip2Qformer model,
                                 std::shared_ptr<WordPieceTokenizer> tokenizer,
                                 std::optional<std::vector<std::string>> random_weights)
    : cfg_(std::move(cfg)), device_(pick_device(cfg_.device_target)), model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      ledger_(random_weights ? WeightLedger(*model_, *random_weights, cfg_.model.model_config.allow_partial_load)
                             : WeightLedger(cfg_.model.model_config.allow_partial_load)) {
  dist::init_from_env(cfg_.use_parallel, cfg_.parallel_config.data_parallel,
                      cfg_.parallel_config.model_parallel);
  torch::manual_seed(cfg_.seed);
  const bool partial = cfg_.model.model_config.allow_partial_load;  // the run's load policy
  cfg_.model.model_config = model_->config();
  cfg_.model.model_config.allow_partial_load = partial;
  set_max_image_pixels(cfg_.max_image_pixels);
  if (!cfg_.load_checkpoint.empty() && !(cfg_.run_mode == "train" && cfg_.resume_training)) {
    require_checkpoint_architecture(model_->config(), cfg_.load_checkpoint);
    load_model_weights(*model_, cfg_.load_checkpoint, ledger_);
    ledger_.check(*model_, coverage_policy(cfg_, cfg_.run_mode == "train"));
  }
  model_->to(device_);
}

void PretrainTrainer::load_weights(const std::string& path) {
  require_checkpoint_architecture(model_->config(), path);
  load_model_weights(*model_, path, ledger_);
  ledger_.check(*model_, coverage_policy(cfg_, false));
}

std::vector<std::string> PretrainTrainer::missing_weights() const {
  return ledger_.loaded_any() ? ledger_.random() : std::vector<std::string>{};
}

void PretrainTrainer::require_weights(const std::vector<std::string>& prefixes, const std::string& task) const {
  blip2::require_weights(missing_weights(), prefixes, task);
}

void require_weights(const std::vector<std::string>& missing, const std::vector<std::string>& prefixes,
                     const std::string& task) {
  for (const auto& prefix : prefixes)
    for (const auto& m : missing)
      if (m.rfind(prefix, 0) == 0)
        throw Error("task " + task + " needs the model's " + prefix.substr(0, prefix.size() - 1) +
                    ", but the loaded weights have none (missing '" + m + "'); load a checkpoint that "
                    "has it (a LAVIS stage-1 file, a Hugging Face Blip2ForImageTextRetrieval, or ours)");
}

BatchLoader make_batch_loader(const RunConfig& cfg, const DatasetConfig& d, bool train,
                              std::shared_ptr<const WordPieceTokenizer> tokenizer) {
  auto dataset = make_dataset(d, cfg.model.model_config.vision_config.image_size,
                              static_cast<uint64_t>(cfg.seed), train ? "train_dataset" : "eval_dataset");
  LoaderOptions o;
  o.batch_size = d.batch_size > 0 ? d.batch_size : cfg.runner_config.batch_size;
  o.shuffle = train && d.data_loader.shuffle;
  o.drop_last = train ? d.drop_remainder : false;
  o.seed = static_cast<uint64_t>(cfg.seed);
  o.num_workers = d.num_parallel_workers;
  o.skip_bad_samples = d.data_loader.skip_bad_samples;
  o.rank = dist::rank();
  o.world_size = dist::world_size();
  return BatchLoader(dataset, std::move(tokenizer), d.text_transforms, o);
}

BatchLoader PretrainTrainer::make_loader(const DatasetConfig& d, bool train) const {
  return make_batch_loader(cfg_, d, train, tokenizer_);
}

void save_train_state(const fs::path& file, torch::optim::Optimizer& opt, const TrainState& st,
                      torch::Device device) {
  torch::serialize::OutputArchive archive;
  opt.save(archive);
  archive.write("step", torch::tensor(st.step));
  archive.write("epoch", torch::tensor(st.epoch));
  archive.write("batch", torch::tensor(st.batch));
  archive.write("rng_cpu", rng_state(torch::kCPU));
  if (device.is_cuda()) archive.write("rng_cuda", rng_state(device));
  archive.save_to(file.string());
}

TrainState load_train_state(const std::string& checkpoint_dir, torch::optim::Optimizer& opt, torch::Device device) {
  torch::serialize::InputArchive archive;
  const std::string state_file = (fs::path(checkpoint_dir) / "trainer_state.pt").string();
  auto read = [&](const char* key) {
    torch::Tensor t;  // a fresh tensor per key: read() rebinds its storage
    archive.read(key, t);
    return t;
  };
  TrainState st;
  try {
    archive.load_from(state_file);
    opt.load(archive);
    st.step = read("step").item<int64_t>();
    st.epoch = read("epoch").item<int64_t>();
    st.batch = read("batch").item<int64_t>();
    set_rng_state(torch::kCPU, read("rng_cpu"));
    torch::Tensor cuda_state;
    if (device.is_cuda() && archive.try_read("rng_cuda", cuda_state)) set_rng_state(device, cuda_state);
  } catch (const c10::Error& e) {
    throw Error(state_file + ": unreadable trainer state (" + first_line(e.what_without_backtrace()).substr(0, 200) +
                ")");
  }
  log_info("resuming from " + checkpoint_dir + " at step " + std::to_string(st.step));
  return st;
}

std::string resume_checkpoint_dir(const RunConfig& cfg) {
  check(!cfg.load_checkpoint.empty(), "resume_training needs load_checkpoint (a checkpoint directory)");
  const std::string dir = resolve_checkpoint(cfg.load_checkpoint);
  check(fs::is_directory(dir) && fs::exists(fs::path(dir) / "trainer_state.pt"),
        dir + ": cannot resume, no trainer_state.pt (resume needs a training checkpoint)");
  return dir;
}

std::ofstream open_metrics(const std::string& output_dir, int64_t keep_through) {
  fs::create_directories(output_dir);
  const fs::path path = fs::path(output_dir) / "metrics.jsonl";
  std::string kept;  // a resumed run keeps the lines of the steps its checkpoint covers
  if (keep_through > 0 && fs::exists(path)) {
    std::istringstream in(read_file(path));
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("step", int64_t{0}) <= keep_through) kept += line + "\n";
    }
  }
  atomic_write(path, kept);
  return std::ofstream(path, std::ios::app);
}

void PretrainTrainer::save_checkpoint(const TrainState& st, torch::optim::Optimizer& opt) {
  if (!dist::is_main_process()) return;
  write_checkpoint(cfg_.output_dir, st.step, [&](const fs::path& tmp) {
    save_safetensors((tmp / "model.safetensors").string(),
                     state_dict(*model_, !cfg_.runner_config.save_frozen_weights),
                     {{"format", "blip2cpp"}, {"arch", cfg_.model.arch.type}});
    save_train_state(tmp / "trainer_state.pt", opt, st, device_);
    atomic_write(tmp / "config.yaml", to_yaml(cfg_));
  });
}

fs::path write_checkpoint(const std::string& output_dir, int64_t step,
                          const std::function<void(const fs::path& tmp)>& fill) {
  const fs::path root = fs::path(output_dir) / "checkpoint";
  const fs::path dir = root / step_dir_name(step);
  const fs::path tmp = root / (step_dir_name(step) + ".tmp");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  fill(tmp);
  fs::remove_all(dir);
  fs::rename(tmp, dir);
  atomic_write(root / "latest", dir.filename().string() + "\n");
  log_info("checkpoint saved: " + dir.string());
  return dir;
}

TrainState PretrainTrainer::resume(torch::optim::Optimizer& opt) {
  const std::string dir = resume_checkpoint_dir(cfg_);
  require_checkpoint_architecture(model_->config(), dir);
  load_model_weights(*model_, dir, ledger_);
  ledger_.check(*model_, coverage_policy(cfg_, true));
  return load_train_state(dir, opt, device_);
}

std::vector<StepLog> PretrainTrainer::train() {
  const auto& rc = cfg_.runner_config;
  auto loader = make_loader(cfg_.train_dataset, /*train=*/true);
  const int64_t per_epoch = loader.batches_per_epoch();
  const int64_t total = cfg_.lr_schedule.total_steps > 0 ? cfg_.lr_schedule.total_steps
                                                         : rc.epochs * per_epoch;

  int64_t trainable = 0;
  auto optimizer_ptr = make_adamw(*model_, cfg_.optimizer, cfg_.lr_schedule.learning_rate, &trainable);
  auto& optimizer = *optimizer_ptr;
  std::vector<torch::Tensor> params = optimizer.param_groups()[0].params();
  params.insert(params.end(), optimizer.param_groups()[1].params().begin(), optimizer.param_groups()[1].params().end());

  TrainState st;
  if (cfg_.resume_training) st = resume(optimizer);
  std::ofstream metrics = open_metrics(cfg_.output_dir, st.step);

  const int64_t batch_size = (cfg_.train_dataset.batch_size > 0 ? cfg_.train_dataset.batch_size
                                                                : rc.batch_size) *
                             dist::world_size();
  const int64_t last_step = rc.max_steps >= 0 ? std::min(rc.max_steps, rc.epochs * per_epoch)
                                              : rc.epochs * per_epoch;
  log_info("training " + std::to_string(count_parameters(*model_)) + " parameters (" +
           std::to_string(trainable) +
           " trainable), " + std::to_string(rc.epochs) + " epochs x " + std::to_string(per_epoch) +
           " steps, global batch " + std::to_string(batch_size) + ", device " + device_.str());

  model_->train();
  std::vector<StepLog> logs;
  Progress progress("train", last_step, rc.log_interval);
  int64_t saved_at = -1;
  for (int64_t epoch = st.epoch; epoch < rc.epochs && st.step < last_step; ++epoch) {
    BatchLoader::Stream stream(loader, epoch, epoch == st.epoch ? st.batch : 0);
    for (int64_t b = epoch == st.epoch ? st.batch : 0; b < per_epoch && st.step < last_step; ++b) {
      auto t0 = std::chrono::steady_clock::now();
      Batch batch = stream.next().to(device_);
      double lr = warmup_cosine_lr(cfg_.lr_schedule, st.step, total);
      set_lr(optimizer, lr);
      Stage1Output out;
      {
        AutocastGuard autocast(rc.bf16_autocast, device_);
        out = model_->forward(batch.images, batch.ids, batch.mask);
      }
      optimizer.zero_grad();
      out.loss.backward();
      dist::all_reduce_gradients(optimizer.param_groups()[0].params());
      dist::all_reduce_gradients(optimizer.param_groups()[1].params());
      if (rc.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(params, rc.max_grad_norm);
      optimizer.step();
      {  // BLIP's guard on the learnable temperature (BLIP-2 itself never clamps it)
        torch::NoGradGuard no_grad;
        model_->temp.clamp_(0.001, 0.5);
      }
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

      st.step += 1;
      st.batch = b + 1;
      st.epoch = epoch;
      if (st.batch == per_epoch) st = {st.step, epoch + 1, 0};
      StepLog log{st.step, epoch, out.loss.item<double>(), out.loss_itc.item<double>(),
                  out.loss_itm.item<double>(), out.loss_lm.item<double>(), lr,
                  static_cast<double>(batch_size) / std::max(secs, 1e-9)};
      check(std::isfinite(log.loss), "loss became " + std::to_string(log.loss) + " at step " +
                                         std::to_string(log.step) + " (lower the learning rate?)");
      logs.push_back(log);
      metrics << nlohmann::json{{"step", log.step}, {"epoch", log.epoch}, {"loss", log.loss},
                                {"loss_itc", log.loss_itc}, {"loss_itm", log.loss_itm},
                                {"loss_lm", log.loss_lm}, {"lr", log.lr},
                                {"samples_per_s", log.samples_per_s}}
                     .dump()
              << "\n";
      metrics.flush();
      progress.update(st.step, "loss " + format_float(log.loss) + " itc " +
                                   format_float(log.loss_itc) + " itm " +
                                   format_float(log.loss_itm) + " lm " +
                                   format_float(log.loss_lm) + " lr " +
                                   format_float(lr * 1e4, 3) + "e-4 " +
                                   format_float(log.samples_per_s, 1) + " samples/s");
      if (rc.save_steps > 0 && st.step % rc.save_steps == 0) {
        save_checkpoint(st, optimizer);
        saved_at = st.step;
      }
    }
    if (rc.save_steps == 0 && saved_at != st.step) {
      save_checkpoint(st, optimizer);
      saved_at = st.step;
    }
  }
  progress.finish();
  if (saved_at != st.step && !logs.empty()) save_checkpoint(st, optimizer);
  if (loader.skipped() > 0)
    log_warn("skipped " + std::to_string(loader.skipped()) + " unreadable training samples");

  if (!logs.empty()) {
    size_t k = std::max<size_t>(1, std::min<size_t>(20, logs.size() / 5));
    nlohmann::json summary;
    std::string table = "loss        start     end\n";
    for (auto [name, field] : {std::pair{"loss", &StepLog::loss}, {"loss_itc", &StepLog::loss_itc},
                               {"loss_itm", &StepLog::loss_itm}, {"loss_lm", &StepLog::loss_lm}}) {
      double a = mean_of(logs, 0, k, field), z = mean_of(logs, logs.size() - k, logs.size(), field);
      summary[name] = {{"start", a}, {"end", z}};
      table += std::string(name) + std::string(12 - std::string(name).size(), ' ') +
               format_float(a) + "  " + format_float(z) + "\n";
    }
    double sps = mean_of(logs, std::min(logs.size() - 1, size_t{2}), logs.size(), &StepLog::samples_per_s);
    summary["samples_per_s"] = sps;
    summary["steps"] = st.step;
    std::cout << "\n" << table << "(mean of the first and last " << k << " steps; ln 2 = 0.6931)\n"
              << "throughput: " << format_float(sps, 1) << " samples/s\n";
    atomic_write(fs::path(cfg_.output_dir) / "train_summary.json", summary.dump(2) + "\n");
  }
  return logs;
}

Stage1Eval PretrainTrainer::evaluate() {
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  torch::manual_seed(cfg_.seed);  // the hard negatives are sampled: make eval repeatable
  Stage1Eval ev;
  int64_t seen = 0;
  std::vector<torch::Tensor> image_feats, text_feats;
  std::vector<std::string> captions;
  Progress progress("eval", loader.batches_per_epoch(), cfg_.runner_config.log_interval);
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  BatchLoader::Stream stream(loader, 0, 0);
  for (int64_t b = 0; b < loader.batches_per_epoch(); ++b) {
    Batch batch = stream.next().to(device_);
    auto out = model_->forward(batch.images, batch.ids, batch.mask);
    const double n = static_cast<double>(batch.ids.size(0));
    ev.loss += out.loss.item<double>() * n;
    ev.loss_itc += out.loss_itc.item<double>() * n;
    ev.loss_itm += out.loss_itm.item<double>() * n;
    ev.loss_lm += out.loss_lm.item<double>() * n;
    seen += batch.ids.size(0);
    image_feats.push_back(out.image_feats.cpu());
    text_feats.push_back(out.text_feat.cpu());
    captions.insert(captions.end(), batch.captions.begin(), batch.captions.end());
    progress.update(b + 1, "");
  }
  progress.finish();
  for (double* v : {&ev.loss, &ev.loss_itc, &ev.loss_itm, &ev.loss_lm}) *v /= std::max<int64_t>(1, seen);

  if (loader.skipped() > 0)
    log_warn("skipped " + std::to_string(loader.skipped()) + " unreadable evaluation samples");

  torch::Tensor sim;
  std::vector<std::vector<int64_t>> img2txt, txt2img;
  if (const auto* cd = dynamic_cast<const CaptionDataset*>(&loader.dataset())) {
    // Each image once, each caption once, the annotation's ground truth.
    const int64_t bs = 32;
    image_feats.clear();
    text_feats.clear();
    for (int64_t i = 0; i < cd->num_images(); i += bs) {
      std::vector<torch::Tensor> imgs;
      for (int64_t k = i; k < std::min(i + bs, cd->num_images()); ++k) imgs.push_back(cd->image(k));
      auto embeds = model_->encode_image(torch::stack(imgs).to(device_));
      image_feats.push_back(model_->image_features(model_->query_pass(embeds, false).hidden).cpu());
    }
    const auto& tt = cfg_.eval_dataset.text_transforms;
    for (size_t i = 0; i < cd->texts().size(); i += bs) {
      std::vector<std::string> texts;
      for (size_t k = i; k < std::min(i + bs, cd->texts().size()); ++k)
        texts.push_back(clean_caption(cd->texts()[k], tt.max_words, tt.prompt));
      auto enc = tokenizer_->encode_batch(texts, tt.max_length, tt.padding);
      text_feats.push_back(
          model_->text_features(model_->text_pass(enc.ids.to(device_), enc.mask.to(device_))).cpu());
    }
    sim = max_over_queries(torch::cat(image_feats), torch::cat(text_feats));
    img2txt = cd->img2txt();
    for (int64_t img : cd->txt2img()) txt2img.push_back({img});
  } else {
    // One image and one caption per sample. A text matches an image when it is that image's
    // caption or an identical one (synthetic images with the same attributes share a caption).
    sim = max_over_queries(torch::cat(image_feats), torch::cat(text_feats));
    std::map<std::string, std::vector<int64_t>> by_caption;
    for (size_t i = 0; i < captions.size(); ++i) by_caption[captions[i]].push_back(static_cast<int64_t>(i));
    for (const auto& c : captions) {
      img2txt.push_back(by_caption[c]);
      txt2img.push_back(by_caption[c]);
    }
  }
  ev.itc_retrieval = recall_at_k(sim, img2txt, txt2img);
  return ev;
}

ZeroShotClassifier PretrainTrainer::zero_shot_classifier(std::vector<std::string> labels) const {
  const auto& d = cfg_.eval_dataset;
  require_weights({"vision_projection.", "text_projection."}, "zero_shot_image_classification");
  if (d.itm_top_k > 0) require_weights({"itm_head."}, "zero_shot_image_classification with itm_top_k");
  ZeroShotOptions o;
  o.candidate_labels = d.data_loader.candidate_labels.empty() ? std::move(labels)
                                                              : d.data_loader.candidate_labels;
  o.hypothesis_template = d.data_loader.hypothesis_template;
  o.hypothesis_templates = d.data_loader.hypothesis_templates;
  o.itm_top_k = d.itm_top_k;
  o.max_length = d.text_transforms.max_length;
  o.max_words = d.text_transforms.max_words;
  o.prompt = d.text_transforms.prompt;
  try {
    return ZeroShotClassifier(model_, tokenizer_, std::move(o));
  } catch (const Error& e) {
    throw Error(std::string("eval_dataset.data_loader: ") + e.what());
  }
}

nlohmann::json PretrainTrainer::evaluate_zero_shot() {
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  auto classifier = zero_shot_classifier(loader.dataset().label_names());
  int64_t n = 0, top1 = 0, top5 = 0;
  BatchLoader::Stream stream(loader, 0, 0);
  Progress progress("zero-shot", loader.batches_per_epoch(), cfg_.runner_config.log_interval);
  for (int64_t b = 0; !stream.done(); ++b) {
    Batch batch = stream.next().to(device_);
    auto probs = classifier.probabilities(batch.images);  // [B, labels]
    auto k = std::min<int64_t>(5, probs.size(1));
    auto top = std::get<1>(probs.topk(k, 1)).cpu();
    auto gold = batch.labels.cpu();
    top1 += (top.select(1, 0) == gold).sum().item<int64_t>();
    top5 += (top == gold.unsqueeze(1)).any(1).sum().item<int64_t>();
    n += top.size(0);
    progress.update(b + 1, "");
  }
  progress.finish();
  return {{"top1_accuracy", 100.0 * top1 / std::max<int64_t>(1, n)},
          {"top5_accuracy", 100.0 * top5 / std::max<int64_t>(1, n)},
          {"num_images", n}, {"num_labels", static_cast<int64_t>(classifier.labels().size())}};
}

nlohmann::json PretrainTrainer::predict_zero_shot(const std::vector<std::string>& inputs) {
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  nlohmann::json out = nlohmann::json::array();
  if (inputs.empty()) {  // the eval dataset, its class names as candidates (as the seed's CIFAR-100)
    auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
    auto classifier = zero_shot_classifier(loader.dataset().label_names());
    BatchLoader::Stream stream(loader, 0, 0);
    Progress progress("predict", loader.batches_per_epoch(), cfg_.runner_config.log_interval);
    for (int64_t b = 0; !stream.done(); ++b) {
      Batch batch = stream.next();
      auto probs = classifier.probabilities(batch.images.to(device_));
      for (int64_t i = 0; i < probs.size(0); ++i)
        out.push_back({{"image", loader.dataset().describe(batch.image_ids[i].item<int64_t>())},
                       {"result", classifier.ranked(probs[i])}});
      progress.update(b + 1, "");
    }
    progress.finish();
    return out;
  }
  auto classifier = zero_shot_classifier({});
  ImageFolderDataset images(inputs, make_image_transform({}, false, cfg_.model.model_config.vision_config.image_size));
  for (int64_t i = 0; i < images.size(); ++i) {
    auto probs = classifier.probabilities(images.get(i).image.unsqueeze(0).to(device_));
    out.push_back({{"image", images.paths()[i]}, {"result", classifier.ranked(probs[0])}});
  }
  return out;
}

nlohmann::json PretrainTrainer::evaluate_retrieval() {
  require_weights({"vision_projection.", "text_projection.", "itm_head."}, "image_to_text_retrieval");
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  const auto& d = cfg_.eval_dataset;
  const auto& tt = d.text_transforms;
  const int64_t bs = std::max<int64_t>(1, d.batch_size > 0 ? d.batch_size : cfg_.runner_config.batch_size);
  RetrievalInputs in;
  std::vector<torch::Tensor> embeds, feats;
  std::vector<std::string> texts;
  std::vector<std::vector<int64_t>> img2txt, txt2img;
  auto add_images = [&](const torch::Tensor& images) {
    auto e = model_->encode_image(images.to(device_));
    feats.push_back(model_->image_features(model_->query_pass(e, false).hidden));
    embeds.push_back(e);
  };
  if (const auto* cd = dynamic_cast<const CaptionDataset*>(&loader.dataset())) {
    for (int64_t i = 0; i < cd->num_images(); i += bs) {
      std::vector<torch::Tensor> imgs;
      for (int64_t k = i; k < std::min(i + bs, cd->num_images()); ++k) imgs.push_back(cd->image(k));
      add_images(torch::stack(imgs));
    }
    texts = cd->texts();
    img2txt = cd->img2txt();
    for (int64_t img : cd->txt2img()) txt2img.push_back({img});
  } else {  // one image and one caption per sample; identical captions match each other's images
    BatchLoader::Stream stream(loader, 0, 0);
    std::vector<std::string> captions;
    while (!stream.done()) {
      Batch b = stream.next();
      add_images(b.images);
      captions.insert(captions.end(), b.captions.begin(), b.captions.end());
    }
    std::map<std::string, std::vector<int64_t>> same;
    for (size_t i = 0; i < captions.size(); ++i) same[captions[i]].push_back(static_cast<int64_t>(i));
    for (const auto& c : captions) {
      img2txt.push_back(same[c]);
      txt2img.push_back(same[c]);
    }
    texts = captions;
  }
  in.image_embeds = torch::cat(embeds);
  in.image_feats = torch::cat(feats);
  std::vector<std::string> cleaned;
  for (const auto& t : texts) cleaned.push_back(clean_caption(t, tt.max_words, tt.prompt));
  auto enc = tokenizer_->encode_batch(cleaned, tt.max_length, tt.padding);
  in.text_ids = enc.ids.to(device_);
  in.text_mask = enc.mask.to(device_);
  std::vector<torch::Tensor> tf;
  for (int64_t i = 0; i < in.text_ids.size(0); i += bs) {
    const int64_t n = std::min(bs, in.text_ids.size(0) - i);
    tf.push_back(model_->text_features(model_->text_pass(in.text_ids.narrow(0, i, n), in.text_mask.narrow(0, i, n))));
  }
  in.text_feats = torch::cat(tf);

  RerankOptions o;
  o.k_test = d.k_test;
  o.add_itc = d.add_extra_itm_score;
  o.reuse_kv = d.reuse_cross_kv;
  const int64_t ni = in.image_feats.size(0), nt = in.text_feats.size(0);
  log_info("retrieval: " + std::to_string(ni) + " images, " + std::to_string(nt) + " texts, k_test " +
           std::to_string(o.k_test));
  Progress progress("rerank", ni + nt, std::max<int64_t>(1, (ni + nt) / 10));
  auto t0 = std::chrono::steady_clock::now();
  auto scores = rerank_top_k(model_, in, o, [&](int64_t done, int64_t) { progress.update(done, ""); });
  progress.finish();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto report = retrieval_report(scores, img2txt, txt2img).to_json();
  report["num_images"] = ni;
  report["num_texts"] = nt;
  report["rerank_seconds"] = secs;
  report["rerank_images_per_s"] = ni / std::max(secs, 1e-9);
  return report;
}

}  // namespace blip2
