// The public API (from_pretrained, Trainer, pipeline), feature extraction, zero-shot
// classification with ITM re-ranking, and the examples built on the API.
#include <gtest/gtest.h>

#include "blip2/api/api.h"
#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/metrics.h"
#include "blip2/tasks/retrieval.h"
#include "blip2/tasks/zero_shot.h"
#include "blip2/util/device.h"
#include "test_util.h"

using namespace blip2;
using namespace blip2::testing;
namespace fs = std::filesystem;

namespace {

const fs::path kImages = fs::path(BLIP2_FIXTURE_DIR) / "images";

// A tiny model with random weights, saved once per test process.
const fs::path& saved_tiny() {
  static const fs::path dir = [] {
    auto d = temp_dir("api_tiny");
    // A random tiny model is the same in every process: these weights are moved away from it.
    auto m = Blip2Model::from_pretrained("tiny");
    torch::NoGradGuard no_grad;
    torch::manual_seed(7);
    for (auto& p : m.module()->parameters()) p.add_(torch::randn_like(p) * 0.05);
    m.save_pretrained((d / "model").string());
    return d / "model";
  }();
  return dir;
}

CliResult run_example(const std::string& name, const std::string& args) {
  return run_program(std::string(BLIP2_EXAMPLE_DIR) + "/example_" + name, args);
}

}  // namespace

TEST(Api, FromPretrainedRoundTripsThroughSavePretrained) {
  auto a = Blip2Model::from_pretrained(saved_tiny().string());
  auto b = Blip2Model::from_pretrained(saved_tiny().string());
  EXPECT_EQ(a.source(), saved_tiny().string());
  auto pixels = a.preprocess(std::vector<std::string>{(kImages / "rgb.png").string()});
  EXPECT_EQ(pixels.sizes(), (std::vector<int64_t>{1, 3, 32, 32}));
  auto fa = a.extract_features(pixels, {}, "image"), fb = b.extract_features(pixels, {}, "image");
  EXPECT_EQ(max_abs_diff(fa.image_embeds_proj, fb.image_embeds_proj), 0.0);
  // A random tiny model differs from the saved one.
  auto c = Blip2Model::from_pretrained("tiny");
  EXPECT_EQ(c.source(), "random");
  EXPECT_GT(max_abs_diff(c.extract_features(pixels, {}, "image").image_embeds_proj, fa.image_embeds_proj), 1e-3);

  auto names = Blip2Model::support_list();
  EXPECT_NE(std::find(names.begin(), names.end(), "blip2_stage1_classification"), names.end());
  std::ostringstream shown;
  Blip2Model::show_support_list(shown);
  EXPECT_NE(shown.str().find("blip2_stage1_vit_g"), std::string::npos);
}

TEST(Api, FromPretrainedErrorsSayWhatIsMissing) {
  auto home = temp_dir("api_home");
  setenv("BLIP2_HOME", home.c_str(), 1);
  auto e = error_of([] { Blip2Model::from_pretrained("blip2_stage1_vit_g"); });
  EXPECT_NE(e.find((home / "blip2_stage1_vit_g").string()), std::string::npos) << e;
  EXPECT_NE(e.find("blip2_pretrained.pth"), std::string::npos) << e;
  unsetenv("BLIP2_HOME");
  e = error_of([] { Blip2Model::from_pretrained("blip2_nonexistent"); });
  EXPECT_NE(e.find("support list"), std::string::npos) << e;
  // The published vocabulary is not built in: a full-size model without vocab.txt is refused.
  e = error_of([&] {
    FromPretrainedOptions o;
    o.allow_random_init = true;
    Blip2Model::from_pretrained("blip2_stage1_vit_g", o);
  });
  EXPECT_NE(e.find("vocab.txt"), std::string::npos) << e;
  fs::remove_all(home);
}

