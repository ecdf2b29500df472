// The contrastive_language_image_pretrain task: stage-1 training and loss evaluation.
//
// Training: frozen ViT, AdamW (no weight decay on biases and 1-D parameters), linear warmup
// then cosine, optional clipping and bf16 autocast (CUDA), atomic checkpoints with everything
// needed to resume bit-for-bit (weights, optimizer, RNG, data position), a progress line, and
// metrics as JSON lines in the output directory.
#pragma once

#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/data/dataset.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/safetensors.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/zero_shot.h"

namespace blip2 {

struct StepLog {
  int64_t step = 0, epoch = 0;
  double loss = 0, loss_itc = 0, loss_itm = 0, loss_lm = 0, lr = 0, samples_per_s = 0;
};

// Recall@K in both directions. img2txt[i] lists the texts that match image i, txt2img[t] the
// images that match text t; a query counts as a hit if any of its matches ranks within K.
struct RetrievalMetrics {
  double txt_r1 = 0, txt_r5 = 0, txt_r10 = 0;  // image -> text
  double img_r1 = 0, img_r5 = 0, img_r10 = 0;  // text -> image
  int64_t num_images = 0, num_texts = 0;
};
// Recall@1/5/10 (in %) of one direction: scores [queries, candidates], gt[q] the matching
// candidates. A query's rank is the number of candidates scoring strictly higher than its best
// match (ties count in its favour).
struct Recall {
  double r1 = 0, r5 = 0, r10 = 0;
};
Recall recall(const torch::Tensor& scores, const std::vector<std::vector<int64_t>>& gt);
RetrievalMetrics recall_at_k(const torch::Tensor& sim_i2t,
                             const std::vector<std::vector<int64_t>>& img2txt,
                             const std::vector<std::vector<int64_t>>& txt2img);

struct Stage1Eval {
  double loss = 0, loss_itc = 0, loss_itm = 0, loss_lm = 0;
  RetrievalMetrics itc_retrieval;  // from ITC similarities alone
  nlohmann::json to_json() const;
};

// lr at optimizer step `step` (0-based): linear from warmup_lr_init to learning_rate over
// warmup_steps, then cosine from learning_rate to lr_end at total_steps.
double warmup_cosine_lr(const LrScheduleConfig& s, int64_t step, int64_t total_steps);

// The device device_target names: cpu, cuda (the current device) or cuda:N.
torch::Device parse_device(const std::string& target);
// The same, checked against this machine (an error naming the target when it has no such device).
torch::Device pick_device(const std::string& target);
void set_lr(torch::optim::Optimizer& opt, double lr);
// AdamW over the trainable parameters of `model`, weight decay off for biases and 1-D
// parameters (group 0: decayed, group 1: not); `trainable` receives their element count.
std::unique_ptr<torch::optim::AdamW> make_adamw(const torch::nn::Module& model, const OptimizerConfig& oc,
                                              double lr, int64_t* trainable = nullptr);

// output_dir/checkpoint/step_N written by `fill` into a temporary directory, then renamed into
// place and named by checkpoint/latest: an interrupted save leaves the previous one intact.
std::filesystem::path write_checkpoint(const std::string& output_dir, int64_t step,
                                       const std::function<void(const std::filesystem::path& tmp)>& fill);

// The batch loader of a dataset section of `cfg` (training: shuffled, drop_remainder; else in
// order, every sample); `tokenizer` null leaves ids/mask undefined (stage 2 tokenises itself).
BatchLoader make_batch_loader(const RunConfig& cfg, const DatasetConfig& d, bool train,
                              std::shared_ptr<const WordPieceTokenizer> tokenizer);

// Where a run stands; saved in each checkpoint.
struct TrainState {
  int64_t step = 0;   // optimizer steps done
  int64_t epoch = 0;  // current epoch
  int64_t batch = 0;  // next batch within the epoch
};

// trainer_state.pt of a checkpoint: the optimizer, the position (TrainState) and every random
// generator, enough to continue bit for bit.
void save_train_state(const std::filesystem::path& file, torch::optim::Optimizer& opt, const TrainState& st,
                      torch::Device device);
TrainState load_train_state(const std::string& checkpoint_dir, torch::optim::Optimizer& opt, torch::Device device);
// The checkpoint directory --resume_training continues from (load_checkpoint resolved, with a
// trainer_state.pt).
std::string resume_checkpoint_dir(const RunConfig& cfg);
// output_dir/metrics.jsonl opened for appending; a resumed run keeps the lines of the steps up
// to `keep_through` and drops the rest.
std::ofstream open_metrics(const std::string& output_dir, int64_t keep_through);

// runner_config.bf16_autocast for a scope: bf16 autocast on CUDA (validate() refuses it on the
// CPU, where it would do nothing); a no-op when disabled.
class AutocastGuard {
 public:
  AutocastGuard(bool enabled, const torch::Device& device);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

class PretrainTrainer {
 public:
  // Builds the model the config describes and loads its weights (model_config's vision and model
  // checkpoint_name_or_path, then load_checkpoint).
  explicit PretrainTrainer(RunConfig cfg);
  // Works on a model already built (and its tokenizer); load_checkpoint still applies.
  // `random_weights`: the tensors its loads left at their initialisation (a task needing those
  // refuses); nullopt when no weights were ever loaded into it.
  PretrainTrainer(RunConfig cfg, Blip2Qformer model, std::shared_ptr<WordPieceTokenizer> tokenizer,
                  std::optional<std::vector<std::string>> random_weights = std::nullopt);
  std::vector<StepLog> train();
  Stage1Eval evaluate();
  // The image_to_text_retrieval task on eval_dataset (ITC top-k, ITM re-ranking).
  nlohmann::json evaluate_retrieval();
  // zero_shot_image_classification. Label probabilities = softmax over labels of
  // (max over queries of the cosine) / temp. evaluate: top-1/top-5 accuracy on a labelled
  // eval_dataset; predict: the sorted {score, label} list of each image of `inputs` (paths or
  // directories), or of each eval_dataset image when `inputs` is empty.
  nlohmann::json evaluate_zero_shot();
  nlohmann::json predict_zero_shot(const std::vector<std::string>& inputs);
  // The classifier the config describes: eval_dataset's candidate_labels (else `labels`),
  // hypothesis_template, itm_top_k and text transform.
  ZeroShotClassifier zero_shot_classifier(std::vector<std::string> labels) const;
  Blip2Qformer model() const { return model_; }
  std::shared_ptr<WordPieceTokenizer> tokenizer() const { return tokenizer_; }
  // Loads weights into the model (a checkpoint, output directory, HF or LAVIS file); together
  // with the earlier loads they must cover the model (WeightLedger).
  void load_weights(const std::string& path);
  // The model's tensors still at their random initialisation after its loads ({} if none).
  std::vector<std::string> missing_weights() const;
  // An error naming `task` when a loaded checkpoint lacked parameters under these prefixes
  // (e.g. "itm_head."). A model never loaded (random init) passes.
  void require_weights(const std::vector<std::string>& prefixes, const std::string& task) const;
  const RunConfig& config() const { return cfg_; }

