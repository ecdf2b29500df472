// Configs: the shipped files parse and validate, round-trip through the writer, and every kind
// of mistake is an error naming the file and the key path. The CLI turns errors into one line
// and a non-zero exit.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>

#include "blip2/config/config.h"
#include "blip2/io/safetensors.h"
#include "blip2/api/runner.h"
#include "blip2/util/common.h"
#include "test_util.h"

using namespace blip2;
using namespace blip2::testing;
namespace fs = std::filesystem;

namespace {


std::string tiny_with(const std::string& from, const std::string& to) {
  std::string text = embedded_tiny_config();
  auto at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return text.replace(at, from.size(), to);
}



}  // namespace

TEST(Config, ShippedConfigsParseAndValidate) {
  // Every config shipped in configs/blip2/.
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator(BLIP2_CONFIG_DIR)) {
    if (entry.path().extension() != ".yaml") continue;
    const std::string path = entry.path().string();
    RunConfig c = load_run_config(path);
    EXPECT_NO_THROW(validate(c, path)) << path;
    ++n;
  }
  EXPECT_GE(n, 14);
  RunConfig full = load_run_config(std::string(BLIP2_CONFIG_DIR) + "/run_blip2_pretrain_stage_1.yaml");
  EXPECT_EQ(full.model.model_config.vision_config.num_hidden_layers, 39);
  EXPECT_EQ(full.train_dataset.data_loader.annotation_files.size(), 2u);
  EXPECT_EQ(full.optimizer.betas[1], 0.98);
}

TEST(Config, EmbeddedDefaultIsTheTinyPresetAndRoundTrips) {
  RunConfig c = parse_run_config(embedded_tiny_config(), "embedded");
  EXPECT_EQ(c.trainer.model_name, "tiny");
  EXPECT_EQ(to_yaml(c.model.model_config), to_yaml(find_preset("tiny")->config));
  RunConfig again = parse_run_config(to_yaml(c), "written");
  EXPECT_EQ(to_yaml(again), to_yaml(c));
}

TEST(Config, ModelSectionStartsFromTheNamedPreset) {
  RunConfig c = parse_run_config(
      "trainer: {model_name: blip2_stage1_vit_g}\n"
      "model: {model_config: {qformer_config: {query_length: 16}}}\n", "t.yaml");
  EXPECT_EQ(c.model.model_config.vision_config.hidden_size, 1408);
  EXPECT_EQ(c.model.model_config.qformer_config.query_length, 16);
}

TEST(Config, UnknownKeyNamesFileAndPath) {
  auto msg = error_of([] {
    parse_run_config(tiny_with("      patch_size: 4", "      patch_size: 4\n      patch_sise: 4"),
                     "my.yaml");
  });
  EXPECT_NE(msg.find("my.yaml"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.model_config.vision_config.patch_sise"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unknown key"), std::string::npos) << msg;
}

TEST(Config, WrongTypeNamesTheKey) {
  auto msg = error_of([] { parse_run_config(tiny_with("epochs: 12", "epochs: four"), "a.yaml"); });
  EXPECT_NE(msg.find("a.yaml: runner_config.epochs: expected a integer"), std::string::npos) << msg;
  msg = error_of([] { parse_run_config(tiny_with("betas: [0.9, 0.98]", "betas: 0.9"), "a.yaml"); });
  EXPECT_NE(msg.find("optimizer.betas: expected a list"), std::string::npos) << msg;
  msg = error_of([] { parse_run_config(tiny_with("  data_loader:\n    type: SyntheticShapes\n    stage: train\n    shuffle: true\n    num_samples: 4096", "  data_loader: 3"), "a.yaml"); });
  EXPECT_NE(msg.find("train_dataset.data_loader: expected a mapping"), std::string::npos) << msg;
}

