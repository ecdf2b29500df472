// The training engine (tasks/engine): gradient accumulation, the precision policy (bf16 autocast
// with fp32 similarities and losses, run on the CPU so that the path is never dead), and what it
// refuses.
#include <gtest/gtest.h>

#include "blip2/config/config.h"
#include "blip2/data/synthetic.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/engine.h"
#include "blip2/tasks/stage1.h"
#include "blip2/text/text.h"
#include "blip2/util/device.h"
#include "test_util.h"

using namespace blip2;
using namespace blip2::testing;
namespace fs = std::filesystem;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A per-sample objective (mean over the batch of a squared error on the image's mean colour), for
// which one batch of 2B samples and two accumulated batches of B give the same gradient.
struct Regression : torch::nn::Module {
  Regression() {
    torch::manual_seed(3);
    linear = register_module("linear", torch::nn::Linear(3, 1));
  }
  torch::Tensor loss(const Batch& b) {
    auto x = b.images.mean({2, 3});  // [B, 3]
    auto y = b.labels.to(torch::kFloat32).unsqueeze(1) / 30.0;
    return (linear->forward(x) - y).pow(2).mean();
  }
  torch::nn::Linear linear{nullptr};
};

BatchLoader shapes_loader(int64_t batch_size) {
  auto data = std::make_shared<SyntheticShapes>("train", 64, 16, 5);
  LoaderOptions o;
  o.batch_size = batch_size;
  o.shuffle = true;
  o.seed = 11;
  return BatchLoader(data, nullptr, TextTransformConfig{}, o);
}

std::vector<StepLog> train_regression(Regression& model, int64_t batch_size, int64_t accumulation) {
  Objective obj;
  obj.name = "regression";
  obj.model = &model;
  obj.step = [&](const Batch& b) { return StepLosses{model.loss(b), {{"loss_half", model.loss(b) / 2}}}; };
  EngineOptions o;
  o.epochs = 2;
  o.accumulation = accumulation;
  o.log_interval = 3;
  o.schedule.learning_rate = 1e-2;
  o.schedule.warmup_steps = 2;
  o.optimizer.weight_decay = 0.0;
  return train(obj, shapes_loader(batch_size), o);
}

}  // namespace

TEST(Engine, AccumulatedBatchesEqualOneBatchAsLarge) {
  // 64 samples: 4 optimizer steps of 16 per epoch either way; the loader's order does not depend
  // on the batch size, so step k sees the same 16 samples.
  Regression one, two;
  auto a = train_regression(one, 16, 1);
  auto b = train_regression(two, 8, 2);
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 8u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].step, b[i].step);
    EXPECT_DOUBLE_EQ(a[i].lr, b[i].lr);  // the schedule counts optimizer steps
    EXPECT_NEAR(a[i].loss, b[i].loss, 1e-6) << "step " << a[i].step;  // logged: the mean of the micro-batches
    EXPECT_NEAR(a[i].part("loss_half"), a[i].loss / 2, 1e-7);
  }
  EXPECT_LT(max_abs_diff(one.linear->weight, two.linear->weight), 1e-6);
  // Every step was logged even though the host read the losses back only every 3 steps.
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].step, static_cast<int64_t>(i) + 1);
}

TEST(Engine, RefusesWhatItCannotDo) {
  Regression model;
  EXPECT_TRUE(contains(error_of([&] { train_regression(model, 16, 0); }),
                       "runner_config.gradient_accumulation_steps: 0 must be >= 1"));
  // An epoch of 4 batches cannot make a step of 8.
  EXPECT_TRUE(contains(error_of([&] { train_regression(model, 16, 8); }),
                       "runner_config.gradient_accumulation_steps: 8 batches per optimizer step, but an epoch has only 4"));
}

TEST(Precision, CpuBf16AutocastKeepsLossesNearFp32) {
  // The Q-Former's matmuls in bf16 (CPU autocast), similarities, softmaxes and losses in fp32:
  // each loss within 2% (+0.02) of the fp32 forward's, and visibly not the fp32 path.
  torch::manual_seed(0);
  Blip2Config c = find_preset("tiny")->config;
  c.qformer_config.hidden_dropout_prob = c.qformer_config.attention_probs_dropout_prob = 0.0;
  c.itm_negatives = "argmax";
  Blip2Qformer model(c);
  model->eval();
  auto data = SyntheticShapes("train", 16, c.vision_config.image_size, 1);
  std::vector<torch::Tensor> images;
  std::vector<std::string> captions;
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < 16; ++i) {
    auto s = data.get(i, 0);
    images.push_back(s.image);
    captions.push_back(s.caption);
    ids.push_back(s.image_id);
  }
  auto tok = make_tokenizer(TokenizerConfig{});
  auto enc = tok->encode_batch(captions, c.max_txt_len, "max_length");
  auto x = torch::stack(images);
  auto image_ids = torch::tensor(ids);
  torch::NoGradGuard no_grad;
  auto fp32 = model->forward(x, enc.ids, enc.keep, image_ids);
  Stage1Output bf16;
  {
    AutocastGuard autocast(true, torch::kCPU);
    bf16 = model->forward(x, enc.ids, enc.keep, image_ids);
  }
  for (const auto& [name, a, b] : {std::tuple{"loss_itc", fp32.loss_itc, bf16.loss_itc},
                                   std::tuple{"loss_itm", fp32.loss_itm, bf16.loss_itm},
                                   std::tuple{"loss_lm", fp32.loss_lm, bf16.loss_lm}}) {
    EXPECT_EQ(b.scalar_type(), torch::kFloat32) << name;
    const double want = a.item<double>(), got = b.item<double>();
    EXPECT_NEAR(got, want, 0.02 * std::abs(want) + 0.02) << name;
  }
  EXPECT_NE(fp32.loss.item<double>(), bf16.loss.item<double>()) << "autocast changed nothing";
  EXPECT_EQ(bf16.image_feats.scalar_type(), torch::kBFloat16);  // the projections ran in bf16
  // Master weights stay fp32.
  for (const auto& p : model->parameters()) EXPECT_EQ(p.scalar_type(), torch::kFloat32);
}

TEST(Precision, TrainingUnderCpuAutocastLearns) {
  // runner_config.bf16_autocast on the CPU runs the engine's autocast path end to end.
  RunConfig c = parse_run_config(embedded_tiny_config(), "embedded");
  auto dir = temp_dir("autocast");
  c.output_dir = dir.string();
  c.runner_config.bf16_autocast = true;
  c.runner_config.epochs = 3;
  c.runner_config.batch_size = 16;
  c.runner_config.log_interval = 4;
  c.train_dataset.data_loader.num_samples = 128;
  c.lr_schedule.warmup_steps = 4;
  auto logs = Stage1Task(c).train();
  ASSERT_EQ(logs.size(), 24u);
  for (const auto& l : logs) EXPECT_TRUE(std::isfinite(l.loss));
  EXPECT_LT(logs.back().loss, logs.front().loss);
  fs::remove_all(dir);
}
