#include "blip2/data/caption_datasets.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "blip2/util/common.h"

namespace blip2 {
namespace fs = std::filesystem;

torch::Tensor ImageTransform::operator()(const Image& img, uint64_t sample_seed) const {
  if (!train) return eval_transform(img, options.size);
  std::mt19937_64 rng(sample_seed);
  return train_transform(img, options, rng);
}

ImageTransform make_image_transform(const ImageTransformConfig& cfg, bool train,
                                    int64_t default_size) {
  ImageTransform t;
  const std::string type = cfg.type.empty() ? (train ? "blip2_image_train" : "blip_image_eval")
                                            : cfg.type;
  check(type == "blip2_image_train" || type == "blip_image_train" || type == "blip_image_eval",
        "image_transforms.type: '" + type +
            "' is not blip2_image_train|blip_image_train|blip_image_eval");
  t.train = type != "blip_image_eval";
  t.options.rand_augment = type == "blip_image_train";
  t.options.size = cfg.image_size > 0 ? cfg.image_size : default_size;
  t.options.scale_min = cfg.scale_min;
  t.options.scale_max = cfg.scale_max;
  t.options.hflip = cfg.hflip;
  return t;
}

std::vector<CaptionEntry> read_caption_annotations(const std::string& json_path,
                                                   const std::string& image_dir) {
  std::error_code ec;
  check(fs::is_regular_file(json_path, ec), json_path + ": annotation file not found");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(json_path));
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(json_path + ": malformed JSON at byte " + std::to_string(e.byte));
  }
  check(j.is_array(), json_path + ": expected a list of annotations, got a JSON " +
                          std::string(j.type_name()));
  std::vector<CaptionEntry> out;
  out.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    const auto& a = j[i];
    const std::string where = json_path + ": entry " + std::to_string(i);
    check(a.is_object(), where + ": expected an object");
    check(a.contains("image") && a["image"].is_string(), where + ": missing string 'image'");
    check(a.contains("caption"), where + ": missing 'caption'");
    CaptionEntry e;
    e.image = (fs::path(image_dir) / a["image"].get<std::string>()).string();
    e.where = where;
    if (a.contains("image_id")) {
      const auto& id = a["image_id"];
      check(id.is_string() || id.is_number_integer(), where + ": 'image_id' must be a string or an integer");
      e.image_id = id.dump();
      e.image_key = "id " + e.image_id + " of " + json_path;  // ids are the file's own (COCO's and VG's may meet)
    } else {
      e.image_key = "path " + e.image;
    }
    const auto& c = a["caption"];
    if (c.is_string()) {
      e.captions.push_back(c.get<std::string>());
    } else {
      check(c.is_array() && !c.empty(), where + ": 'caption' must be a string or a non-empty list");
      for (const auto& s : c) {
        check(s.is_string(), where + ": 'caption' list holds a non-string");
        e.captions.push_back(s.get<std::string>());
      }
    }
    out.push_back(std::move(e));
  }
  return out;
}

CaptionDataset::CaptionDataset(const DataLoaderConfig& cfg, ImageTransform transform)
    : transform_(std::move(transform)) {
  check(!cfg.annotation_files.empty(), "data_loader.annotation_files is empty");
  check(cfg.annotation_files.size() == cfg.image_dirs.size(),
        "data_loader: " + std::to_string(cfg.annotation_files.size()) + " annotation_files but " +
            std::to_string(cfg.image_dirs.size()) + " image_dirs (they are pairs)");
  const fs::path root = cfg.dataset_dir;
  for (size_t f = 0; f < cfg.annotation_files.size(); ++f) {
    auto entries = read_caption_annotations((root / cfg.annotation_files[f]).string(),
                                            (root / cfg.image_dirs[f]).string());
    for (auto& e : entries) entries_.push_back(std::move(e));
  }
  check(!entries_.empty(), "data_loader.annotation_files hold no annotation");
  // LAVIS' caption datasets: the dense index of each distinct image_id (an annotation file's
  // ids are its own; entries without one are told apart by their image path).
  std::map<std::string, int64_t> dense;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    auto [it, added] = dense.emplace(e.image_key, static_cast<int64_t>(images_.size()));
    if (added) {
      images_.push_back(static_cast<int64_t>(i));
      img2txt_.emplace_back();
    } else {
      const auto& first = entries_[static_cast<size_t>(images_[static_cast<size_t>(it->second)])];
      check(first.image == e.image, e.where + ": image_id " + e.image_id + " is also " + first.where +
                                        "'s, whose image is another file (" + first.image + " vs " + e.image + ")");
    }
    for (const auto& c : e.captions) {
      const auto t = static_cast<int64_t>(texts_.size());
      texts_.push_back(c);
      img2txt_[static_cast<size_t>(it->second)].push_back(t);
      txt2img_.push_back(it->second);
      pairs_.emplace_back(static_cast<int64_t>(i), t);
    }
  }
}

ImageTextSample CaptionDataset::get(int64_t index, uint64_t sample_seed) const {
  const auto [entry, txt] = pairs_.at(static_cast<size_t>(index));
  const auto& e = entries_[static_cast<size_t>(entry)];
  ImageTextSample s;
  try {
    s.image = transform_(load_image(e.image), sample_seed);
  } catch (const Error& err) {
    throw Error(std::string(err.what()) + " (" + e.where + ")");
  }
  s.caption = texts_[static_cast<size_t>(txt)];
  s.image_id = txt2img_[static_cast<size_t>(txt)];
  return s;
}

