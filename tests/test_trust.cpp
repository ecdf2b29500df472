// Never silently wrong: each input that used to run to completion with wrong numbers (or crash) is
// now either computed as the reference computes it or refused with one line naming it. One test
// per finding of the issue, on the tiny variants of tests/fixtures/variants.
#include <sys/resource.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "blip2/api/api.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/io/pth.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/stage1.h"
#include "blip2/tasks/stage2.h"
#include "blip2/util/device.h"
#include "blip2/vision/image.h"
#include "test_util.h"

namespace blip2 {
namespace {

using namespace blip2::testing;
namespace fs = std::filesystem;

const fs::path kVariants = fs::path(BLIP2_FIXTURE_DIR) / "variants";

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A stage-1 run config for the tiny variants: the blip2_stage1_vit_g preset (whose architecture
// their config.json overrides), their vocabulary, 8-token texts, and `model` lines under
// model.model_config (indented by 4).
fs::path variant_run_config(const fs::path& dir, const fs::path& variant, const std::string& model = "",
                            const std::string& name = "run.yaml") {
  const std::string vocab = (variant / "vocab.txt").string();
  std::string yaml = "run_mode: predict\ntrainer:\n  type: contrastive_language_image_pretrain\n"
                     "  model_name: blip2_stage1_vit_g\n";
  for (const char* section : {"train_dataset", "eval_dataset"})
    yaml += std::string(section) + ":\n  data_loader:\n    type: ImageFolder\n  text_transforms:\n    max_length: 8\n"
            "  tokenizer:\n    max_length: 8\n    vocab_file: " + vocab + "\n";
  if (!model.empty()) yaml += "model:\n  model_config:\n" + model;
  const auto path = dir / name;
  atomic_write(path, yaml);
  return path;
}

// The ITC text feature of "tok10 tok11 tok12" = ids [CLS] 15 16 17 [SEP], the first text of the
// variants' inputs, as `blip2 run --run_mode predict` writes it.
torch::Tensor cli_text_feature(const fs::path& out) {
  return load_safetensors((out / "features.safetensors").string()).at("text_embeds_proj").select(1, 0);
}

TEST(Trust, HuggingFaceActivationsAreComputedNotAssumedGelu) {
  // Q-Former relu through the CLI (--load_checkpoint) and the API; a quick_gelu ViT through
  // blip2 convert, whose config.yaml says quick_gelu and is read back as such.
  auto dir = temp_dir("trust_act");
  const auto relu = kVariants / "stage1_qformer_config.hidden_act_1";
  ASSERT_EQ(nlohmann::json::parse(read_file(relu / "config.json"))["qformer_config"]["hidden_act"], "relu");
  const TensorMap want = load_safetensors((relu / "expected.safetensors").string());
  auto r = run_cli("run --config " + variant_run_config(dir, relu).string() + " --load_checkpoint " + relu.string() +
                   " --output_dir " + (dir / "out").string() + " --predict_text 'tok10 tok11 tok12'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_LE(max_abs_diff(cli_text_feature(dir / "out"), want.at("text_feat").narrow(0, 0, 1)), 1e-4);

  const auto quick = kVariants / "stage1_vision_config.hidden_act_0";
  ASSERT_EQ(nlohmann::json::parse(read_file(quick / "config.json"))["vision_config"]["hidden_act"], "quick_gelu");
  r = run_cli("convert " + quick.string() + " --out " + (dir / "converted").string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(read_file(dir / "converted" / "config.yaml"), "hidden_act: quick_gelu"));
  FromPretrainedOptions o;
  o.vocab_file = (quick / "vocab.txt").string();
  auto model = Blip2Model::from_pretrained((dir / "converted").string(), o);
  const TensorMap q = load_safetensors((quick / "expected.safetensors").string());
  torch::NoGradGuard no_grad;
  auto feats = model.module()->extract_features(q.at("pixel_values"), {}, {}, "image").image_embeds_proj;
  EXPECT_LE(max_abs_diff(feats, q.at("image_feat")), 1e-4);
  fs::remove_all(dir);
}

TEST(Trust, ArchitectureComesFromTheCheckpointAndConflictsAreErrors) {
  auto dir = temp_dir("trust_arch");
  const auto base = kVariants / "stage1_base";  // cross_attention_frequency 1
  // The config sets 2: one line naming the key, both values and both files; nothing run.
  const auto yaml = variant_run_config(dir, base, "    qformer_config:\n      cross_attention_freq: 2\n", "freq2.yaml");
  auto r = run_cli("run --config " + yaml.string() + " --load_checkpoint " + base.string() + " --output_dir " +
                   (dir / "out").string() + " --predict_text 'tok10 tok11 tok12'");
  EXPECT_EQ(r.code, 1) << r.out;
  const std::string err = r.out.substr(r.out.find("error: "));
  EXPECT_TRUE(contains(err, "model.model_config.qformer_config.cross_attention_freq: 2 in " + yaml.string() +
                                ", but 1 in " + (base / "config.json").string()))
      << r.out;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_FALSE(fs::exists(dir / "out" / "features.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "out" / "resolved_config.yaml"));
  // Left to the preset (2), it is the checkpoint's (1), and the numbers are transformers'.
  r = run_cli("run --config " + variant_run_config(dir, base).string() + " --load_checkpoint " + base.string() +
              " --output_dir " + (dir / "out").string() + " --predict_text 'tok10 tok11 tok12'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "qformer_config.cross_attention_freq 2 -> 1")) << r.out;
  // What ran is what resolved_config.yaml says.
  EXPECT_TRUE(contains(read_file(dir / "out" / "resolved_config.yaml"), "cross_attention_freq: 1"));
  const TensorMap want = load_safetensors((base / "expected.safetensors").string());
  EXPECT_LE(max_abs_diff(cli_text_feature(dir / "out"), want.at("text_feat").narrow(0, 0, 1)), 1e-4);
  // Through the API: a run config that disagrees with the model given to the Trainer.
  TrainerOptions o;
  o.config = yaml.string();
  o.output_dir = (dir / "api").string();
  auto msg = error_of([&] { Trainer("contrastive_language_image_pretrain", base.string(), o); });
  EXPECT_TRUE(contains(msg, "cross_attention_freq: 2 in " + yaml.string())) << msg;
  // Weights given to a model built already must describe it: the relu variant has the base's
  // shapes, and would otherwise load and be computed with GELU.
  TrainerOptions p;
  p.output_dir = (dir / "predict").string();
  Trainer built("contrastive_language_image_pretrain", base.string(), p);
  const auto relu = kVariants / "stage1_qformer_config.hidden_act_1";
  msg = error_of([&] { built.predict({}, relu.string(), {"tok10"}); });
  EXPECT_TRUE(contains(msg, "qformer_config.hidden_act: 'gelu' in the model as built, but 'relu' in " +
                                (relu / "config.json").string())) << msg;
  // A model.safetensors given as a file brings the config.yaml beside it.
  auto r2 = run_cli("convert " + relu.string() + " --out " + (dir / "conv").string());
  ASSERT_EQ(r2.code, 0) << r2.out;
  FromPretrainedOptions fo;
  fo.vocab_file = (relu / "vocab.txt").string();
  auto m = Blip2Model::from_pretrained((dir / "conv" / "model.safetensors").string(), fo);
  EXPECT_EQ(m.config().qformer_config.hidden_act, "relu");
  fs::remove_all(dir);
}

TEST(Trust, KnownExtrasAreDroppedOnlyWhereTheyAreKnown) {
  // EVA-CLIP-g's 40th block, which BLIP-2 removes (LAVIS loads eva_vit_g.pth with strict=False),
  // is dropped; a second extra block is not.
  auto hf = load_hf_directory((kParity / "hf_itm").string());  // a 2-block ViT
  Blip2Qformer model(hf.config);
  TensorMap vit;
  for (const auto& [name, t] : hf.tensors)
    if (name.rfind("vision_model.", 0) == 0) vit[name] = t;
  vit["vision_model.encoder.layers.2.mlp.fc1.weight"] = vit.at("vision_model.encoder.layers.1.mlp.fc1.weight");
  WeightLedger ledger;
  EXPECT_NO_THROW(ledger.load(*model, vit, "eva_vit_g.pth", "vision_model."));
  vit["vision_model.encoder.layers.3.mlp.fc1.weight"] = vit.at("vision_model.encoder.layers.1.mlp.fc1.weight");
  auto msg = error_of([&] { WeightLedger().load(*model, vit, "eva_vit_g.pth", "vision_model."); });
  EXPECT_TRUE(contains(msg, "eva_vit_g.pth: vision_model.encoder.layers.3.mlp.fc1.weight (1 tensor) that the model "
                            "has no place for")) << msg;
  // A tied lm_head that differs from the embeddings it is tied to is not dropped.
  auto f = load_hf_directory((kParity / "hf_opt").string());
  Blip2Llm llm(f.config);
  TensorMap t = f.tensors;
  t["language_model.lm_head.weight"] = t.at("language_model.model.decoder.embed_tokens.weight") + 1;
  msg = error_of([&] { WeightLedger().load(*llm, t, "opt.bin"); });
  EXPECT_TRUE(contains(msg, "'language_model.lm_head.weight' differs from 'language_model.model.decoder.embed_tokens.weight'"))
      << msg;
  t["language_model.lm_head.weight"] = t.at("language_model.model.decoder.embed_tokens.weight").clone();
  EXPECT_NO_THROW(WeightLedger().load(*llm, t, "opt.bin"));
}

TEST(Trust, TrainerRefusesAModelOfTheWrongStage) {
  auto msg = error_of([] { Trainer("image_to_text_retrieval", "tiny_stage2"); });
  EXPECT_TRUE(contains(msg, "task image_to_text_retrieval works on stage-1 models")) << msg;
  TrainerOptions o;
  o.config = std::string(BLIP2_CONFIG_DIR) + "/tiny_pretrain_stage_2.yaml";
  msg = error_of([&] { Trainer("contrastive_language_image_pretrain", "tiny", o); });
  EXPECT_TRUE(contains(msg, "a stage-2 run config (text_config), but 'tiny' is a stage-1 model")) << msg;
}

TEST(Trust, ExportRefusesWhatTransformersWouldFillAtRandom) {
  auto dir = temp_dir("trust_export");
  const auto base = kVariants / "stage1_base";
  auto r = run_cli("convert " + base.string() + " --out " + (dir / "c").string());
  ASSERT_EQ(r.code, 0) << r.out;
  TensorMap t = load_safetensors((dir / "c" / "model.safetensors").string());
  for (auto it = t.begin(); it != t.end();) it = it->first.rfind("vision_model.encoder.", 0) == 0 ? t.erase(it) : std::next(it);
  save_safetensors((dir / "c" / "model.safetensors").string(), t);
  r = run_cli("export --to hf " + (dir / "c").string() + " --out " + (dir / "hf").string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "vision_model.encoder.layers.0")) << r.out;
  EXPECT_TRUE(contains(r.out, "transformers would initialise them at random")) << r.out;
  EXPECT_FALSE(fs::exists(dir / "hf" / "model.safetensors"));
  // A Hugging Face model.safetensors given as a file brings the config.json beside it.
  const auto relu = kVariants / "stage1_qformer_config.hidden_act_1";
  FromPretrainedOptions relu_options;
  relu_options.vocab_file = (relu / "vocab.txt").string();
  auto m = Blip2Model::from_pretrained((relu / "model.safetensors").string(), relu_options);
  EXPECT_EQ(m.config().qformer_config.hidden_act, "relu");
  // transformers' default encoder_hidden_size (1408) when config.json leaves it out.
  auto j = read_json_file((base / "config.json").string());
  j["qformer_config"].erase("encoder_hidden_size");
  auto msg = error_of([&] { blip2_config_from_hf(j, "config.json"); });
  EXPECT_TRUE(contains(msg, "qformer_config.encoder_hidden_size: 1408 differs from vision_config.hidden_size 8")) << msg;
  fs::remove_all(dir);
}

TEST(Trust, EvaluatingRandomWeightsIsSaidOutLoud) {
  auto dir = temp_dir("trust_random");
  auto r = run_cli("run --run_mode eval --output_dir " + dir.string());
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "no weights were loaded: the model holds its random initialisation")) << r.out;
  fs::remove_all(dir);
}

TEST(Trust, Stage2ConvertOutputLoadsAsItsArchitecture) {
  // blip2 convert of a stage-2 Hugging Face model writes a model config.yaml; the API reads it.
  auto dir = temp_dir("trust_s2conv");
  const auto opt = kVariants / "stage2_opt_base";
  auto r = run_cli("convert " + opt.string() + " --out " + (dir / "c").string());
  ASSERT_EQ(r.code, 0) << r.out;
  TrainerOptions o;
  DatasetConfig d;
  d.data_loader.type = "SyntheticShapes";
  o.eval_dataset = d;
  o.output_dir = (dir / "out").string();
  Trainer trainer("image_to_text_generation", (dir / "c").string(), o);
  auto model = trainer.generation_model().module();
  const TensorMap want = load_safetensors((opt / "expected.safetensors").string());
  torch::NoGradGuard no_grad;
  const auto& ids = want.at("input_ids");
  auto [text, keep] = strip_image_tokens(ids, torch::ones_like(ids), model->text_config().image_token_id);
  EXPECT_LE(max_abs_diff(model->forward(want.at("pixel_values"), text, keep), want.at("logits")), 1e-4);
  fs::remove_all(dir);
}

TEST(Trust, LoadsCoverTheModelOrStop) {
  // Weights of a model with cross-attention every 2nd layer into one with it in every layer
  // (config.yaml edited): the second layer's cross-attention would stay random.
  auto dir = temp_dir("trust_cover");
  const auto freq2 = kVariants / "stage1_qformer_config.cross_attention_frequency";
  auto r = run_cli("convert " + freq2.string() + " --out " + (dir / "c").string());
  ASSERT_EQ(r.code, 0) << r.out;
  std::string model_yaml = read_file(dir / "c" / "config.yaml");
  const auto at = model_yaml.find("cross_attention_freq: 2");
  ASSERT_NE(at, std::string::npos);
  model_yaml.replace(at, 23, "cross_attention_freq: 1");
  fs::create_directories(dir / "bare");
  fs::copy_file(dir / "c" / "model.safetensors", dir / "bare" / "weights.safetensors");  // no config beside it
  atomic_write(dir / "arch.yaml", model_yaml);
  FromPretrainedOptions o;
  o.config = (dir / "arch.yaml").string();
  o.vocab_file = (freq2 / "vocab.txt").string();
  auto msg = error_of([&] { Blip2Model::from_pretrained((dir / "bare" / "weights.safetensors").string(), o); });
  EXPECT_TRUE(contains(msg, "the weights do not cover the model")) << msg;
  EXPECT_TRUE(contains(msg, "qformer.encoder.layer.1.crossattention")) << msg;
  EXPECT_TRUE(contains(msg, "allow_partial_load")) << msg;
  // On purpose: the load report names what is random, and tasks see it.
  o.allow_partial_load = true;
  auto partial = Blip2Model::from_pretrained((dir / "bare" / "weights.safetensors").string(), o);
  const auto random = partial.missing_weights();
  EXPECT_TRUE(std::any_of(random.begin(), random.end(), [](const std::string& n) {
    return contains(n, "qformer.encoder.layer.1.crossattention");
  }));
  // The other way round (a checkpoint with tensors the model has no place for) through the CLI.
  const auto freq1_weights = dir / "bare1" / "weights.safetensors";
  r = run_cli("convert " + (kVariants / "stage1_base").string() + " --out " + (dir / "c1").string());
  ASSERT_EQ(r.code, 0) << r.out;
  fs::create_directories(dir / "bare1");
  fs::copy_file(dir / "c1" / "model.safetensors", freq1_weights);
  std::string arch = read_file(dir / "c1" / "config.yaml");
  arch.replace(arch.find("cross_attention_freq: 1"), 23, "cross_attention_freq: 2");
  std::string indented;
  std::istringstream lines(arch);
  for (std::string line; std::getline(lines, line);) indented += "    " + line + "\n";
  const auto yaml = variant_run_config(dir, freq2, indented);
  r = run_cli("run --config " + yaml.string() + " --load_checkpoint " + freq1_weights.string() + " --output_dir " +
              (dir / "out").string() + " --predict_text 'tok10'");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "that the model has no place for")) << r.out;
  r = run_cli("run --config " + yaml.string() + " --load_checkpoint " + freq1_weights.string() + " --output_dir " +
              (dir / "out").string() + " --predict_text 'tok10' --allow_partial_load");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "ignored (allow_partial_load)")) << r.out;
  fs::remove_all(dir);
}

