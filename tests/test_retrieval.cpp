// Retrieval with ITM re-ranking: the top-k re-ranking equals a brute-force ITM + ITC scoring of
// every pair when k covers everything (with and without reusing each image's cross-attention
// keys/values), and the metrics match values computed by hand.
#include <gtest/gtest.h>

#include "blip2/config/config.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/retrieval.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"
#include "test_util.h"

#include <map>
#include <optional>

#include <nlohmann/json.hpp>

using namespace blip2;

namespace {

// A random tiny stage-1 model in eval mode, and the retrieval inputs of `ni` random images and
// `nt` random texts of 7 tokens, those with a row index in `padded` padded after `keep[t]` tokens.
struct Split {
  Blip2Qformer model{nullptr};
  RetrievalInputs in;
};

Split random_split(uint64_t seed, int64_t ni, int64_t nt, const std::map<int64_t, int64_t>& kept) {
  torch::manual_seed(seed);
  Split s{Blip2Qformer(find_preset("tiny")->config), {}};
  s.model->eval();
  torch::NoGradGuard no_grad;
  auto& in = s.in;
  in.image_embeds = s.model->encode_image(torch::randn({ni, 3, 32, 32}));
  in.image_feats = s.model->image_features(s.model->query_pass(in.image_embeds, false).hidden);
  in.text_ids = torch::randint(5, 50, {nt, 7});
  in.text_keep = torch::ones({nt, 7}, torch::kLong);
  for (const auto& [t, n] : kept) in.text_keep[t].narrow(0, n, 7 - n).zero_();
  in.text_ids.masked_fill_(in.text_keep == 0, 0);
  in.text_feats = s.model->text_features(s.model->text_pass(in.text_ids, in.text_keep));
  return s;
}

}  // namespace

TEST(Retrieval, RerankingCoveringEverythingEqualsBruteForce) {
  auto [model, in] = random_split(0, 4, 5, {{1, 4}});
  torch::NoGradGuard no_grad;
  auto sim = max_over_queries(in.image_feats, in.text_feats);
  auto brute = torch::empty({4, 5});
  for (int i = 0; i < 4; ++i)
    for (int t = 0; t < 5; ++t)
      brute[i][t] = model->itm_logits(in.image_embeds.narrow(0, i, 1), in.text_ids.narrow(0, t, 1),
                                      in.text_keep.narrow(0, t, 1))[0][1] + sim[i][t];
  for (bool reuse : {true, false}) {
    RerankOptions o;
    o.k_test = 128;
    o.reuse_kv = reuse;
    auto s = rerank_top_k(model, in, o);
    EXPECT_LT((s.i2t - brute).abs().max().item<float>(), 1e-4) << reuse;
    EXPECT_LT((s.t2i - brute.t()).abs().max().item<float>(), 1e-4) << reuse;
  }
  // k smaller than the candidates: the rest score -100, the top-k keep their re-ranked scores.
  RerankOptions o;
  o.k_test = 2;
  auto s = rerank_top_k(model, in, o);
  EXPECT_EQ((s.i2t == -100.0f).sum(1).min().item<int64_t>(), 3);
  auto top = sim[0].topk(2);
  for (int j = 0; j < 2; ++j) {
    int64_t t = std::get<1>(top)[j].item<int64_t>();
    EXPECT_NEAR(s.i2t[0][t].item<float>(), brute[0][t].item<float>(), 1e-4);
  }
}

TEST(Retrieval, ChunkedRerankingEqualsThePerQueryPath) {
  // k_test below both counts, so the two directions choose different pairs (some shared): every
  // chunk size gives the same bits, and the per-query path (keys/values recomputed inside each
  // ITM call, no sharing) the same scores. The ViT outputs stay on the host.
  const int64_t ni = 9, nt = 23;
  std::map<int64_t, int64_t> kept;
  for (int64_t t = 0; t < nt; t += 3) kept[t] = 3 + t % 4;
  auto [model, in] = random_split(1, ni, nt, kept);
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(itc_similarity(in.image_feats, in.text_feats, 2),
                           max_over_queries(in.image_feats, in.text_feats)));
  RerankOptions o;
  o.k_test = 4;
  o.reuse_kv = false;
  const auto ref = rerank_top_k(model, in, o);
  o.reuse_kv = true;
  std::optional<RetrievalScores> first;
  for (int64_t chunk : {1, 4, 16}) {
    o.chunk_images = chunk;
    int64_t calls = 0, last = 0;
    auto s = rerank_top_k(model, in, o, [&](int64_t done, int64_t total) { ++calls; last = done; EXPECT_EQ(total, ni); });
    EXPECT_EQ(calls, ni);
    EXPECT_EQ(last, ni);
    EXPECT_TRUE(torch::equal(s.i2t == -100.0f, ref.i2t == -100.0f)) << chunk;
    EXPECT_TRUE(torch::equal(s.t2i == -100.0f, ref.t2i == -100.0f)) << chunk;
    EXPECT_EQ((s.t2i != -100.0f).sum().item<int64_t>(), nt * 4);
    EXPECT_LT((s.i2t - ref.i2t).abs().max().item<float>(), 1e-5) << chunk;
    EXPECT_LT((s.t2i - ref.t2i).abs().max().item<float>(), 1e-5) << chunk;
    if (!first) first = s;
    EXPECT_TRUE(torch::equal(s.i2t, first->i2t) && torch::equal(s.t2i, first->t2i)) << chunk;
  }
  o.chunk_images = 0;
  EXPECT_THROW(rerank_top_k(model, in, o), Error);
}

