// The public face of blip2cpp, in the seed's calling style (MindFormers' `from_pretrained`,
// `show_support_list()`, `Trainer(task=..., model=...)`, `pipeline(task, model=...)`):
//
//   auto model = blip2::Blip2Model::from_pretrained("blip2_stage1_classification");
//   auto classify = blip2::pipeline("zero_shot_image_classification", model,
//                                   {.candidate_labels = {"sunflower", "tree", "dog", "cat", "toy"}});
//   nlohmann::json result = classify({"sunflower.png"});
//
//   blip2::Trainer trainer("image_to_text_retrieval", "blip2_stage1_vit_g", {.config = "run.yaml"});
//   nlohmann::json metrics = trainer.evaluate();
//
// A model name is one of the support list; its weights are read from $BLIP2_HOME/<name>
// (default ~/.cache/blip2cpp), never downloaded. A path is a blip2cpp model directory or
// checkpoint (config.yaml + model.safetensors), a training output directory, or a Hugging Face
// directory (config.json + safetensors).
#pragma once

#include <functional>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "blip2/config/config.h"
#include "blip2/io/safetensors.h"
#include "blip2/models/blip2_llm.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/text/llm_tokenizer.h"
#include "blip2/text/text.h"
#include "blip2/vision/image.h"

namespace blip2 {

class Stage1Task;
class Stage2Task;
class Blip2GenerationModel;

// The architecture a name or path describes: a preset of the support list, a Hugging Face
// directory (config.json), a blip2cpp directory or checkpoint (config.yaml), a training output
// directory (its latest checkpoint), or a config YAML file (run config or model config).
Blip2Config model_config_of(const std::string& name_or_path);

struct FromPretrainedOptions {
  std::string device = "cpu";  // cpu | cuda | cuda:N
  // Weights that leave tensors of the model random (or bring tensors it has no place for) are an
  // error unless this is true (model_config.allow_partial_load).
  bool allow_partial_load = false;
  // BERT's vocab.txt. "" = vocab.txt beside the weights when there is one, else the built-in
  // synthetic vocabulary when the model's vocabulary is that size (the tiny preset).
  std::string vocab_file;
  // A preset name with no weights under $BLIP2_HOME: random weights instead of an error (for
  // training from scratch; the tiny preset has no published weights and always allows it).
  bool allow_random_init = false;
  // The architecture of a bare weight file (a .pth or .safetensors path): a preset name or a
  // config YAML. Directories bring their own (config.yaml or config.json).
  std::string config = "blip2_stage1_vit_g";
  // "int8": quantise the ViT's linear layers as they load (model_config.weights); "" = as the
  // weights are (a directory blip2 quantize wrote is int8 already).
  std::string weights;
};

// A stage-1 BLIP-2 (EVA ViT + Q-Former with its ITC/ITM/LM heads) with the tokenizer it reads
// text with: the seed's Blip2Qformer / Blip2Classifier.
class Blip2Model {
 public:
  static Blip2Model from_pretrained(const std::string& name_or_path,
                                    const FromPretrainedOptions& options = {});
  // The named models (presets) this build knows, and the seed's printout of them.
  static std::vector<std::string> support_list();
  static void show_support_list(std::ostream& out);

  Blip2Model(Blip2Qformer module, std::shared_ptr<WordPieceTokenizer> tokenizer, std::string source,
             std::vector<std::string> missing_weights = {});

  // Images as the model sees them: decoded, resized (Pillow bicubic) and normalised, [B,3,S,S]
  // on the model's device.
  torch::Tensor preprocess(const std::vector<Image>& images) const;
  torch::Tensor preprocess(const std::vector<std::string>& image_paths) const;
  // Texts cleaned like captions and tokenised: {ids, keep} on the model's device, padded to
  // max_length (0 = the model's max_txt_len; more than the Q-Former's positions is an error).
  std::pair<torch::Tensor, torch::Tensor> tokenize(const std::vector<std::string>& texts,
                                                   int64_t max_length = 0) const;

  // LAVIS' extract_features: mode "image", "text" or "multimodal" (pairs images[i], texts[i]).
  Features extract_features(const torch::Tensor& images, const std::vector<std::string>& texts,
                            const std::string& mode) const;
  // The stage-1 training losses (ITC, ITM with hard negatives, LM) of image-caption pairs.
  Stage1Output losses(const torch::Tensor& images, const std::vector<std::string>& captions) const;

  // config.yaml + model.safetensors, loadable by from_pretrained (written atomically).
  void save_pretrained(const std::string& dir) const;