TEST(Trust, ModelsAboutToBeLoadedWholeSkipTheirRandomInitialisation) {
  // A model whose loads cover it is built without drawing its initialisation (no random number
  // is consumed) and holds the checkpoint's weights. One whose checkpoint lacks what evaluation
  // may leave random (the LM head and temperature, as a Hugging Face directory) draws those
  // tensors alone, by their modules' rules: the only draw is then the head's dense weight.
  auto dir = temp_dir("trust_draws");
  const Blip2Config c = find_preset("tiny")->config;
  torch::manual_seed(3);
  WeightLedger scratch;
  const auto saved = state_dict(*build_model(c, scratch));
  TensorMap without_lm;
  for (const auto& [name, t] : saved)
    if (name.rfind("cls.", 0) != 0 && name != "temp") without_lm.emplace(name, t);
  save_safetensors((dir / "whole.safetensors").string(), saved);
  save_safetensors((dir / "no_lm.safetensors").string(), without_lm);
  auto build = [&](const std::string& file, WeightLedger& ledger) {
    return build_loaded<Blip2Qformer>(true, [&](bool draw) {
      ledger = WeightLedger();
      auto m = build_model(c, ledger, torch::kCPU, draw);
      load_model_weights(*m, (dir / file).string(), ledger);
      return m;
    }, ledger);
  };
  auto gen = at::detail::getDefaultCPUGenerator();
  torch::manual_seed(5);
  const auto before = gen.get_state();
  WeightLedger ledger;
  auto whole = build("whole.safetensors", ledger);
  EXPECT_TRUE(torch::equal(gen.get_state(), before));  // nothing was drawn
  EXPECT_TRUE(ledger.random().empty());
  for (const auto& [name, t] : state_dict(*whole)) EXPECT_TRUE(torch::equal(t, saved.at(name))) << name;

  torch::manual_seed(5);
  auto partial = build("no_lm.safetensors", ledger);
  const auto after = gen.get_state();
  torch::manual_seed(5);
  const int64_t h = c.qformer_config.hidden_size;
  const auto dense = torch::empty({h, h}).normal_(0.0, c.qformer_config.initializer_range);
  EXPECT_TRUE(torch::equal(gen.get_state(), after));  // that draw, and no other
  const auto p = state_dict(*partial);
  EXPECT_EQ(ledger.random().size(), 6u);  // cls.* (5) and temp
  EXPECT_TRUE(torch::equal(p.at("cls.predictions.transform.dense.weight"), dense));
  EXPECT_EQ(p.at("cls.predictions.transform.dense.bias").abs().max().item<float>(), 0.0f);
  EXPECT_EQ(p.at("cls.predictions.transform.LayerNorm.weight").min().item<float>(), 1.0f);
  EXPECT_EQ(p.at("cls.predictions.transform.LayerNorm.bias").abs().max().item<float>(), 0.0f);
  EXPECT_EQ(p.at("cls.predictions.bias").abs().max().item<float>(), 0.0f);
  EXPECT_FLOAT_EQ(p.at("temp").item<float>(), static_cast<float>(c.temperature));
  for (const auto& [name, t] : without_lm) EXPECT_TRUE(torch::equal(p.at(name), t)) << name;
  // A tensor no module has a rule for (EVA's class token) cannot be drawn alone: build_loaded
  // then builds the model again with every draw, from the generator state before the attempt.
  const auto before_attempt = gen.get_state();
  EXPECT_FALSE(init_parameters(*partial, {"itm_head.weight", "vision_model.embeddings.class_embedding"}));
  EXPECT_TRUE(torch::equal(gen.get_state(), before_attempt));
  EXPECT_TRUE(init_parameters(*partial, {"itm_head.weight", "temp"}));
  fs::remove_all(dir);
}

