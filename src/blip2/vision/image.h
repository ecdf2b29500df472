// Images as Pillow + LAVIS prepare them: decode (JPEG via libjpeg-turbo, PNG via libpng) with
// Pillow's convert("RGB") semantics, Pillow's antialiased BICUBIC resize re-implemented in the
// same fixed-point arithmetic, crops and flips, then ToTensor + CLIP normalisation.
//
// Decoding follows Pillow's defaults: no EXIF rotation, ISLOW IDCT with fancy upsampling,
// greyscale replicated, alpha dropped (not composited), palettes looked up, CMYK JPEGs read
// with Adobe inversion and converted with Pillow's cmyk2rgb, 16-bit RGB reduced to its high byte.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace blip2 {

// 8-bit RGB, row-major HWC.
struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;
  uint8_t* row(int64_t y) { return rgb.data() + y * width * 3; }
  const uint8_t* row(int64_t y) const { return rgb.data() + y * width * 3; }
};

// The largest image (width x height) the decoders take: a larger one is refused from its header,
// before any pixel buffer is allocated (a 7 KB PNG can declare 40000 x 40000). Default: Pillow's
// error threshold, twice its MAX_IMAGE_PIXELS: 178,956,970; above half of it a warning is logged,
// as Pillow does. Run configs set it with max_image_pixels. Process-wide.
void set_max_image_pixels(int64_t pixels);
int64_t max_image_pixels();

// Detects the format from the bytes; errors name `name` (the file) and what is wrong.
Image decode_image_bytes(const std::string& bytes, const std::string& name);
Image load_image(const std::string& path);

// Pillow's Image.resize((w, h), BICUBIC): separable, antialiased when shrinking (support scaled
// by the factor), coefficients in 22-bit fixed point, horizontal pass first and 8-bit in between
// (Pillow <= 12; Pillow 13 may run the vertical pass first on some sizes).
Image resize_bicubic(const Image& in, int64_t width, int64_t height);
Image crop(const Image& in, int64_t x, int64_t y, int64_t width, int64_t height);
Image hflip(const Image& in);

// Normalize with the OpenAI CLIP mean/std (every BLIP-2 image processor): float [3,H,W] in [0,1].
torch::Tensor normalize_image(const torch::Tensor& image01);
// uint8 [3,H,W] and ToTensor + normalize_image, float [3,H,W].
torch::Tensor to_uint8_tensor(const Image& img);
torch::Tensor to_normalized_tensor(const Image& img);

// blip_image_eval: Resize((S, S), BICUBIC), a squash without crop.
torch::Tensor eval_transform(const Image& img, int64_t size);

// blip2_image_train: RandomResizedCrop(S, scale, ratio 3/4..4/3, BICUBIC) + horizontal flip
// with probability 0.5, drawn from `rng` (torchvision's sampling procedure).
struct TrainTransformOptions {
  int64_t size = 224;
  double scale_min = 0.5, scale_max = 1.0;
  double ratio_min = 3.0 / 4.0, ratio_max = 4.0 / 3.0;
  bool hflip = true;
  bool rand_augment = false;  // blip_image_train: RandomAugment(2, 5) after the flip
};

// LAVIS' RandomAugment(N, M) with blip_image_train's ops (Identity, AutoContrast, Brightness,
// Sharpness, Equalize, ShearX, ShearY, TranslateX, TranslateY, Rotate): N ops drawn with
// replacement, each applied with probability 0.5 at magnitude M of 10; geometric ops fill with
// grey 128. The geometry and tables follow LAVIS' randaugment.py; the bilinear warps are
// computed in floating point (OpenCV quantises sub-pixel positions to 1/32).
Image rand_augment(const Image& img, std::mt19937_64& rng, int n = 2, int magnitude = 5);
// PIL.ImageOps.autocontrast (cutoff 0) and PIL.ImageOps.equalize, per channel.
Image autocontrast(const Image& img);
Image equalize(const Image& img);
torch::Tensor train_transform(const Image& img, const TrainTransformOptions& o, std::mt19937_64& rng);

}  // namespace blip2