  Blip2Qformer module() const { return module_; }
  std::shared_ptr<WordPieceTokenizer> tokenizer() const { return tokenizer_; }
  const Blip2Config& config() const { return module_->config(); }
  torch::Device device() const { return module_->temp.device(); }
  const std::string& source() const { return source_; }  // where the weights came from
  // Parameters the checkpoint did not have (left at random init); tasks that need them refuse.
  const std::vector<std::string>& missing_weights() const { return missing_; }
  // The same, or nullopt when no weights were loaded at all (random, for training from scratch).
  std::optional<std::vector<std::string>> random_weights() const;

 private:
  Blip2Qformer module_;
  std::shared_ptr<WordPieceTokenizer> tokenizer_;
  std::string source_;
  std::vector<std::string> missing_;
};

// ---- Trainer ----

struct TrainerOptions {
  // A run config YAML to start from ("" = the embedded tiny config); the task, model and the
  // fields below override it.
  std::string config;
  std::string output_dir;                       // "" = the config's
  std::optional<DatasetConfig> train_dataset;   // "" = the config's
  std::optional<DatasetConfig> eval_dataset;
  std::optional<int64_t> seed;
  std::string device;                           // "" = the config's device_target
};

// Trainer(task, model, options): the seed's Trainer. `model` is a name of the support list or a
// path (see the top of this file), or an already loaded Blip2Model. Tasks:
// contrastive_language_image_pretrain (train, evaluate = losses + ITC retrieval, predict =
// features), image_to_text_retrieval (evaluate), zero_shot_image_classification (evaluate,
// predict). Stage 2 (a stage-2 preset or config, or task image_to_text_generation):
// train (contrastive_language_image_pretrain), evaluate (caption loss; synthetic: caption
// accuracy), predict(images, checkpoint, {prompt}) = [{image, prompt, text}].
class Trainer {
 public:
  Trainer(const std::string& task, const std::string& model, const TrainerOptions& options = {});
  Trainer(const std::string& task, const Blip2Model& model, const TrainerOptions& options = {});
  // From a complete run config (what `blip2 run` does): the model it describes, or `model`.
  explicit Trainer(RunConfig config);
  Trainer(RunConfig config, const Blip2Model& model);
  ~Trainer();
  Trainer(Trainer&&) noexcept;

  // Trains and returns {"steps": n, "final": {losses}, "checkpoint": dir}.
  nlohmann::json train();
  nlohmann::json evaluate();
  // Predicts on image paths (or directories); `checkpoint` ("" = the model as loaded) names
  // weights to load first. zero_shot_image_classification: [{image, result: [{score,label}]}].
  // contrastive_language_image_pretrain: LAVIS' extract_features of the images (image mode),
  // the texts (text mode) and, when both are given in equal numbers, the pairs (multimodal),
  // written to OUTPUT_DIR/features.safetensors; returns the inputs and each tensor's shape.
  nlohmann::json predict(const std::vector<std::string>& inputs, const std::string& checkpoint = "",
                         const std::vector<std::string>& texts = {});

  const RunConfig& config() const;
  Blip2Model model() const;                      // stage 1
  Blip2GenerationModel generation_model() const;  // stage 2

 private:
  std::unique_ptr<Stage1Task> impl_;
  std::unique_ptr<Stage2Task> stage2_;
};

// ---- pipeline ----

struct PipelineOptions {
  // zero_shot_image_classification
  std::vector<std::string> candidate_labels;
  std::string hypothesis_template = "This is a photo of {}.";
  std::vector<std::string> hypothesis_templates;  // several: a label scores its best (replaces the one above)
  int64_t top_k = 0;       // labels per image in the result (0 = all)
  int64_t itm_top_k = 0;   // re-rank the best labels by ITM + ITC (0 = ITC only, as the seed)
  // Tokens per label sentence: 0 = the model's max_txt_len; more than the Q-Former's
  // max_position_embeddings is an error.
  int64_t max_length = 0;
  // feature_extraction: "image", "text" or "multimodal"
  std::string mode = "image";
  // loading a model by name or path
  FromPretrainedOptions load;
};

using PipelineInput = std::variant<std::string, Image>;  // a path or a decoded image

// A callable task: zero_shot_image_classification returns, per image, the sorted
// [{"score", "label"}] list; feature_extraction returns {"image_embeds": [B,Q,H] shape, ...}
// and keeps the tensors in last_features().
class Pipeline {
 public:
  Pipeline(std::string task, Blip2Model model, PipelineOptions options);
  nlohmann::json operator()(const std::vector<PipelineInput>& images,
                            const std::vector<std::string>& texts = {});
  nlohmann::json operator()(const PipelineInput& image) { return (*this)(std::vector<PipelineInput>{image}); }
  const Features& last_features() const { return features_; }
  const std::string& task() const { return task_; }
  const Blip2Model& model() const { return model_; }