TEST(Trust, AHandedOverLoadTakesTheFileWithoutACopyAndAliasesNothingElse) {
  // A map handed over (a temporary) gives its tensors to the model: the weight is then the
  // file's memory-mapped storage (not resizable, unlike an allocation), and writing to it
  // reaches neither the file nor a later load. A map the caller keeps is copied from: the
  // model's writes never reach the caller's tensors.
  auto dir = temp_dir("trust_adopt");
  const auto file = (dir / "w.safetensors").string();
  torch::manual_seed(1);
  const TensorMap saved = {{"weight", torch::randn({16, 8})}, {"bias", torch::randn({16})}};
  save_safetensors(file, saved);
  auto fresh = [] { return Linear(8, 16, true, InitOptions{}); };

  auto taken = fresh();
  load_into(*taken, load_safetensors(file), file);
  EXPECT_FALSE(taken->weight.storage().resizable());  // the mapping's memory
  EXPECT_TRUE(torch::equal(taken->weight, saved.at("weight")));
  {
    torch::NoGradGuard no_grad;
    taken->weight.add_(1.0);
  }
  EXPECT_TRUE(torch::equal(load_safetensors(file).at("weight"), saved.at("weight")));

  const TensorMap kept = load_safetensors(file);
  auto copied = fresh();
  load_into(*copied, kept, file);
  EXPECT_TRUE(copied->weight.storage().resizable());  // its own allocation
  {
    torch::NoGradGuard no_grad;
    copied->weight.mul_(3.0);
  }
  EXPECT_TRUE(torch::equal(kept.at("weight"), saved.at("weight")));
  auto again = fresh();
  load_into(*again, kept, file);
  EXPECT_TRUE(torch::equal(again->weight, saved.at("weight")));
  fs::remove_all(dir);
}

