// Retrieval metrics: Recall@K in both directions, given each query's matching candidates.
#pragma once

#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

namespace blip2 {

// Recall@K in both directions. img2txt[i] lists the texts that match image i, txt2img[t] the
// images that match text t; a query counts as a hit if any of its matches ranks within K.
struct RetrievalMetrics {
  double txt_r1 = 0, txt_r5 = 0, txt_r10 = 0;  // image -> text
  double img_r1 = 0, img_r5 = 0, img_r10 = 0;  // text -> image
  int64_t num_images = 0, num_texts = 0;
  nlohmann::json to_json() const;
};
// Recall@1/5/10 (in %) of one direction: scores [queries, candidates], gt[q] the matching
// candidates. A query's rank is the number of candidates scoring strictly higher than its best
// match (ties count in its favour).
struct Recall {
  double r1 = 0, r5 = 0, r10 = 0;
};
Recall recall(const torch::Tensor& scores, const std::vector<std::vector<int64_t>>& gt);
RetrievalMetrics recall_at_k(const torch::Tensor& sim_i2t, const std::vector<std::vector<int64_t>>& img2txt,
                             const std::vector<std::vector<int64_t>>& txt2img);

}  // namespace blip2
