#include "blip2/vision/image.h"

#include <array>
#include <atomic>
#include <csetjmp>
#include <cstdio>
#include <cstring>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "blip2/util/common.h"

namespace blip2 {
namespace {

// ---- JPEG ----

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}
// Warnings are quiet, except the one that says the data ran out: Pillow refuses a truncated
// JPEG ("image file is truncated") where libjpeg would fill the missing rows with grey.
void jpeg_quiet(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
    auto* err = reinterpret_cast<JpegError*>(cinfo->err);
    std::snprintf(err->message, sizeof err->message, "the image file is truncated");
    std::longjmp(err->jump, 1);
  }
}

// Pillow's cmyk2rgb: nk = 255 - k; channel = nk - c * nk / 255 (rounded as MULDIV255).
inline uint8_t cmyk_channel(int c, int k) {
  int nk = 255 - k;
  int tmp = c * nk + 128;
  int v = nk - (((tmp >> 8) + tmp) >> 8);
  return static_cast<uint8_t>(std::clamp(v, 0, 255));
}

std::atomic<int64_t> g_max_image_pixels{178956970};

// Pillow's decompression-bomb guard, from the header: an error above the limit, a warning above
// half of it (Pillow's MAX_IMAGE_PIXELS). Returns the error message, "" when the size is fine.
std::string pixel_limit_error(int64_t width, int64_t height, const std::string& name) {
  const int64_t pixels = width * height, limit = g_max_image_pixels.load();
  if (pixels > limit)
    return name + ": " + std::to_string(width) + " x " + std::to_string(height) + " = " + std::to_string(pixels) +
           " pixels exceeds the limit of " + std::to_string(limit) +
           " (max_image_pixels); refused before decoding, as Pillow refuses decompression bombs";
  if (pixels > limit / 2)
    log_warn(name + ": " + std::to_string(width) + " x " + std::to_string(height) + " is a very large image (" +
             std::to_string(pixels) + " pixels)");
  return "";
}

Image decode_jpeg(const std::string& bytes, const std::string& name) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_quiet;
  Image img;
  std::vector<uint8_t> line;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw Error(name + ": corrupt JPEG (" + err.message + ")");
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()),
               static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  if (auto too_big = pixel_limit_error(cinfo.image_width, cinfo.image_height, name); !too_big.empty()) {
    jpeg_destroy_decompress(&cinfo);
    throw Error(too_big);
  }
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  const bool grey = cinfo.jpeg_color_space == JCS_GRAYSCALE;
  cinfo.out_color_space = cmyk ? JCS_CMYK : grey ? JCS_GRAYSCALE : JCS_RGB;
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&cinfo);
  img.width = cinfo.output_width;
  img.height = cinfo.output_height;
  img.rgb.resize(static_cast<size_t>(img.width * img.height * 3));
  line.resize(static_cast<size_t>(img.width) * cinfo.output_components);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW rows[1] = {line.data()};
    const int64_t y = cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, rows, 1);
    uint8_t* out = img.row(y);
    for (int64_t x = 0; x < img.width; ++x) {
      if (grey) {
        out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = line[x];
      } else if (cmyk) {  // Pillow assumes Adobe's inverted CMYK ("CMYK;I")
        const uint8_t* p = &line[4 * x];
        int k = 255 - p[3];
        for (int c = 0; c < 3; ++c) out[3 * x + c] = cmyk_channel(255 - p[c], k);
      } else {
        std::memcpy(out + 3 * x, &line[3 * x], 3);
      }
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return img;
}

// ---- PNG ----

struct PngReader {
  const std::string* bytes = nullptr;
  size_t offset = 0;
  std::string error;
};

void png_read_mem(png_structp png, png_bytep out, png_size_t n) {
  auto* r = static_cast<PngReader*>(png_get_io_ptr(png));
  if (r->offset + n > r->bytes->size()) png_error(png, "file is truncated");
  std::memcpy(out, r->bytes->data() + r->offset, n);
  r->offset += n;
}
void png_fail(png_structp png, png_const_charp msg) {
  auto* r = static_cast<PngReader*>(png_get_error_ptr(png));
  r->error = msg;
  png_longjmp(png, 1);
}
void png_quiet(png_structp, png_const_charp) {}