 private:
  void init();
  std::string task_;
  Blip2Model model_;
  PipelineOptions options_;
  std::shared_ptr<class ZeroShotClassifier> classifier_;
  Features features_;
};

// The pipeline tasks: zero_shot_image_classification, feature_extraction.
std::vector<std::string> pipeline_tasks();
Pipeline pipeline(const std::string& task, const std::string& model, PipelineOptions options = {});
Pipeline pipeline(const std::string& task, const Blip2Model& model, PipelineOptions options = {});

// ---- stage 2: image-to-text generation ----

struct GenerationModelOptions {
  std::string device = "cpu";  // cpu | cuda | cuda:N
  bool allow_partial_load = false;  // as FromPretrainedOptions
  // The LLM's tokenizer (tokenizer.model, or a directory with it or vocab.json + merges.txt).
  // "" = the one in the LLM or model directory, else the built-in vocabulary (tiny_stage2).
  std::string tokenizer;
  bool allow_random_init = false;  // a preset name with no weights: random weights, no error
  // "int8": quantise the ViT's and the LLM's linear layers as they load (model_config.weights);
  // "" = as the weights are (a directory blip2 quantize wrote is int8 already).
  std::string weights;
};

// A stage-2 BLIP-2 (ViT, Q-Former query path, language_projection, LLM) with its LLM
// tokenizer: the seed's Blip2ImageToTextGeneration.
class Blip2GenerationModel {
 public:
  // A preset name (itt_blip2_stage2_vit_g_llama_7b, blip2_opt_2.7b, tiny_stage2, ...: weights
  // from $BLIP2_HOME/<name>), a Hugging Face Blip2ForConditionalGeneration directory, or a
  // stage-2 training output directory / checkpoint.
  static Blip2GenerationModel from_pretrained(const std::string& name_or_path,
                                              const GenerationModelOptions& options = {});
  Blip2GenerationModel(Blip2Llm module, std::shared_ptr<LlmTokenizer> tokenizer, std::string source);
  torch::Tensor preprocess(const std::vector<PipelineInput>& images) const;
  // The text after each image's prompt (`prompts`: one per image, or one for all; "" = none).
  std::vector<std::string> generate(const torch::Tensor& images, const std::vector<std::string>& prompts,
                                    const GenerationOptions& options) const;
  GenerationOptions generation_options() const { return GenerationOptions::from(module_->text_config()); }
  Blip2Llm module() const { return module_; }
  std::shared_ptr<LlmTokenizer> tokenizer() const { return tokenizer_; }
  const Blip2Config& config() const { return module_->config(); }
  torch::Device device() const { return module_->query_tokens.device(); }
  const std::string& source() const { return source_; }

 private:
  Blip2Llm module_;
  std::shared_ptr<LlmTokenizer> tokenizer_;
  std::string source_;
};

struct ImageToTextOptions {
  // The seed's: prompt = hypothesis_template.format(prompt); "{}" passes the prompt as given.
  std::string hypothesis_template = "{}";
  std::optional<GenerationOptions> generation;  // default: the model's text_config settings
  GenerationModelOptions load;                  // loading a model by name or path
};

// pipeline("image_to_text_generation"): [{"text", "prompt"}] per image.
class ImageToTextPipeline {
 public:
  ImageToTextPipeline(Blip2GenerationModel model, ImageToTextOptions options);
  nlohmann::json operator()(const std::vector<PipelineInput>& images, const std::string& prompt = "");
  nlohmann::json operator()(const PipelineInput& image, const std::string& prompt = "") {
    return (*this)(std::vector<PipelineInput>{image}, prompt);
  }
  const Blip2GenerationModel& model() const { return model_; }

 private:
  Blip2GenerationModel model_;
  ImageToTextOptions options_;
};
ImageToTextPipeline image_to_text_pipeline(const std::string& model, ImageToTextOptions options = {});
ImageToTextPipeline image_to_text_pipeline(const Blip2GenerationModel& model, ImageToTextOptions options = {});

// Features as named safetensors (image_embeds, image_embeds_proj, text_embeds, text_embeds_proj,
// multimodal_embeds: those defined), written atomically.
void save_features(const std::string& path, const Features& f);
// The defined features by name, on the CPU; and their shapes as JSON {name: [dims]}.
TensorMap feature_tensors(const Features& f);
nlohmann::json feature_shapes(const Features& f);

}  // namespace blip2