TEST(Retrieval, MetricsByHandWithTiesAndSeveralCaptions) {
  // 2 images; image 0 owns texts 0 and 1, image 1 owns text 2.
  RetrievalScores s;
  s.i2t = torch::tensor({{0.2f, 0.9f, 0.5f},    // best GT (text 1) first -> hit@1
                         {0.4f, 0.4f, 0.4f}});  // tie: its text counts as rank 0
  s.t2i = torch::tensor({{0.1f, 0.3f},          // text 0: image 1 first -> rank 1
                         {0.7f, 0.2f},          // text 1: hit@1
                         {0.6f, 0.5f}});        // text 2: image 0 first -> rank 1
  auto r = retrieval_report(s, {{0, 1}, {2}}, {{0}, {0}, {1}});
  EXPECT_DOUBLE_EQ(r.txt_r1, 100.0);
  EXPECT_NEAR(r.img_r1, 100.0 / 3, 1e-9);
  EXPECT_DOUBLE_EQ(r.img_r5, 100.0);
  EXPECT_NEAR(r.txt_r_mean, 100.0, 1e-9);
  EXPECT_NEAR(r.img_r_mean, (100.0 / 3 + 200.0) / 3, 1e-9);
  EXPECT_NEAR(r.r_mean, (r.txt_r_mean + r.img_r_mean) / 2, 1e-12);
  // LAVIS' _report_metrics (what it selects the best checkpoint by): the text-retrieval mean.
  EXPECT_DOUBLE_EQ(r.agg_metrics, r.txt_r_mean);
  EXPECT_NE(r.agg_metrics, r.r_mean);
}

TEST(ZeroShot, PredictRanksCandidateLabelsAndEvalReportsAccuracy) {
  auto dir = blip2::testing::temp_dir("zeroshot");
  std::string cfg = read_file(std::string(BLIP2_CONFIG_DIR) + "/tiny_zero_shot.yaml");
  cfg.replace(cfg.find("    num_samples: 256"), std::string("    num_samples: 256").size(),
              "    num_samples: 32\n    candidate_labels: [red circle, blue square, green ring]");
  atomic_write(dir / "zs.yaml", cfg);
  const std::string img = std::string(BLIP2_FIXTURE_DIR) + "/images/";
  auto r = blip2::testing::run_cli("run --config " + (dir / "zs.yaml").string() + " --run_mode predict --predict_data " +
                                   img + "rgb.png," + img + "grey.jpg --output_dir " + (dir / "out").string());
  ASSERT_EQ(r.code, 0) << r.out;
  auto lines = read_file(dir / "out" / "zero_shot_image_classification_result.txt");
  ASSERT_EQ(std::count(lines.begin(), lines.end(), '\n'), 2);
  auto first = nlohmann::json::parse(lines.substr(0, lines.find('\n')));
  ASSERT_EQ(first.size(), 3u);
  double total = 0, prev = 2;
  for (const auto& e : first) {
    total += e["score"].get<double>();
    EXPECT_LE(e["score"].get<double>(), prev);  // sorted, best first
    prev = e["score"].get<double>();
  }
  EXPECT_NEAR(total, 1.0, 1e-5);
  auto json = nlohmann::json::parse(read_file(dir / "out" / "zero_shot_image_classification_result.json"));
  EXPECT_EQ(json[1]["image"], img + "grey.jpg");

  // eval over the dataset's own 30 classes (candidate_labels, when given, replace them)
  cfg.replace(cfg.find("\n    candidate_labels: [red circle, blue square, green ring]"),
              std::string("\n    candidate_labels: [red circle, blue square, green ring]").size(), "");
  atomic_write(dir / "zs_eval.yaml", cfg);
  r = blip2::testing::run_cli("run --config " + (dir / "zs_eval.yaml").string() + " --run_mode eval --output_dir " +
                              (dir / "eval").string());
  ASSERT_EQ(r.code, 0) << r.out;
  auto ev = nlohmann::json::parse(read_file(dir / "eval" / "zero_shot_eval_results.json"));
  EXPECT_EQ(ev["num_labels"], 30);
  EXPECT_EQ(ev["num_images"], 32);
  EXPECT_GE(ev["top5_accuracy"].get<double>(), ev["top1_accuracy"].get<double>());

  // predict without --predict_data: every eval_dataset image, its class names as candidates
  r = blip2::testing::run_cli("run --config " + (dir / "zs_eval.yaml").string() + " --run_mode predict --output_dir " +
                              (dir / "pred").string());
  ASSERT_EQ(r.code, 0) << r.out;
  auto all = nlohmann::json::parse(read_file(dir / "pred" / "zero_shot_image_classification_result.json"));
  ASSERT_EQ(all.size(), 32u);
  EXPECT_EQ(all[0]["result"].size(), 30u);
  std::filesystem::remove_all(dir);
}
