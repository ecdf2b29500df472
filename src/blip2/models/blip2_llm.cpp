#include "blip2/models/blip2_llm.h"

#include "blip2/util/common.h"

namespace blip2 {

Blip2LlmImpl::Blip2LlmImpl(const Blip2Config& c, const InitOptions& init, const std::optional<InitOptions>& frozen)
    : config_(c) {
  check(c.text_config.has_value(), "a stage-2 model needs model_config.text_config (the LLM)");
  const auto& q = c.qformer_config;
  InitOptions vit_init = init;
  vit_init.std = c.vision_config.initializer_range;
  InitOptions bert_init = init;
  bert_init.std = q.initializer_range;
  InitOptions head_init = init;
  head_init.std = -1;  // torch.nn.Linear's default, as LAVIS creates opt_proj

  if (frozen && c.freeze_vision) vit_init.options = frozen->options;
  vision_model = register_module("vision_model", EvaVisionModel(c.vision_config, vit_init));
  vision_model->post_layernorm->to(torch::kFloat32);  // ln_vision trains (float32)
  {
    torch::NoGradGuard no_grad;
    query_tokens = register_parameter("query_tokens", torch::empty({1, q.query_length, q.hidden_size}, init.options));
    if (init.draw) query_tokens.normal_(0.0, q.initializer_range);
  }
  qformer = register_module("qformer", QFormerModel(q, c.encoder_width(), bert_init, /*text_path=*/false));
  language_projection = register_module(
      "language_projection", Linear(q.hidden_size, c.text_config->hidden_size, true, head_init));
  InitOptions llm_init = init;
  if (frozen && c.freeze_text) llm_init.options = frozen->options;
  language_model = register_module("language_model", make_causal_lm(*c.text_config, llm_init));

  if (c.freeze_vision) {
    for (auto& p : vision_model->named_parameters())
      if (p.key().rfind("post_layernorm.", 0) != 0) p.value().set_requires_grad(false);
  }
  if (c.freeze_text)
    for (auto& p : language_model->parameters()) p.set_requires_grad(false);
  train(is_training());
}

void Blip2LlmImpl::train(bool on) {
  torch::nn::Module::train(on);
  if (config_.freeze_vision) vision_model->eval();
  if (config_.freeze_text) language_model->eval();
}

torch::Tensor Blip2LlmImpl::encode_image(const torch::Tensor& images) {
  torch::Tensor feats;
  if (config_.freeze_vision) {
    torch::NoGradGuard no_grad;
    feats = vision_model->forward_features(images.to(vision_model->embeddings->position_embedding.scalar_type()));
  } else {
    feats = vision_model->forward_features(images.to(vision_model->embeddings->position_embedding.scalar_type()));
  }
  // ln_vision and the Q-Former run in fp32 (transformers keeps the Q-Former in fp32 too).
  return vision_model->post_layernorm(feats.to(torch::kFloat32));
}

torch::Tensor Blip2LlmImpl::image_prefix(const torch::Tensor& images) {
  auto image_embeds = encode_image(images);
  auto queries = query_tokens.expand({image_embeds.size(0), -1, -1});
  auto hidden = qformer->forward(queries, torch::Tensor(), queries.size(1), image_embeds).last_hidden_state;
  return language_projection(hidden);
}

torch::Tensor Blip2LlmImpl::forward(const torch::Tensor& images, const torch::Tensor& ids,
                                    const torch::Tensor& keep, bool vocab_local) {
  auto prefix = image_prefix(images);
  auto text = language_model->embed(ids);
  auto embeds = torch::cat({prefix.to(text.scalar_type()), text}, 1);
  auto k = torch::cat({torch::ones({ids.size(0), prefix.size(1)}, keep.options().dtype(torch::kLong)),
                       keep.to(torch::kLong)}, 1);
  return language_model->forward(embeds, k, positions_from_keep(k, k.size(1)), nullptr, false, vocab_local);
}

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels, bool global_tokens,
                             bool vocab_parallel) {
  return next_token_loss(logits, labels, 0.0, global_tokens, vocab_parallel);
}

torch::Tensor Blip2LlmImpl::loss(const torch::Tensor& images, const torch::Tensor& ids,
                                 const torch::Tensor& keep, const torch::Tensor& labels) {
  check(labels.sizes() == ids.sizes(), "stage-2 loss: labels and ids differ in shape");
  auto logits = forward(images, ids, keep, /*vocab_local=*/true);
  const int64_t q = logits.size(1) - ids.size(1);
  auto full = torch::cat({torch::full({ids.size(0), q}, -100, labels.options()), labels}, 1);
  return causal_lm_loss(logits, full, config_.lm_loss_normalization == "global_tokens", /*vocab_parallel=*/true);
}

std::vector<std::vector<int64_t>> Blip2LlmImpl::generate(const torch::Tensor& images, const torch::Tensor& ids,
                                                         const torch::Tensor& keep, const GenerationOptions& o,
                                                         GenerationStats* stats) {
  torch::NoGradGuard no_grad;
  auto prefix = image_prefix(images);
  check(prefix.size(0) == ids.size(0), "generation: " + std::to_string(prefix.size(0)) + " images but " +
                                           std::to_string(ids.size(0)) + " prompts");
  return blip2::generate(*language_model, prefix, ids, keep, o, stats);
}

std::pair<torch::Tensor, torch::Tensor> strip_image_tokens(const torch::Tensor& ids, const torch::Tensor& keep,
                                                           int64_t image_token_id) {
  auto is_image = ids == image_token_id;
  auto counts = is_image.sum(1);
  if (counts.max().item<int64_t>() == 0) return {ids, keep};
  check(counts.min().item<int64_t>() == counts.max().item<int64_t>(),
        "prompt ids: rows hold different numbers of <image> tokens (" +
            std::to_string(image_token_id) + ")");
  auto rest = is_image.logical_not();
  const int64_t n = ids.size(1) - counts[0].item<int64_t>();
  return {ids.masked_select(rest).view({ids.size(0), n}), keep.masked_select(rest).view({ids.size(0), n})};
}

}  // namespace blip2
