// Numerical parity with Hugging Face transformers: a tiny random Blip2ForImageTextRetrieval
// saved by tools/make_parity_fixtures.py, loaded from its own directory, run on the same inputs.
#include <gtest/gtest.h>

#include "blip2/io/checkpoint.h"
#include "blip2/io/hf.h"
#include "blip2/io/pth.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/util/common.h"
#include "test_util.h"

using namespace blip2;
using namespace blip2::testing;
namespace fs = std::filesystem;

namespace {

// The model computes the ITM logits transformers computed for the fixture's inputs.
void expect_fixture_itm_logits(Blip2Qformer& model) {
  model->eval();
  torch::NoGradGuard no_grad;
  auto io = load_safetensors((kParity / "hf_itm_io.safetensors").string());
  auto vision = model->encode_image(io.at("pixel_values"));
  EXPECT_LT(max_abs_diff(model->itm_logits(vision, io.at("input_ids"), io.at("attention_mask")),
                     io.at("itm_logits")), 1e-4);
}

}  // namespace

TEST(Parity, HuggingFaceImageTextRetrievalModel) {
  auto hf = load_hf_directory((kParity / "hf_itm").string());
  EXPECT_EQ(hf.config.qformer_config.query_length, 6);
  EXPECT_EQ(hf.config.vision_config.patch_size, 7);
  Blip2Qformer model(hf.config);
  auto report = load_into(*model, hf.tensors, "hf_itm");
  // A retrieval checkpoint has no stage-1 LM head and no temperature; nothing else is missing.
  for (const auto& k : report.missing)
    EXPECT_TRUE(k.rfind("cls.", 0) == 0 || k == "temp") << "missing " << k;
  EXPECT_TRUE(report.unexpected.empty()) << report.summary();
  model->eval();
  torch::NoGradGuard no_grad;

  auto io = load_safetensors((kParity / "hf_itm_io.safetensors").string());
  auto images = io.at("pixel_values"), ids = io.at("input_ids"), mask = io.at("attention_mask");
  auto vision = model->encode_image(images);
  EXPECT_LT(max_abs_diff(vision, io.at("vision_last_hidden_state")), 1e-4);
  auto query = model->query_pass(vision, false).hidden;
  EXPECT_LT(max_abs_diff(query, io.at("query_output")), 1e-4);
  auto image_feat = model->image_features(query);
  EXPECT_LT(max_abs_diff(image_feat, io.at("image_feat")), 1e-4);
  auto text_feat = model->text_features(model->text_pass(ids, mask));
  EXPECT_LT(max_abs_diff(text_feat, io.at("text_feat")), 1e-4);
  EXPECT_LT(max_abs_diff(max_over_queries(image_feat, text_feat), io.at("itc_logits_per_image")), 1e-4);
  EXPECT_LT(max_abs_diff(model->itm_logits(vision, ids, mask), io.at("itm_logits")), 1e-4);
}