TEST(Trust, ZeroShotLabelsFitTheQformerPositions) {
  // A Q-Former with 8 positions: the labels are padded to its max_txt_len, not to 32; asking for
  // 32 is refused by name instead of LibTorch's "index out of range in self".
  const auto dir = kVariants / "stage1_qformer_config.max_position_embeddings";
  Image img;
  img.width = img.height = 8;
  img.rgb.assign(8 * 8 * 3, 100);
  PipelineOptions o;
  o.candidate_labels = {"tok5", "tok6 tok7"};
  auto classify = pipeline("zero_shot_image_classification", dir.string(), o);
  auto result = classify(img);
  ASSERT_EQ(result.size(), 1u);
  EXPECT_EQ(result[0].size(), 2u);
  o.max_length = 32;
  auto msg = error_of([&] { pipeline("zero_shot_image_classification", dir.string(), o); });
  EXPECT_TRUE(contains(msg, "max_length 32 exceeds the Q-Former's max_position_embeddings 8")) << msg;
  EXPECT_FALSE(contains(msg, "\n")) << msg;
  // The same through tokenize (features of texts).
  auto model = Blip2Model::from_pretrained(dir.string());
  msg = error_of([&] { model.tokenize({"tok5"}, 32); });
  EXPECT_TRUE(contains(msg, "max_length 32 exceeds the Q-Former's max_position_embeddings 8")) << msg;
}

