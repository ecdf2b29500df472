// Stage 1 of BLIP-2: frozen EVA ViT + Q-Former trained with ITC, ITM (hard negatives) and LM
// losses, computed as LAVIS' blip2_qformer.py::Blip2Qformer.forward does.
//
// Parameter names (Hugging Face's Blip2ForImageTextRetrieval, extended with the stage-1 LM head
// and the temperature): vision_model.*, query_tokens, embeddings.{word,position}_embeddings,
// qformer.*, vision_projection, text_projection, itm_head, cls.predictions.*, temp.
//
// Shapes: B batch, N image tokens (257 at 224 px), Dv ViT width, Q queries, H Q-Former width,
// L text tokens, E projection size, V vocabulary.
#pragma once

#include <optional>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/models/eva_vit.h"
#include "blip2/models/qformer.h"

namespace blip2 {

struct Stage1Output {
  torch::Tensor loss, loss_itc, loss_itm, loss_lm;  // loss = itc + itm + lm (unweighted)
  torch::Tensor image_feats, text_feat;             // [B,Q,E], [B,E]: the ITC features
};

// LAVIS' BlipOutputFeatures (Blip2Qformer.extract_features). Fields a mode does not compute stay
// undefined.
struct Features {
  torch::Tensor image_embeds;       // [B,Q,H] query outputs            (image, multimodal)
  torch::Tensor image_embeds_proj;  // [B,Q,E] normalised projections    (image)
  torch::Tensor text_embeds;        // [B,L,H] text outputs              (text)
  torch::Tensor text_embeds_proj;   // [B,L,E] normalised projections of every token (text);
                                    //         row 0 ([CLS]) is the ITC text feature
  torch::Tensor multimodal_embeds;  // [B,Q,H] query outputs of the joint image+text pass
};

struct QueryOutput {
  torch::Tensor hidden;        // [B, Q, H]
  std::vector<KVCache> past;   // self-attention keys/values of the queries, per layer
};

class Blip2QformerImpl : public torch::nn::Module, public ParameterInit {
 public:
  // `frozen`: where and in which dtype the frozen ViT is created (default: as `init`).
  explicit Blip2QformerImpl(const Blip2Config& config, const InitOptions& init = {},
                            const std::optional<InitOptions>& frozen = std::nullopt);

  // The stage-1 training forward. images [B,3,S,S]; ids [B,L] ([CLS] ... [SEP] pad) and their
  // keep-mask [B,L] (1 = token, 0 = padding; every keep in blip2cpp is such a mask, every
  // additive_mask the -10000 form the attention adds).
  // image_ids [B] (optional): samples with equal ids show the same image, so they are ITC
  // positives of each other (soft targets) and never each other's ITM negatives, as in LAVIS.
  // Similarities, softmaxes and losses are computed in fp32 whatever autocast is on.
  Stage1Output forward(const torch::Tensor& images, const torch::Tensor& ids,
                       const torch::Tensor& keep, const torch::Tensor& image_ids = {});

  // ln_vision(ViT(images)) [B,N,Dv]; the ViT runs without autograd when frozen.
  torch::Tensor encode_image(const torch::Tensor& images);
  // Queries cross-attending the image, keys/values cached for the LM pass when asked.
  QueryOutput query_pass(const torch::Tensor& image_embeds, bool use_cache);
  // Text alone, bidirectional, padding masked: [B,L,H].
  torch::Tensor text_pass(const torch::Tensor& ids, const torch::Tensor& keep);
  // normalize(vision_projection(queries)) [B,Q,E] and normalize(text_projection(CLS)) [B,E].
  torch::Tensor image_features(const torch::Tensor& query_hidden);
  torch::Tensor text_features(const torch::Tensor& text_hidden);
  // The joint pass: [queries; text], bidirectional with padding masked, queries cross-attend the
  // image: [B,Q+L,H].
  torch::Tensor multimodal_pass(const torch::Tensor& image_embeds, const torch::Tensor& ids,
                                const torch::Tensor& keep);
  // mode "image" (needs images), "text" (needs ids, keep) or "multimodal" (needs all three; also
  // fills image_embeds with the image-only query outputs). Runs without autograd.
  Features extract_features(const torch::Tensor& images, const torch::Tensor& ids,
                            const torch::Tensor& keep, const std::string& mode);
  // ITM: the joint pass, itm_head over the query outputs, averaged over queries: [B,2].
  torch::Tensor itm_logits(const torch::Tensor& image_embeds, const torch::Tensor& ids,
                           const torch::Tensor& keep);
  // The same from precomputed cross-attention keys/values (QFormerModel::cross_kv), whose
  // batch matches ids (expand one image's over its texts without copying).
  torch::Tensor itm_logits(const std::vector<KVCache>& cross, const torch::Tensor& ids,
                           const torch::Tensor& keep);
  // LM: text attends all cached queries plus earlier text (causal). ids start with [DEC]: [B,L,V].
  torch::Tensor lm_logits(const torch::Tensor& decoder_ids, const torch::Tensor& keep,
                          const std::vector<KVCache>& query_past);

