// The zero_shot_image_classification task of a stage-1 model: evaluation on a labelled
// eval_dataset, and predictions for images (zero_shot.h holds the classifier).
#include "blip2/data/caption_datasets.h"
#include "blip2/dist/dist.h"
#include "blip2/tasks/stage1.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace blip2 {

ZeroShotClassifier Stage1Task::zero_shot_classifier(std::vector<std::string> labels) const {
  const auto& d = cfg_.eval_dataset;
  require_weights({"vision_projection.", "text_projection."}, "zero_shot_image_classification");
  if (d.itm_top_k > 0) require_weights({"itm_head."}, "zero_shot_image_classification with itm_top_k");
  ZeroShotOptions o;
  o.candidate_labels = d.data_loader.candidate_labels.empty() ? std::move(labels)
                                                              : d.data_loader.candidate_labels;
  o.hypothesis_template = d.data_loader.hypothesis_template;
  o.hypothesis_templates = d.data_loader.hypothesis_templates;
  o.itm_top_k = d.itm_top_k;
  o.max_length = d.text_transforms.max_length;
  o.max_words = d.text_transforms.max_words;
  o.prompt = d.text_transforms.prompt;
  try {
    return ZeroShotClassifier(model_, tokenizer_, std::move(o));
  } catch (const Error& e) {
    throw Error(std::string("eval_dataset.data_loader: ") + e.what());
  }
}

nlohmann::json Stage1Task::evaluate_zero_shot() {
  auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  auto classifier = zero_shot_classifier(loader.dataset().label_names());
  int64_t n = 0, top1 = 0, top5 = 0;
  // Under data parallelism batch b goes to dp rank b % dp; the counts are summed.
  const int64_t parts = dist::dp_size(), part = dist::dp_rank();
  BatchLoader::Stream stream(loader, 0, part, -1, parts);
  Progress progress("zero-shot", (loader.batches_per_epoch() - part + parts - 1) / parts,
                    cfg_.runner_config.log_interval);
  for (int64_t b = 0; !stream.done(); ++b) {
    Batch batch = stream.next().to(device_);
    auto probs = classifier.probabilities(batch.images);  // [B, labels]
    auto k = std::min<int64_t>(5, probs.size(1));
    auto top = std::get<1>(probs.topk(k, 1)).cpu();
    auto gold = batch.labels.cpu();
    top1 += (top.select(1, 0) == gold).sum().item<int64_t>();
    top5 += (top == gold.unsqueeze(1)).any(1).sum().item<int64_t>();
    n += top.size(0);
    progress.update(b + 1, "");
  }
  progress.finish();
  auto counts = torch::tensor({n, top1, top5}, torch::kLong);
  dist::combine_rows(counts);
  n = counts[0].item<int64_t>();
  top1 = counts[1].item<int64_t>();
  top5 = counts[2].item<int64_t>();
  return {{"top1_accuracy", 100.0 * top1 / std::max<int64_t>(1, n)},
          {"top5_accuracy", 100.0 * top5 / std::max<int64_t>(1, n)},
          {"num_images", n}, {"num_labels", static_cast<int64_t>(classifier.labels().size())}};
}

nlohmann::json Stage1Task::predict_zero_shot(const std::vector<std::string>& inputs) {
  model_->eval();
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(cfg_.runner_config.bf16_autocast, device_);
  nlohmann::json out = nlohmann::json::array();
  if (inputs.empty()) {  // the eval dataset, its class names as candidates (as the seed's CIFAR-100)
    auto loader = make_loader(cfg_.eval_dataset, /*train=*/false);
    auto classifier = zero_shot_classifier(loader.dataset().label_names());
    BatchLoader::Stream stream(loader, 0, 0);
    Progress progress("predict", loader.batches_per_epoch(), cfg_.runner_config.log_interval);
    for (int64_t b = 0; !stream.done(); ++b) {
      Batch batch = stream.next();
      auto probs = classifier.probabilities(batch.images.to(device_));
      for (int64_t i = 0; i < probs.size(0); ++i)
        out.push_back({{"image", loader.dataset().describe(batch.indices[static_cast<size_t>(i)])},
                       {"result", classifier.ranked(probs[i])}});
      progress.update(b + 1, "");
    }
    progress.finish();
    return out;
  }
  auto classifier = zero_shot_classifier({});
  ImageFolderDataset images(inputs, make_image_transform({}, false, cfg_.model.model_config.vision_config.image_size));
  for (int64_t i = 0; i < images.size(); ++i) {
    auto probs = classifier.probabilities(images.get(i).image.unsqueeze(0).to(device_));
    out.push_back({{"image", images.paths()[i]}, {"result", classifier.ranked(probs[0])}});
  }
  return out;
}

}  // namespace blip2
