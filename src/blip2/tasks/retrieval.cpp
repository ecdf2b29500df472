#include "blip2/tasks/retrieval.h"

#include "blip2/tasks/metrics.h"

namespace blip2 {


RetrievalScores rerank_top_k(Blip2Qformer& model, const RetrievalInputs& in, const RerankOptions& o,
                             const std::function<void(int64_t, int64_t)>& progress) {
  torch::NoGradGuard no_grad;
  const int64_t ni = in.image_feats.size(0), nt = in.text_feats.size(0);
  auto sim = max_over_queries(in.image_feats, in.text_feats);  // [Ni, Nt]
  RetrievalScores s{torch::full({ni, nt}, -100.0f, sim.options()),
                    torch::full({nt, ni}, -100.0f, sim.options())};
  std::vector<KVCache> cross;
  if (o.reuse_kv) cross = model->qformer->cross_kv(in.image_embeds);

  const int64_t k_txt = std::min(o.k_test, nt);
  for (int64_t i = 0; i < ni; ++i) {
    auto [vals, idx] = sim[i].topk(k_txt);
    auto ids = in.text_ids.index_select(0, idx), keep = in.text_keep.index_select(0, idx);
    auto logits = o.reuse_kv
                      ? model->itm_logits(repeat_row(cross, i, k_txt), ids, keep)
                      : model->itm_logits(in.image_embeds.narrow(0, i, 1).expand({k_txt, -1, -1}), ids, keep);
    auto score = logits.select(1, 1) + (o.add_itc ? vals : torch::zeros_like(vals));
    s.i2t[i].index_put_({idx}, score.to(sim.scalar_type()));
    if (progress) progress(i + 1, ni + nt);
  }
  const int64_t k_img = std::min(o.k_test, ni);
  auto sim_t = sim.t();
  for (int64_t t = 0; t < nt; ++t) {
    auto [vals, idx] = sim_t[t].topk(k_img);
    auto ids = in.text_ids.narrow(0, t, 1).expand({k_img, -1});
    auto keep = in.text_keep.narrow(0, t, 1).expand({k_img, -1});
    auto logits = o.reuse_kv ? model->itm_logits(select_rows(cross, idx), ids, keep)
                             : model->itm_logits(in.image_embeds.index_select(0, idx), ids, keep);
    auto score = logits.select(1, 1) + (o.add_itc ? vals : torch::zeros_like(vals));
    s.t2i[t].index_put_({idx}, score.to(sim.scalar_type()));
    if (progress) progress(ni + t + 1, ni + nt);
  }
  return s;
}

RetrievalReport retrieval_report(const RetrievalScores& s,
                                 const std::vector<std::vector<int64_t>>& img2txt,
                                 const std::vector<std::vector<int64_t>>& txt2img) {
  const Recall a = recall(s.i2t, img2txt), b = recall(s.t2i, txt2img);
  RetrievalReport r;
  r.txt_r1 = a.r1; r.txt_r5 = a.r5; r.txt_r10 = a.r10;
  r.img_r1 = b.r1; r.img_r5 = b.r5; r.img_r10 = b.r10;
  r.txt_r_mean = (r.txt_r1 + r.txt_r5 + r.txt_r10) / 3;
  r.img_r_mean = (r.img_r1 + r.img_r5 + r.img_r10) / 3;
  r.r_mean = (r.txt_r_mean + r.img_r_mean) / 2;
  r.agg_metrics = r.r_mean;
  return r;
}

nlohmann::json RetrievalReport::to_json() const {
  return {{"txt_r1", txt_r1}, {"txt_r5", txt_r5}, {"txt_r10", txt_r10}, {"txt_r_mean", txt_r_mean},
          {"img_r1", img_r1}, {"img_r5", img_r5}, {"img_r10", img_r10}, {"img_r_mean", img_r_mean},
          {"r_mean", r_mean}, {"agg_metrics", agg_metrics}};
}

}  // namespace blip2
