// Every config field that changes the numbers, each on a tiny random model that transformers built
// with that one field changed (tools/make_variant_fixtures.py, tests/fixtures/variants): loaded
// through the public entry points, blip2cpp either gives transformers' numbers (max abs diff
// <= 1e-4) or refuses with a message that names the field. Adding a field is a line in the
// generator's table, not a test.
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "blip2/api/api.h"
#include "blip2/models/blip2_llm.h"
#include "test_util.h"

namespace blip2 {
namespace {

using namespace blip2::testing;
namespace fs = std::filesystem;

const fs::path kVariants = fs::path(BLIP2_FIXTURE_DIR) / "variants";

// The variants blip2cpp refuses, each for a reason: learned activation parameters (prelu), a
// [PAD] id its vocabulary does not have, a stage-1 model without the Q-Former's text path,
// OPT-350m's projections, dynamic and yarn RoPE, a 4.x generation setting off its default,
// relative position embeddings, pruned heads. Every other variant must give transformers' numbers.
const std::set<std::string> kRefused = {
    "stage1_vision_config.hidden_act_11",        "stage1_qformer_config.pad_token_id",
    "stage1_qformer_config.use_qformer_text_input", "stage2_opt_word_embed_proj_dim",
    "stage2_llama_rope_parameters_3",            "stage2_llama_rope_parameters_4",
    "edit_0_text_config_num_beams",              "edit_2_qformer_config_position_embedding_type",
    "edit_4_vision_config_pruned_heads"};

// The variant's outputs computed by blip2cpp against transformers': the largest abs difference.
double stage1_diff(const fs::path& dir, const TensorMap& want) {
  auto model = Blip2Model::from_pretrained(dir.string());
  auto m = model.module();
  torch::NoGradGuard no_grad;
  const auto& pixels = want.at("pixel_values");
  const auto& ids = want.at("input_ids");
  const auto& mask = want.at("attention_mask");
  auto image = m->extract_features(pixels, {}, {}, "image").image_embeds_proj;
  auto text = m->extract_features({}, ids, mask, "text").text_embeds_proj.select(1, 0);
  auto itm = m->itm_logits(m->encode_image(pixels), ids, mask);
  return std::max({max_abs_diff(image, want.at("image_feat")), max_abs_diff(text, want.at("text_feat")),
                   max_abs_diff(itm, want.at("itm_logits"))});
}

double stage2_diff(const fs::path& dir, const TensorMap& want) {
  // The Trainer entry point, with the built-in vocabulary as the tokenizer (the tiny LLMs' ids).
  TrainerOptions o;
  DatasetConfig d;
  d.data_loader.type = "SyntheticShapes";
  o.eval_dataset = d;
  o.output_dir = temp_dir("variant").string();
  Trainer trainer("image_to_text_generation", dir.string(), o);
  auto model = trainer.generation_model().module();
  torch::NoGradGuard no_grad;
  const auto& ids = want.at("input_ids");
  auto [text, keep] = strip_image_tokens(ids, torch::ones_like(ids), model->text_config().image_token_id);
  auto logits = model->forward(want.at("pixel_values"), text, keep);
  return max_abs_diff(logits, want.at("logits"));
}

TEST(Variants, EveryFieldIsHonouredOrRefused) {
  std::ifstream in(kVariants / "variants.json");
  ASSERT_TRUE(in.good()) << "run tools/make_variant_fixtures.py";
  const auto manifest = nlohmann::json::parse(in);
  ASSERT_GT(manifest.size(), 90u);
  int matched = 0, refused = 0;
  std::set<std::string> names;
  for (const auto& v : manifest) {
    const std::string name = v["name"], kind = v["kind"], field = v["field"];
    const bool runs = v["transformers"] == "ok";
    names.insert(name);
    SCOPED_TRACE(name + " (" + field + " = " + v["value"].dump() + ")");
    std::cout << name << "\n";
    const fs::path dir = kVariants / name;
    try {
      double diff = 0;
      if (runs) {
        const TensorMap want = load_safetensors((dir / "expected.safetensors").string());
        diff = kind == "stage1" ? stage1_diff(dir, want) : stage2_diff(dir, want);
      } else {
        kind == "stage1" ? (void)Blip2Model::from_pretrained(dir.string())
                         : (void)Trainer("image_to_text_generation", dir.string());
      }
      EXPECT_TRUE(runs) << "accepted a model transformers cannot run: " << v["transformers"];
      EXPECT_FALSE(kRefused.count(name)) << "accepted a variant that should be refused";
      EXPECT_LE(diff, 1e-4) << "the numbers differ from transformers'";
      ++matched;
    } catch (const Error& e) {
      const std::string msg = e.what();
      std::cout << "  refused: " << msg << "\n";
      EXPECT_TRUE(kRefused.count(name) || !runs) << "refused a variant transformers runs: " << msg;
      // The refusal names the file, the key and the value.
      const std::string key = field.substr(field.rfind('.') + 1);
      EXPECT_NE(msg.find(dir.string()), std::string::npos) << "the refusal does not name the file: " << msg;
      EXPECT_NE(msg.find(key), std::string::npos) << "the refusal does not name " << key << ": " << msg;
      bool value_named = msg.find(v["value"].dump()) != std::string::npos;
      if (v["value"].is_object())
        for (const auto& [k, x] : v["value"].items()) value_named = value_named || msg.find(x.dump()) != std::string::npos;
      EXPECT_TRUE(value_named) << "the refusal does not name the value " << v["value"].dump() << ": " << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
      ++refused;
    }
  }
  std::cout << manifest.size() << " variants: " << matched << " equal to transformers, " << refused
            << " refused by name\n";
  for (const auto& n : kRefused) EXPECT_TRUE(names.count(n)) << n << " is not a variant";
}

}  // namespace
}  // namespace blip2
