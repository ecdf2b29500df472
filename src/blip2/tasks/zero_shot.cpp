#include "blip2/tasks/zero_shot.h"

#include "blip2/util/common.h"

namespace blip2 {

ZeroShotClassifier::ZeroShotClassifier(Blip2Qformer model,
                                       std::shared_ptr<const WordPieceTokenizer> tokenizer,
                                       ZeroShotOptions options)
    : model_(std::move(model)), options_(std::move(options)) {
  check(!options_.candidate_labels.empty(),
        "candidate_labels is empty: give the labels to choose from (e.g. [\"cat\", \"dog\"])");
  for (const auto& l : options_.candidate_labels)
    check(!l.empty(), "candidate_labels: a label is empty");
  check(options_.itm_top_k >= 0, "itm_top_k must be >= 0 (0 = ITC only)");
  const auto& mc = model_->config();
  if (options_.max_length <= 0) options_.max_length = mc.max_txt_len;
  check(options_.max_length <= mc.qformer_config.max_position_embeddings,
        "max_length " + std::to_string(options_.max_length) + " exceeds the Q-Former's max_position_embeddings " +
            std::to_string(mc.qformer_config.max_position_embeddings) + ": label sentences would run past its positions");
  const auto templates = options_.hypothesis_templates.empty()
                             ? std::vector<std::string>{options_.hypothesis_template}
                             : options_.hypothesis_templates;
  auto device = model_->temp.device();
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> feats;
  for (size_t k = 0; k < templates.size(); ++k) {
    std::vector<std::string> texts;
    for (const auto& l : options_.candidate_labels)
      texts.push_back(clean_caption(fill_template(templates[k], l), options_.max_words, options_.prompt));
    auto enc = tokenizer->encode_batch(texts, options_.max_length, "max_length");
    auto ids = enc.ids.to(device), keep = enc.keep.to(device);
    feats.push_back(model_->text_features(model_->text_pass(ids, keep)));
    if (k == 0) {
      ids_ = ids;
      keep_ = keep;
    }
  }
  text_feats_ = torch::cat(feats);  // [templates * labels, E], template-major
}

torch::Tensor ZeroShotClassifier::probabilities(const torch::Tensor& images) {
  torch::NoGradGuard no_grad;
  auto embeds = model_->encode_image(images);
  auto feats = model_->image_features(model_->query_pass(embeds, false).hidden);
  return probabilities(feats, embeds);
}

torch::Tensor ZeroShotClassifier::probabilities(const torch::Tensor& image_feats,
                                                const torch::Tensor& image_embeds) {
  torch::NoGradGuard no_grad;
  const int64_t n = static_cast<int64_t>(options_.candidate_labels.size());
  // [B, labels]: max over queries, then over templates
  auto cos = max_over_queries(image_feats, text_feats_).view({image_feats.size(0), -1, n}).amax(1);
  auto probs = torch::softmax(cos / model_->temp, 1);
  const int64_t k = std::min<int64_t>(options_.itm_top_k, probs.size(1));
  if (k == 0) return probs;
  auto [top_p, top_i] = probs.topk(k, 1);  // [B, k]
  for (int64_t b = 0; b < probs.size(0); ++b) {
    auto cross = repeat_row(model_->qformer->cross_kv(image_embeds.narrow(0, b, 1)), 0, k);
    auto labels = top_i[b];
    auto itm = model_->itm_logits(cross, ids_.index_select(0, labels), keep_.index_select(0, labels));
    auto score = itm.select(1, 1) + cos[b].index_select(0, labels);
    probs[b].index_put_({labels}, torch::softmax(score, 0) * top_p[b].sum());
  }
  return probs;
}

nlohmann::json ZeroShotClassifier::ranked(const torch::Tensor& probs, int64_t top_k) const {
  auto p = probs.to(torch::kCPU, torch::kDouble).contiguous();
  auto order = std::get<1>(p.sort(0, /*descending=*/true));
  const int64_t n = top_k > 0 ? std::min(top_k, order.size(0)) : order.size(0);
  nlohmann::json out = nlohmann::json::array();
  for (int64_t j = 0; j < n; ++j) {
    int64_t l = order[j].item<int64_t>();
    out.push_back({{"score", p[l].item<double>()}, {"label", options_.candidate_labels[l]}});
  }
  return out;
}

}  // namespace blip2