Image decode_png(const std::string& bytes, const std::string& name) {
  PngReader reader;
  reader.bytes = &bytes;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &reader, png_fail, png_quiet);
  check(png != nullptr, name + ": cannot allocate a PNG reader");
  png_infop info = png_create_info_struct(png);
  Image img;
  std::vector<png_bytep> rows;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw Error(name + ": corrupt PNG (" + reader.error + ")");
  }
  png_set_read_fn(png, &reader, png_read_mem);
  png_read_info(png, info);
  if (auto too_big = pixel_limit_error(png_get_image_width(png, info), png_get_image_height(png, info), name);
      !too_big.empty()) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw Error(too_big);
  }
  const int color = png_get_color_type(png, info);
  const int depth = png_get_bit_depth(png, info);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);  // tRNS ignored: no alpha
  if ((color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) && depth < 8)
    png_set_expand_gray_1_2_4_to_8(png);
  if (depth == 16) png_set_strip_16(png);  // high byte, as Pillow's RGB;16B
  if ((color & PNG_COLOR_MASK_ALPHA) || png_get_valid(png, info, PNG_INFO_tRNS))
    png_set_strip_alpha(png);  // Pillow's convert("RGB") drops alpha and transparency
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  img.width = png_get_image_width(png, info);
  img.height = png_get_image_height(png, info);
  if (png_get_rowbytes(png, info) != static_cast<size_t>(img.width * 3)) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw Error(name + ": unsupported PNG layout");
  }
  img.rgb.resize(static_cast<size_t>(img.width * img.height * 3));
  rows.resize(static_cast<size_t>(img.height));
  for (int64_t y = 0; y < img.height; ++y) rows[y] = img.row(y);
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return img;
}

// ---- Pillow's resampling ----

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis.
struct Coeffs {
  int64_t ksize;
  std::vector<int64_t> bounds;  // per output: first input index, count
  std::vector<int32_t> k;       // per output: ksize fixed-point weights
};

