#include "blip2/data/synthetic.h"

#include <array>
#include <cmath>
#include <random>

#include "blip2/data/caption_datasets.h"
#include "blip2/util/common.h"

namespace blip2 {
namespace {

const std::array<const char*, 5> kShapes{"circle", "square", "triangle", "cross", "ring"};
const std::array<const char*, 6> kColors{"red", "green", "blue", "yellow", "purple", "orange"};
const std::array<std::array<float, 3>, 6> kRgb{{{0.90f, 0.10f, 0.10f},
                                                {0.10f, 0.75f, 0.20f},
                                                {0.15f, 0.30f, 0.95f},
                                                {0.95f, 0.90f, 0.10f},
                                                {0.60f, 0.20f, 0.80f},
                                                {1.00f, 0.55f, 0.05f}}};
const std::array<const char*, 2> kSizes{"small", "large"};
const std::array<const char*, 5> kPositions{"on the left", "on the right", "at the top",
                                            "at the bottom", "in the center"};
// Shape centres (fractions of the side) per position.
const std::array<std::array<float, 2>, 5> kCentres{
    {{0.27f, 0.5f}, {0.73f, 0.5f}, {0.5f, 0.27f}, {0.5f, 0.73f}, {0.5f, 0.5f}}};

// A generator for one sample, independent of any global RNG.
std::mt19937_64 sample_rng(uint64_t seed, uint64_t split, int64_t index) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(split), static_cast<uint32_t>(index),
                    static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32)};
  return std::mt19937_64(seq);
}

bool inside(int shape, float dx, float dy, float r) {
  float d = std::sqrt(dx * dx + dy * dy);
  switch (shape) {
    case 0: return d <= r;
    case 1: return std::fabs(dx) <= 0.85f * r && std::fabs(dy) <= 0.85f * r;
    case 2: {  // upward triangle, apex at -r, base at +0.75r
      float t = (dy + r) / (1.75f * r);
      return t >= 0.f && t <= 1.f && std::fabs(dx) <= t * r;
    }
    case 3: return (std::fabs(dx) <= r / 3 && std::fabs(dy) <= r) ||
                   (std::fabs(dy) <= r / 3 && std::fabs(dx) <= r);
    default: return d <= r && d >= 0.55f * r;
  }
}

}  // namespace

int ShapeAttributes::label() const { return color * static_cast<int>(kShapes.size()) + shape; }

SyntheticShapes::SyntheticShapes(std::string split, int64_t num_samples, int64_t image_size,
                                 uint64_t seed)
    : split_(std::move(split)), num_samples_(num_samples), image_size_(image_size), seed_(seed) {
  check(split_ == "train" || split_ == "heldout" || split_ == "eval" || split_ == "test",
        "synthetic split '" + split_ + "' is not train|heldout");
  heldout_ = split_ != "train";
  check(num_samples_ > 0, "synthetic split '" + split_ + "' needs num_samples > 0");
  check(image_size_ >= 16, "synthetic images need image_size >= 16");
}

int64_t ShapeAttributes::combination() const {
  return shape + static_cast<int64_t>(kShapes.size()) *
                     (color + static_cast<int64_t>(kColors.size()) *
                                  (size + static_cast<int64_t>(kSizes.size()) * position));
}

ShapeAttributes SyntheticShapes::attributes(int64_t index) const {
  ShapeAttributes a;
  if (heldout_) {
    // Every held-out image has its own combination (a seeded permutation of all of them, cycled
    // past the count), so each canonical caption names exactly one image of the split and
    // retrieval R@1 can reach 100%.
    const int64_t n = kNumCombinations;
    static thread_local std::pair<uint64_t, std::vector<int>> cache;
    if (cache.second.empty() || cache.first != seed_) {
      std::vector<int> perm(n);
      for (int i = 0; i < n; ++i) perm[i] = i;
      auto rng = sample_rng(seed_, 2, -1);
      for (int64_t i = n - 1; i > 0; --i) std::swap(perm[i], perm[rng() % (i + 1)]);
      cache = {seed_, std::move(perm)};
    }
    int c = cache.second[index % n];
    a.shape = c % kShapes.size();
    c /= kShapes.size();
    a.color = c % kColors.size();
    c /= kColors.size();
    a.size = c % kSizes.size();
    a.position = c / kSizes.size();
    return a;
  }
  auto rng = sample_rng(seed_, 1, index);
  a.shape = static_cast<int>(rng() % kShapes.size());
  a.color = static_cast<int>(rng() % kColors.size());
  a.size = static_cast<int>(rng() % kSizes.size());
  a.position = static_cast<int>(rng() % kPositions.size());
  return a;
}

