// Stage-1 training against LAVIS itself: tools/make_lavis_oracle.py ran LAVIS' own Blip2Qformer
// (GitHub salesforce/LAVIS 506965b, under a one-process gloo group, hard negatives taken as the
// argmax of LAVIS' sampling weights) on a tiny configuration and recorded the losses, the ITM
// negative-sampling weights, every trainable parameter's gradient after one backward, and every
// trainable parameter after one AdamW step with LAVIS' optimizer groups and learning-rate
// schedule, for a batch whose samples carry image ids [0, 0, 1, 2] ("dup") and for one without
// ids ("nodup"). blip2cpp loads the same LAVIS checkpoint and must compute the same numbers
// (losses 1e-5 absolute, gradients and updated parameters 1e-5 relative), as llm.c checks its
// training step against PyTorch's.
#include <gtest/gtest.h>

#include <fstream>
#include <set>

#include "blip2/io/checkpoint.h"
#include "blip2/io/pth.h"
#include "blip2/io/safetensors.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/optim.h"
#include "test_util.h"

using namespace blip2;
using namespace blip2::testing;
namespace fs = std::filesystem;

namespace {

const fs::path kOracle = fs::path(BLIP2_FIXTURE_DIR) / "lavis_oracle";

// The tiny configuration of tools/make_lavis_oracle.py (VIT, QFORMER, BLIP2 there), as a
// Blip2Config: EVA ViT 28 px / patch 7 / width 32 / depth 2 / mlp_ratio 2.25; Q-Former hidden 48,
// 3 layers, 4 heads, FFN 80, 6 queries; vocabulary of 100 + [DEC]; no dropout.
Blip2Config oracle_config() {
  Blip2Config c;
  c.max_txt_len = 12;
  c.temperature = 0.07;
  auto& v = c.vision_config;
  v.image_size = 28;
  v.patch_size = 7;
  v.hidden_size = 32;
  v.num_hidden_layers = 2;
  v.num_attention_heads = 4;
  v.intermediate_size = 72;  // int(32 * 2.25)
  v.layer_norm_eps = 1e-6;
  v.post_layernorm_eps = 1e-5;
  auto& q = c.qformer_config;
  q.num_hidden_layers = 3;
  q.num_attention_heads = 4;
  q.hidden_size = 48;
  q.intermediate_size = 80;
  q.query_length = 6;
  q.cross_attention_freq = 2;
  q.encoder_width = 32;
  q.vocab_size = 100;
  q.special_token_nums = 1;
  q.bos_token_id = 100;  // [DEC], appended by LAVIS' init_tokenizer
  q.sep_token_id = 3;
  q.pad_token_id = 0;
  q.max_position_embeddings = 40;
  q.hidden_dropout_prob = 0.0;
  q.attention_probs_dropout_prob = 0.0;
  q.head_embed_dim = 16;
  c.itm_negatives = "argmax";  // what the oracle's multinomial returned
  return c;
}

std::vector<std::string> read_lines(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

// The fixture's tensors under `prefix` ("dup.grad."), renamed from LAVIS' names to blip2cpp's by
// the same mapping that loads LAVIS checkpoints.
TensorMap lavis_named(const TensorMap& fixture, const std::string& prefix) {
  TensorMap lavis;
  for (const auto& [k, t] : fixture)
    if (k.rfind(prefix, 0) == 0) lavis[k.substr(prefix.size())] = t;
  return canonical_from_lavis(lavis);
}

// Attention key biases: softmax is invariant to adding one constant to a row's scores, so their
// gradient is zero in exact arithmetic, and both LAVIS and blip2cpp hold rounding noise (~1e-9)
// there, which Adam's first step then normalises to about +-lr. They are compared absolutely.
bool key_bias(const std::string& name) { return name.ends_with("attention.key.bias"); }

// max |got - want| relative to max |want| (absolute where `want` is all zeros).
double relative_diff(const torch::Tensor& got, const torch::Tensor& want) {
  const auto d = (got.to(torch::kFloat64) - want.to(torch::kFloat64)).abs().max().item<double>();
  const auto scale = want.to(torch::kFloat64).abs().max().item<double>();
  return scale > 0 ? d / scale : d;
}

class LavisOracle : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);  // as the oracle ran (thread count moves results by ~1e-7)
    fixture_ = load_safetensors((kOracle / "oracle.safetensors").string());
  }
  void TearDown() override { torch::set_num_threads(threads_); }

  // The LAVIS checkpoint the oracle started from, loaded and checked to cover the model.
  Blip2Qformer load_model(const Blip2Config& c) {
    WeightLedger ledger;
    Blip2Qformer model(c);
    load_model_weights(*model, (kOracle / "model.pth").string(), ledger);
    ledger.check(*model, CoveragePolicy{});
    model->train();  // the ViT stays in eval mode, as LAVIS'
    return model;
  }

  const torch::Tensor& at(const std::string& key) const {
    auto it = fixture_.find(key);
    if (it == fixture_.end()) throw Error("oracle.safetensors has no '" + key + "'");
    return it->second;
  }

  struct Step {
    Stage1Output out;
    std::map<std::string, torch::Tensor> grads;  // blip2cpp names
  };
  // One forward + backward on the fixture's batch of `case_name`, with or without its image ids.
  Step forward_backward(Blip2Qformer& model, const std::string& case_name, bool with_ids) {
    const auto ids = at(case_name + ".input_ids"), mask = at(case_name + ".attention_mask");
    const auto image_ids = with_ids ? at("dup.image_ids") : torch::Tensor();
    model->zero_grad();
    Step s;
    s.out = model->forward(at("images"), ids, mask, image_ids);
    s.out.loss.backward();
    for (const auto& p : model->named_parameters())
      if (p.value().requires_grad() && p.value().grad().defined()) s.grads[p.key()] = p.value().grad().clone();
    return s;
  }

  // Losses and every gradient against the oracle's.
  void expect_step_matches(const Step& s, const std::string& case_name) {
    const std::vector<std::pair<std::string, torch::Tensor>> losses{
        {"loss", s.out.loss}, {"loss_itc", s.out.loss_itc}, {"loss_itm", s.out.loss_itm}, {"loss_lm", s.out.loss_lm}};
    for (const auto& [k, got] : losses)
      EXPECT_NEAR(got.item<double>(), at(case_name + "." + k).item<double>(), 1e-5) << case_name << " " << k;
    const auto want = lavis_named(fixture_, case_name + ".grad.");
    EXPECT_EQ(s.grads.size(), want.size()) << "trainable parameters with a gradient";
    for (const auto& [name, g] : want) {
      auto it = s.grads.find(name);
      ASSERT_NE(it, s.grads.end()) << "no gradient for " << name;
      if (key_bias(name))
        EXPECT_LT((it->second - g).abs().max().item<double>(), 1e-8) << case_name << " gradient of " << name;
      else
        EXPECT_LE(relative_diff(it->second, g), 1e-5) << case_name << " gradient of " << name;
    }
  }

  int threads_ = torch::get_num_threads();
  TensorMap fixture_;
};

}  // namespace