 private:
  void save_checkpoint(const TrainState& st, torch::optim::Optimizer& opt);
  TrainState resume(torch::optim::Optimizer& opt);
  BatchLoader make_loader(const DatasetConfig& d, bool train) const;

  RunConfig cfg_;
  torch::Device device_;
  Blip2Qformer model_{nullptr};
  std::shared_ptr<WordPieceTokenizer> tokenizer_;
  WeightLedger ledger_;  // which tensors hold loaded weights
};

// The model a config describes, with the weights its vision_config and model_config
// checkpoint_name_or_path name (random where none is named), loaded through `ledger` (whose
// check() the caller runs once every load is done).
Blip2Qformer build_model(const Blip2Config& config, WeightLedger& ledger);
// Loads weights from a checkpoint, training output directory (its latest), Hugging Face
// directory, LAVIS .pth or safetensors file (those under `prefix` only) through `ledger`.
LoadReport load_model_weights(torch::nn::Module& model, const std::string& path, WeightLedger& ledger,
                              const std::string& prefix = "");
// The architecture the run's checkpoints describe becomes the run's (adopt_architecture), in
// order: vision_config's, text_config's (an LLM directory), model_config's, then load_checkpoint's;
// the config is validated again after, and its max_image_pixels applied.
void adopt_checkpoint_architectures(RunConfig& cfg);
// Weights for a model built already: the architecture their config describes (if any) must be
// `built`'s, field for field, else an Error naming the field, both values and the file.
void require_checkpoint_architecture(const Blip2Config& built, const std::string& path);
// What a run may leave without checkpoint weights (CoveragePolicy) when `training` or not.
CoveragePolicy coverage_policy(const RunConfig& cfg, bool training);
// The tokenizer `tc` describes, checked against the Q-Former's vocabulary and special ids.
std::shared_ptr<WordPieceTokenizer> model_tokenizer(const TokenizerConfig& tc, const QFormerConfig& q,
                                                    const std::string& section);

// An error naming `task` when `missing` (what a checkpoint lacked) has a name under one of the
// prefixes, e.g. "itm_head." for ITM re-ranking.
void require_weights(const std::vector<std::string>& missing, const std::vector<std::string>& prefixes,
                     const std::string& task);

}  // namespace blip2
