// Model structure: parameter counts of the full presets (meta device), mask patterns, the
// cached-K/V LM pass, and the synthetic data the tiny model learns from.
#include <gtest/gtest.h>

#include <limits>

#include "blip2/config/config.h"
#include "blip2/data/synthetic.h"
#include "blip2/io/checkpoint.h"
#include "blip2/models/blip2_qformer.h"
#include "test_util.h"

using namespace blip2;
using blip2::testing::error_of;

namespace {

Blip2Config tiny_config(double dropout = 0.0) {
  Blip2Config c = find_preset("tiny")->config;
  c.qformer_config.hidden_dropout_prob = dropout;
  c.qformer_config.attention_probs_dropout_prob = dropout;
  return c;
}

int64_t count_prefix(const torch::nn::Module& m, const std::string& prefix) {
  int64_t n = 0;
  for (const auto& p : m.named_parameters())
    if (p.key().rfind(prefix, 0) == 0) n += p.value().numel();
  return n;
}

}  // namespace

TEST(Presets, SupportListNamesTheSeedModels) {
  auto names = support_list();
  for (const char* want : {"blip2_stage1_vit_g", "blip2_stage1_classification", "tiny"})
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  EXPECT_EQ(find_preset("nope"), nullptr);
}

TEST(Presets, FullSizeParameterCountsMatchThePaper) {
  // Built on the meta device: shapes only, no weight memory.
  InitOptions meta{torch::TensorOptions().dtype(torch::kFloat32).device(torch::kMeta), 0.02};
  Blip2Qformer model(find_preset("blip2_stage1_vit_g")->config, meta);
  EXPECT_TRUE(model->query_tokens.is_meta());
  const int64_t vit = count_prefix(*model, "vision_model.") -
                      count_prefix(*model, "vision_model.post_layernorm.");
  const int64_t total = count_parameters(*model);
  const int64_t qformer = total - vit - count_prefix(*model, "vision_model.post_layernorm.");
  // EVA ViT-g with 39 blocks: ~0.985B. Q-Former with queries, heads and LM head: ~188M.
  EXPECT_NEAR(vit / 1e9, 0.985, 0.01) << vit;
  EXPECT_NEAR(qformer / 1e6, 188.0, 2.5) << qformer;
  // Exact shapes the checkpoints have.
  auto params = model->named_parameters();
  EXPECT_EQ(params["vision_model.embeddings.position_embedding"].sizes(),
            (std::vector<int64_t>{1, 257, 1408}));
  EXPECT_EQ(params["vision_model.encoder.layers.38.self_attn.qkv.weight"].sizes(),
            (std::vector<int64_t>{4224, 1408}));
  EXPECT_EQ(params["vision_model.encoder.layers.0.mlp.fc1.weight"].sizes(),
            (std::vector<int64_t>{6144, 1408}));
  EXPECT_EQ(params["qformer.encoder.layer.10.crossattention.attention.key.weight"].sizes(),
            (std::vector<int64_t>{768, 1408}));
  EXPECT_FALSE(params.contains("qformer.encoder.layer.11.crossattention.attention.key.weight"));
  EXPECT_EQ(params["embeddings.word_embeddings.weight"].sizes(), (std::vector<int64_t>{30523, 768}));
  EXPECT_EQ(params["cls.predictions.bias"].sizes(), (std::vector<int64_t>{30523}));
  EXPECT_EQ(params["query_tokens"].sizes(), (std::vector<int64_t>{1, 32, 768}));
  EXPECT_EQ(params["itm_head.weight"].sizes(), (std::vector<int64_t>{2, 768}));
  EXPECT_EQ(params["vision_projection.weight"].sizes(), (std::vector<int64_t>{256, 768}));
  EXPECT_EQ(params["temp"].dim(), 0);
}

TEST(Presets, FrozenVisionHasNoGradExceptLnVision) {
  auto cfg = tiny_config();
  cfg.freeze_vision = true;  // as the full presets (the tiny one trains its ViT)
  Blip2Qformer model(cfg);
  for (const auto& p : model->named_parameters()) {
    bool vit = p.key().rfind("vision_model.", 0) == 0;
    bool ln_vision = p.key().rfind("vision_model.post_layernorm.", 0) == 0;
    EXPECT_EQ(p.value().requires_grad(), !vit || ln_vision) << p.key();
  }
  model->train();
  EXPECT_FALSE(model->vision_model->is_training());
  EXPECT_TRUE(model->qformer->is_training());
}