TEST_F(LavisOracle, TokenizerGivesLavisIds) {
  // LAVIS' BertTokenizer(vocab.txt) + [DEC], padding to max_txt_len 12.
  auto tok = WordPieceTokenizer::from_file((kOracle / "vocab.txt").string());
  EXPECT_EQ(tok.bos_id(), 100);
  auto enc = tok.encode_batch(read_lines(kOracle / "captions.txt"), 12, "max_length");
  EXPECT_TRUE(torch::equal(enc.ids, at("dup.input_ids")));
  EXPECT_TRUE(torch::equal(enc.keep, at("dup.attention_mask")));
}

TEST_F(LavisOracle, LossesAndGradientsWithDuplicateImageIds) {
  auto model = load_model(oracle_config());
  auto s = forward_backward(model, "dup", /*with_ids=*/true);
  expect_step_matches(s, "dup");
}

TEST_F(LavisOracle, LossesAndGradientsWithoutImageIds) {
  auto model = load_model(oracle_config());
  auto s = forward_backward(model, "nodup", /*with_ids=*/false);
  expect_step_matches(s, "nodup");
}

TEST_F(LavisOracle, HardNegativeWeightsAreLavis) {
  // LAVIS' softmax weights over the negatives (same-image pairs masked) and the argmax picks.
  for (const std::string c : {"dup", "nodup"}) {
    auto model = load_model(oracle_config());
    torch::NoGradGuard no_grad;
    const bool ids = c == "dup";
    auto out = model->forward(at("images"), at(c + ".input_ids"), at(c + ".attention_mask"),
                              ids ? at("dup.image_ids") : torch::Tensor());
    auto i2t = max_over_queries(out.image_feats, out.text_feat) / model->temp;
    auto t2i = max_over_queries(out.image_feats, out.text_feat).t() / model->temp;
    auto pos = itc_positives(ids ? at("dup.image_ids") : torch::Tensor(), ids ? at("dup.image_ids") : torch::Tensor(),
                             4, 4, 0, torch::kCPU);
    EXPECT_LT(max_abs_diff(torch::softmax(t2i.masked_fill(pos, -10000.0), 1), at(c + ".weights_t2i")), 5e-6) << c;
    EXPECT_LT(max_abs_diff(torch::softmax(i2t.masked_fill(pos, -10000.0), 1), at(c + ".weights_i2t")), 5e-6) << c;
    auto neg = hard_negatives(i2t, t2i, pos, /*sample=*/false);
    EXPECT_TRUE(torch::equal(neg.image_for_text, at(c + ".image_for_text"))) << c;
    EXPECT_TRUE(torch::equal(neg.text_for_image, at(c + ".text_for_image"))) << c;
  }
}