RunConfig short_stage2(const fs::path& out) {
  RunConfig c = load_run_config(std::string(BLIP2_CONFIG_DIR) + "/tiny_pretrain_stage_2.yaml");
  c.output_dir = out.string();
  c.model.model_config.checkpoint_name_or_path = "";
  c.runner_config.epochs = 2;
  c.runner_config.batch_size = 8;
  c.runner_config.log_interval = 100;
  c.runner_config.llm_pretrain_epochs = 1;
  c.train_dataset.data_loader.num_samples = 64;
  c.eval_dataset.data_loader.num_samples = 8;
  c.lr_schedule.warmup_steps = 3;
  // dropout on, so resuming must also restore the random generator
  c.model.model_config.qformer_config.hidden_dropout_prob = 0.1;
  return c;
}

TEST(Trust, Stage2ResumeContinuesExactly) {
  auto dir = temp_dir("trust_resume2");
  auto full = Stage2Task(short_stage2(dir / "full")).train();
  ASSERT_EQ(full.size(), 16u);
  RunConfig first = short_stage2(dir / "split");
  first.runner_config.max_steps = 6;
  auto head = Stage2Task(first).train();
  ASSERT_EQ(head.size(), 6u);
  RunConfig second = short_stage2(dir / "split");
  second.resume_training = true;
  second.load_checkpoint = (dir / "split").string();
  auto tail = Stage2Task(second).train();
  ASSERT_EQ(tail.size(), 10u);
  expect_same_trajectory(full, head, tail);
  // The resumed run kept the first 6 metrics lines and appended the rest: 16 in all.
  std::string metrics = read_file(dir / "split" / "metrics.jsonl");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), 16);
  EXPECT_EQ(read_file(dir / "split" / "checkpoint" / "latest"), "step_00000016\n");
  fs::remove_all(dir);
}

