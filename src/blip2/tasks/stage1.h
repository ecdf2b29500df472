// Stage 1 (the contrastive_language_image_pretrain task without an LLM): Q-Former training with
// ITC, ITM and LM losses on the training engine, loss evaluation, and the tasks a stage-1 model
// serves: image_to_text_retrieval (retrieval_eval.cpp) and zero_shot_image_classification
// (zero_shot_eval.cpp).
#pragma once

#include <functional>

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "blip2/config/config.h"
#include "blip2/data/dataset.h"
#include "blip2/io/checkpoint.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/engine.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/zero_shot.h"
#include "blip2/text/text.h"

namespace blip2 {

struct RetrievalInputs;  // tasks/retrieval.h

struct Stage1Eval {
  double loss = 0, loss_itc = 0, loss_itm = 0, loss_lm = 0;
  RetrievalMetrics itc_retrieval;  // from ITC similarities alone
  nlohmann::json to_json() const;
};

class Stage1Task {
 public:
  // Builds the model the config describes and loads its weights (model_config's vision and model
  // checkpoint_name_or_path, then load_checkpoint).
  explicit Stage1Task(RunConfig cfg);
  // Works on a model already built (and its tokenizer); load_checkpoint still applies.
  // `random_weights`: the tensors its loads left at their initialisation (a task needing those
  // refuses); nullopt when no weights were ever loaded into it.
  Stage1Task(RunConfig cfg, Blip2Qformer model, std::shared_ptr<WordPieceTokenizer> tokenizer,
             std::optional<std::vector<std::string>> random_weights = std::nullopt);
  // Trains on train_dataset (the engine: resume, accumulation, checkpoints, metrics).
  // `probe` sees each step's averaged gradients (tests).
  std::vector<StepLog> train(const GradientProbe& probe = {});
  // The losses on eval_dataset (each batch's image ids as in training; hard negatives drawn
  // with the run's seed) and ITC retrieval recall, texts matching images by image id.
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
  BatchLoader make_loader(const DatasetConfig& d, bool train) const;
  // The images and texts of eval_dataset retrieval ranks, and which match (by image id): for a
  // caption dataset each distinct image once and each caption once; otherwise each sample's
  // image and caption (samples of one image id then match each other's texts).
  struct RetrievalSet {
    std::vector<int64_t> batch_sizes;             // images per batch
    std::function<torch::Tensor(int64_t k)> image_batch;  // batch k preprocessed, [b,3,S,S]
    std::vector<std::string> texts;             // raw captions
    std::vector<std::vector<int64_t>> img2txt, txt2img;
  };
  RetrievalSet retrieval_set(const BatchLoader& loader, int64_t batch_size) const;
  // The set's ITC features (and, with image_embeds, the ViT outputs ITM re-ranking reads, kept on
  // the host), texts tokenised as eval_dataset's text transform says and encoded in chunks of
  // batch_size. Images are decoded a batch at a time. Under data parallelism image batch / text
  // chunk k is encoded on dp rank k % dp and every rank's rows are combined (zero-fill + sum:
  // exactly the one-process features).
  RetrievalInputs encode_retrieval_set(const RetrievalSet& set, int64_t batch_size, bool image_embeds);

  RunConfig cfg_;
  torch::Device device_;
  Blip2Qformer model_{nullptr};
  std::shared_ptr<WordPieceTokenizer> tokenizer_;
  WeightLedger ledger_;  // which tensors hold loaded weights
};

}  // namespace blip2