TEST(Api, ExtractFeaturesMatchesTheTaskComputations) {
  auto model = Blip2Model::from_pretrained(saved_tiny().string());
  auto m = model.module();
  auto pixels = model.preprocess(std::vector<std::string>{(kImages / "rgb.png").string(),
                                                          (kImages / "grey.jpg").string()});
  std::vector<std::string> texts{"a red circle on the left", "a small blue ring"};
  auto image = model.extract_features(pixels, texts, "image");
  auto text = model.extract_features(pixels, texts, "text");
  auto mm = model.extract_features(pixels, texts, "multimodal");
  const auto& c = model.config();
  const int64_t q = c.qformer_config.query_length, h = c.qformer_config.hidden_size;
  EXPECT_EQ(image.image_embeds.sizes(), (std::vector<int64_t>{2, q, h}));
  EXPECT_FALSE(image.text_embeds.defined());
  EXPECT_EQ(text.text_embeds.sizes(), (std::vector<int64_t>{2, c.max_txt_len, h}));
  EXPECT_EQ(mm.multimodal_embeds.sizes(), (std::vector<int64_t>{2, q, h}));

  torch::NoGradGuard no_grad;
  auto [ids, mask] = model.tokenize(texts, c.max_txt_len);
  auto embeds = m->encode_image(pixels);
  EXPECT_LT(max_abs_diff(image.image_embeds_proj, m->image_features(m->query_pass(embeds, false).hidden)), 1e-6);
  // Token 0 of the text projections is the ITC text feature.
  EXPECT_LT(max_abs_diff(text.text_embeds_proj.select(1, 0), m->text_features(m->text_pass(ids, mask))), 1e-6);
  // The ITM head over the multimodal query outputs, averaged, is the ITM logit.
  EXPECT_LT(max_abs_diff(m->itm_head(mm.multimodal_embeds).mean(1), m->itm_logits(embeds, ids, mask)), 1e-5);

  EXPECT_NE(error_of([&] { model.extract_features(pixels, {"one text"}, "multimodal"); }).find("2 images and 1 texts"),
            std::string::npos);
  EXPECT_NE(error_of([&] { model.extract_features(pixels, texts, "audio"); }).find("image|text|multimodal"),
            std::string::npos);
}

TEST(ZeroShot, ClassifierMatchesTheHuggingFaceFixtureScores) {
  // A vocabulary under which "w15 w16 w17 w18" tokenises to the fixture's ids [2 15 16 17 18 3 0].
  std::vector<std::string> vocab = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  for (int i = 5; i < 100; ++i) vocab.push_back(std::to_string(i).insert(0, 1, 'w'));
  auto tok = std::make_shared<WordPieceTokenizer>(vocab, true, "[DEC]");
  auto hf = load_hf_directory((kParity / "hf_itm").string());
  Blip2Qformer model(hf.config);
  load_into(*model, hf.tensors, "hf_itm");
  model->eval();
  auto io = load_safetensors((kParity / "hf_itm_io.safetensors").string());
  ZeroShotOptions o;
  o.candidate_labels = {"w15 w16 w17 w18", "w40 w41", "w99 w5 w6 w7 w8"};
  o.hypothesis_template = "{}";
  o.max_length = 7;
  ZeroShotClassifier itc(model, tok, o);
  auto probs = itc.probabilities(io.at("pixel_values"));
  auto expected = torch::softmax(io.at("itc_logits_per_image") / model->temp, 1);
  EXPECT_LT(max_abs_diff(probs, expected), 1e-5);

  // ITM re-ranking of every label: the re-ranked scores are ITM logit + cosine, computed here
  // brute force on the full image path (no key/value reuse), sharing ITC's mass (all of it).
  o.itm_top_k = 3;
  ZeroShotClassifier rerank(model, tok, o);
  auto reranked = rerank.probabilities(io.at("pixel_values"));
  torch::NoGradGuard no_grad;
  auto embeds = model->encode_image(io.at("pixel_values"));
  auto ids = io.at("input_ids"), mask = io.at("attention_mask");
  for (int64_t b = 0; b < 3; ++b) {
    auto itm = model->itm_logits(embeds.narrow(0, b, 1).expand({3, -1, -1}), ids, mask);
    auto score = itm.select(1, 1) + io.at("itc_logits_per_image")[b];
    EXPECT_LT(max_abs_diff(reranked[b], torch::softmax(score, 0)), 1e-5) << "image " << b;
  }
  // The diagonal ITM logits are the fixture's.
  for (int64_t b = 0; b < 3; ++b) {
    auto itm = model->itm_logits(embeds.narrow(0, b, 1), ids.narrow(0, b, 1), mask.narrow(0, b, 1));
    EXPECT_LT(max_abs_diff(itm[0], io.at("itm_logits")[b]), 1e-4);
  }
  // The retrieval task's scores on the same model (keys/values reused): each matching pair
  // scores the fixture's ITM logit + its ITC similarity.
  RetrievalInputs in;
  in.image_embeds = embeds;
  in.image_feats = model->image_features(model->query_pass(embeds, false).hidden);
  in.text_ids = ids;
  in.text_keep = mask;
  in.text_feats = model->text_features(model->text_pass(ids, mask));
  auto scores = rerank_top_k(model, in, RerankOptions{});
  auto itc_diag = io.at("itc_logits_per_image").diagonal();
  EXPECT_LT(max_abs_diff(scores.i2t.diagonal(), io.at("itm_logits").select(1, 1) + itc_diag), 1e-4);
  EXPECT_LT(max_abs_diff(scores.t2i.diagonal(), io.at("itm_logits").select(1, 1) + itc_diag), 1e-4);
  // Re-ranking only the top 2 keeps the third label's ITC probability and the total.
  o.itm_top_k = 2;
  auto top2 = ZeroShotClassifier(model, tok, o).probabilities(io.at("pixel_values"));
  for (int64_t b = 0; b < 3; ++b) {
    int64_t last = std::get<1>(probs[b].topk(3)).index({2}).item<int64_t>();
    EXPECT_NEAR(top2[b][last].item<double>(), probs[b][last].item<double>(), 1e-6);
    EXPECT_NEAR(top2[b].sum().item<double>(), 1.0, 1e-5);
  }
}

