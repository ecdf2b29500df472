#include <future>
#include <numeric>
#include <random>

#include "blip2/data/dataset.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace blip2 {

Batch Batch::to(const torch::Device& device) const {
  Batch b = *this;
  auto move = [&](const torch::Tensor& t) { return to_device_async(t, device); };
  b.images = move(images);
  if (ids.defined()) b.ids = move(ids);
  if (keep.defined()) b.keep = move(keep);
  b.image_ids = move(image_ids);
  b.labels = move(labels);
  return b;
}

BatchLoader::BatchLoader(std::shared_ptr<const ImageTextDataset> dataset,
                         std::shared_ptr<const WordPieceTokenizer> tokenizer,
                         TextTransformConfig text, LoaderOptions options)
    : dataset_(std::move(dataset)),
      tokenizer_(std::move(tokenizer)),
      text_(std::move(text)),
      opt_(options) {
  check(opt_.batch_size > 0, "batch size must be positive");
  check(batches_per_epoch() > 0,
        "dataset of " + std::to_string(dataset_->size()) + " samples gives no batch of " +
            std::to_string(opt_.batch_size) + " per rank (drop_remainder)");
}

int64_t BatchLoader::batches_per_epoch() const {
  int64_t per_rank = dataset_->size() / opt_.world_size;
  return opt_.drop_last ? per_rank / opt_.batch_size
                        : (per_rank + opt_.batch_size - 1) / opt_.batch_size;
}

std::vector<int64_t> BatchLoader::epoch_order(int64_t epoch) const { return *order(epoch); }

std::shared_ptr<const std::vector<int64_t>> BatchLoader::order(int64_t epoch) const {
  std::lock_guard<std::mutex> lock(order_mutex_);
  if (epoch == cached_epoch_) return cached_order_;
  std::vector<int64_t> order(dataset_->size());
  std::iota(order.begin(), order.end(), 0);
  if (opt_.shuffle) {
    std::mt19937_64 rng(opt_.seed * 1000003ULL + static_cast<uint64_t>(epoch));
    std::shuffle(order.begin(), order.end(), rng);
  }
  // Rank r takes every world_size-th sample starting at r, after truncating to a multiple.
  int64_t per_rank = static_cast<int64_t>(order.size()) / opt_.world_size;
  std::vector<int64_t> mine;
  mine.reserve(per_rank);
  for (int64_t i = 0; i < per_rank; ++i) mine.push_back(order[i * opt_.world_size + opt_.rank]);
  cached_epoch_ = epoch;
  cached_order_ = std::make_shared<const std::vector<int64_t>>(std::move(mine));
  return cached_order_;
}

Batch BatchLoader::batch(int64_t epoch, int64_t index) const {
  check(index >= 0 && index < batches_per_epoch(), "batch index out of range");
  auto ord = order(epoch);
  int64_t begin = index * opt_.batch_size;
  int64_t end = std::min<int64_t>(begin + opt_.batch_size, static_cast<int64_t>(ord->size()));
  return collate(std::vector<int64_t>(ord->begin() + begin, ord->begin() + end), epoch);
}

Batch BatchLoader::collate(const std::vector<int64_t>& indices, int64_t epoch) const {
  const int64_t n = static_cast<int64_t>(indices.size());
  const int64_t total = dataset_->size();
  std::vector<ImageTextSample> samples(n);
  std::vector<int64_t> used(n);  // a skipped sample's stand-in
  auto load = [&](int64_t i) {
    int64_t index = indices[i];
    for (int64_t attempt = 0;; ++attempt) {
      uint64_t seed = (opt_.seed * 1000003ULL + static_cast<uint64_t>(epoch)) * 2654435761ULL +
                      static_cast<uint64_t>(index);
      try {
        samples[i] = dataset_->get(index, seed);
        used[i] = index;
        return;
      } catch (const Error& e) {
        if (!opt_.skip_bad_samples) throw;
        if (skipped_->fetch_add(1) < 20) log_warn("skipping " + std::string(e.what()));
        check(attempt + 1 < total, "skip_bad_samples: no readable sample left in the dataset");
        index = (index + 1) % total;  // the next sample stands in
      }
    }
  };
  // Decode/transform on up to num_workers threads.
  int64_t workers = std::clamp<int64_t>(opt_.num_workers, 1, n);
  std::vector<std::future<void>> jobs;
  for (int64_t w = 0; w < workers; ++w)
    jobs.push_back(std::async(std::launch::async, [&, w] {
      for (int64_t i = w; i < n; i += workers) load(i);
    }));
  for (auto& j : jobs) j.get();  // rethrows the first error

  Batch b;
  std::vector<torch::Tensor> images;
  std::vector<int64_t> ids, labels;
  for (auto& s : samples) {
    images.push_back(s.image);
    b.captions.push_back(clean_caption(s.caption, text_.max_words, text_.prompt));
    ids.push_back(s.image_id);
    labels.push_back(s.label);
  }
  b.images = torch::stack(images);
  if (tokenizer_) {  // stage 2 tokenises with the LLM's tokenizer itself
    auto enc = tokenizer_->encode_batch(b.captions, text_.max_length, text_.padding);
    b.ids = enc.ids;
    b.keep = enc.keep;
  }
  b.image_ids = torch::tensor(ids, torch::kLong);
  b.indices = std::move(used);
  b.labels = torch::tensor(labels, torch::kLong);
  if (opt_.pin_memory) {
    b.images = b.images.pin_memory();
    if (b.ids.defined()) b.ids = b.ids.pin_memory();
    if (b.keep.defined()) b.keep = b.keep.pin_memory();
    b.image_ids = b.image_ids.pin_memory();
    b.labels = b.labels.pin_memory();
  }
  return b;
}

BatchLoader::Stream::Stream(const BatchLoader& loader, int64_t epoch, int64_t start, int64_t end, int64_t stride)
    : loader_(loader), epoch_(epoch), next_index_(start),
      end_((end < 0 ? loader.batches_per_epoch() : std::min(end, loader.batches_per_epoch())) - 1), queued_(start),
      stride_(std::max<int64_t>(1, stride)) {
  fill();
}

void BatchLoader::Stream::fill() {
  const auto depth = static_cast<size_t>(std::max<int64_t>(1, loader_.opt_.prefetch));
  while (pending_.size() < depth && queued_ <= end_) {
    pending_.push_back(std::async(std::launch::async, [this, i = queued_] { return loader_.batch(epoch_, i); }));
    queued_ += stride_;
  }
}

BatchLoader::Stream::~Stream() {
  for (auto& p : pending_)
    if (p.valid()) p.wait();
}

Batch BatchLoader::Stream::next() {
  check(!done(), "batch stream exhausted");
  Batch current = pending_.front().get();
  pending_.pop_front();
  next_index_ += stride_;
  fill();
  return current;
}

}  // namespace blip2
