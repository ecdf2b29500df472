#include "blip2/tasks/retrieval.h"

#include "blip2/dist/dist.h"
#include "blip2/tasks/metrics.h"

namespace blip2 {


RetrievalScores rerank_top_k(Blip2Qformer& model, const RetrievalInputs& in, const RerankOptions& o,
                             const std::function<void(int64_t, int64_t)>& progress) {
  torch::NoGradGuard no_grad;
  const int64_t ni = in.image_feats.size(0), nt = in.text_feats.size(0);
  auto sim = max_over_queries(in.image_feats, in.text_feats);  // [Ni, Nt]
  // Under data parallelism each dp rank re-ranks a contiguous block of the image rows and of the
  // text rows; the others stay zero and the matrices are summed over the ranks, which leaves
  // every row exactly as one process computes it (unranked entries -100, as LAVIS).
  const int64_t parts = dist::dp_size(), part = dist::dp_rank();
  auto block = [&](int64_t n) {
    const int64_t per = (n + parts - 1) / parts;
    return std::pair{std::min(n, part * per), std::min(n, (part + 1) * per)};
  };
  const auto [i0, i1] = block(ni);
  const auto [t0, t1] = block(nt);
  RetrievalScores s{torch::zeros({ni, nt}, sim.options()), torch::zeros({nt, ni}, sim.options())};
  s.i2t.narrow(0, i0, i1 - i0).fill_(-100.0f);
  s.t2i.narrow(0, t0, t1 - t0).fill_(-100.0f);
  std::vector<KVCache> cross;
  if (o.reuse_kv) cross = model->qformer->cross_kv(in.image_embeds);
  const int64_t mine = (i1 - i0) + (t1 - t0);

  const int64_t k_txt = std::min(o.k_test, nt);
  for (int64_t i = i0; i < i1; ++i) {
    auto [vals, idx] = sim[i].topk(k_txt);
    auto ids = in.text_ids.index_select(0, idx), keep = in.text_keep.index_select(0, idx);
    auto logits = o.reuse_kv
                      ? model->itm_logits(repeat_row(cross, i, k_txt), ids, keep)
                      : model->itm_logits(in.image_embeds.narrow(0, i, 1).expand({k_txt, -1, -1}), ids, keep);
    auto score = logits.select(1, 1) + (o.add_itc ? vals : torch::zeros_like(vals));
    s.i2t[i].index_put_({idx}, score.to(sim.scalar_type()));
    if (progress) progress(i - i0 + 1, mine);
  }
  const int64_t k_img = std::min(o.k_test, ni);
  auto sim_t = sim.t();
  for (int64_t t = t0; t < t1; ++t) {
    auto [vals, idx] = sim_t[t].topk(k_img);
    auto ids = in.text_ids.narrow(0, t, 1).expand({k_img, -1});
    auto keep = in.text_keep.narrow(0, t, 1).expand({k_img, -1});
    auto logits = o.reuse_kv ? model->itm_logits(select_rows(cross, idx), ids, keep)
                             : model->itm_logits(in.image_embeds.index_select(0, idx), ids, keep);
    auto score = logits.select(1, 1) + (o.add_itc ? vals : torch::zeros_like(vals));
    s.t2i[t].index_put_({idx}, score.to(sim.scalar_type()));
    if (progress) progress((i1 - i0) + t - t0 + 1, mine);
  }
  dist::combine_rows(s.i2t);
  dist::combine_rows(s.t2i);
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