TEST(Trust, ResumeRefusesAnotherStageOrArchitecture) {
  // A stage-2 checkpoint does not resume a stage-1 run, and a checkpoint of another Q-Former
  // does not resume this one: one line naming the key and both files.
  auto dir = temp_dir("trust_resume_other");
  RunConfig s2 = short_stage2(dir / "s2");
  s2.runner_config.max_steps = 2;
  Stage2Task(s2).train();
  RunConfig s1 = parse_run_config(embedded_tiny_config(), "tiny.yaml");
  s1.output_dir = (dir / "s1").string();
  s1.resume_training = true;
  s1.load_checkpoint = (dir / "s2").string();
  auto msg = error_of([&] { Stage1Task(s1).train(); });
  std::cout << "stage-1 resume from a stage-2 checkpoint: " << msg << "\n";
  EXPECT_TRUE(contains(msg, "stage-2 checkpoint, but this run trains stage 1")) << msg;
  RunConfig other = short_stage2(dir / "s2");
  other.resume_training = true;
  other.load_checkpoint = (dir / "s2").string();
  other.model.model_config.qformer_config.num_hidden_layers = 2;
  other.given["model.model_config.qformer_config.num_hidden_layers"] = "test";
  msg = error_of([&] { Stage2Task(other).train(); });
  EXPECT_TRUE(contains(msg, "qformer_config.num_hidden_layers")) << msg;
  EXPECT_TRUE(contains(msg, "config.yaml")) << msg;
  // The data position counts batches of the checkpoint's size and accumulation.
  RunConfig acc = short_stage2(dir / "s2");
  acc.resume_training = true;
  acc.load_checkpoint = (dir / "s2").string();
  acc.runner_config.gradient_accumulation_steps = 2;
  msg = error_of([&] { Stage2Task(acc).train(); });
  EXPECT_TRUE(contains(msg, "runner_config.gradient_accumulation_steps: 2, but ")) << msg;
  EXPECT_TRUE(contains(msg, "was written with 1")) << msg;
  acc.runner_config.gradient_accumulation_steps = 1;
  acc.runner_config.batch_size = 4;
  msg = error_of([&] { Stage2Task(acc).train(); });
  EXPECT_TRUE(contains(msg, "runner_config.batch_size: 4 x data_parallel 1, but ")) << msg;
  EXPECT_TRUE(contains(msg, "was written with 8 x 1 (resume with the same global batch)")) << msg;
  fs::remove_all(dir);
}

TEST(Trust, OptionsThatWouldDoNothingAreRefused) {
  // Gradient accumulation of no batches, and k_test below the R@10 that retrieval reports.
  // (bf16 autocast is honoured on the CPU too: Precision.* runs it.)
  RunConfig c = parse_run_config(embedded_tiny_config(), "tiny.yaml");
  c.runner_config.gradient_accumulation_steps = 0;
  auto msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: runner_config.gradient_accumulation_steps: 0 must be >= 1")) << msg;
  // Stage-1 settings on a stage-2 model, a frozen dtype with nothing frozen.
  RunConfig s2 = load_run_config(std::string(BLIP2_CONFIG_DIR) + "/tiny_pretrain_stage_2.yaml");
  s2.model.model_config.itc_gather = "with_grad";
  msg = error_of([&] { validate(s2, "s2.yaml"); });
  EXPECT_TRUE(contains(msg, "s2.yaml: model.model_config.itc_gather: with_grad on a stage-2 model")) << msg;
  c = parse_run_config(embedded_tiny_config(), "tiny.yaml");  // freeze_vision: false
  c.model.model_config.frozen_dtype = "bfloat16";
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: model.model_config.frozen_dtype: bfloat16 with freeze_vision false")) << msg;
  c = parse_run_config(embedded_tiny_config(), "tiny.yaml");
  c.train_dataset.prefetch_size = 0;
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: train_dataset.prefetch_size: 0 must be >= 1")) << msg;
  c = parse_run_config(embedded_tiny_config(), "tiny.yaml");
  c.eval_dataset.k_test = 5;
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: eval_dataset.k_test: 5 is below 10")) << msg;
  c.eval_dataset.k_test = 10;
  c.eval_dataset.rerank_chunk_size = 0;
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: eval_dataset.rerank_chunk_size: 0 must be >= 1")) << msg;
  c.eval_dataset.rerank_chunk_size = 16;
  c.model.model_config.weights = "int4";
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: model.model_config.weights: 'int4' is not float|int8")) << msg;
  c.model.model_config.weights = "int8";  // the embedded config trains
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: model.model_config.weights: int8 is for evaluation and prediction")) << msg;
  c.run_mode = "eval";
  c.parallel_config.model_parallel = 2;
  c.use_parallel = true;
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "int8 with parallel_config.model_parallel 2")) << msg;
  c.parallel_config.model_parallel = 1;
  c.use_parallel = false;
  c.model.model_config.weights = "float";
  c.run_mode = "train";
  EXPECT_EQ(error_of([&] { validate(c, "tiny.yaml"); }), "<no error>");
  // Resuming outside training, pipeline parallelism, a processor that is not what runs.
  c.resume_training = true;
  c.run_mode = "eval";
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "tiny.yaml: resume_training: true with run_mode eval")) << msg;
  c = parse_run_config(embedded_tiny_config(), "tiny.yaml");
  c.parallel_config.pipeline_stage = 2;
  EXPECT_TRUE(contains(error_of([&] { validate(c, "tiny.yaml"); }), "parallel_config.pipeline_stage: 2")) << msg;
  c = parse_run_config(embedded_tiny_config(), "tiny.yaml");
  c.processor.image_processor.image_size = 224;  // the tiny config gives it (32)
  msg = error_of([&] { validate(c, "tiny.yaml"); });
  EXPECT_TRUE(contains(msg, "processor.image_processor.image_size: 224 differs from the model's image size 32")) << msg;
}

