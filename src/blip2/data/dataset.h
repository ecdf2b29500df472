// The dataset interface and the batch loader shared by every task.
//
// A dataset yields (image tensor, caption, image id, class label) samples; the loader orders
// them deterministically from (seed, epoch), keeps this rank's shard, groups them into batches
// and tokenises the captions. The samples of a batch are produced on worker threads.
#pragma once

#include <atomic>
#include <deque>
#include <cstdint>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "blip2/config/config.h"
#include "blip2/text/text.h"

namespace blip2 {

struct ImageTextSample {
  torch::Tensor image;    // [3, S, S] float, normalised
  std::string caption;    // raw caption (cleaned by the loader)
  // Dense id of the image shown: samples with equal ids show the same image (several captions
  // of one picture; synthetic: the same attribute combination).
  int64_t image_id = 0;
  int64_t label = -1;     // class, where the dataset has one
};

class ImageTextDataset {
 public:
  virtual ~ImageTextDataset() = default;
  virtual int64_t size() const = 0;
  // `sample_seed` drives random augmentation; the loader derives it from (seed, epoch, index).
  virtual ImageTextSample get(int64_t index, uint64_t sample_seed) const = 0;
  ImageTextSample get(int64_t index) const { return get(index, 0); }
  // Class names in label order, for datasets with labels (CIFAR-100, synthetic shapes).
  virtual std::vector<std::string> label_names() const { return {}; }
  // What a sample is called in errors (file and annotation entry).
  virtual std::string describe(int64_t index) const { return "sample " + std::to_string(index); }
};

struct Batch {
  torch::Tensor images;    // [B, 3, S, S]
  torch::Tensor ids;       // [B, L]
  torch::Tensor keep;      // [B, L] keep-mask: 1 = token, 0 = padding
  torch::Tensor image_ids; // [B] ImageTextSample::image_id
  torch::Tensor labels;    // [B]
  std::vector<int64_t> indices;  // the dataset index of each sample (for describe())
  std::vector<std::string> captions;  // cleaned
  // ids/keep stay undefined without a tokenizer; copies from pinned memory do not block.
  Batch to(const torch::Device& device) const;
};

struct LoaderOptions {
  int64_t batch_size = 8;
  bool skip_bad_samples = false;  // replace unreadable samples by the next good one, and count
  bool shuffle = true;
  bool drop_last = true;
  uint64_t seed = 42;
  int64_t num_workers = 2;
  int64_t prefetch = 2;           // batches built ahead by Stream
  bool pin_memory = false;        // batches in page-locked memory (for non-blocking CUDA copies)
  int rank = 0, world_size = 1;
};

class BatchLoader {
 public:
  // A null tokenizer leaves ids/keep undefined (the captions are still cleaned).
  BatchLoader(std::shared_ptr<const ImageTextDataset> dataset,
              std::shared_ptr<const WordPieceTokenizer> tokenizer, TextTransformConfig text,
              LoaderOptions options);
  int64_t batches_per_epoch() const;
  // This rank's sample indices for an epoch, in order (a permutation when shuffling).
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  // Batch `index` of `epoch`, built on the worker threads.
  Batch batch(int64_t epoch, int64_t index) const;
  Batch collate(const std::vector<int64_t>& indices, int64_t epoch = 0) const;
  const ImageTextDataset& dataset() const { return *dataset_; }
  const LoaderOptions& options() const { return opt_; }
  int64_t skipped() const { return skipped_->load(); }  // bad samples skipped so far

  // Iterates the batches of one epoch from `start`, building the next `prefetch` batches on
  // background threads while the caller works on the current one.
  class Stream {
   public:
    // Batches start, start + stride, ... below end of the epoch (end -1 = all of them); a stride
    // of the dp size at start = dp rank gives a rank its share of an evaluation.
    Stream(const BatchLoader& loader, int64_t epoch, int64_t start, int64_t end = -1, int64_t stride = 1);
    ~Stream();
    bool done() const { return next_index_ > end_; }
    // The index of the batch next() returns.
    int64_t index() const { return next_index_; }
    Batch next();

   private:
    void fill();
    const BatchLoader& loader_;
    int64_t epoch_, next_index_, end_, queued_, stride_;
    std::deque<std::future<Batch>> pending_;
  };

 private:
  std::shared_ptr<const ImageTextDataset> dataset_;
  std::shared_ptr<const WordPieceTokenizer> tokenizer_;
  TextTransformConfig text_;
  LoaderOptions opt_;
  std::shared_ptr<std::atomic<int64_t>> skipped_ = std::make_shared<std::atomic<int64_t>>(0);
  mutable std::mutex order_mutex_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::shared_ptr<const std::vector<int64_t>> cached_order_;
  std::shared_ptr<const std::vector<int64_t>> order(int64_t epoch) const;
};

}  // namespace blip2
