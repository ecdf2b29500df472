#include "blip2/tasks/metrics.h"

#include <limits>

namespace blip2 {

Recall recall(const torch::Tensor& scores, const std::vector<std::vector<int64_t>>& gt) {
  auto s = scores.to(torch::kCPU, torch::kFloat32).contiguous();
  Recall r;
  const int64_t n = s.size(0);
  auto acc = s.accessor<float, 2>();
  for (int64_t q = 0; q < n; ++q) {
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t j : gt[q]) best = std::max(best, acc[q][j]);
    int64_t rank = 0;
    for (int64_t j = 0; j < s.size(1); ++j) rank += acc[q][j] > best;
    r.r1 += rank < 1;
    r.r5 += rank < 5;
    r.r10 += rank < 10;
  }
  for (double* v : {&r.r1, &r.r5, &r.r10}) *v = 100.0 * *v / std::max<int64_t>(1, n);
  return r;
}

RetrievalMetrics recall_at_k(const torch::Tensor& sim_i2t,
                             const std::vector<std::vector<int64_t>>& img2txt,
                             const std::vector<std::vector<int64_t>>& txt2img) {
  RetrievalMetrics m;
  m.num_images = sim_i2t.size(0);
  m.num_texts = sim_i2t.size(1);
  auto a = recall(sim_i2t, img2txt), b = recall(sim_i2t.t(), txt2img);
  m.txt_r1 = a.r1; m.txt_r5 = a.r5; m.txt_r10 = a.r10;
  m.img_r1 = b.r1; m.img_r5 = b.r5; m.img_r10 = b.r10;
  return m;
}

nlohmann::json RetrievalMetrics::to_json() const {
  return {{"txt_r1", txt_r1}, {"txt_r5", txt_r5}, {"txt_r10", txt_r10}, {"img_r1", img_r1}, {"img_r5", img_r5},
          {"img_r10", img_r10}, {"num_images", num_images}, {"num_texts", num_texts}};
}

}  // namespace blip2