TEST_F(LavisOracle, AdamWStepWithLavisGroupsAndSchedule) {
  // LAVIS' optimizer groups: weight decay off for exactly the parameters no_decay.txt names.
  auto model = load_model(oracle_config());
  OptimizerConfig oc;
  oc.betas = {at("beta1").item<double>(), at("beta2").item<double>()};
  oc.eps = at("eps").item<double>();
  oc.weight_decay = at("weight_decay").item<double>();
  TensorMap no_decay_lavis;
  for (const auto& n : read_lines(kOracle / "no_decay.txt")) no_decay_lavis[n] = torch::zeros({1});
  std::set<std::string> want_no_decay;
  for (const auto& [n, t] : canonical_from_lavis(no_decay_lavis)) want_no_decay.insert(n);
  {
    auto opt = make_adamw(*model, oc, 1.0);
    std::map<const void*, std::string> names;
    for (const auto& p : model->named_parameters()) names[p.value().unsafeGetTensorImpl()] = p.key();
    std::set<std::string> no_decay;
    for (const auto& p : opt->param_groups()[1].params()) no_decay.insert(names.at(p.unsafeGetTensorImpl()));
    for (const auto& n : no_decay) EXPECT_TRUE(want_no_decay.count(n)) << n << " is not decayed here but is by LAVIS";
    for (const auto& n : want_no_decay) EXPECT_TRUE(no_decay.count(n)) << n << " is decayed here but not by LAVIS";
    EXPECT_EQ(static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[1].options()).weight_decay(), 0.0);
  }
  // LAVIS' LinearWarmupCosineLRScheduler at (epoch 0, iteration 1) of the run config
  // (init_lr 1e-4, warmup_lr 1e-6, 2 warmup steps) is the engine's lr for optimizer step 1.
  LrScheduleConfig sched;
  sched.type = "linear_warmup_cosine_lr";
  sched.learning_rate = 1e-4;
  sched.warmup_lr_init = 1e-6;
  sched.lr_end = 1e-5;
  sched.warmup_steps = 2;
  const double lr = learning_rate(sched, {1, 0, 1, 1, 100, 10});
  EXPECT_NEAR(lr, at("lr").item<double>(), 1e-15);

  for (const std::string c : {"dup", "nodup"}) {
    auto m = load_model(oracle_config());
    auto opt = make_adamw(*m, oc, lr);
    forward_backward(m, c, c == "dup");
    opt->step();
    const auto want = lavis_named(fixture_, c + ".after.");
    size_t compared = 0;
    for (const auto& p : m->named_parameters()) {
      if (!p.value().requires_grad()) continue;
      auto it = want.find(p.key());
      ASSERT_NE(it, want.end()) << "the oracle has no updated " << p.key();
      if (key_bias(p.key()))
        EXPECT_LE((p.value().detach() - it->second).abs().max().item<double>(), 2.01 * lr) << c << " updated " << p.key();
      else
        EXPECT_LE(relative_diff(p.value().detach(), it->second), 1e-5) << c << " updated " << p.key();
      ++compared;
    }
    EXPECT_EQ(compared, want.size());
  }
}

