#include "blip2/tasks/retrieval.h"

#include "blip2/dist/dist.h"
#include "blip2/tasks/metrics.h"
#include "blip2/util/common.h"

namespace blip2 {

namespace {

// This dp rank's contiguous block [first, second) of n rows.
std::pair<int64_t, int64_t> my_block(int64_t n) {
  const int64_t parts = dist::dp_size(), part = dist::dp_rank();
  const int64_t per = (n + parts - 1) / parts;
  return {std::min(n, part * per), std::min(n, (part + 1) * per)};
}

// The pairs of one image (reuse_kv), host tensors of text indices: `score` its k_test texts
// (first, in their order), then the other texts that chose it among their k_test images; `chose`
// every text that chose it.
struct ImagePairs {
  torch::Tensor score, chose;
};

std::vector<ImagePairs> pairs_by_image(const torch::Tensor& top_txt, const torch::Tensor& top_img,
                                       int64_t i0, int64_t i1) {
  const int64_t nt = top_img.size(0), k_img = top_img.size(1);
  auto img = top_img.reshape({-1}).cpu();
  auto txt = torch::arange(nt, torch::kLong).repeat_interleave(k_img);
  auto order = std::get<1>(img.sort(/*stable=*/std::optional<bool>(true), 0, false));  // texts ascending per image
  img = img.index_select(0, order);
  txt = txt.index_select(0, order);
  auto counts = torch::bincount(img, {}, i1).cumsum(0);
  const auto* end = counts.data_ptr<int64_t>();
  auto top = top_txt.cpu();
  std::vector<ImagePairs> out;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t from = i ? end[i - 1] : 0;
    auto chose = txt.narrow(0, from, end[i] - from);
    auto own = top[i];
    out.push_back({torch::cat({own, chose.masked_select(torch::isin(chose, own).logical_not())}), chose});
  }
  return out;
}

// ITM (+ ITC) of image `i` of the chunk `cross` against `texts` (device indices), in batches of
// at most `batch` texts.
torch::Tensor score_image(Blip2Qformer& model, const RetrievalInputs& in, const std::vector<KVCache>& cross,
                          int64_t row, const torch::Tensor& texts, const torch::Tensor& itc, int64_t batch,
                          bool add_itc) {
  std::vector<torch::Tensor> parts;
  for (int64_t s = 0; s < texts.size(0); s += batch) {
    const int64_t n = std::min(batch, texts.size(0) - s);
    auto idx = texts.narrow(0, s, n);
    auto logits = model->itm_logits(repeat_row(cross, row, n), in.text_ids.index_select(0, idx),
                                    in.text_keep.index_select(0, idx));
    auto score = logits.select(1, 1);
    parts.push_back(add_itc ? score + itc.index_select(0, idx) : score);
  }
  return torch::cat(parts).to(itc.scalar_type());
}

}  // namespace

torch::Tensor itc_similarity(const torch::Tensor& image_feats, const torch::Tensor& text_feats,
                             int64_t chunk_images) {
  check(chunk_images >= 1, "retrieval: the chunk size must be >= 1, got " + std::to_string(chunk_images));
  const int64_t ni = image_feats.size(0);
  if (ni <= chunk_images) return max_over_queries(image_feats, text_feats);
  auto sim = torch::empty({ni, text_feats.size(0)}, text_feats.options());
  for (int64_t c = 0; c < ni; c += chunk_images) {
    const int64_t n = std::min(chunk_images, ni - c);
    sim.narrow(0, c, n).copy_(max_over_queries(image_feats.narrow(0, c, n), text_feats));
  }
  return sim;
}