TEST(Parity, FusedQkvBiasIsSplitAndShardsAreJoined) {
  TensorMap hf{{"vision_model.encoder.layers.0.self_attn.qkv.bias", torch::tensor({1.f, 2.f, 0.f, 0.f, 3.f, 4.f})},
               {"query_tokens", torch::zeros({1, 2, 3})}};
  auto c = canonical_from_hf(hf, "x");
  EXPECT_TRUE(torch::equal(c.at("vision_model.encoder.layers.0.self_attn.q_bias"), torch::tensor({1.f, 2.f})));
  EXPECT_TRUE(torch::equal(c.at("vision_model.encoder.layers.0.self_attn.v_bias"), torch::tensor({3.f, 4.f})));
  EXPECT_FALSE(c.count("vision_model.encoder.layers.0.self_attn.qkv.bias"));

  auto dir = fs::temp_directory_path() / ("blip2_shards_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  save_safetensors((dir / "a.safetensors").string(), {{"x", torch::ones({2})}});
  save_safetensors((dir / "b.safetensors").string(), {{"y", torch::zeros({3})}});
  atomic_write(dir / "model.safetensors.index.json",
               R"({"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  auto all = load_safetensors_dir(dir.string());
  EXPECT_EQ(all.size(), 2u);
  atomic_write(dir / "model.safetensors.index.json",
               R"({"weight_map": {"x": "a.safetensors", "z": "b.safetensors"}})");
  try {
    load_safetensors_dir(dir.string());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'z' is listed in b.safetensors but that shard lacks it"),
              std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(Parity, LavisCheckpointGivesTheSameModel) {
  auto hf = load_hf_directory((kParity / "hf_itm").string());
  auto lavis = canonical_from_lavis(load_pth((kParity / "blip2_lavis.pth").string()));
  Blip2Qformer model(hf.config);
  auto report = load_into(*model, lavis, "blip2_lavis.pth");
  EXPECT_TRUE(report.missing.empty()) << report.summary();
  EXPECT_TRUE(report.unexpected.empty()) << report.summary();
  // Every tensor the Hugging Face file also has is identical after both conversions.
  for (const auto& [name, t] : hf.tensors) {
    if (name == "embeddings.position_ids") continue;
    ASSERT_TRUE(lavis.count(name)) << name;
    EXPECT_TRUE(torch::equal(lavis.at(name), t)) << name;
  }
  auto extras = load_safetensors((kParity / "lavis_extras.safetensors").string());
  EXPECT_TRUE(torch::equal(model->cls->bias, extras.at("cls_bias")));
  EXPECT_FLOAT_EQ(model->temp.item<float>(), 0.07f);

  expect_fixture_itm_logits(model);
}

TEST(Parity, BareVitFileAndPositionInterpolation) {
  auto vit = canonical_from_lavis(load_pth((kParity / "eva_vit_lavis.pth").string()));
  EXPECT_TRUE(vit.count("vision_model.embeddings.class_embedding"));
  EXPECT_TRUE(vit.count("vision_model.encoder.layers.1.self_attn.q_bias"));
  auto extras = load_safetensors((kParity / "lavis_extras.safetensors").string());
  auto got = interpolate_pos_embed(extras.at("pos_embed"), 1 + 36);
  EXPECT_LT(max_abs_diff(got, extras.at("interpolated")), 1e-5);
}

TEST(Parity, PthReaderRefusesWhatIsNotAStateDict) {
  auto dir = fs::temp_directory_path() / ("blip2_pth_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto expect_error = [&](const std::string& file, const std::string& want) {
    try {
      load_pth((dir / file).string());
      ADD_FAILURE() << file << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  atomic_write(dir / "text.pth", "not a zip at all");
  expect_error("text.pth", "text.pth: not a PyTorch zip checkpoint");
  std::string good = read_file(kParity / "eva_vit_lavis.pth");
  atomic_write(dir / "cut.pth", good.substr(0, good.size() / 2));
  expect_error("cut.pth", "cut.pth: ");
  expect_error("missing.pth", "missing.pth: checkpoint not found");
  fs::remove_all(dir);
}

TEST(Parity, UnpicklerFindingsFromFuzzing) {
  auto bytes = [](const std::string& key) { return torch::zeros({16}, torch::kUInt8); };
  auto err = [&](const std::string& pickle) {
    return error_of([&] { unpickle_state_dict(pickle, "f.pth", bytes); });
  };
  // LONG1 with 9 bytes once shifted a 64-bit value by 64 (undefined behaviour).
  EXPECT_NE(err(std::string("\x80\x02\x8a\x09", 4) + std::string(9, '\x01') + ".").find("LONG1 integer of 9 bytes"),
            std::string::npos);
  // A truncated stream and a tensor larger than its storage are named.
  EXPECT_NE(err(std::string("\x80\x02X\xff\x00\x00\x00" "ab", 9)).find("truncated pickle"), std::string::npos);
}

TEST(Parity, ConvertAndInspectFromTheCli) {
  auto dir = fs::temp_directory_path() / ("blip2_convert_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  auto run = [](const std::string& args) {
    auto r = run_cli(args);
    return std::make_pair(r.code, r.out);
  };
  auto [code, out] = run("convert " + (kParity / "hf_itm").string() + " --out " + (dir / "hf").string());
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("6 of the model's tensors absent"), std::string::npos) << out;
  // The converted directory loads into the same model and computes the same ITM logits.
  auto hf = load_hf_directory((kParity / "hf_itm").string());
  Blip2Qformer model(hf.config);
  load_into(*model, load_safetensors((dir / "hf" / "model.safetensors").string()), "converted");
  expect_fixture_itm_logits(model);
  std::tie(code, out) = run("inspect " + (dir / "hf").string());
  EXPECT_EQ(code, 0);
  EXPECT_NE(out.find("vision_model.encoder.layers.0.self_attn.q_bias  Float  [32]"), std::string::npos) << out;
  EXPECT_NE(out.find("129 tensors"), std::string::npos) << out;
  // A LAVIS file into a preset it does not fit: one line naming the tensor.
  std::tie(code, out) = run("convert " + (kParity / "blip2_lavis.pth").string() + " --model tiny --out " +
                            (dir / "bad").string());
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("'query_tokens' has shape [1, 6, 48] but tiny expects [1, 8, 96]"), std::string::npos) << out;
  fs::remove_all(dir);
}

TEST(Parity, Stage1LossesMatchLavisFormulas) {
  auto hf = load_hf_directory((kParity / "hf_itm").string());
  Blip2Qformer model(hf.config);
  load_into(*model, canonical_from_lavis(load_pth((kParity / "blip2_lavis.pth").string())), "lavis");
  model->eval();
  torch::NoGradGuard no_grad;
  auto f = load_safetensors((kParity / "stage1_losses.safetensors").string());
  auto ids = f.at("input_ids"), mask = f.at("attention_mask");
  const int64_t b = ids.size(0);

  auto image_embeds = model->encode_image(f.at("pixel_values"));
  auto query = model->query_pass(image_embeds, /*use_cache=*/true);
  auto image_feats = model->image_features(query.hidden);
  auto text_feat = model->text_features(model->text_pass(ids, mask));
  auto sim_i2t = max_over_queries(image_feats, text_feat) / model->temp;
  auto sim_t2i = max_over_queries(image_feats, text_feat).t() / model->temp;
  auto loss_itc = itc_loss(sim_i2t, sim_t2i, itc_positives({}, {}, b, b, 0, torch::kCPU), 0.1);
  EXPECT_LT(max_abs_diff(loss_itc.reshape({1}), f.at("loss_itc")), 1e-5);

  auto ni = f.at("neg_image_for_text"), nt = f.at("neg_text_for_image");
  auto itm = model->itm_logits(torch::cat({image_embeds, image_embeds.index_select(0, ni), image_embeds}),
                               torch::cat({ids, ids, ids.index_select(0, nt)}),
                               torch::cat({mask, mask, mask.index_select(0, nt)}));
  EXPECT_LT(max_abs_diff(itm, f.at("itm_logits")), 1e-4);
  auto labels = torch::cat({torch::ones({b}, torch::kLong), torch::zeros({2 * b}, torch::kLong)});
  EXPECT_LT(max_abs_diff(torch::nn::functional::cross_entropy(itm, labels).reshape({1}), f.at("loss_itm")), 1e-5);

  const auto& q = model->config().qformer_config;
  auto [dec, lm_labels] = lm_inputs(ids, q.bos_token_id, q.pad_token_id);
  auto logits = model->lm_logits(dec, mask, query.past);  // over the cached query keys/values
  EXPECT_LT(max_abs_diff(logits, f.at("lm_logits")), 1e-4);
  EXPECT_LT(max_abs_diff(lm_loss(logits, lm_labels, 0.1).reshape({1}), f.at("loss_lm")), 1e-5);
}

TEST(Parity, ExportToHuggingFaceRoundTrips) {
  auto hf = load_hf_directory((kParity / "hf_itm").string());
  auto lavis = canonical_from_lavis(load_pth((kParity / "blip2_lavis.pth").string()));
  auto dir = fs::temp_directory_path() / ("blip2_export_" + std::to_string(::getpid()));
  export_hf_directory(hf.config, lavis, dir.string());
  auto raw = load_safetensors((dir / "model.safetensors").string());
  auto original = load_safetensors((kParity / "hf_itm" / "model.safetensors").string());
  EXPECT_EQ(raw.size(), original.size());
  for (const auto& [name, t] : original) {
    ASSERT_TRUE(raw.count(name)) << name;
    EXPECT_TRUE(torch::equal(raw.at(name), t)) << name;
  }
  auto again = load_hf_directory(dir.string());
  EXPECT_EQ(to_yaml(again.config), to_yaml(hf.config));
  fs::remove_all(dir);
}

TEST(Parity, NamedWeightsResolveUnderBlip2Home) {
  auto home = fs::temp_directory_path() / ("blip2_home_" + std::to_string(::getpid()));
  fs::create_directories(home / "blip2_stage1_vit_g");
  setenv("BLIP2_HOME", home.c_str(), 1);
  EXPECT_EQ(resolve_weights("blip2_stage1_vit_g"), (home / "blip2_stage1_vit_g").string());
  try {
    resolve_weights("vit_g_p16");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("vit_g_p16: no local weights at " + (home / "vit_g_p16").string() +
                                         "; place LAVIS' eva_vit_g.pth there"), std::string::npos) << e.what();
  }
  unsetenv("BLIP2_HOME");
  fs::remove_all(home);
}