TEST_F(LavisOracle, TheFixtureTellsTheVariantsApart) {
  // Negative controls: the oracle would catch a port that ignored image ids or let gradient
  // through the gathered side of ITC (LAVIS' concat_all_gather is no_grad even in one process).
  {
    auto model = load_model(oracle_config());
    auto s = forward_backward(model, "dup", /*with_ids=*/false);  // ids dropped
    EXPECT_GT(std::abs(s.out.loss_itc.item<double>() - at("dup.loss_itc").item<double>()), 1e-2);
  }
  {
    Blip2Config c = oracle_config();
    c.itc_gather = "with_grad";
    auto model = load_model(c);
    auto s = forward_backward(model, "nodup", false);
    EXPECT_NEAR(s.out.loss.item<double>(), at("nodup.loss").item<double>(), 1e-5);  // same losses
    const auto want = lavis_named(fixture_, "nodup.grad.");
    int differ = 0;
    for (const auto& [name, g] : want) differ += !key_bias(name) && relative_diff(s.grads.at(name), g) > 1e-3;
    EXPECT_GT(differ, static_cast<int>(want.size()) / 2) << "gradients through the gathered side";
  }
}

TEST_F(LavisOracle, LinearWarmupCosineScheduleIsLavis) {
  // lr_schedule.type linear_warmup_cosine_lr against LAVIS' LinearWarmupCosineLRScheduler over
  // 10 epochs x 4 iterations (init_lr 1e-4, min_lr 1e-5, warmup_lr 1e-6, 2 warmup steps).
  LrScheduleConfig s;
  s.type = "linear_warmup_cosine_lr";
  s.learning_rate = 1e-4;
  s.lr_end = 1e-5;
  s.warmup_lr_init = 1e-6;
  s.warmup_steps = 2;
  const auto epoch = at("schedule.epoch"), iteration = at("schedule.iteration"), lr = at("schedule.lr");
  ASSERT_EQ(lr.numel(), 40);
  for (int64_t i = 0; i < lr.numel(); ++i) {
    const int64_t e = epoch[i].item<int64_t>(), it = iteration[i].item<int64_t>();
    SchedulePosition at1{0, e, it, 1, 40, 10};
    EXPECT_NEAR(learning_rate(s, at1), lr[i].item<double>(), 1e-15) << "epoch " << e << " iteration " << it;
    // With 2 batches accumulated, optimizer step k uses the lr LAVIS set at iteration 2k + 1.
    if (it % 2 == 1) {
      SchedulePosition at2{0, e, it / 2, 2, 20, 10};
      EXPECT_NEAR(learning_rate(s, at2), lr[i].item<double>(), 1e-15) << "epoch " << e << " iteration " << it;
    }
  }
  // The per-step schedule (type cosine) is another one: it decays within epoch 0.
  s.type = "cosine";
  EXPECT_LT(learning_rate(s, {30, 0, 30, 1, 40, 1}), 1e-4 * 0.9);
}
