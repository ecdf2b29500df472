// Stage 2 of BLIP-2: frozen ViT -> Q-Former (query path only) -> language_projection -> frozen
// decoder LLM, the projected queries placed before the text embeddings (LAVIS blip2_opt.py,
// MindFormers Blip2Llm / Blip2ImageToTextGeneration, Hugging Face Blip2ForConditionalGeneration).
//
// Parameter names are Hugging Face's: vision_model.*, query_tokens, qformer.* (no text FFN),
// language_projection, language_model.* (the LLM's own names).
//
// Shapes: B batch, Q queries, L text tokens, H LLM width, V vocabulary.
#pragma once

#include <optional>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/models/eva_vit.h"
#include "blip2/models/generation.h"
#include "blip2/models/llm/llm.h"
#include "blip2/models/qformer.h"

namespace blip2 {

class Blip2LlmImpl : public torch::nn::Module {
 public:
  // `frozen` (when given) creates the frozen ViT and LLM instead of `init`: e.g. bfloat16 directly
  // on the GPU, so a 7B LLM never exists in float32 or twice. ln_vision stays float32.
  explicit Blip2LlmImpl(const Blip2Config& config, const InitOptions& init = {},
                        const std::optional<InitOptions>& frozen = std::nullopt);

  // ln_vision(ViT(images)) [B, N, Dv]; without autograd when the ViT is frozen.
  torch::Tensor encode_image(const torch::Tensor& images);
  // language_projection(Q-Former queries) [B, Q, H]: the soft prompt of each image.
  torch::Tensor image_prefix(const torch::Tensor& images);
  // Logits [B, Q + L, V] of [prefix; text] where ids, keep [B, L] (left or right padded).
  // vocab_local: this tp rank's slice of the vocabulary (see CausalLMImpl::forward).
  torch::Tensor forward(const torch::Tensor& images, const torch::Tensor& ids, const torch::Tensor& keep,
                        bool vocab_local = false);
  // The captioning loss: next-token cross-entropy (mean, no smoothing) over the text positions
  // whose label is not -100, the last query slot predicting the first text token (LAVIS' layout).
  // labels [B, L].
  torch::Tensor loss(const torch::Tensor& images, const torch::Tensor& ids, const torch::Tensor& keep,
                     const torch::Tensor& labels);
  // New tokens for each image after its (left-padded) prompt.
  std::vector<std::vector<int64_t>> generate(const torch::Tensor& images, const torch::Tensor& ids,
                                             const torch::Tensor& keep, const GenerationOptions& o,
                                             GenerationStats* stats = nullptr);
  // Keeps the frozen ViT and LLM in eval mode whatever train() is asked of the rest.
  void train(bool on = true) override;
  const Blip2Config& config() const { return config_; }
  const TextConfig& text_config() const { return *config_.text_config; }

  EvaVisionModel vision_model{nullptr};
  torch::Tensor query_tokens;  // [1, Q, Hq]
  QFormerModel qformer{nullptr};
  Linear language_projection{nullptr};
  std::shared_ptr<CausalLMImpl> language_model;

 private:
  Blip2Config config_;
};
TORCH_MODULE(Blip2Llm);

// Hugging Face's <image>-token layout: input ids that begin (after any left padding) with the
// Q placeholder ids the processor adds. Returns ids and keep without those columns, so a
// transformers-style batch can be given to generate()/forward(). Rows must hold the same number.
std::pair<torch::Tensor, torch::Tensor> strip_image_tokens(const torch::Tensor& ids, const torch::Tensor& keep,
                                                           int64_t image_token_id);

// Next-token cross-entropy: logits [B, T, V] against labels [B, T] shifted by one, -100 ignored
// (next_token_loss without smoothing; global_tokens: model_config.lm_loss_normalization).
torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels, bool global_tokens = false,
                             bool vocab_parallel = false);

}  // namespace blip2