TEST(Layers, InferenceLinearEqualsTorchLinearAndTrainingKeepsItsGradient) {
  // Inference in fp32 on the CPU goes through oneDNN's inner product: the same products as
  // torch's linear up to rounding, for a decode step's few rows and for many, with and without
  // bias; with a gradient wanted it is torch's linear (autograd intact).
  torch::manual_seed(0);
  auto w = torch::randn({300, 96}), b = torch::randn({300});
  for (int64_t rows : {1, 4, 257}) {
    auto x = torch::randn({rows, 3, 96});
    torch::NoGradGuard no_grad;
    auto ref = torch::nn::functional::linear(x, w, b);
    auto y = blip2::linear(x, w, b);
    ASSERT_EQ(y.sizes(), ref.sizes());
    EXPECT_LT((y - ref).abs().max().item<float>(), 1e-4) << rows;
    EXPECT_LT((blip2::linear(x, w) - torch::nn::functional::linear(x, w)).abs().max().item<float>(), 1e-4);
  }
  auto wg = w.clone().requires_grad_(true);
  auto x = torch::randn({4, 96});
  auto y = blip2::linear(x, wg, b);
  ASSERT_TRUE(y.requires_grad());
  y.sum().backward();
  EXPECT_TRUE(torch::allclose(wg.grad(), x.sum(0).unsqueeze(0).expand({300, 96})));
}

