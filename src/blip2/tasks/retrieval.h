// image_to_text_retrieval: LAVIS' protocol (blip2.py::compute_sim_matrix, tasks/retrieval.py).
//
// ITC similarity s[i,t] = max over queries of <image_feat[i,q], text_feat[t]>. For each image the
// k_test most similar texts, and for each text the k_test most similar images, are re-scored as
// ITM positive logit + s (or the ITM logit alone); all other pairs score -100. Recall@K is taken
// over each image's ground-truth captions (image->text) and each caption's image (text->image).
//
// Memory is bounded by the chunk size, not by the split: the ViT outputs stay where the caller
// keeps them (the host, in the run dtype), and the re-ranking walks the images in chunks. A chunk's
// cross-attention keys/values are computed once and every pair of one of its images is scored
// against them without a copy: the image's k_test texts and the texts that chose it among their
// k_test images, a pair both directions chose scored once. With ViT-g at 364 px (677 tokens,
// width 1408) and the Q-Former's 6 cross-attention layers of width 768, in fp32:
//   ViT outputs (host)       Ni x 677 x 1408 x 4 B      = 3.8 MB per image (19 GB for COCO's 5k)
//   keys/values of a chunk   C x 6 x 2 x 677 x 768 x 4 B = 25 MB per image of the chunk
//   ITC similarities          Ni x Nt x 4 B, and the two score matrices as much again
// (LAVIS keeps the ViT outputs on the host as well, and recomputes the keys/values per pair.)
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
  // Images whose cross-attention keys/values are held at once (reuse_kv) and, for the ITC
  // similarities, images per matmul block (>= 1).
  int64_t chunk_images = 16;
};

// Runs under no-grad; `model` should be in eval mode. in.image_embeds may live on the host: a
// chunk at a time goes to the device of in.text_ids. `progress`, when given, is told as the
// images (reuse_kv) or the Ni + Nt queries (otherwise) of this rank are done.
RetrievalScores rerank_top_k(Blip2Qformer& model, const RetrievalInputs& in, const RerankOptions& o,
                             const std::function<void(int64_t done, int64_t total)>& progress = {});

// max_over_queries of the whole split in blocks of `chunk_images` images (the [chunk x Q, Nt]
// product is what a block holds); the same numbers as one matmul.
torch::Tensor itc_similarity(const torch::Tensor& image_feats, const torch::Tensor& text_feats,
                             int64_t chunk_images);

struct RetrievalReport {
  double txt_r1 = 0, txt_r5 = 0, txt_r10 = 0, txt_r_mean = 0;
  double img_r1 = 0, img_r5 = 0, img_r10 = 0, img_r_mean = 0;
  double r_mean = 0;       // mean of txt_r_mean and img_r_mean
  double agg_metrics = 0;  // LAVIS': txt_r_mean
  nlohmann::json to_json() const;
};

// img2txt[i]: the texts of image i; txt2img[t]: the image(s) of text t. A query's rank is the number
// of candidates scoring strictly higher than its best ground truth.
RetrievalReport retrieval_report(const RetrievalScores& s,
                                 const std::vector<std::vector<int64_t>>& img2txt,
                                 const std::vector<std::vector<int64_t>>& txt2img);

}  // namespace blip2