TEST(ZeroShot, BadOptionsAreNamed) {
  auto model = Blip2Model::from_pretrained(saved_tiny().string());
  ZeroShotOptions o;
  auto e = error_of([&] { ZeroShotClassifier(model.module(), model.tokenizer(), o); });
  EXPECT_NE(e.find("candidate_labels is empty"), std::string::npos) << e;
  o.candidate_labels = {"red circle"};
  o.hypothesis_template = "a photo of";
  e = error_of([&] { ZeroShotClassifier(model.module(), model.tokenizer(), o); });
  EXPECT_NE(e.find("has no '{}'"), std::string::npos) << e;
  e = error_of([&] { pipeline("image_captioning", model); });
  EXPECT_NE(e.find("available: zero_shot_image_classification, feature_extraction"), std::string::npos) << e;
  e = error_of([&] { Trainer("text_classification", model); });
  EXPECT_NE(e.find("task 'text_classification' is not available"), std::string::npos) << e;
}

TEST(Api, PipelinesTakePathsOrDecodedImages) {
  auto model = Blip2Model::from_pretrained(saved_tiny().string());
  PipelineOptions o;
  o.candidate_labels = {"red circle", "blue square", "green ring"};
  o.top_k = 2;
  auto classify = pipeline("zero_shot_image_classification", model, o);
  const std::string path = (kImages / "rgb.png").string();
  auto by_path = classify(path);
  auto by_image = classify(load_image(path));
  ASSERT_EQ(by_path.size(), 1u);
  ASSERT_EQ(by_path[0].size(), 2u);  // top_k
  EXPECT_EQ(by_path, by_image);
  EXPECT_GE(by_path[0][0]["score"].get<double>(), by_path[0][1]["score"].get<double>());

  PipelineOptions f;
  f.mode = "multimodal";
  auto features = pipeline("feature_extraction", saved_tiny().string(), f);
  auto shapes = features({path, (kImages / "grey.jpg").string()}, {"a red circle", "a green ring"});
  EXPECT_EQ(shapes["multimodal_embeds"][0], 2);
  EXPECT_TRUE(features.last_features().multimodal_embeds.defined());
}

