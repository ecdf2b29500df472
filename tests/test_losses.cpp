// The stage-1 losses against values computed by hand on small tensors, and the hard-negative
// sampler's guarantees.
#include <gtest/gtest.h>

#include <cmath>

#include "blip2/config/config.h"
#include "blip2/models/blip2_qformer.h"

using namespace blip2;

namespace {

// Cross-entropy with label smoothing eps over K classes, written out.
double smoothed_ce(const std::vector<double>& logits, int target, double eps) {
  double mx = *std::max_element(logits.begin(), logits.end()), z = 0;
  for (double l : logits) z += std::exp(l - mx);
  double nll = -(logits[target] - mx - std::log(z)), mean_nll = 0;
  for (double l : logits) mean_nll += -(l - mx - std::log(z));
  mean_nll /= static_cast<double>(logits.size());
  return (1 - eps) * nll + eps * mean_nll;
}

std::vector<double> row(const torch::Tensor& t, int64_t i) {
  auto r = t[i].to(torch::kDouble).contiguous();
  return std::vector<double>(r.data_ptr<double>(), r.data_ptr<double>() + r.numel());
}

}  // namespace

TEST(Losses, MaxOverQueriesTakesTheBestQuery) {
  auto img = torch::tensor({{{1.f, 0.f}, {0.f, 1.f}}, {{-1.f, 0.f}, {0.5f, 0.5f}}});  // [2,2,2]
  auto txt = torch::tensor({{0.f, 2.f}, {3.f, 0.f}, {-1.f, -1.f}});                  // [3,2]
  auto s = max_over_queries(img, txt);
  ASSERT_EQ(s.sizes(), (std::vector<int64_t>{2, 3}));
  float want[2][3] = {{2.f, 3.f, -1.f}, {1.f, 1.5f, 1.f}};
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 3; ++t) EXPECT_FLOAT_EQ(s[b][t].item<float>(), want[b][t]);
}

TEST(Losses, ItcIsTheMeanOfTwoSmoothedCrossEntropies) {
  auto i2t = torch::tensor({{2.0, 0.5, -1.0}, {0.1, 0.3, 0.2}, {1.0, 1.0, 3.0}});
  auto t2i = torch::tensor({{1.0, -2.0, 0.0}, {0.0, 4.0, 1.0}, {0.5, 0.5, 0.5}});
  auto targets = itc_positives({}, {}, 3, 3, 0, torch::kCPU);
  double want = 0;
  for (int b = 0; b < 3; ++b)
    want += smoothed_ce(row(i2t, b), b, 0.1) + smoothed_ce(row(t2i, b), b, 0.1);
  want /= 6.0;
  EXPECT_NEAR(itc_loss(i2t.to(torch::kFloat), t2i.to(torch::kFloat), targets, 0.1).item<double>(),
              want, 1e-6);
}

TEST(Losses, LmShiftsIgnoresPaddingAndSmooths) {
  // ids: [CLS] a b [SEP] [PAD] -> decoder ids [DEC] a b [SEP] [PAD], labels pad -> -100.
  auto ids = torch::tensor({{2, 7, 8, 3, 0}});
  auto [dec, labels] = lm_inputs(ids, /*bos=*/9, /*pad=*/0);
  EXPECT_EQ(dec[0][0].item<int64_t>(), 9);
  EXPECT_EQ(dec[0][1].item<int64_t>(), 7);
  EXPECT_EQ(labels[0][4].item<int64_t>(), -100);
  EXPECT_EQ(labels[0][0].item<int64_t>(), 9);
  torch::manual_seed(0);
  auto logits = torch::randn({1, 5, 10});
  // Positions 0..2 predict labels 1..3 (a, b, [SEP]); position 3 would predict padding.
  double want = 0;
  for (int t = 0; t < 3; ++t)
    want += smoothed_ce(row(logits[0], t), static_cast<int>(labels[0][t + 1].item<int64_t>()), 0.1);
  want /= 3.0;
  EXPECT_NEAR(lm_loss(logits, labels, 0.1).item<double>(), want, 1e-6);
}

