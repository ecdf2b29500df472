// image_to_text_retrieval: LAVIS' protocol (blip2.py::compute_sim_matrix, tasks/retrieval.py).
//
// ITC similarity s[i,t] = max over queries of <image_feat[i,q], text_feat[t]>. For each image the
// k_test most similar texts, and for each text the k_test most similar images, are re-scored as
// ITM positive logit + s (or the ITM logit alone); all other pairs score -100. Recall@K is taken
// over each image's ground-truth captions (image->text) and each caption's image (text->image).
#pragma once

#include <functional>
#include <vector>

#include <nlohmann/json.hpp>

#include "blip2/models/blip2_qformer.h"

namespace blip2 {

struct RetrievalInputs {
  torch::Tensor image_embeds;  // [Ni, N, Dv]  ln_vision(ViT(image))
  torch::Tensor image_feats;   // [Ni, Q, E]   normalised projected queries
  torch::Tensor text_ids, text_keep;  // [Nt, L]
  torch::Tensor text_feats;    // [Nt, E]
};

struct RetrievalScores {
  torch::Tensor i2t;  // [Ni, Nt]
  torch::Tensor t2i;  // [Nt, Ni]
};

struct RerankOptions {
  int64_t k_test = 128;
  bool add_itc = true;   // add_extra_itm_score: ITM + ITC (LAVIS), else ITM alone
  bool reuse_kv = true;  // compute each image's cross-attention keys/values once
};

// Runs under no-grad; `model` should be in eval mode.
// `progress`, when given, is told after each of the Ni + Nt queries.
RetrievalScores rerank_top_k(Blip2Qformer& model, const RetrievalInputs& in, const RerankOptions& o,
                             const std::function<void(int64_t done, int64_t total)>& progress = {});

struct RetrievalReport {
  double txt_r1 = 0, txt_r5 = 0, txt_r10 = 0, txt_r_mean = 0;
  double img_r1 = 0, img_r5 = 0, img_r10 = 0, img_r_mean = 0;
  double r_mean = 0, agg_metrics = 0;
  nlohmann::json to_json() const;
};

// img2txt[i]: the texts of image i; txt2img[t]: the image(s) of text t. A query's rank is the number
// of candidates scoring strictly higher than its best ground truth.
RetrievalReport retrieval_report(const RetrievalScores& s,
                                 const std::vector<std::vector<int64_t>>& img2txt,
                                 const std::vector<std::vector<int64_t>>& txt2img);

}  // namespace blip2
