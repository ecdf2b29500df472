// Stage 2: training the Q-Former's query path, query tokens, ln_vision and language_projection
// against a frozen LLM (the seed's Blip2Llm, `contrastive_language_image_pretrain` with a
// text_config), and the `image_to_text_generation` task (Blip2ImageToTextGeneration): captions
// or answers for images after a prompt.
//
// Captions are LLM-tokenised as [BOS] prompt caption [EOS], right-padded; the loss covers the
// caption and EOS only (BOS, prompt, padding and the query slots are -100). Generation prompts
// are [BOS] prompt, left-padded. A model with a random LLM (the tiny preset) first pretrains it
// on the training captions (runner_config.llm_pretrain_epochs) and writes it out as a Hugging
// Face directory (output_dir/llm).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "blip2/config/config.h"
#include "blip2/data/dataset.h"
#include "blip2/models/blip2_llm.h"
#include "blip2/text/llm_tokenizer.h"
#include "blip2/io/checkpoint.h"
#include "blip2/tasks/engine.h"

namespace blip2 {

// True when the config describes a stage-2 model (a text_config, or arch Blip2Llm /
// Blip2ImageToTextGeneration).
bool is_stage2(const RunConfig& cfg);

// The LLM tokenizer for a dataset section: its tokenizer.vocab_file (a tokenizer.model, or a
// directory with it or with vocab.json + merges.txt), else the LLM checkpoint directory's, else
// the model directory's, else (SyntheticShapes data) the built-in WordPiece vocabulary. Checked against the LLM's vocabulary.
std::shared_ptr<LlmTokenizer> stage2_tokenizer(const DatasetConfig& d, const Blip2Config& c,
                                               const std::string& section);

struct CaptionTargets {
  torch::Tensor ids, keep, labels;  // [B, L]
};
// [BOS] text [EOS] per caption (captions already include the prompt), truncated to max_length,
// `repeats` times in a row, right-padded; labels -100 on padding, the first BOS and the first
// `prompt_tokens` text tokens.
CaptionTargets caption_targets(const LlmTokenizer& tok, const std::vector<std::string>& captions,
                               int64_t prompt_tokens, int64_t max_length, int64_t eos_id, int64_t repeats = 1);

// Of a synthetic-shapes caption: are colour and shape those of class `label_name`
// ("red circle")? The first colour word and the first shape word must be the label's.
bool caption_names_class(const std::string& caption, const std::string& label_name,
                         const std::vector<std::string>& class_names);

// The text after each image's prompt: prompts tokenised ([BOS] prompt, left-padded), generated,
// decoded without special tokens and stripped. images [B,3,S,S]; prompts: one per image.
std::vector<std::string> generate_texts(Blip2LlmImpl& model, const LlmTokenizer& tok, const torch::Tensor& images,
                                        const std::vector<std::string>& prompts, const GenerationOptions& o,
                                        GenerationStats* stats = nullptr);

class Stage2Task {
 public:
  explicit Stage2Task(RunConfig cfg);
  // Trains on train_dataset (the engine: resume, accumulation, checkpoints, metrics), after
  // pretraining a random LLM on the captions when llm_pretrain_epochs asks.
  // `probe` sees each step's averaged gradients (tests).
  std::vector<StepLog> train(const GradientProbe& probe = {});
  // eval_dataset: mean caption loss; with labelled synthetic data also the share of images
  // whose greedy caption names colour and shape right, and some examples.
  nlohmann::json evaluate();
  // Generated text for each image of `inputs` (paths or directories; empty = eval_dataset),
  // after the prompt hypothesis_template holds `prompt`.
  nlohmann::json predict(const std::vector<std::string>& inputs, const std::string& prompt);
  // Texts for preprocessed images [B,3,S,S] after their prompts (filled in already).
  std::vector<std::string> generate(const torch::Tensor& images, const std::vector<std::string>& prompts,
                                    const GenerationOptions& o, GenerationStats* stats = nullptr);
  // Loads weights (a checkpoint, output directory, Hugging Face or LAVIS file) into the model.
  void load_weights(const std::string& path);
  Blip2Llm model() const { return model_; }
  std::shared_ptr<LlmTokenizer> tokenizer() const { return tokenizer_; }
  const RunConfig& config() const { return cfg_; }

 private:
  void pretrain_llm(const BatchLoader& loader);
  void resume_weights(const std::string& dir);
  BatchLoader make_loader(const DatasetConfig& d, bool train) const;
  int64_t prompt_tokens(const DatasetConfig& d) const;

  RunConfig cfg_;
  torch::Device device_;
  Blip2Llm model_{nullptr};
  std::shared_ptr<LlmTokenizer> tokenizer_;
  WeightLedger ledger_;  // which tensors hold loaded (or pretrained) weights
};

}  // namespace blip2
