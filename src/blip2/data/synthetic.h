// The built-in synthetic data: images of coloured shapes on noisy backgrounds with templated
// captions and class labels. Deterministic from (split, seed, index); nothing is read from disk.
//
// Each image has one shape (circle, square, triangle, cross, ring) in one colour (6), size
// (small, large) and position (left, right, top, bottom, center). Class = colour x shape (30
// classes, "red circle"). Training captions use one of five phrasings chosen per sample; the
// held-out split uses the canonical phrasing "a {size} {colour} {shape} {position}", which
// names every attribute, so retrieval on it needs all of them; its images have distinct
// attribute combinations (300 exist) until the split is larger than that.
#pragma once

#include <string>
#include <vector>

#include "blip2/data/dataset.h"
#include "blip2/vision/image.h"

namespace blip2 {

struct ShapeAttributes {
  int shape = 0, color = 0, size = 0, position = 0;
  int label() const;  // color * num_shapes + shape
  // Which of the 300 combinations this is: samples with the same one show the same content, so
  // it is their image id (ITC positives of each other, never each other's ITM negatives).
  int64_t combination() const;
};

class SyntheticShapes : public ImageTextDataset {
 public:
  // split: "train" (random phrasings) or "heldout"/"eval" (canonical captions, other images).
  SyntheticShapes(std::string split, int64_t num_samples, int64_t image_size, uint64_t seed);
  int64_t size() const override { return num_samples_; }
  using ImageTextDataset::get;
  ImageTextSample get(int64_t index, uint64_t sample_seed) const override;

  std::vector<std::string> label_names() const override { return class_names(); }
  ShapeAttributes attributes(int64_t index) const;
  // Float image in [0, 1], [3, S, S], before normalisation.
  torch::Tensor render(const ShapeAttributes& a, int64_t index) const;

  static const std::vector<std::string>& vocabulary();   // WordPiece vocab, id order
  static std::vector<std::string> class_names();          // "red circle", ... (label order)
  static std::string canonical_caption(const ShapeAttributes& a);
  static constexpr int64_t kDefaultTrainSize = 8192;
  static constexpr int64_t kDefaultHeldoutSize = 256;
  static constexpr int64_t kNumCombinations = 5 * 6 * 2 * 5;  // shape x colour x size x position

 private:
  std::string split_;
  int64_t num_samples_, image_size_;
  uint64_t seed_;
  bool heldout_;
};


// Builds the dataset a config section names (SyntheticShapes for now).
// `section` (train_dataset / eval_dataset) names the config key in errors.
std::shared_ptr<ImageTextDataset> make_dataset(const DatasetConfig& cfg, int64_t image_size,
                                               uint64_t seed, const std::string& section);
// The tokenizer a config names: vocab_file, or the synthetic vocabulary when it is "".
std::shared_ptr<WordPieceTokenizer> make_tokenizer(const TokenizerConfig& cfg);

}  // namespace blip2
