// Retrieval re-ranking at the real counts (issue 14): Flickr30k test is 1,000 images x 5,000
// texts (k_test 128), COCO's Karpathy test 5,000 x 25,000 (k_test 256). A random Q-Former of the
// tiny preset's shape (or narrower, by the flags) re-ranks random ViT outputs held on the host, as
// the image_to_text_retrieval task does after its feature pass; the figures are wall time, pairs
// re-ranked per second (LAVIS' count: Ni x k + Nt x k, the pairs both directions chose counted
// twice, as compute_sim_matrix scores them twice) and the process's peak resident memory.
//
//   blip2_bench_retrieval [--images 1000] [--texts 5000] [--k 128] [--chunk 16]
//                         [--width 96] [--layers 4] [--queries 8] [--text-len 16]
//                         [--vit-tokens 65] [--vit-width 64]
//
// The memory of the same run at ViT-g's size follows from retrieval.h's formula; the bench
// prints it for these counts next to what was measured.
#include <chrono>
#include <fstream>
#include <iostream>
#include <string>

#include "blip2/config/config.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/retrieval.h"
#include "blip2/util/common.h"
#include "bench_util.h"

using namespace blip2;

namespace {

using bench::peak_rss_gib;

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) try {
  int64_t images = 1000, texts = 5000, k = 128, chunk = 16, width = 96, layers = 4, queries = 8, text_len = 16,
          vit_tokens = 65, vit_width = 64;
  const std::string usage =
      " (usage: blip2_bench_retrieval [--images N] [--texts N] [--k K] [--chunk C] [--width W] [--layers L]"
      " [--queries Q] [--text-len L] [--vit-tokens N] [--vit-width W])";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    check(i + 1 < argc, a + " needs a value" + usage);
    const int64_t v = std::stoll(argv[++i]);
    check(v >= 1, a + " must be >= 1");
    if (a == "--images") images = v;
    else if (a == "--texts") texts = v;
    else if (a == "--k") k = v;
    else if (a == "--chunk") chunk = v;
    else if (a == "--width") width = v;
    else if (a == "--layers") layers = v;
    else if (a == "--queries") queries = v;
    else if (a == "--text-len") text_len = v;
    else if (a == "--vit-tokens") vit_tokens = v;
    else if (a == "--vit-width") vit_width = v;
    else throw Error("unknown option " + a + usage);
  }
  Blip2Config c = find_preset("tiny")->config;
  auto& q = c.qformer_config;
  q.hidden_size = width;
  q.intermediate_size = 2 * width;
  q.num_attention_heads = std::max<int64_t>(1, width / 32);
  q.num_hidden_layers = layers;
  q.query_length = queries;
  q.max_position_embeddings = std::max<int64_t>(q.max_position_embeddings, text_len);
  c.vision_config.hidden_size = vit_width;
  c.vision_config.num_attention_heads = std::max<int64_t>(1, vit_width / 16);
  c.max_txt_len = text_len;
  torch::manual_seed(0);
  Blip2Qformer model(c);
  model->eval();
  torch::NoGradGuard no_grad;
  std::cout << "retrieval: " << images << " images x " << texts << " texts, k_test " << k << ", chunk " << chunk
            << "; Q-Former width " << width << " x " << layers << " layers, " << queries << " queries, text length "
            << text_len << "; ViT outputs " << vit_tokens << " x " << vit_width << "; threads "
            << torch::get_num_threads() << std::endl;

  const auto t0 = std::chrono::steady_clock::now();
  RetrievalInputs in;
  in.image_embeds = torch::randn({images, vit_tokens, vit_width});
  std::vector<torch::Tensor> feats;
  for (int64_t i = 0; i < images; i += 256)
    feats.push_back(model->image_features(
        model->query_pass(in.image_embeds.narrow(0, i, std::min<int64_t>(256, images - i)), false).hidden));
  in.image_feats = torch::cat(feats);
  in.text_ids = torch::randint(5, q.vocab_size, {texts, text_len});
  auto lengths = torch::randint(3, text_len + 1, {texts, 1});
  in.text_keep = (torch::arange(text_len).unsqueeze(0) < lengths).to(torch::kLong);
  in.text_ids.masked_fill_(in.text_keep == 0, 0);
  feats.clear();
  for (int64_t t = 0; t < texts; t += 1024) {
    const int64_t n = std::min<int64_t>(1024, texts - t);
    feats.push_back(model->text_features(model->text_pass(in.text_ids.narrow(0, t, n), in.text_keep.narrow(0, t, n))));
  }
  in.text_feats = torch::cat(feats);
  const double features_s = seconds(t0);

  RerankOptions o;
  o.k_test = k;
  o.chunk_images = chunk;
  Progress progress("rerank", images, std::max<int64_t>(1, images / 10));
  const auto t1 = std::chrono::steady_clock::now();
  auto s = rerank_top_k(model, in, o, [&](int64_t done, int64_t) { progress.update(done, ""); });
  progress.finish();
  const double rerank_s = seconds(t1);
  const double pairs = static_cast<double>(images * std::min(k, texts) + texts * std::min(k, images));
  const int64_t scored = (s.i2t != -100.0f).sum().item<int64_t>() + (s.t2i != -100.0f).sum().item<int64_t>();
  check(static_cast<double>(scored) == pairs, "re-ranked " + std::to_string(scored) + " pairs, expected " +
                                                  std::to_string(static_cast<int64_t>(pairs)));
  std::cout << "  features (random ViT outputs, Q-Former passes) " << format_float(features_s, 1) << " s\n"
            << "  re-ranking " << format_float(rerank_s, 1) << " s, " << format_float(pairs / rerank_s, 0)
            << " pairs/s (" << static_cast<int64_t>(pairs) << " pairs)\n"
            << "  peak resident memory " << format_float(peak_rss_gib(), 2) << " GiB\n";
  // The same counts at ViT-g 364 px (677 tokens x 1408), the Q-Former's 6 cross layers of 768, fp32.
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const double vit = images * 677.0 * 1408 * 4 / gib, kv_chunk = chunk * 6.0 * 2 * 677 * 768 * 4 / gib;
  const double kv_all = images * 6.0 * 2 * 677 * 768 * 4 / gib, sims = 3.0 * images * texts * 4 / gib;
  std::cout << "  at ViT-g 364 px: ViT outputs " << format_float(vit, 1) << " GiB (host), keys/values of a chunk "
            << format_float(kv_chunk, 2) << " GiB (all images at once: " << format_float(kv_all, 1)
            << " GiB), similarities + scores " << format_float(sims, 1) << " GiB\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
