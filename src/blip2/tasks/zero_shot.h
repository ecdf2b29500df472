// zero_shot_image_classification: each candidate label is put into a hypothesis template
// ("This is a photo of {}."), encoded once by the text path, and scored against an image as
// (max over queries of the cosine of the projected, normalised features) / temp; probabilities
// are the softmax over labels. With several templates a label scores its best template. This is MindFormers' Blip2Classifier with the retrieval
// similarity (the max over the queries, as ITC trains it) instead of the first query alone.
//
// Optional ITM re-ranking (beyond the seed): the `itm_top_k` most probable labels of each image
// are re-scored as ITM positive logit + cosine (the retrieval protocol's score); they share the
// probability mass ITC gave them in proportion to softmax(score), so the list still sums to 1
// and its order follows the re-ranking.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "blip2/models/blip2_qformer.h"
#include "blip2/text/text.h"

namespace blip2 {

struct ZeroShotOptions {
  std::vector<std::string> candidate_labels;
  std::string hypothesis_template = "This is a photo of {}.";
  // When given, replaces hypothesis_template: a label's cosine is its best template's (the max
  // over templates, as over queries); ITM re-ranking reads the first template.
  std::vector<std::string> hypothesis_templates;
  int64_t itm_top_k = 0;   // labels re-ranked by ITM per image (0 = ITC only)
  int64_t max_length = 0;  // tokens per label sentence (0 = the model's max_txt_len); at most the
                           // Q-Former's max_position_embeddings
  int64_t max_words = 50;
  std::string prompt;      // prepended after caption cleaning (as the caption transform does)
};

class ZeroShotClassifier {
 public:
  // Checks the options (labels present, template with "{}") and encodes the label sentences.
  ZeroShotClassifier(Blip2Qformer model, std::shared_ptr<const WordPieceTokenizer> tokenizer,
                     ZeroShotOptions options);
  // Label probabilities of preprocessed images [B,3,S,S] (on the model's device): [B, labels].
  torch::Tensor probabilities(const torch::Tensor& images);
  // The same from the images' normalised query features and ln_vision'd ViT output.
  torch::Tensor probabilities(const torch::Tensor& image_feats, const torch::Tensor& image_embeds);
  // One image's probabilities as the seed's sorted list [{"score": s, "label": l}, ...],
  // the `top_k` best (0 = all).
  nlohmann::json ranked(const torch::Tensor& probs, int64_t top_k = 0) const;
  const std::vector<std::string>& labels() const { return options_.candidate_labels; }
  const ZeroShotOptions& options() const { return options_; }

 private:
  Blip2Qformer model_;
  ZeroShotOptions options_;
  torch::Tensor ids_, keep_;   // [labels, L] of the first template
  torch::Tensor text_feats_;   // [templates * labels, E]
};

}  // namespace blip2