TEST(Layers, Int8WeightsAreQuantisedPerChannelAndMultiplyAsDequantised) {
  torch::manual_seed(0);
  auto w = torch::randn({300, 96}) * torch::linspace(0.01, 3.0, 300).unsqueeze(1), b = torch::randn({300});
  auto [q, scale] = quantize_int8(w);
  ASSERT_EQ(q.scalar_type(), torch::kInt8);
  EXPECT_EQ(q.abs().amax(1).min().item<int>(), 127);  // every row uses its whole range
  auto deq = q.to(torch::kFloat32) * scale.unsqueeze(1);
  EXPECT_TRUE(((deq - w).abs() <= scale.unsqueeze(1) / 2 + 1e-6).all().item<bool>());
  // The product: the dequantised weight's, up to the bf16 rounding of the activations (~0.4% of
  // the outputs' range).
  auto x = torch::randn({5, 2, 96});
  torch::NoGradGuard no_grad;
  auto ref = torch::nn::functional::linear(x, deq, b);
  auto y = int8_linear(x, q, scale, b);
  EXPECT_EQ(y.scalar_type(), torch::kFloat32);
  EXPECT_LT((y - ref).abs().max().item<float>(), 1e-2 * ref.abs().max().item<float>());
  // A layer turned int8 keeps its parameter's name, adds weight_scale, and computes the same.
  Linear layer(96, 300, true, InitOptions{});
  auto before = layer(x);
  layer->to_int8(/*quantise=*/true);
  auto params = layer->named_parameters();
  EXPECT_EQ(params["weight"].scalar_type(), torch::kInt8);
  EXPECT_TRUE(layer->named_buffers().contains("weight_scale"));
  EXPECT_LT((layer(x) - before).abs().max().item<float>(), 2e-2 * before.abs().max().item<float>());
  // A NaN or inf weight has no int8 value: refused, naming the file, the tensor and the row.
  auto broken = w.clone();
  broken[7][3] = std::numeric_limits<float>::infinity();
  Linear target(96, 300, true, InitOptions{});
  target->to_int8(/*quantise=*/false);
  auto msg = error_of([&] { load_into(*target, TensorMap{{"weight", broken}, {"bias", b}}, "w.safetensors"); });
  EXPECT_EQ(msg, "w.safetensors: tensor 'weight': a non-finite weight (NaN or inf) in output row 7: int8 "
                 "cannot represent it") << msg;
  broken[7][3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(error_of([&] { quantize_int8(broken); }).find("output row 7"), std::string::npos);
}

TEST(Masks, PaddingMaskIsAdditiveOverKeys) {
  auto keep = torch::tensor({{1, 1, 0}, {1, 0, 0}});
  auto m = padding_mask(keep);
  ASSERT_EQ(m.sizes(), (std::vector<int64_t>{2, 1, 1, 3}));
  EXPECT_EQ(m[0][0][0][1].item<float>(), 0.f);
  EXPECT_EQ(m[0][0][0][2].item<float>(), -10000.f);
  EXPECT_EQ(m[1][0][0][1].item<float>(), -10000.f);
}

TEST(Masks, ItmMaskLetsEveryTokenSeeEveryNonPadToken) {
  // [queries; text] with padding only: bidirectional.
  auto text = torch::tensor({{1, 1, 1, 0}});
  auto keep = torch::cat({torch::ones({1, 2}, text.options()), text}, 1);
  auto m = padding_mask(keep).expand({1, 1, 6, 6});
  for (int q = 0; q < 6; ++q)
    for (int k = 0; k < 6; ++k) EXPECT_EQ(m[0][0][q][k].item<float>(), k == 5 ? -10000.f : 0.f);
}

TEST(Masks, CausalPrefixMaskForTheLmPass) {
  // 2 cached queries, 4 text tokens of which the last is padding.
  auto keep = torch::tensor({{1, 1, 1, 1, 1, 0}});
  auto m = causal_prefix_mask(keep, 2);
  ASSERT_EQ(m.sizes(), (std::vector<int64_t>{1, 1, 4, 6}));
  for (int t = 0; t < 4; ++t)
    for (int k = 0; k < 6; ++k) {
      bool visible = (k < 2 || k - 2 <= t) && k != 5;
      EXPECT_EQ(m[0][0][t][k].item<float>(), visible ? 0.f : -10000.f) << t << "," << k;
    }
}

TEST(QFormer, CachedQueryKeysValuesEqualTheFullMultimodalCausalPass) {
  // LAVIS' LM pass reuses the query pass' self-attention K/V. The same result must come out of
  // one pass over [queries; text] with the paper's mask: queries see queries only, text sees
  // all queries plus earlier text.
  torch::manual_seed(0);
  auto cfg = tiny_config();
  Blip2Qformer model(cfg);
  model->eval();
  torch::NoGradGuard no_grad;
  const int64_t b = 2, nq = cfg.qformer_config.query_length, l = 5;
  auto images = torch::randn({b, 3, 32, 32});
  auto ids = torch::randint(5, 50, {b, l});
  auto mask = torch::tensor({{1, 1, 1, 1, 1}, {1, 1, 1, 0, 0}});
  ids.masked_fill_(mask == 0, 0);
  auto image_embeds = model->encode_image(images);
  auto query = model->query_pass(image_embeds, true);
  auto cached = model->lm_logits(ids, mask, query.past);

  // Uncached: one pass with queries in the sequence and an explicit [nq+l, nq+l] mask.
  auto full_keep = torch::cat({torch::ones({b, nq}, mask.options()), mask}, 1);
  auto allowed = torch::zeros({nq + l, nq + l});
  allowed.narrow(0, 0, nq).narrow(1, 0, nq).fill_(1);
  allowed.narrow(0, nq, l).narrow(1, 0, nq).fill_(1);
  allowed.narrow(0, nq, l).narrow(1, nq, l).copy_(torch::ones({l, l}).tril());
  auto m = ((1 - allowed.unsqueeze(0) * full_keep.unsqueeze(1).to(torch::kFloat)) * -10000.0).unsqueeze(1);
  auto embeds = torch::cat({model->query_tokens.expand({b, -1, -1}), model->embeddings(ids)}, 1);
  auto hidden = model->qformer->forward(embeds, m, nq, image_embeds).last_hidden_state;
  auto uncached = model->cls(hidden.narrow(1, nq, l), model->embeddings->word_embeddings->weight);
  EXPECT_LT((cached - uncached).abs().max().item<float>(), 1e-4);
  // and the query outputs are the query pass' outputs
  EXPECT_LT((hidden.narrow(1, 0, nq) - query.hidden).abs().max().item<float>(), 1e-4);
}

TEST(QFormer, TextPassIgnoresPaddingContent) {
  torch::manual_seed(0);
  Blip2Qformer model(tiny_config());
  model->eval();
  torch::NoGradGuard no_grad;
  auto ids = torch::tensor({{2, 10, 11, 3, 0, 0}});
  auto mask = torch::tensor({{1, 1, 1, 1, 0, 0}});
  auto other = ids.clone();
  other[0][4] = 20;
  other[0][5] = 21;
  auto a = model->text_pass(ids, mask).narrow(1, 0, 4);
  auto b = model->text_pass(other, mask).narrow(1, 0, 4);
  EXPECT_LT((a - b).abs().max().item<float>(), 1e-5);
}

TEST(VisionModel, QkvBiasHasNoKeyPart) {
  torch::manual_seed(0);
  auto cfg = tiny_config();
  EvaVisionModel vit(cfg.vision_config, InitOptions{});
  vit->eval();
  torch::NoGradGuard no_grad;
  auto attn = vit->layers[0]->as<EvaBlock>()->self_attn;
  attn->q_bias.normal_();
  attn->v_bias.normal_();
  auto x = torch::randn({1, 5, 64});
  // Reference: explicit q/k/v with k unbiased.
  auto w = attn->qkv->weight;
  auto q = torch::nn::functional::linear(x, w.narrow(0, 0, 64), attn->q_bias);
  auto k = torch::nn::functional::linear(x, w.narrow(0, 64, 64));
  auto v = torch::nn::functional::linear(x, w.narrow(0, 128, 64), attn->v_bias);
  auto split = [](const torch::Tensor& t) { return t.view({1, 5, 4, 16}).transpose(1, 2); };
  auto scores = torch::matmul(split(q), split(k).transpose(-1, -2)) / std::sqrt(16.0);
  auto ctx = torch::matmul(scores.softmax(-1), split(v)).transpose(1, 2).reshape({1, 5, 64});
  auto want = attn->projection(ctx);
  EXPECT_LT((attn->forward(x) - want).abs().max().item<float>(), 1e-5);
}

TEST(VisionModel, TokensAreClsPlusPatches) {
  auto cfg = tiny_config();
  EvaVisionModel vit(cfg.vision_config, InitOptions{});
  torch::NoGradGuard no_grad;
  auto out = vit->forward_features(torch::randn({2, 3, 32, 32}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 1 + 64, 64}));
}