torch::Tensor SyntheticShapes::render(const ShapeAttributes& a, int64_t index) const {
  auto rng = sample_rng(seed_, heldout_ ? 4 : 3, index);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::normal_distribution<float> noise(0.f, 0.08f);
  const int64_t s = image_size_;
  const float side = static_cast<float>(s);
  const float r = side * (a.size == 0 ? 0.15f + 0.03f * u(rng) : 0.27f + 0.04f * u(rng));
  const float cx = side * (kCentres[a.position][0] + 0.06f * (u(rng) - 0.5f));
  const float cy = side * (kCentres[a.position][1] + 0.06f * (u(rng) - 0.5f));
  std::array<float, 3> bg{0.15f + 0.2f * u(rng), 0.15f + 0.2f * u(rng), 0.15f + 0.2f * u(rng)};
  std::array<float, 3> fg;
  for (int c = 0; c < 3; ++c)
    fg[c] = std::clamp(kRgb[a.color][c] + 0.1f * (u(rng) - 0.5f), 0.f, 1.f);

  auto img = torch::empty({3, s, s});
  auto acc = img.accessor<float, 3>();
  for (int64_t y = 0; y < s; ++y)
    for (int64_t x = 0; x < s; ++x) {
      bool in = inside(a.shape, x + 0.5f - cx, y + 0.5f - cy, r);
      for (int c = 0; c < 3; ++c)
        acc[c][y][x] = std::clamp((in ? fg[c] : bg[c]) + noise(rng), 0.f, 1.f);
    }
  return img;
}

std::string SyntheticShapes::canonical_caption(const ShapeAttributes& a) {
  return std::string("a ") + kSizes[a.size] + " " + kColors[a.color] + " " + kShapes[a.shape] +
         " " + kPositions[a.position];
}

ImageTextSample SyntheticShapes::get(int64_t index, uint64_t) const {
  check(index >= 0 && index < num_samples_, "synthetic index out of range");
  auto a = attributes(index);
  ImageTextSample out;
  out.image = normalize_image(render(a, index));
  out.image_id = a.combination();
  out.label = a.label();
  if (heldout_) {
    out.caption = canonical_caption(a);
    return out;
  }
  std::string size = kSizes[a.size], color = kColors[a.color], shape = kShapes[a.shape],
              pos = kPositions[a.position];
  auto rng = sample_rng(seed_, 5, index);
  switch (rng() % 5) {
    case 0: out.caption = canonical_caption(a); break;
    case 1: out.caption = "a photo of a " + color + " " + shape; break;
    case 2: out.caption = "there is a " + size + " " + color + " " + shape + " " + pos; break;
    case 3: out.caption = "this image shows a " + size + " " + color + " " + shape + " " + pos; break;
    default: out.caption = "a " + size + " " + color + " " + shape + " shape " + pos + ", dark background";
  }
  return out;
}

const std::vector<std::string>& SyntheticShapes::vocabulary() {
  static const std::vector<std::string> vocab = {
      "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "a", "an", "the",
      "of", "photo", "picture", "image", "there", "is", "in", "on", "at", "this",
      "shows", "with", "side", "part", "small", "large", "big", "tiny", "red", "green",
      "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "cross", "ring",
      "left", "right", "top", "bottom", "center", "middle", "shape", "##s", "and",
      "background", "dark"};
  return vocab;
}

std::vector<std::string> SyntheticShapes::class_names() {
  std::vector<std::string> names;
  for (const char* c : kColors)
    for (const char* s : kShapes) names.push_back(std::string(c) + " " + s);
  return names;
}

std::shared_ptr<ImageTextDataset> make_dataset(const DatasetConfig& cfg, int64_t image_size,
                                               uint64_t seed, const std::string& section) {
  const auto& dl = cfg.data_loader;
  if (dl.type == "SyntheticShapes") {
    bool train = dl.stage == "train";
    int64_t n = dl.num_samples > 0 ? dl.num_samples
                                   : (train ? SyntheticShapes::kDefaultTrainSize
                                            : SyntheticShapes::kDefaultHeldoutSize);
    return std::make_shared<SyntheticShapes>(train ? "train" : "heldout", n, image_size, seed);
  }
  const bool train = dl.stage == "train";
  ImageTransform transform = make_image_transform(cfg.image_transforms, train, image_size);
  try {
    if (dl.type == "MultiImgCapDataLoader") return std::make_shared<CaptionDataset>(dl, transform);
    if (dl.type == "Cifar100DataLoader") return std::make_shared<Cifar100Dataset>(dl, transform);
    if (dl.type == "ImageFolder")
      return std::make_shared<ImageFolderDataset>(std::vector<std::string>{dl.dataset_dir}, transform);
  } catch (const Error& e) {
    throw Error(section + ": " + e.what());
  }
  throw Error(section + ".data_loader.type: '" + dl.type +
              "' is not SyntheticShapes|MultiImgCapDataLoader|Cifar100DataLoader|ImageFolder");
}

std::shared_ptr<WordPieceTokenizer> make_tokenizer(const TokenizerConfig& cfg) {
  if (cfg.type != "BertTokenizer")
    throw Error("tokenizer.type '" + cfg.type + "' is not available (available: BertTokenizer)");
  if (cfg.vocab_file.empty())
    return std::make_shared<WordPieceTokenizer>(SyntheticShapes::vocabulary(), cfg.do_lower_case,
                                                cfg.bos_token);
  return std::make_shared<WordPieceTokenizer>(
      WordPieceTokenizer::from_file(cfg.vocab_file, cfg.do_lower_case, cfg.bos_token));
}

}  // namespace blip2