TEST(Api, TrainerEvaluatesAndPredictsLikeTheCli) {
  auto dir = temp_dir("api_trainer");
  TrainerOptions o;
  o.output_dir = (dir / "out").string();
  DatasetConfig eval = parse_run_config(embedded_tiny_config(), "embedded").eval_dataset;
  eval.data_loader.num_samples = 16;
  eval.data_loader.hypothesis_template = "a {}";
  o.eval_dataset = eval;
  Trainer zs("zero_shot_image_classification", saved_tiny().string(), o);
  auto report = zs.evaluate();
  EXPECT_EQ(report["num_images"], 16);
  EXPECT_EQ(report["num_labels"], 30);

  Trainer ret("image_to_text_retrieval", saved_tiny().string(), o);
  auto r = ret.evaluate();
  for (const char* key : {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                          "img_r_mean", "r_mean", "agg_metrics"})
    EXPECT_TRUE(r.contains(key)) << key;

  // predict of the stage-1 task = feature extraction to safetensors; the CLI does the same.
  const std::string img = (kImages / "rgb.png").string();
  auto cli = run_cli("run --run_mode predict --load_checkpoint " + saved_tiny().string() + " --predict_data " +
                     img + " --predict_text 'a red circle' --output_dir " + (dir / "cli").string());
  ASSERT_EQ(cli.code, 0) << cli.out;
  auto written = load_safetensors((dir / "cli" / "features.safetensors").string());
  for (const char* key : {"image_embeds", "image_embeds_proj", "text_embeds", "text_embeds_proj", "multimodal_embeds"})
    EXPECT_TRUE(written.count(key)) << key;
  auto model = Blip2Model::from_pretrained(saved_tiny().string());
  auto direct = model.extract_features(model.preprocess(std::vector<std::string>{img}), {}, "image");
  EXPECT_LT(max_abs_diff(written.at("image_embeds_proj"), direct.image_embeds_proj), 1e-6);
  fs::remove_all(dir);
}

TEST(Examples, BuildAndRunOnTheTinyPreset) {
  const std::string model = saved_tiny().string();
  const std::string rgb = (kImages / "rgb.png").string(), grey = (kImages / "grey.jpg").string();
  auto r = run_example("zero_shot_pipeline", model + " " + rgb + " " + grey + " --labels 'red circle,blue ring'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find(rgb + " [{\"label\":"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("blue ring"), std::string::npos) << r.out;

  r = run_example("stage1_loss", model + " " + rgb + " 'a red circle' " + grey + " 'a small blue ring'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("loss "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"multimodal_embeds\":[2,8,96]"), std::string::npos) << r.out;

  auto dir = temp_dir("example_eval");
  std::string cfg = read_file(std::string(BLIP2_CONFIG_DIR) + "/tiny_zero_shot.yaml");
  cfg.replace(cfg.find("num_samples: 256"), 16, "num_samples: 16");
  atomic_write(dir / "zs.yaml", cfg);
  r = run_example("trainer_eval", "zero_shot_image_classification " + model + " " + (dir / "zs.yaml").string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"top1_accuracy\""), std::string::npos) << r.out;

  r = run_example("zero_shot_pipeline", model + " " + (dir / "missing.png").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("missing.png"), std::string::npos) << r.out;
  fs::remove_all(dir);
}

TEST(Api, TasksRefuseModelsWithoutTheHeadsTheyNeed) {
  // A checkpoint without the ITM head (and without the projections) loads with a report, but
  // the tasks that need those refuse with the name of what is missing.
  auto dir = temp_dir("api_heads");
  TensorMap weights;
  for (auto& [name, t] : load_safetensors((saved_tiny() / "model.safetensors").string()))
    if (name.rfind("itm_head.", 0) != 0 && name.rfind("vision_projection.", 0) != 0) weights[name] = t;
  fs::create_directories(dir / "model");
  save_safetensors((dir / "model" / "model.safetensors").string(), weights);
  fs::copy_file(saved_tiny() / "config.yaml", dir / "model" / "config.yaml");
  auto e = error_of([&] { Blip2Model::from_pretrained((dir / "model").string()); });
  EXPECT_NE(e.find("itm_head.bias, itm_head.weight, vision_projection.bias, vision_projection.weight (4 tensors) "
                   "would keep their random initialisation"), std::string::npos) << e;
  FromPretrainedOptions partial;  // on purpose: the tasks that need them still refuse
  partial.allow_partial_load = true;
  auto model = Blip2Model::from_pretrained((dir / "model").string(), partial);
  EXPECT_FALSE(model.missing_weights().empty());
  TrainerOptions o;
  o.output_dir = (dir / "out").string();
  e = error_of([&] { Trainer("image_to_text_retrieval", model, o).evaluate(); });
  EXPECT_NE(e.find("task image_to_text_retrieval needs the model's vision_projection"), std::string::npos) << e;
  PipelineOptions p;
  p.candidate_labels = {"red circle"};
  e = error_of([&] { pipeline("zero_shot_image_classification", model, p); });
  EXPECT_NE(e.find("zero_shot_image_classification needs the model's vision_projection"), std::string::npos) << e;
  fs::remove_all(dir);
}