TEST(HardNegatives, NeverThePositive) {
  torch::manual_seed(0);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t b = 2 + trial % 7;
    // Strongly diagonal similarities: the positive would win if it were not masked.
    auto sim = torch::randn({b, b}) + 50.0 * torch::eye(b);
    auto neg = hard_negatives(sim, sim.t().contiguous(), itc_positives({}, {}, b, b, 0, torch::kCPU));
    for (int64_t i = 0; i < b; ++i) {
      EXPECT_NE(neg.image_for_text[i].item<int64_t>(), i);
      EXPECT_NE(neg.text_for_image[i].item<int64_t>(), i);
    }
  }
}

TEST(HardNegatives, PositivesOfThisRankAreMaskedInTheGlobalBatch) {
  // Rank 1 of 2 with B = 3: its positives are columns 3..5 of the gathered batch.
  torch::manual_seed(1);
  auto sim = torch::zeros({3, 6});
  for (int i = 0; i < 3; ++i) sim[i][3 + i] = 100.0;
  for (int trial = 0; trial < 20; ++trial) {
    auto neg = hard_negatives(sim, sim, itc_positives({}, {}, 3, 6, 3, torch::kCPU));
    for (int i = 0; i < 3; ++i) EXPECT_NE(neg.image_for_text[i].item<int64_t>(), 3 + i);
  }
}

TEST(HardNegatives, FollowTheSoftmaxOfTheSimilarities) {
  // Text 0 is far more similar to image 1 than to image 2: image 1 is its hard negative.
  torch::manual_seed(2);
  auto sim = torch::tensor({{0.0, 8.0, 0.0}, {0.0, 0.0, 0.0}, {0.0, 0.0, 0.0}});
  int hits = 0;
  for (int trial = 0; trial < 200; ++trial)
    hits += hard_negatives(sim, sim, itc_positives({}, {}, 3, 3, 0, torch::kCPU)).image_for_text[0].item<int64_t>() == 1;
  EXPECT_GT(hits, 190);
}

TEST(Losses, ItcWithImageIdsSpreadsTheTargetOverTheSameImage) {
  // Texts 0 and 1 describe image 0 (ids 5, 5), text 2 image 9: row 0's target is 0.45 on
  // columns 0 and 1 (0.9 / 2) plus 0.1 / 3 everywhere, LAVIS' soft targets.
  auto i2t = torch::tensor({{2.0, 0.5, -1.0}, {0.1, 0.3, 0.2}, {1.0, 1.0, 3.0}}).to(torch::kFloat);
  auto t2i = torch::tensor({{1.0, -2.0, 0.0}, {0.0, 4.0, 1.0}, {0.5, 0.5, 0.5}}).to(torch::kFloat);
  auto ids = torch::tensor({5, 5, 9});
  auto pos = itc_positives(ids, ids, 3, 3, 0, torch::kCPU);
  EXPECT_TRUE(pos[0][1].item<bool>() && pos[1][0].item<bool>() && !pos[2][0].item<bool>());
  double want = 0;
  for (const auto* sim : {&i2t, &t2i})
    for (int b = 0; b < 3; ++b) {
      auto logp = torch::log_softmax(sim->select(0, b).to(torch::kDouble), 0);
      for (int j = 0; j < 3; ++j) {
        const double target = (b < 2 ? (j < 2 ? 0.45 : 0.0) : (j == 2 ? 0.9 : 0.0)) + 0.1 / 3;
        want -= target * logp[j].item<double>();
      }
    }
  EXPECT_NEAR(itc_loss(i2t, t2i, pos, 0.1).item<double>(), want / 6.0, 1e-6);
}

TEST(HardNegatives, NeverAnotherCaptionOfTheSameImage) {
  // Samples 0 and 1 show the same image and are the most similar pair: neither may be the
  // other's negative, drawn or argmax.
  auto sim = torch::tensor({{9.0, 8.0, 0.0}, {8.0, 9.0, 1.0}, {0.0, 1.0, 9.0}}).to(torch::kFloat);
  auto ids = torch::tensor({3, 3, 4});
  auto pos = itc_positives(ids, ids, 3, 3, 0, torch::kCPU);
  auto argmax = hard_negatives(sim, sim, pos, /*sample=*/false);
  EXPECT_EQ(argmax.image_for_text[0].item<int64_t>(), 2);
  EXPECT_EQ(argmax.text_for_image[1].item<int64_t>(), 2);
  EXPECT_EQ(argmax.image_for_text[2].item<int64_t>(), 1);  // the likeliest other image
  torch::manual_seed(4);
  for (int trial = 0; trial < 50; ++trial) {
    auto neg = hard_negatives(sim, sim, pos);
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(neg.image_for_text[i].item<int64_t>(), 2);
      EXPECT_EQ(neg.text_for_image[i].item<int64_t>(), 2);
    }
  }
}