TEST(Config, MalformedYamlGivesTheLine) {
  auto msg = error_of([] { parse_run_config("seed: 1\nrunner_config: {epochs: [\n", "bad.yaml"); });
  EXPECT_NE(msg.find("bad.yaml: malformed YAML at line"), std::string::npos) << msg;
}

TEST(Config, AKeyGivenTwiceIsRefusedNotHalfIgnored) {
  // yaml-cpp would keep both and every lookup would see the first: the second silently ignored.
  auto msg = error_of([] { parse_run_config("seed: 7\nrun_mode: eval\nseed: 42\n", "twice.yaml"); });
  EXPECT_EQ(msg, "twice.yaml: seed is given twice (lines 1 and 3); keep one") << msg;
  msg = error_of([] {
    parse_run_config(tiny_with("      patch_size: 4", "      patch_size: 4\n      patch_size: 8"), "t.yaml");
  });
  EXPECT_NE(msg.find("t.yaml: model.model_config.vision_config.patch_size is given twice"), std::string::npos) << msg;
}

TEST(Config, BrokenConstraintsAreNamed) {
  auto check_msg = [](const std::string& yaml, const std::string& want) {
    auto msg = error_of([&] {
      RunConfig c = parse_run_config(yaml, "c.yaml");
      validate(c, "c.yaml");
    });
    EXPECT_NE(msg.find(want), std::string::npos) << msg;
  };
  check_msg(tiny_with("    max_txt_len: 16", "    max_txt_len: 16\n    text_config: {seq_length: 20}"),
            "c.yaml: model.model_config.text_config.seq_length: 20 < qformer_config.query_length + max_txt_len = 24");
  check_msg(tiny_with("    max_txt_len: 16", "    max_txt_len: 16\n    text_config: {num_beams: 0}"),
            "c.yaml: model.model_config.text_config.num_beams: must be >= 1, got 0");
  check_msg(tiny_with("    max_txt_len: 16", "    max_txt_len: 16\n    text_config: {type: GPT2Config}"),
            "text_config.type: 'GPT2Config' is not LlamaConfig (Llama, Baichuan) or OPTConfig");
  check_msg(tiny_with("      patch_size: 4", "      patch_size: 5"),
            "vision_config.image_size: 32 is not a multiple of patch_size 5");
  check_msg(tiny_with("run_mode: train", "run_mode: fly"), "run_mode: 'fly' is not train|eval|predict");
  check_msg(tiny_with("      num_attention_heads: 4\n      hidden_size: 96", "      num_attention_heads: 5\n      hidden_size: 96"),
            "qformer_config.hidden_size: not divisible");
  check_msg(tiny_with("\"a small {} on the left\"", "\"a small one on the left\""),
            "c.yaml: eval_dataset.data_loader.hypothesis_templates: 'a small one on the left' has no '{}' for the label");
  check_msg(tiny_with("eval_tasks: [zero_shot_image_classification, image_to_text_retrieval]",
                      "eval_tasks: [captioning]"),
            "runner_config.eval_tasks: 'captioning' is not image_to_text_retrieval|zero_shot_image_classification");
}

TEST(Config, MissingFileIsNamed) {
  auto msg = error_of([] { load_run_config("/nonexistent/x.yaml"); });
  EXPECT_EQ(msg, "/nonexistent/x.yaml: config file not found");
}

TEST(Cli, ListModelsPrintsTheSupportList) {
  auto r = run_cli("list-models");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("blip2_stage1_vit_g"), std::string::npos);
  EXPECT_NE(r.out.find("blip2_stage1_classification"), std::string::npos);
  EXPECT_NE(r.out.find("tiny"), std::string::npos);
}

