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

class Blip2QformerImpl : public torch::nn::Module {
 public:
  explicit Blip2QformerImpl(const Blip2Config& config, const InitOptions& init = {});

  // The stage-1 training forward. images [B,3,S,S]; ids, mask [B,L] ([CLS] ... [SEP] pad).
  Stage1Output forward(const torch::Tensor& images, const torch::Tensor& ids,
                       const torch::Tensor& mask);

  // ln_vision(ViT(images)) [B,N,Dv]; the ViT runs without autograd when frozen.
  torch::Tensor encode_image(const torch::Tensor& images);
  // Queries cross-attending the image, keys/values cached for the LM pass when asked.
  QueryOutput query_pass(const torch::Tensor& image_embeds, bool use_cache);
  // Text alone, bidirectional with padding mask: [B,L,H].
  torch::Tensor text_pass(const torch::Tensor& ids, const torch::Tensor& mask);
  // normalize(vision_projection(queries)) [B,Q,E] and normalize(text_projection(CLS)) [B,E].
  torch::Tensor image_features(const torch::Tensor& query_hidden);
  torch::Tensor text_features(const torch::Tensor& text_hidden);
  // The joint pass: [queries; text] with a bidirectional padding mask, queries cross-attend the
  // image: [B,Q+L,H].
  torch::Tensor multimodal_pass(const torch::Tensor& image_embeds, const torch::Tensor& ids,
                                const torch::Tensor& mask);
  // mode "image" (needs images), "text" (needs ids, mask) or "multimodal" (needs all three; also
  // fills image_embeds with the image-only query outputs). Runs without autograd.
  Features extract_features(const torch::Tensor& images, const torch::Tensor& ids,
                            const torch::Tensor& mask, const std::string& mode);
  // ITM: the joint pass, itm_head over the query outputs, averaged over queries: [B,2].
  torch::Tensor itm_logits(const torch::Tensor& image_embeds, const torch::Tensor& ids,
                           const torch::Tensor& mask);
  // The same from precomputed cross-attention keys/values (QFormerModel::cross_kv), whose
  // batch matches ids (expand one image's over its texts without copying).
  torch::Tensor itm_logits(const std::vector<KVCache>& cross, const torch::Tensor& ids,
                           const torch::Tensor& mask);
  // LM: text attends all cached queries plus earlier text (causal). ids start with [DEC]: [B,L,V].
  torch::Tensor lm_logits(const torch::Tensor& decoder_ids, const torch::Tensor& mask,
                          const std::vector<KVCache>& query_past);

  // Keeps the frozen ViT in eval mode whatever train() is asked of the rest.
  void train(bool on = true) override;

  const Blip2Config& config() const { return config_; }

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

// (CE(sim_i2t, targets) + CE(sim_t2i, targets)) / 2 with label smoothing.
torch::Tensor itc_loss(const torch::Tensor& sim_i2t, const torch::Tensor& sim_t2i,
                       const torch::Tensor& targets, double label_smoothing = 0.1);

struct HardNegatives {
  torch::Tensor image_for_text;  // [B] index into the gathered images
  torch::Tensor text_for_image;  // [B] index into the gathered texts
};
// One negative per row, drawn from softmax(sim) with the positives (columns offset + b)
// set to -10000. sim_* are [B, B*world] temperature-scaled similarities.
HardNegatives sample_hard_negatives(const torch::Tensor& sim_i2t, const torch::Tensor& sim_t2i,
                                    int64_t offset);

// Decoder inputs and labels for the LM loss: [CLS] -> bos, pads -> -100 in the labels.
std::pair<torch::Tensor, torch::Tensor> lm_inputs(const torch::Tensor& ids, int64_t bos,
                                                  int64_t pad);
// Next-token CE: logits[:, :-1] against labels[:, 1:], ignoring -100, with label smoothing.
torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                      double label_smoothing = 0.1);

}  // namespace blip2