std::string CaptionDataset::describe(int64_t index) const {
  return entries_.at(pairs_.at(static_cast<size_t>(index)).first).where;
}

torch::Tensor CaptionDataset::image(int64_t image_index) const {
  const auto& e = entries_.at(static_cast<size_t>(images_.at(static_cast<size_t>(image_index))));
  return eval_transform(load_image(e.image), transform_.options.size);
}

// ---- CIFAR-100 (binary release) ----

namespace {
constexpr int64_t kCifarRecord = 2 + 3 * 32 * 32;

std::vector<std::string> read_lines(const fs::path& p) {
  std::error_code ec;
  check(fs::is_regular_file(p, ec), p.string() + ": label names file not found");
  std::ifstream in(p);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (!line.empty()) out.push_back(line);
  }
  return out;
}
}  // namespace

Cifar100Dataset::Cifar100Dataset(const DataLoaderConfig& cfg, ImageTransform transform)
    : fine_(cfg.fine_label), template_(cfg.hypothesis_template), transform_(std::move(transform)) {
  fs::path dir = cfg.dataset_dir;
  std::error_code ec;
  if (!fs::exists(dir / "test.bin", ec) && fs::is_directory(dir / "cifar-100-binary", ec))
    dir /= "cifar-100-binary";
  const std::string stage = cfg.stage == "eval" ? "test" : cfg.stage;
  check(stage == "train" || stage == "test", "data_loader.stage: '" + cfg.stage +
                                                 "' is not train|test for CIFAR-100");
  file_ = (dir / (stage + ".bin")).string();
  check(fs::is_regular_file(file_, ec), file_ + ": CIFAR-100 binary file not found");
  bytes_ = read_file(file_);
  check(!bytes_.empty() && bytes_.size() % kCifarRecord == 0,
        file_ + ": size " + std::to_string(bytes_.size()) + " is not a multiple of the " +
            std::to_string(kCifarRecord) + "-byte CIFAR-100 record");
  count_ = static_cast<int64_t>(bytes_.size()) / kCifarRecord;
  names_ = read_lines(dir / (fine_ ? "fine_label_names.txt" : "coarse_label_names.txt"));
  const size_t want = fine_ ? 100 : 20;
  check(names_.size() == want, (dir / (fine_ ? "fine_label_names.txt" : "coarse_label_names.txt")).string() +
                                   ": expected " + std::to_string(want) + " names, found " +
                                   std::to_string(names_.size()));
}

Image Cifar100Dataset::raw_image(int64_t index) const {
  const char* r = bytes_.data() + index * kCifarRecord + 2;
  Image img{32, 32, std::vector<uint8_t>(32 * 32 * 3)};
  for (int64_t p = 0; p < 32 * 32; ++p)
    for (int c = 0; c < 3; ++c) img.rgb[p * 3 + c] = static_cast<uint8_t>(r[c * 1024 + p]);
  return img;
}

ImageTextSample Cifar100Dataset::get(int64_t index, uint64_t sample_seed) const {
  check(index >= 0 && index < count_, file_ + ": record " + std::to_string(index) + " out of range");
  const auto* rec = reinterpret_cast<const uint8_t*>(bytes_.data() + index * kCifarRecord);
  const int label = fine_ ? rec[1] : rec[0];
  check(label < static_cast<int>(names_.size()),
        file_ + ": record " + std::to_string(index) + " has label " + std::to_string(label) +
            " beyond the " + std::to_string(names_.size()) + " class names");
  ImageTextSample s;
  s.image = transform_(raw_image(index), sample_seed);
  s.label = label;
  s.image_id = index;
  s.caption = fill_template(template_, names_[label]);
  return s;
}

// ---- a folder of images ----

ImageFolderDataset::ImageFolderDataset(const std::vector<std::string>& inputs,
                                       ImageTransform transform)
    : transform_(std::move(transform)) {
  auto is_image = [](const fs::path& p) {
    std::string ext = p.extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
    return ext == ".jpg" || ext == ".jpeg" || ext == ".png";
  };
  for (const auto& in : inputs) {
    std::error_code ec;
    if (fs::is_directory(in, ec)) {
      std::vector<std::string> found;
      for (const auto& e : fs::recursive_directory_iterator(in))
        if (e.is_regular_file() && is_image(e.path())) found.push_back(e.path().string());
      std::sort(found.begin(), found.end());
      check(!found.empty(), in + ": no .jpg/.jpeg/.png images in this directory");
      paths_.insert(paths_.end(), found.begin(), found.end());
    } else {
      check(fs::is_regular_file(in, ec), in + ": image not found");
      paths_.push_back(in);
    }
  }
  check(!paths_.empty(), "no images to read");
}

ImageTextSample ImageFolderDataset::get(int64_t index, uint64_t sample_seed) const {
  ImageTextSample s;
  s.image = transform_(load_image(paths_.at(static_cast<size_t>(index))), sample_seed);
  s.image_id = index;
  return s;
}

}  // namespace blip2