TEST(Stage1, ForwardReturnsTheSumAndWorksAtBatchSizeOne) {
  torch::manual_seed(0);
  Blip2Config c = find_preset("tiny")->config;
  c.freeze_vision = true;  // as BLIP-2 (the tiny preset trains its ViT)
  Blip2Qformer model(c);
  model->train();
  auto ids = torch::tensor({{2, 7, 8, 3, 0, 0}});
  auto mask = (ids != 0).to(torch::kLong);
  auto out = model->forward(torch::randn({1, 3, 32, 32}), ids, mask);
  EXPECT_NEAR(out.loss.item<double>(),
              (out.loss_itc + out.loss_itm + out.loss_lm).item<double>(), 1e-5);
  // One pair: ITC over a single candidate is 0; the "negative" is the pair itself (as the
  // seed's single-image example shows: loss_itc 0, loss_itm ~0.68).
  EXPECT_NEAR(out.loss_itc.item<double>(), 0.0, 1e-6);
  EXPECT_TRUE(std::isfinite(out.loss_itm.item<double>()));
  out.loss.backward();
  EXPECT_TRUE(model->query_tokens.grad().defined());
  EXPECT_GT(model->query_tokens.grad().abs().sum().item<double>(), 0.0);
  EXPECT_FALSE(model->vision_model->layers[0]->as<EvaBlock>()->mlp->fc1->weight.grad().defined());
  // Unfrozen (the tiny preset's default), the ViT gets gradients too.
  Blip2Qformer trained(find_preset("tiny")->config);
  trained->train();
  trained->forward(torch::randn({1, 3, 32, 32}), ids, mask).loss.backward();
  EXPECT_TRUE(trained->vision_model->layers[0]->as<EvaBlock>()->mlp->fc1->weight.grad().defined());
}

TEST(Stage1, ItmLossMatchesItsDefinitionForGivenNegatives) {
  // Recompute ITM for the negatives the model drew (same RNG draw), by hand.
  torch::manual_seed(3);
  Blip2Config c = find_preset("tiny")->config;
  c.qformer_config.hidden_dropout_prob = 0;
  c.qformer_config.attention_probs_dropout_prob = 0;
  Blip2Qformer model(c);
  model->eval();
  torch::NoGradGuard no_grad;
  auto images = torch::randn({3, 3, 32, 32});
  auto ids = torch::tensor({{2, 7, 8, 3}, {2, 9, 3, 0}, {2, 10, 11, 3}});
  auto mask = (ids != 0).to(torch::kLong);
  torch::manual_seed(11);
  auto out = model->forward(images, ids, mask);

  auto embeds = model->encode_image(images);
  auto feats = model->image_features(model->query_pass(embeds, false).hidden);
  auto text = model->text_features(model->text_pass(ids, mask));
  auto i2t = max_over_queries(feats, text) / model->temp;
  auto t2i = max_over_queries(feats, text).t() / model->temp;
  torch::manual_seed(11);
  auto neg = hard_negatives(i2t, t2i, itc_positives({}, {}, 3, 3, 0, torch::kCPU));
  auto logits = model->itm_logits(
      torch::cat({embeds, embeds.index_select(0, neg.image_for_text), embeds}),
      torch::cat({ids, ids, ids.index_select(0, neg.text_for_image)}),
      torch::cat({mask, mask, mask.index_select(0, neg.text_for_image)}));
  double want = 0;
  for (int i = 0; i < 9; ++i) want += smoothed_ce(row(logits, i), i < 3 ? 1 : 0, 0.0);
  EXPECT_NEAR(out.loss_itm.item<double>(), want / 9.0, 1e-5);
}