RetrievalScores rerank_top_k(Blip2Qformer& model, const RetrievalInputs& in, const RerankOptions& o,
                             const std::function<void(int64_t, int64_t)>& progress) {
  torch::NoGradGuard no_grad;
  const auto dev = in.text_ids.device();
  const int64_t ni = in.image_feats.size(0), nt = in.text_feats.size(0);
  auto sim = itc_similarity(in.image_feats, in.text_feats, o.chunk_images);  // [Ni, Nt]; checks the chunk size
  const int64_t k_txt = std::min(o.k_test, nt), k_img = std::min(o.k_test, ni);
  auto [top_txt_val, top_txt] = sim.topk(k_txt, 1);       // [Ni, k]
  auto top_img = std::get<1>(sim.t().topk(k_img, 1));     // [Nt, k]
  // Under data parallelism each dp rank re-ranks a contiguous block of images (reuse_kv: every
  // pair of its images; otherwise its block of image rows and of text rows); the others stay
  // zero and the matrices are summed over the ranks, which leaves every entry exactly as one
  // process computes it (unranked entries -100, as LAVIS).
  const auto [i0, i1] = my_block(ni);
  RetrievalScores s{torch::zeros({ni, nt}, sim.options()), torch::zeros({nt, ni}, sim.options())};
  s.i2t.narrow(0, i0, i1 - i0).fill_(-100.0f);

  if (o.reuse_kv) {
    s.t2i.narrow(1, i0, i1 - i0).fill_(-100.0f);
    const auto pairs = pairs_by_image(top_txt, top_img, i0, i1);
    auto row = torch::empty({nt}, sim.options());
    for (int64_t c = i0; c < i1; c += o.chunk_images) {
      const int64_t n = std::min(o.chunk_images, i1 - c);
      auto cross = model->qformer->cross_kv(in.image_embeds.narrow(0, c, n).to(dev, /*non_blocking=*/true));
      for (int64_t i = c; i < c + n; ++i) {
        auto texts = pairs[i - i0].score.to(dev), chose = pairs[i - i0].chose.to(dev);
        auto score = score_image(model, in, cross, i - c, texts, sim[i], k_txt, o.add_itc);
        s.i2t[i].index_put_({top_txt[i]}, score.narrow(0, 0, k_txt));
        row.index_put_({texts}, score);
        s.t2i.select(1, i).index_put_({chose}, row.index_select(0, chose));
        if (progress) progress(i - i0 + 1, i1 - i0);
      }
    }
  } else {
    const auto [t0, t1] = my_block(nt);
    s.t2i.narrow(0, t0, t1 - t0).fill_(-100.0f);
    const int64_t mine = (i1 - i0) + (t1 - t0);
    for (int64_t i = i0; i < i1; ++i) {
      auto idx = top_txt[i];
      auto logits = model->itm_logits(in.image_embeds.narrow(0, i, 1).to(dev).expand({k_txt, -1, -1}),
                                      in.text_ids.index_select(0, idx), in.text_keep.index_select(0, idx));
      auto score = logits.select(1, 1) + (o.add_itc ? top_txt_val[i] : torch::zeros({k_txt}, sim.options()));
      s.i2t[i].index_put_({idx}, score.to(sim.scalar_type()));
      if (progress) progress(i - i0 + 1, mine);
    }
    for (int64_t t = t0; t < t1; ++t) {
      auto idx = top_img[t];
      auto vals = sim.select(1, t).index_select(0, idx);
      auto ids = in.text_ids.narrow(0, t, 1).expand({k_img, -1});
      auto keep = in.text_keep.narrow(0, t, 1).expand({k_img, -1});
      auto embeds = in.image_embeds.index_select(0, idx.to(in.image_embeds.device())).to(dev);
      auto logits = model->itm_logits(embeds, ids, keep);
      auto score = logits.select(1, 1) + (o.add_itc ? vals : torch::zeros_like(vals));
      s.t2i[t].index_put_({idx}, score.to(sim.scalar_type()));
      if (progress) progress((i1 - i0) + t - t0 + 1, mine);
    }
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
  r.agg_metrics = r.txt_r_mean;  // LAVIS' _report_metrics: the text-retrieval mean, not r_mean
  return r;
}

nlohmann::json RetrievalReport::to_json() const {
  return {{"txt_r1", txt_r1}, {"txt_r5", txt_r5}, {"txt_r10", txt_r10}, {"txt_r_mean", txt_r_mean},
          {"img_r1", img_r1}, {"img_r5", img_r5}, {"img_r10", img_r10}, {"img_r_mean", img_r_mean},
          {"r_mean", r_mean}, {"agg_metrics", agg_metrics}};
}

}  // namespace blip2