  // Keeps the frozen ViT in eval mode whatever train() is asked of the rest.
  void train(bool on = true) override;

  const Blip2Config& config() const { return config_; }
  bool init_parameter(const std::string& name) override;  // temp, query_tokens (the rest: its layers')

  EvaVisionModel vision_model{nullptr};
  torch::Tensor query_tokens;  // [1, Q, H]
  TextEmbeddings embeddings{nullptr};
  QFormerModel qformer{nullptr};
  Linear vision_projection{nullptr}, text_projection{nullptr}, itm_head{nullptr};
  LMHead cls{nullptr};
  torch::Tensor temp;  // scalar, learnable, init 0.07

 private:
  Blip2Config config_;
};
TORCH_MODULE(Blip2Qformer);

// ---- the loss pieces, free functions so tests can check each one by hand ----

// s[b, t] = max over queries q of <image_feats[b,q], text_feats[t]>: [B,Q,E] x [T,E] -> [B,T].
torch::Tensor max_over_queries(const torch::Tensor& image_feats, const torch::Tensor& text_feats);

// Which of the gathered samples are positives of each local one: [B, B*world] bool. With
// image ids (local [B], gathered [B*world]) every pair of the same image; without, the
// diagonal of this rank's block (columns offset + b).
torch::Tensor itc_positives(const torch::Tensor& image_ids, const torch::Tensor& image_ids_all,
                            int64_t batch, int64_t world_batch, int64_t offset, torch::Device device);

// LAVIS' ITC loss: targets spread evenly over each row's positives, then label smoothing
// (0.9 * that + 0.1 / N); the mean over rows of -sum(log_softmax(sim) * targets), averaged over
// both directions. sim_* [B, B*world] (image->text, text->image), positives as itc_positives.
// With one positive per row this is cross_entropy(label_smoothing) against it.
torch::Tensor itc_loss(const torch::Tensor& sim_i2t, const torch::Tensor& sim_t2i,
                       const torch::Tensor& positives, double label_smoothing = 0.1);

struct HardNegatives {
  torch::Tensor image_for_text;  // [B] index into the gathered images
  torch::Tensor text_for_image;  // [B] index into the gathered texts
};
// One negative per row from softmax(sim) with the positives set to -10000: drawn (`sample`,
// LAVIS: the image for each text first, then the text for each image) or the most likely one
// (`sample` false). sim_* are [B, B*world] temperature-scaled similarities.
HardNegatives hard_negatives(const torch::Tensor& sim_i2t, const torch::Tensor& sim_t2i,
                             const torch::Tensor& positives, bool sample = true);

// Decoder inputs and labels for the LM loss: [CLS] -> bos, pads -> -100 in the labels.
std::pair<torch::Tensor, torch::Tensor> lm_inputs(const torch::Tensor& ids, int64_t bos,
                                                  int64_t pad);
// Next-token CE: logits[:, :-1] against labels[:, 1:], ignoring -100, with label smoothing
// (next_token_loss; global_tokens: model_config.lm_loss_normalization).
torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                      double label_smoothing = 0.1, bool global_tokens = false);

}  // namespace blip2