TEST(Trust, CudaDeviceIndexIsKeptEverywhere) {
  EXPECT_EQ(parse_device("cuda:1"), torch::Device(torch::kCUDA, 1));
  EXPECT_EQ(parse_device("cuda"), torch::Device(torch::kCUDA));
  EXPECT_EQ(parse_device("cpu"), torch::Device(torch::kCPU));
  EXPECT_TRUE(contains(error_of([] { parse_device("gpu"); }), "'gpu' is not cpu|cuda|cuda:N"));
  if (torch::cuda::device_count() >= 2) GTEST_SKIP() << "this machine has two GPUs: checked elsewhere";
  // No such device here: the error names cuda:1, the device asked for, not cuda.
  FromPretrainedOptions o;
  o.device = "cuda:1";
  auto msg = error_of([&] { Blip2Model::from_pretrained("tiny", o); });
  EXPECT_TRUE(contains(msg, "cuda:1")) << msg;
  GenerationModelOptions g;
  g.device = "cuda:1";
  msg = error_of([&] { Blip2GenerationModel::from_pretrained("tiny_stage2", g); });
  EXPECT_TRUE(contains(msg, "cuda:1")) << msg;
  auto r = run_cli("run --device_target cuda:1 --run_mode eval");
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.out, "device_target is cuda:1")) << r.out;
}

// A Baichuan directory whose config.json is edited to look like another Baichuan.
std::string baichuan_error(const fs::path& dir, const std::function<void(nlohmann::json&)>& edit) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto src = kParity / "baichuan_llm";
  fs::copy_file(src / "pytorch_model.bin", dir / "pytorch_model.bin");
  auto j = nlohmann::json::parse(read_file(src / "config.json"));
  edit(j);
  atomic_write(dir / "config.json", j.dump(2));
  return error_of([&] { load_hf_llm(dir.string()); });
}

TEST(Trust, BaichuanCheckpointsAreToldApart) {
  auto dir = temp_dir("trust_baichuan");
  EXPECT_EQ(baichuan_error(dir / "7b", [](nlohmann::json&) {}), "<no error>");
  auto msg = baichuan_error(dir / "13b", [](nlohmann::json& j) {
    j["architectures"] = {"BaichuanForCausalLM"};
    j["hidden_size"] = 5120;
  });
  EXPECT_TRUE(contains(msg, "architectures: [\"BaichuanForCausalLM\"]")) << msg;
  EXPECT_TRUE(contains(msg, "ALiBi")) << msg;
  msg = baichuan_error(dir / "b2", [](nlohmann::json& j) {
    j["architectures"] = {"BaichuanForCausalLM"};
    j["hidden_size"] = 4096;
    j["vocab_size"] = 125696;
  });
  EXPECT_TRUE(contains(msg, "Baichuan2-7B")) << msg;
  EXPECT_TRUE(contains(msg, "NormHead")) << msg;
  msg = baichuan_error(dir / "none", [](nlohmann::json& j) { j.erase("architectures"); });
  EXPECT_TRUE(contains(msg, "does not say which Baichuan")) << msg;
  fs::remove_all(dir);
}

// Peak resident memory of this process, in MiB.
double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

uint32_t crc32(const std::string& bytes) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : bytes) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return c ^ 0xFFFFFFFFu;
}

void put_be32(std::string& s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) s[at + i] = static_cast<char>((v >> (24 - 8 * i)) & 0xFF);
}

TEST(Trust, DecodersRefuseDecompressionBombsFromTheHeader) {
  auto dir = temp_dir("trust_bomb");
  const double before = peak_rss_mib();
  // A valid PNG whose IHDR (CRC fixed up) says 40000 x 40000.
  std::string png = read_file(fs::path(BLIP2_FIXTURE_DIR) / "images" / "rgb.png");
  ASSERT_EQ(png.substr(12, 4), "IHDR");
  put_be32(png, 16, 40000);
  put_be32(png, 20, 40000);
  put_be32(png, 29, crc32(png.substr(12, 17)));
  atomic_write(dir / "bomb.png", png);
  auto msg = error_of([&] { load_image((dir / "bomb.png").string()); });
  EXPECT_TRUE(contains(msg, (dir / "bomb.png").string() + ": 40000 x 40000 = 1600000000 pixels exceeds the limit "
                                                         "of 178956970")) << msg;
  // A JPEG whose SOF says 60000 x 60000.
  std::string jpg = read_file(fs::path(BLIP2_FIXTURE_DIR) / "images" / "rgb_420.jpg");
  const auto sof = jpg.find("\xFF\xC0");
  ASSERT_NE(sof, std::string::npos);
  jpg[sof + 5] = static_cast<char>(0xEA), jpg[sof + 6] = 0x60;  // height 60000
  jpg[sof + 7] = static_cast<char>(0xEA), jpg[sof + 8] = 0x60;  // width 60000
  atomic_write(dir / "bomb.jpg", jpg);
  msg = error_of([&] { load_image((dir / "bomb.jpg").string()); });
  EXPECT_TRUE(contains(msg, "bomb.jpg: 60000 x 60000 = 3600000000 pixels exceeds the limit")) << msg;
  EXPECT_LT(peak_rss_mib() - before, 200.0) << "a pixel buffer was allocated before the check";
  // The limit is configurable (and Pillow-sized by default); small images are unaffected.
  EXPECT_EQ(max_image_pixels(), 178956970);
  set_max_image_pixels(10);
  msg = error_of([&] { load_image((fs::path(BLIP2_FIXTURE_DIR) / "images" / "rgb.png").string()); });
  EXPECT_TRUE(contains(msg, "exceeds the limit of 10 (max_image_pixels)")) << msg;
  set_max_image_pixels(178956970);
  EXPECT_EQ(error_of([&] { load_image((fs::path(BLIP2_FIXTURE_DIR) / "images" / "rgb.png").string()); }), "<no error>");
  // Through the CLI: one line, exit 1.
  auto r = run_cli("run --run_mode predict --predict_data " + (dir / "bomb.png").string() + " --output_dir " +
                   (dir / "out").string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "40000 x 40000")) << r.out;
  fs::remove_all(dir);
}

