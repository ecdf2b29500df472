// The image_to_text_retrieval task of a stage-1 model: ITC similarities of every image and text
// of eval_dataset, the k_test best re-ranked by ITM (retrieval.h).
#include <chrono>
#include <optional>

#include "blip2/dist/dist.h"
#include "blip2/tasks/retrieval.h"
#include "blip2/tasks/stage1.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace blip2 {

RetrievalInputs Stage1Task::encode_retrieval_set(const RetrievalSet& set, int64_t bs, bool with_embeds) {
  const auto& tt = cfg_.eval_dataset.text_transforms;
  RetrievalInputs in;
  const int64_t parts = dist::dp_size(), part = dist::dp_rank();
  std::vector<int64_t> offsets{0};
  for (int64_t n : set.batch_sizes) offsets.push_back(offsets.back() + n);
  for (int64_t k = 0; k < static_cast<int64_t>(set.batch_sizes.size()); ++k) {
    if (k % parts != part && in.image_feats.defined()) continue;
    auto e = model_->encode_image(set.image_batch(k).to(device_));
    auto f = model_->image_features(model_->query_pass(e, false).hidden);
    if (!in.image_feats.defined()) {  // the shapes come from the first batch, which every rank encodes
      // The ViT outputs stay on the host: re-ranking brings a chunk at a time to the device.
      if (with_embeds) in.image_embeds = torch::zeros({offsets.back(), e.size(1), e.size(2)}, e.options().device(torch::kCPU));
      in.image_feats = torch::zeros({offsets.back(), f.size(1), f.size(2)}, f.options());
    }
    if (k % parts != part) continue;
    if (with_embeds) in.image_embeds.narrow(0, offsets[k], e.size(0)).copy_(e);
    in.image_feats.narrow(0, offsets[k], f.size(0)).copy_(f);
  }
  if (with_embeds) dist::combine_rows(in.image_embeds);
  dist::combine_rows(in.image_feats);
  std::vector<std::string> cleaned;
  for (const auto& t : set.texts) cleaned.push_back(clean_caption(t, tt.max_words, tt.prompt));
  auto enc = tokenizer_->encode_batch(cleaned, tt.max_length, tt.padding);
  in.text_ids = enc.ids.to(device_);
  in.text_keep = enc.keep.to(device_);
  for (int64_t i = 0, k = 0; i < in.text_ids.size(0); i += bs, ++k) {
    if (k % parts != part && in.text_feats.defined()) continue;
    const int64_t n = std::min(bs, in.text_ids.size(0) - i);
    auto f = model_->text_features(model_->text_pass(in.text_ids.narrow(0, i, n), in.text_keep.narrow(0, i, n)));
    if (!in.text_feats.defined()) in.text_feats = torch::zeros({in.text_ids.size(0), f.size(1)}, f.options());
    if (k % parts == part) in.text_feats.narrow(0, i, n).copy_(f);
  }
  dist::combine_rows(in.text_feats);
  return in;
}

nlohmann::json Stage1Task::evaluate_retrieval() {
  require_weights({"vision_projection.", "text_projection.", "itm_head."}, "image_to_text_retrieval");
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  const auto& d = cfg_.eval_dataset;
  const int64_t bs = std::max<int64_t>(1, d.batch_size > 0 ? d.batch_size : cfg_.runner_config.batch_size);
  const auto set = retrieval_set(loader, bs);
  const RetrievalInputs in = encode_retrieval_set(set, bs, /*image_embeds=*/true);
  const auto& img2txt = set.img2txt;
  const auto& txt2img = set.txt2img;

  RerankOptions o;
  o.k_test = d.k_test;
  o.add_itc = d.add_extra_itm_score;
  o.reuse_kv = d.reuse_cross_kv;
  o.chunk_images = d.rerank_chunk_size;
  const int64_t ni = in.image_feats.size(0), nt = in.text_feats.size(0);
  log_info("retrieval: " + std::to_string(ni) + " images, " + std::to_string(nt) + " texts, k_test " +
           std::to_string(o.k_test));
  std::optional<Progress> progress;  // over this rank's images (or queries, without reuse_cross_kv)
  auto t0 = std::chrono::steady_clock::now();
  auto scores = rerank_top_k(model_, in, o, [&](int64_t done, int64_t total) {
    if (!progress) progress.emplace("rerank", total, std::max<int64_t>(1, total / 10));
    progress->update(done, "");
  });
  if (progress) progress->finish();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto report = retrieval_report(scores, img2txt, txt2img).to_json();
  report["num_images"] = ni;
  report["num_texts"] = nt;
  report["rerank_seconds"] = secs;
  report["rerank_images_per_s"] = ni / std::max(secs, 1e-9);
  return report;
}

}  // namespace blip2