Coeffs precompute(int64_t in_size, int64_t out_size) {
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(out_size * 2);
  c.k.assign(out_size * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      w[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int64_t x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[x] / ww : w[x];
      c.k[xx * c.ksize + x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                                    : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

Image resample_horizontal(const Image& in, int64_t out_w) {
  Coeffs c = precompute(in.width, out_w);
  Image out{out_w, in.height, std::vector<uint8_t>(static_cast<size_t>(out_w * in.height * 3))};
  // 32-bit sums as Pillow: the weights sum to 2^22, so |sum| stays below 2^31.
  for (int64_t y = 0; y < in.height; ++y) {
    const uint8_t* src = in.row(y);
    uint8_t* dst = out.row(y);
    for (int64_t xx = 0; xx < out_w; ++xx) {
      const int64_t n = c.bounds[xx * 2 + 1];
      const uint8_t* p = src + c.bounds[xx * 2] * 3;
      const int32_t* k = &c.k[xx * c.ksize];
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int64_t x = 0; x < n; ++x, p += 3) {
        s0 += p[0] * k[x];
        s1 += p[1] * k[x];
        s2 += p[2] * k[x];
      }
      dst[xx * 3] = clip8(s0);
      dst[xx * 3 + 1] = clip8(s1);
      dst[xx * 3 + 2] = clip8(s2);
    }
  }
  return out;
}

Image resample_vertical(const Image& in, int64_t out_h) {
  Coeffs c = precompute(in.height, out_h);
  Image out{in.width, out_h, std::vector<uint8_t>(static_cast<size_t>(in.width * out_h * 3))};
  const int64_t stride = in.width * 3;
  std::vector<int32_t> acc(static_cast<size_t>(stride));
  for (int64_t yy = 0; yy < out_h; ++yy) {
    const int64_t ymin = c.bounds[yy * 2], n = c.bounds[yy * 2 + 1];
    const int32_t* k = &c.k[yy * c.ksize];
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    for (int64_t y = 0; y < n; ++y) {  // row by row: contiguous, vectorisable
      const uint8_t* src = in.row(y + ymin);
      const int32_t w = k[y];
      for (int64_t i = 0; i < stride; ++i) acc[i] += src[i] * w;
    }
    uint8_t* dst = out.row(yy);
    for (int64_t i = 0; i < stride; ++i) dst[i] = clip8(acc[i]);
  }
  return out;
}

}  // namespace

Image decode_image_bytes(const std::string& bytes, const std::string& name) {
  auto starts = [&](const char* magic, size_t n) {
    return bytes.size() >= n && std::memcmp(bytes.data(), magic, n) == 0;
  };
  if (starts("\xFF\xD8\xFF", 3)) return decode_jpeg(bytes, name);
  if (starts("\x89PNG\r\n\x1a\n", 8)) return decode_png(bytes, name);
  throw Error(name + ": not a JPEG or PNG image" + (bytes.empty() ? " (empty file)" : ""));
}

void set_max_image_pixels(int64_t pixels) {
  check(pixels > 0, "max_image_pixels must be positive");
  g_max_image_pixels.store(pixels);
}

int64_t max_image_pixels() { return g_max_image_pixels.load(); }

Image load_image(const std::string& path) {
  std::error_code ec;
  check(std::filesystem::is_regular_file(path, ec), path + ": image not found");
  return decode_image_bytes(read_file(path), path);
}

Image resize_bicubic(const Image& in, int64_t width, int64_t height) {
  check(width > 0 && height > 0, "resize to a non-positive size");
  if (in.width == width && in.height == height) return in;
  // Horizontal pass first, as Pillow's ImagingResampleInner through 12.x. (Pillow 13 picks
  // the order by a heuristic; as the intermediate is rounded to 8 bits, some sizes then differ
  // by a few levels.)
  Image h = in.width != width ? resample_horizontal(in, width) : in;
  return in.height != height ? resample_vertical(h, height) : h;
}

Image crop(const Image& in, int64_t x, int64_t y, int64_t width, int64_t height) {
  check(x >= 0 && y >= 0 && width > 0 && height > 0 && x + width <= in.width &&
            y + height <= in.height,
        "crop box outside the image");
  Image out{width, height, std::vector<uint8_t>(static_cast<size_t>(width * height * 3))};
  for (int64_t r = 0; r < height; ++r)
    std::memcpy(out.row(r), in.row(y + r) + x * 3, static_cast<size_t>(width * 3));
  return out;
}

Image hflip(const Image& in) {
  Image out = in;
  for (int64_t y = 0; y < in.height; ++y)
    for (int64_t x = 0; x < in.width; ++x)
      std::memcpy(out.row(y) + x * 3, in.row(y) + (in.width - 1 - x) * 3, 3);
  return out;
}

torch::Tensor to_uint8_tensor(const Image& img) {
  return torch::from_blob(const_cast<uint8_t*>(img.rgb.data()), {img.height, img.width, 3},
                          torch::kUInt8)
      .permute({2, 0, 1})
      .clone();
}

torch::Tensor normalize_image(const torch::Tensor& image01) {
  static const auto mean = torch::tensor({0.48145466f, 0.4578275f, 0.40821073f}).view({3, 1, 1});
  static const auto std = torch::tensor({0.26862954f, 0.26130258f, 0.27577711f}).view({3, 1, 1});
  return (image01 - mean) / std;
}

torch::Tensor to_normalized_tensor(const Image& img) {
  return normalize_image(to_uint8_tensor(img).to(torch::kFloat32) / 255.0f);
}

torch::Tensor eval_transform(const Image& img, int64_t size) {
  return to_normalized_tensor(resize_bicubic(img, size, size));
}

torch::Tensor train_transform(const Image& img, const TrainTransformOptions& o,
                              std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double area = static_cast<double>(img.width * img.height);
  int64_t w = img.width, h = img.height, x = 0, y = 0;
  bool found = false;
  for (int attempt = 0; attempt < 10 && !found; ++attempt) {
    double target = area * (o.scale_min + (o.scale_max - o.scale_min) * u(rng));
    double log_r = std::log(o.ratio_min) + (std::log(o.ratio_max) - std::log(o.ratio_min)) * u(rng);
    double aspect = std::exp(log_r);
    int64_t cw = std::llround(std::sqrt(target * aspect));
    int64_t ch = std::llround(std::sqrt(target / aspect));
    if (cw > 0 && ch > 0 && cw <= img.width && ch <= img.height) {
      w = cw;
      h = ch;
      y = std::uniform_int_distribution<int64_t>(0, img.height - h)(rng);
      x = std::uniform_int_distribution<int64_t>(0, img.width - w)(rng);
      found = true;
    }
  }
  if (!found) {  // torchvision's fallback: the whole image, clamped to the ratio range, centred
    double in_ratio = static_cast<double>(img.width) / img.height;
    if (in_ratio < o.ratio_min) {
      w = img.width;
      h = std::llround(w / o.ratio_min);
    } else if (in_ratio > o.ratio_max) {
      h = img.height;
      w = std::llround(h * o.ratio_max);
    }
    h = std::min(h, img.height);
    w = std::min(w, img.width);
    y = (img.height - h) / 2;
    x = (img.width - w) / 2;
  }
  Image out = resize_bicubic(crop(img, x, y, w, h), o.size, o.size);
  if (o.hflip && u(rng) < 0.5) out = hflip(out);
  if (o.rand_augment) out = rand_augment(out, rng);
  return to_normalized_tensor(out);
}

namespace {

Image map_table(const Image& img, const std::array<std::array<uint8_t, 256>, 3>& table) {
  Image out = img;
  for (size_t i = 0; i < out.rgb.size(); ++i) out.rgb[i] = table[i % 3][img.rgb[i]];
  return out;
}

}  // namespace

Image autocontrast(const Image& img) {
  std::array<std::array<uint8_t, 256>, 3> t;
  for (int c = 0; c < 3; ++c) {
    int lo = 255, hi = 0;
    for (size_t i = c; i < img.rgb.size(); i += 3) lo = std::min<int>(lo, img.rgb[i]), hi = std::max<int>(hi, img.rgb[i]);
    for (int v = 0; v < 256; ++v) {
      double x = v;
      if (hi > lo) x = std::clamp(v * (255.0 / (hi - lo)) - lo * (255.0 / (hi - lo)), 0.0, 255.0);
      t[c][v] = static_cast<uint8_t>(x);
    }
  }
  return map_table(img, t);
}

Image equalize(const Image& img) {  // PIL.ImageOps.equalize, per channel
  std::array<std::array<uint8_t, 256>, 3> t;
  for (int c = 0; c < 3; ++c) {
    std::array<int64_t, 256> hist{};
    for (size_t i = c; i < img.rgb.size(); i += 3) ++hist[img.rgb[i]];
    int64_t total = 0, last = 0;
    for (int v = 0; v < 256; ++v)
      if (hist[v]) total += hist[v], last = hist[v];
    const int64_t step = (total - last) / 255;
    int64_t acc = step / 2;
    for (int v = 0; v < 256; ++v) {
      t[c][v] = step == 0 ? static_cast<uint8_t>(v) : static_cast<uint8_t>(std::min<int64_t>(acc / step, 255));
      acc += hist[v];
    }
  }
  return map_table(img, t);
}

namespace {

Image brightness(const Image& img, double factor) {
  std::array<std::array<uint8_t, 256>, 3> t;
  for (int v = 0; v < 256; ++v)
    t[0][v] = t[1][v] = t[2][v] = static_cast<uint8_t>(std::clamp(v * static_cast<float>(factor), 0.f, 255.f));
  return map_table(img, t);
}

Image sharpness(const Image& img, double factor) {
  if (factor == 1.0 || img.width < 3 || img.height < 3) return img;
  Image out = img;
  for (int64_t y = 1; y + 1 < img.height; ++y)
    for (int64_t x = 1; x + 1 < img.width; ++x)
      for (int c = 0; c < 3; ++c) {
        int sum = 0;
        for (int dy = -1; dy <= 1; ++dy)
          for (int dx = -1; dx <= 1; ++dx) sum += img.row(y + dy)[(x + dx) * 3 + c] * (dx || dy ? 1 : 5);
        float blur = std::nearbyint(sum / 13.0f);
        float v = blur + static_cast<float>(factor) * (img.row(y)[x * 3 + c] - blur);
        out.row(y)[x * 3 + c] = static_cast<uint8_t>(std::clamp(v, 0.f, 255.f));
      }
  return out;
}

// cv2.warpAffine(img, M, (W, H), INTER_LINEAR, borderValue=128): dst(p) = src(M^-1 p).
Image warp_affine(const Image& img, const std::array<double, 6>& m) {
  const double det = m[0] * m[4] - m[1] * m[3];
  const std::array<double, 6> inv{m[4] / det, -m[1] / det, (m[1] * m[5] - m[4] * m[2]) / det,
                                  -m[3] / det, m[0] / det, (m[3] * m[2] - m[0] * m[5]) / det};
  Image out = img;
  auto at = [&](int64_t x, int64_t y, int c) -> double {
    if (x < 0 || y < 0 || x >= img.width || y >= img.height) return 128.0;
    return img.row(y)[x * 3 + c];
  };
  for (int64_t y = 0; y < img.height; ++y)
    for (int64_t x = 0; x < img.width; ++x) {
      const double sx = inv[0] * x + inv[1] * y + inv[2], sy = inv[3] * x + inv[4] * y + inv[5];
      const int64_t x0 = static_cast<int64_t>(std::floor(sx)), y0 = static_cast<int64_t>(std::floor(sy));
      const double fx = sx - x0, fy = sy - y0;
      for (int c = 0; c < 3; ++c) {
        double v = (1 - fy) * ((1 - fx) * at(x0, y0, c) + fx * at(x0 + 1, y0, c)) +
                   fy * ((1 - fx) * at(x0, y0 + 1, c) + fx * at(x0 + 1, y0 + 1, c));
        out.row(y)[x * 3 + c] = static_cast<uint8_t>(std::clamp(std::nearbyint(v), 0.0, 255.0));
      }
    }
  return out;
}

}  // namespace

Image rand_augment(const Image& img, std::mt19937_64& rng, int n, int magnitude) {
  static const char* kOps[] = {"Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
                               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"};
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double level = magnitude / 10.0;
  auto sign = [&](double v) { return u(rng) > 0.5 ? -v : v; };
  Image out = img;
  for (int i = 0; i < n; ++i) {
    const std::string op = kOps[std::uniform_int_distribution<int>(0, 9)(rng)];
    if (u(rng) > 0.5) continue;
    if (op == "AutoContrast") out = autocontrast(out);
    else if (op == "Equalize") out = equalize(out);
    else if (op == "Brightness") out = brightness(out, level * 1.8 + 0.1);
    else if (op == "Sharpness") out = sharpness(out, level * 1.8 + 0.1);
    else if (op == "ShearX") out = warp_affine(out, {1, sign(level * 0.3), 0, 0, 1, 0});
    else if (op == "ShearY") out = warp_affine(out, {1, 0, 0, sign(level * 0.3), 1, 0});
    else if (op == "TranslateX") out = warp_affine(out, {1, 0, -sign(level * 10), 0, 1, 0});
    else if (op == "TranslateY") out = warp_affine(out, {1, 0, 0, 0, 1, -sign(level * 10)});
    else if (op == "Rotate") {  // cv2.getRotationMatrix2D((W/2, H/2), degrees, 1)
      double deg = level * 30;
      if (u(rng) < 0.5) deg = -deg;
      const double a = std::cos(deg * M_PI / 180), b = std::sin(deg * M_PI / 180);
      const double cx = out.width / 2.0, cy = out.height / 2.0;
      out = warp_affine(out, {a, b, (1 - a) * cx - b * cy, -b, a, b * cx + (1 - a) * cy});
    }
  }
  return out;
}

}  // namespace blip2
