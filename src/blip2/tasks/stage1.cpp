#include "blip2/tasks/stage1.h"

#include <map>

#include "blip2/data/caption_datasets.h"
#include "blip2/dist/dist.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/safetensors.h"
#include "blip2/models/layers.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/retrieval.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"
#include "blip2/vision/image.h"

namespace blip2 {
namespace fs = std::filesystem;

nlohmann::json Stage1Eval::to_json() const {
  return {{"loss", loss}, {"loss_itc", loss_itc}, {"loss_itm", loss_itm}, {"loss_lm", loss_lm},
          {"itc_retrieval", itc_retrieval.to_json()}};
}

Stage1Task::Stage1Task(RunConfig cfg)
    : cfg_(std::move(cfg)), device_(pick_device(cfg_.device_target)),
      ledger_(cfg_.model.model_config.allow_partial_load) {
  join_processes(cfg_);
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
  const bool resuming = cfg_.run_mode == "train" && cfg_.resume_training;
  model_ = build_loaded<Blip2Qformer>(skip_draws(cfg_), [&](bool draw) {
    ledger_ = WeightLedger(mc.allow_partial_load);
    auto m = build_model(mc, ledger_, device_, draw);
    if (!cfg_.load_checkpoint.empty() && !resuming) load_model_weights(*m, cfg_.load_checkpoint, ledger_);
    return m;
  }, ledger_);
  if (!resuming) ledger_.check(*model_, coverage_policy(cfg_, cfg_.run_mode == "train"));
  model_->to(device_);
}

Stage1Task::Stage1Task(RunConfig cfg, Blip2Qformer model,
                                 std::shared_ptr<WordPieceTokenizer> tokenizer,
                                 std::optional<std::vector<std::string>> random_weights)
    : cfg_(std::move(cfg)), device_(pick_device(cfg_.device_target)), model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      ledger_(random_weights ? WeightLedger(*model_, *random_weights, cfg_.model.model_config.allow_partial_load)
                             : WeightLedger(cfg_.model.model_config.allow_partial_load)) {
  join_processes(cfg_);
  check(dist::tp_size() == 1 || !tensor_shards(*model_).empty(),
        "parallel_config.model_parallel " + std::to_string(dist::tp_size()) +
            ": this model was built whole before the processes joined; let the task build it (Stage1Task(cfg))");
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

void Stage1Task::load_weights(const std::string& path) {
  require_checkpoint_architecture(model_->config(), path);
  load_model_weights(*model_, path, ledger_);
  ledger_.check(*model_, coverage_policy(cfg_, false));
}

std::vector<std::string> Stage1Task::missing_weights() const {
  return ledger_.loaded_any() ? ledger_.random() : std::vector<std::string>{};
}

void Stage1Task::require_weights(const std::vector<std::string>& prefixes, const std::string& task) const {
  blip2::require_weights(missing_weights(), prefixes, task);
}

BatchLoader Stage1Task::make_loader(const DatasetConfig& d, bool train) const {
  return make_batch_loader(cfg_, d, train, tokenizer_);
}

std::vector<StepLog> Stage1Task::train(const GradientProbe& probe) {
  auto loader = make_loader(cfg_.train_dataset, /*train=*/true);
  Objective obj;
  obj.name = "train";
  obj.model = model_.get();
  obj.step = [this](const Batch& b) {
    auto out = model_->forward(b.images, b.ids, b.keep, b.image_ids);
    return StepLosses{out.loss, {{"loss_itc", out.loss_itc}, {"loss_itm", out.loss_itm}, {"loss_lm", out.loss_lm}}};
  };
  obj.after_update = [this] {  // BLIP's guard on the learnable temperature
    torch::NoGradGuard no_grad;
    model_->temp.clamp_(0.001, 0.5);
  };
  obj.save = [this](const fs::path& dir) {
    const TensorMap weights = state_dict(*model_, !cfg_.runner_config.save_frozen_weights);  // every rank
    if (dir.empty()) return;
    save_safetensors((dir / "model.safetensors").string(), weights,
                     {{"format", "blip2cpp"}, {"arch", cfg_.model.arch.type}});
    atomic_write(dir / "config.yaml", to_yaml(cfg_));
  };
  obj.load = [this](const std::string& dir) {
    require_checkpoint_architecture(model_->config(), dir);
    load_model_weights(*model_, dir, ledger_);
    ledger_.check(*model_, coverage_policy(cfg_, true));
  };
  EngineOptions eo = EngineOptions::from(cfg_, device_);
  eo.on_gradients = probe;
  if (cfg_.resume_training) eo.resume_from = resume_checkpoint_dir(cfg_);
  return blip2::train(obj, loader, eo);
}

namespace {

// Which texts match which images when each image and each text carries an image id.
void match_by_id(const std::vector<int64_t>& image_ids, const std::vector<int64_t>& text_ids,
                 std::vector<std::vector<int64_t>>& img2txt, std::vector<std::vector<int64_t>>& txt2img) {
  std::map<int64_t, std::vector<int64_t>> texts_of, images_of;
  for (size_t t = 0; t < text_ids.size(); ++t) texts_of[text_ids[t]].push_back(static_cast<int64_t>(t));
  for (size_t i = 0; i < image_ids.size(); ++i) images_of[image_ids[i]].push_back(static_cast<int64_t>(i));
  img2txt.clear();
  txt2img.clear();
  for (int64_t id : image_ids) img2txt.push_back(texts_of[id]);
  for (int64_t id : text_ids) txt2img.push_back(images_of[id]);
}

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.to(torch::kCPU, torch::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

Stage1Task::RetrievalSet Stage1Task::retrieval_set(const BatchLoader& loader, int64_t bs) const {
  RetrievalSet set;
  if (const auto* cd = dynamic_cast<const CaptionDataset*>(&loader.dataset())) {
    // Each distinct image once (entries grouped by image id), each caption once; the pixels are
    // decoded when a batch is encoded.
    for (int64_t i = 0; i < cd->num_images(); i += bs) set.batch_sizes.push_back(std::min(bs, cd->num_images() - i));
    set.image_batch = [cd, bs](int64_t k) {
      std::vector<torch::Tensor> imgs;
      for (int64_t i = k * bs; i < std::min((k + 1) * bs, cd->num_images()); ++i) imgs.push_back(cd->image(i));
      return torch::stack(imgs);
    };
    set.texts = cd->texts();
    set.img2txt = cd->img2txt();
    for (int64_t img : cd->txt2img()) set.txt2img.push_back({img});
    return set;
  }
  // One image and one caption per sample; a text matches every image of its image id
  // (synthetic: the same attribute combination).
  BatchLoader::Stream stream(loader, 0, 0);
  std::vector<int64_t> ids;
  auto batches = std::make_shared<std::vector<torch::Tensor>>();
  while (!stream.done()) {
    Batch b = stream.next();
    batches->push_back(b.images);
    set.batch_sizes.push_back(b.images.size(0));
    set.texts.insert(set.texts.end(), b.captions.begin(), b.captions.end());
    for (int64_t id : to_vector(b.image_ids)) ids.push_back(id);
  }
  set.image_batch = [batches](int64_t k) { return (*batches)[k]; };
  match_by_id(ids, ids, set.img2txt, set.txt2img);
  return set;
}

namespace {

// Every rank's rows of the ITC features, images [n_images, Q, E] and texts [n_texts, E], combined
// over the replicas (zero-fill + sum: exact); a rank that computed none takes the shapes from the
// others.
void combine_features(torch::Tensor& images, int64_t n_images, torch::Tensor& texts, int64_t n_texts) {
  const int64_t queries = dist::max_over(images.defined() ? images.size(1) : 0);
  const int64_t width = dist::max_over(texts.defined() ? texts.size(1) : 0);
  if (!images.defined()) images = torch::zeros({n_images, queries, width});
  if (!texts.defined()) texts = torch::zeros({n_texts, width});
  dist::combine_rows(images);
  dist::combine_rows(texts);
}

}  // namespace

Stage1Eval Stage1Task::evaluate() {
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  Stage1Eval ev;
  int64_t seen = 0;  // samples evaluated, over all ranks
  // Caption datasets: retrieval over each distinct image and each caption once (below), not
  // over the loss batches' pairs, which are kept for the other datasets.
  const bool captions = dynamic_cast<const CaptionDataset*>(&loader.dataset()) != nullptr;
  const auto& ed = cfg_.eval_dataset;
  const int64_t bs = std::max<int64_t>(1, ed.batch_size > 0 ? ed.batch_size : cfg_.runner_config.batch_size);
  // Under data parallelism each rank evaluates whole batches (batch b on dp rank b % dp, the
  // model's gathers kept local), and the sums and features are combined: the same batches as in
  // one process.
  const int64_t nb = loader.batches_per_epoch(), parts = dist::dp_size(), part = dist::dp_rank();
  const int64_t eval_bs = loader.options().batch_size, total = loader.dataset().size();
  torch::Tensor image_all, text_all;  // [N, Q, E], [N, E] for the loss batches' pairs
  std::vector<int64_t> ids(static_cast<size_t>(total), 0);
  torch::Tensor sums = torch::zeros({5}, torch::kFloat64);  // 4 losses x n, n
  Progress progress("eval", (nb - part + parts - 1) / parts, cfg_.runner_config.log_interval);
  {
    dist::LocalScope local;
    BatchLoader::Stream stream(loader, 0, part, -1, parts);
    for (int64_t done = 0; !stream.done();) {
      const int64_t b = stream.index();
      Batch batch = stream.next().to(device_);
      // The hard negatives are sampled: batch b draws from seed + b, so eval is repeatable and the
      // same on any number of ranks.
      torch::manual_seed(static_cast<uint64_t>(cfg_.seed + b));
      auto out = model_->forward(batch.images, batch.ids, batch.keep, batch.image_ids);
      const double n = static_cast<double>(batch.ids.size(0));
      auto losses = torch::stack({out.loss, out.loss_itc, out.loss_itm, out.loss_lm}).to(torch::kFloat64).cpu() * n;
      sums.narrow(0, 0, 4) += losses;
      sums[4] += n;
      if (!captions) {
        auto img = out.image_feats.to(torch::kFloat32).cpu(), txt = out.text_feat.to(torch::kFloat32).cpu();
        if (!image_all.defined()) {
          image_all = torch::zeros({total, img.size(1), img.size(2)});
          text_all = torch::zeros({total, txt.size(1)});
        }
        image_all.narrow(0, b * eval_bs, img.size(0)).copy_(img);
        text_all.narrow(0, b * eval_bs, txt.size(0)).copy_(txt);
        const auto batch_ids = to_vector(batch.image_ids);
        std::copy(batch_ids.begin(), batch_ids.end(), ids.begin() + b * eval_bs);
      }
      progress.update(++done, "");
    }
  }
  progress.finish();
  dist::combine_rows(sums);
  seen = static_cast<int64_t>(sums[4].item<double>());
  auto mean = sums / static_cast<double>(std::max<int64_t>(1, seen));
  ev.loss = mean[0].item<double>();
  ev.loss_itc = mean[1].item<double>();
  ev.loss_itm = mean[2].item<double>();
  ev.loss_lm = mean[3].item<double>();
  if (loader.skipped() > 0) log_warn("skipped " + std::to_string(loader.skipped()) + " unreadable evaluation samples");
  std::vector<torch::Tensor> image_feats, text_feats;
  if (!captions) {
    combine_features(image_all, total, text_all, total);
    auto id_rows = torch::tensor(ids, torch::kLong);
    dist::combine_rows(id_rows);
    ids = to_vector(id_rows);
    image_feats.push_back(image_all);
    text_feats.push_back(text_all);
  }

  std::vector<std::vector<int64_t>> img2txt, txt2img;
  if (captions) {
    const auto set = retrieval_set(loader, bs);
    const auto in = encode_retrieval_set(set, bs, /*image_embeds=*/false);
    image_feats.push_back(in.image_feats.to(torch::kFloat32).cpu());
    text_feats.push_back(in.text_feats.to(torch::kFloat32).cpu());
    img2txt = set.img2txt;
    txt2img = set.txt2img;
  } else {
    match_by_id(ids, ids, img2txt, txt2img);
  }
  ev.itc_retrieval = recall_at_k(max_over_queries(torch::cat(image_feats), torch::cat(text_feats)), img2txt, txt2img);
  return ev;
}

}  // namespace blip2
