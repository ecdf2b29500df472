// The image_to_text_retrieval task of a stage-1 model: ITC similarities of every image and text
// of eval_dataset, the k_test best re-ranked by ITM (retrieval.h).
#include <chrono>

#include "blip2/tasks/retrieval.h"
#include "blip2/tasks/stage1.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace blip2 {

nlohmann::json Stage1Task::evaluate_retrieval() {
  require_weights({"vision_projection.", "text_projection.", "itm_head."}, "image_to_text_retrieval");
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  const auto& d = cfg_.eval_dataset;
  const auto& tt = d.text_transforms;
  const int64_t bs = std::max<int64_t>(1, d.batch_size > 0 ? d.batch_size : cfg_.runner_config.batch_size);
  RetrievalInputs in;
  std::vector<torch::Tensor> embeds, feats;
  auto set = retrieval_set(loader, bs);
  for (const auto& images : set.image_batches) {
    auto e = model_->encode_image(images.to(device_));
    feats.push_back(model_->image_features(model_->query_pass(e, false).hidden));
    embeds.push_back(e);
  }
  const auto& texts = set.texts;
  const auto& img2txt = set.img2txt;
  const auto& txt2img = set.txt2img;
  in.image_embeds = torch::cat(embeds);
  in.image_feats = torch::cat(feats);
  std::vector<std::string> cleaned;
  for (const auto& t : texts) cleaned.push_back(clean_caption(t, tt.max_words, tt.prompt));
  auto enc = tokenizer_->encode_batch(cleaned, tt.max_length, tt.padding);
  in.text_ids = enc.ids.to(device_);
  in.text_keep = enc.keep.to(device_);
  std::vector<torch::Tensor> tf;
  for (int64_t i = 0; i < in.text_ids.size(0); i += bs) {
    const int64_t n = std::min(bs, in.text_ids.size(0) - i);
    tf.push_back(model_->text_features(model_->text_pass(in.text_ids.narrow(0, i, n), in.text_keep.narrow(0, i, n))));
  }
  in.text_feats = torch::cat(tf);

  RerankOptions o;
  o.k_test = d.k_test;
  o.add_itc = d.add_extra_itm_score;
  o.reuse_kv = d.reuse_cross_kv;
  const int64_t ni = in.image_feats.size(0), nt = in.text_feats.size(0);
  log_info("retrieval: " + std::to_string(ni) + " images, " + std::to_string(nt) + " texts, k_test " +
           std::to_string(o.k_test));
  Progress progress("rerank", ni + nt, std::max<int64_t>(1, (ni + nt) / 10));
  auto t0 = std::chrono::steady_clock::now();
  auto scores = rerank_top_k(model_, in, o, [&](int64_t done, int64_t) { progress.update(done, ""); });
  progress.finish();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto report = retrieval_report(scores, img2txt, txt2img).to_json();
  report["num_images"] = ni;
  report["num_texts"] = nt;
  report["rerank_seconds"] = secs;
  report["rerank_images_per_s"] = ni / std::max(secs, 1e-9);
  return report;
}

}  // namespace blip2