TEST(Synthetic, DeterministicAndVaried) {
  SyntheticShapes a("train", 100, 32, 7), b("train", 100, 32, 7), held("heldout", 100, 32, 7);
  auto s1 = a.get(3), s2 = b.get(3);
  EXPECT_TRUE(torch::equal(s1.image, s2.image));
  EXPECT_EQ(s1.caption, s2.caption);
  EXPECT_FALSE(torch::equal(a.get(3).image, held.get(3).image));
  std::set<int> labels;
  std::set<std::string> captions;
  for (int i = 0; i < 100; ++i) {
    labels.insert(a.get(i).label);
    captions.insert(a.get(i).caption);
  }
  EXPECT_GT(labels.size(), 20u);
  EXPECT_GT(captions.size(), 50u);
  // Every caption word is in the vocabulary (no [UNK] in the built-in data).
  WordPieceTokenizer tok(SyntheticShapes::vocabulary());
  for (int i = 0; i < 100; ++i)
    for (int64_t id : tok.encode(clean_caption(a.get(i).caption))) EXPECT_NE(id, tok.unk_id());
}

TEST(Synthetic, ImageFeaturesDependOnTheImage) {
  torch::manual_seed(0);
  Blip2Qformer model(tiny_config());
  model->eval();
  torch::NoGradGuard no_grad;
  SyntheticShapes data("train", 16, 32, 1);
  std::vector<torch::Tensor> imgs;
  for (int i = 0; i < 16; ++i) imgs.push_back(data.get(i).image);
  auto embeds = model->encode_image(torch::stack(imgs));
  auto feats = model->image_features(model->query_pass(embeds, false).hidden);
  // Spread across images relative to the spread within one image's tokens.
  double across = embeds.std(0).mean().item<double>();
  double feat_across = feats.std(0).mean().item<double>();
  std::cout << "embeds std across images " << across << ", query features " << feat_across << "\n";
  EXPECT_GT(across, 0.05);
  EXPECT_GT(feat_across, 1e-3);
}