TEST(Trust, LavisDuplicatesAreCheckedAndAcceptedQuietly) {
  // LAVIS stores the LM decoder's bias twice and ties its weight to the word embeddings.
  TensorMap raw = load_pth((kParity / "blip2_lavis.pth").string());
  ASSERT_TRUE(raw.count("Qformer.cls.predictions.decoder.bias"));  // as LAVIS saves it
  auto canon = canonical_from_lavis(raw);
  EXPECT_FALSE(canon.count("cls.predictions.decoder.bias"));
  EXPECT_TRUE(canon.count("cls.predictions.bias"));
  auto hf = load_hf_directory((kParity / "hf_itm").string());
  Blip2Qformer model(hf.config);
  WeightLedger ledger;
  auto report = ledger.load(*model, canon, "blip2_lavis.pth");
  EXPECT_TRUE(report.unexpected.empty()) << report.summary();
  EXPECT_NO_THROW(ledger.check(*model, {}));
  // A twin that differs is not silently dropped.
  raw["Qformer.cls.predictions.decoder.bias"] = raw.at("Qformer.cls.predictions.bias") + 1;
  auto msg = error_of([&] { canonical_from_lavis(raw); });
  EXPECT_TRUE(contains(msg, "'Qformer.cls.predictions.decoder.bias' differs from 'Qformer.cls.predictions.bias'"))
      << msg;
}

TEST(Trust, ConfigsAsTransformers4WroteThemAreRead) {
  // Nested sections in full, every generic key at its default (tools/make_legacy_configs.py).
  const fs::path dir = fs::path(BLIP2_FIXTURE_DIR) / "legacy_configs";
  auto blip2 = read_json_file((dir / "blip2_opt.json").string());
  ASSERT_TRUE(blip2["text_config"].contains("num_beams"));
  const auto c = blip2_config_from_hf(blip2, "blip2_opt.json");
  ASSERT_TRUE(c.text_config.has_value());
  EXPECT_TRUE(c.text_config->is_opt());
  EXPECT_EQ(c.text_config->eos_token_id, 50118);
  EXPECT_EQ(c.qformer_config.query_length, 32);
  const auto llama = text_config_from_hf(read_json_file((dir / "llama.json").string()), "llama.json");
  EXPECT_EQ(llama.rope_type, "linear");
  EXPECT_DOUBLE_EQ(llama.rope_factor, 2.0);
  EXPECT_TRUE(text_config_from_hf(read_json_file((dir / "opt.json").string()), "opt.json").is_opt());
  // Keys of older releases that no model reads (Salesforce's 4.47 configs carry them), and keys of
  // no release, are accepted: transformers reads none of them.
  blip2["qformer_config"]["classifier_dropout"] = nullptr;
  blip2["vision_config"]["projection_dim"] = 512;
  blip2["vision_config"]["dropout"] = 0.0;
  blip2["text_config"]["max_sequence_length"] = 2048;
  EXPECT_EQ(error_of([&] { blip2_config_from_hf(blip2, "blip2_opt.json"); }), "<no error>");
  // The same config with a generation setting off its default is refused by name.
  blip2["text_config"]["num_beams"] = 5;
  auto msg = error_of([&] { blip2_config_from_hf(blip2, "blip2_opt.json"); });
  EXPECT_TRUE(contains(msg, "blip2_opt.json: text_config.num_beams: 5 is a generation setting")) << msg;
}

TEST(Trust, SentencePieceDecodeOfInvalidUtf8FollowsSentencepiece) {
  // Ids of the byte pieces <0xE2> <0x82> <0x41> and <0xE2> <0x41> <0xFF> <0xFF> in the fixture model;
  // the expected strings are sentencepiece's SentencePieceProcessor.decode (transformers 5's
  // LlamaTokenizer.decode returns "" for both, which blip2cpp does not follow).
  auto tok = load_llm_tokenizer((fs::path(BLIP2_FIXTURE_DIR) / "llm_tokenizers" / "spm" / "tokenizer.model").string());
  const std::string r = "\xEF\xBF\xBD";  // U+FFFD
  ASSERT_EQ(tok->decode({229, 133, 68}).size(), (r + r + "A").size());
  EXPECT_EQ(tok->decode({229, 133, 68}), r + r + "A");
  EXPECT_EQ(tok->decode({229, 68, 258, 258}), r + "A" + r + r);
}

}  // namespace
}  // namespace blip2
