// Loader throughput: decode + bicubic resize to S x S + normalise, on N worker threads, for
// every image of a directory. Compare with tools/bench_loader_pillow.py on the same files.
//   build/bench/blip2_bench_loader DIR [--size 224] [--threads 2] [--repeat 3]
#include <chrono>
#include <iostream>

#include "blip2/data/caption_datasets.h"
#include "blip2/data/synthetic.h"
#include "blip2/util/common.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: blip2_bench_loader DIR [--size 224] [--threads 2] [--repeat 3]\n";
    return 2;
  }
  int64_t size = 224, threads = 2, repeat = 3;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    int64_t v = std::stoll(argv[i + 1]);
    if (k == "--size") size = v;
    else if (k == "--threads") threads = v;
    else if (k == "--repeat") repeat = v;
  }
  try {
    auto ds = std::make_shared<blip2::ImageFolderDataset>(
        std::vector<std::string>{argv[1]}, blip2::make_image_transform({}, false, size));
    auto tok = std::make_shared<blip2::WordPieceTokenizer>(blip2::SyntheticShapes::vocabulary());
    blip2::LoaderOptions o;
    o.batch_size = 32;
    o.shuffle = false;
    o.drop_last = false;
    o.num_workers = threads;
    blip2::BatchLoader loader(ds, tok, {}, o);
    double best = 0;
    for (int64_t r = 0; r < repeat; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      int64_t n = 0;
      for (int64_t b = 0; b < loader.batches_per_epoch(); ++b) n += loader.batch(0, b).images.size(0);
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, n / s);
    }
    std::cout << "blip2cpp loader: " << ds->size() << " images, " << threads << " threads, "
              << size << "px: " << blip2::format_float(best, 1) << " images/s (best of " << repeat
              << ")\n";
  } catch (const blip2::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