TEST(Cli, BadInputGivesOneLineAndNonZeroExit) {
  auto dir = temp_dir("cli");
  auto count_lines = [](const std::string& s) { return std::count(s.begin(), s.end(), '\n'); };

  auto r = run_cli("run --config " + (dir / "missing.yaml").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.out, "error: " + (dir / "missing.yaml").string() + ": config file not found\n");

  std::ofstream(dir / "bad.yaml") << "seed: [1\n";
  r = run_cli("run --config " + (dir / "bad.yaml").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find("bad.yaml: malformed YAML"), std::string::npos) << r.out;

  std::ofstream(dir / "unknown.yaml") << tiny_with("seed: 42", "seed: 42\nsede: 1");
  r = run_cli("run --config " + (dir / "unknown.yaml").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("unknown.yaml: sede: unknown key"), std::string::npos) << r.out;

  r = run_cli("run --run_mode train --train_dataset_dir " + (dir / "nope").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("nope: dataset directory not found"), std::string::npos) << r.out;

  r = run_cli("run --run_mode sideways");
  EXPECT_NE(r.code, 0);

  // A checkpoint whose shapes don't match the model.
  save_safetensors((dir / "ckpt.safetensors").string(), {{"query_tokens", torch::zeros({1, 3, 96})}});
  r = run_cli("run --run_mode eval --output_dir " + (dir / "out").string() + " --load_checkpoint " +
              (dir / "ckpt.safetensors").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("ckpt.safetensors: tensor 'query_tokens' has shape [1,3,96] but the model "
                       "expects [1,8,96]"), std::string::npos) << r.out;

  // A truncated checkpoint.
  std::string bytes = read_file(dir / "ckpt.safetensors");
  std::ofstream(dir / "cut.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() - 10);
  r = run_cli("run --run_mode eval --output_dir " + (dir / "out").string() + " --load_checkpoint " +
              (dir / "cut.safetensors").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(count_lines(r.out.substr(r.out.find("error:"))), 1) << r.out;
  EXPECT_NE(r.out.find("cut.safetensors: tensor 'query_tokens'"), std::string::npos) << r.out;
  fs::remove_all(dir);
}

TEST(Safetensors, RoundTripAndLyingHeaders) {
  auto dir = temp_dir("st");
  TensorMap t{{"a", torch::arange(6, torch::kFloat32).view({2, 3})},
              {"b", torch::tensor({1, 2, 3}, torch::kLong)},
              {"c", torch::ones({2}, torch::kBFloat16)}};
  auto path = (dir / "x.safetensors").string();
  save_safetensors(path, t, {{"k", "v"}});
  auto back = load_safetensors(path);
  ASSERT_EQ(back.size(), 3u);
  for (const auto& [k, v] : t) EXPECT_TRUE(torch::equal(back.at(k), v)) << k;

  auto write_raw = [&](const std::string& header, size_t data_bytes) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
    bytes += header + std::string(data_bytes, '\0');
    std::ofstream(dir / "bad.safetensors", std::ios::binary) << bytes;
    return error_of([&] { load_safetensors((dir / "bad.safetensors").string()); });
  };
  EXPECT_NE(write_raw(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8)
                .find("outside the data section"), std::string::npos);
  EXPECT_NE(write_raw(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16)
                .find("needs 12 bytes"), std::string::npos);
  EXPECT_NE(write_raw(R"({"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", 1)
                .find("unsupported dtype"), std::string::npos);
  EXPECT_NE(write_raw("{not json", 0).find("malformed header JSON"), std::string::npos);
  // Two entries over the same bytes would be two tensors sharing memory: refused, naming both.
  EXPECT_NE(write_raw(R"({"v":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16)
                .find("tensors 'v' and 'w' overlap in the data section"), std::string::npos);
  EXPECT_NE(write_raw(R"({"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8)
                .find("overlap in the data section"), std::string::npos);
  std::ofstream(dir / "bad.safetensors", std::ios::binary) << "\xff\xff\xff\xff\xff\xff\xff\x7f{}";
  EXPECT_NE(error_of([&] { load_safetensors((dir / "bad.safetensors").string()); })
                .find("exceeds the file size"), std::string::npos);
  fs::remove_all(dir);
}
