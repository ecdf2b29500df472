// The datasets users bring, in the layouts of the seed and LAVIS:
//
//   MultiImgCapDataLoader  LAVIS caption JSON (COCO Karpathy train/val/test, Visual Genome
//                          vg_caption.json, Flickr30k test.json): a list of {"image": path
//                          relative to the image dir, "caption": string or list of strings,
//                          "image_id": ...}; several (annotation file, image dir) pairs under one
//                          dataset_dir. Train: one sample per (image, caption). Eval: the same
//                          pairs, plus the image <-> text ground truth retrieval needs.
//   Cifar100DataLoader     the CIFAR-100 binary release (train.bin / test.bin, records of
//                          coarse label, fine label, 3x32x32 bytes; fine/coarse_label_names.txt).
//   ImageFolder            every .jpg/.jpeg/.png under a directory (or one file), for predict.
#pragma once

#include <string>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/data/dataset.h"
#include "blip2/vision/image.h"

namespace blip2 {

// How images become tensors (train: random resized crop + flip; eval: resize).
struct ImageTransform {
  bool train = false;
  TrainTransformOptions options;
  torch::Tensor operator()(const Image& img, uint64_t sample_seed) const;
};
ImageTransform make_image_transform(const ImageTransformConfig& cfg, bool train,
                                    int64_t default_size);

struct CaptionEntry {
  std::string image;                  // full path
  std::vector<std::string> captions;
  std::string where;                  // "file: entry N" for errors
  std::string image_id;                // the annotation's "image_id" as JSON text (9 and "9" differ); "" = none
  // What identifies the image: the image_id within its annotation file, else the path. Entries
  // with equal keys show one image (COCO-train style: an entry per caption).
  std::string image_key;
};

// Reads one LAVIS caption annotation file; errors name the file and the entry.
std::vector<CaptionEntry> read_caption_annotations(const std::string& json_path,
                                                   const std::string& image_dir);

class CaptionDataset : public ImageTextDataset {
 public:
  CaptionDataset(const DataLoaderConfig& cfg, ImageTransform transform);
  int64_t size() const override { return static_cast<int64_t>(pairs_.size()); }
  using ImageTextDataset::get;
  ImageTextSample get(int64_t index, uint64_t sample_seed) const override;
  std::string describe(int64_t index) const override;

  // Retrieval view (eval): each distinct image once (entries grouped by image id, in order of
  // first appearance), every caption once, a caption matching every caption-list of its image.
  int64_t num_images() const { return static_cast<int64_t>(images_.size()); }
  const std::vector<std::string>& texts() const { return texts_; }
  const std::vector<std::vector<int64_t>>& img2txt() const { return img2txt_; }
  const std::vector<int64_t>& txt2img() const { return txt2img_; }
  torch::Tensor image(int64_t image_index) const;  // eval transform

 private:
  std::vector<CaptionEntry> entries_;
  std::vector<int64_t> images_;                     // the first entry of each distinct image
  std::vector<std::pair<int64_t, int64_t>> pairs_;  // (image index, text index)
  std::vector<std::string> texts_;
  std::vector<std::vector<int64_t>> img2txt_;
  std::vector<int64_t> txt2img_;
  ImageTransform transform_;
};

class Cifar100Dataset : public ImageTextDataset {
 public:
  // dir holds train.bin / test.bin and the label name files; stage train | test.
  Cifar100Dataset(const DataLoaderConfig& cfg, ImageTransform transform);
  int64_t size() const override { return count_; }
  using ImageTextDataset::get;
  ImageTextSample get(int64_t index, uint64_t sample_seed) const override;
  const std::vector<std::string>& class_names() const { return names_; }
  std::vector<std::string> label_names() const override { return names_; }
  Image raw_image(int64_t index) const;

 private:
  std::string file_, bytes_;
  int64_t count_ = 0;
  std::vector<std::string> names_;
  bool fine_;
  std::string template_;
  ImageTransform transform_;
};

class ImageFolderDataset : public ImageTextDataset {
 public:
  ImageFolderDataset(const std::vector<std::string>& paths_or_dirs, ImageTransform transform);
  int64_t size() const override { return static_cast<int64_t>(paths_.size()); }
  using ImageTextDataset::get;
  ImageTextSample get(int64_t index, uint64_t sample_seed) const override;
  std::string describe(int64_t index) const override { return paths_.at(index); }
  const std::vector<std::string>& paths() const { return paths_; }

 private:
  std::vector<std::string> paths_;
  ImageTransform transform_;
};

}  // namespace blip2
