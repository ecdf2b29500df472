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

// Fields the issue has blip2cpp implement: refusing them fails the test.
const std::set<std::string> kMustImplement = {
    "vision_config.hidden_act", "qformer_config.hidden_act", "vision_config.qkv_bias",
    "vision_config.hidden_size", "vision_config.num_hidden_layers", "vision_config.image_size",
    "qformer_config.cross_attention_frequency", "qformer_config.max_position_embeddings",
    "qformer_config.layer_norm_eps", "vision_config.layer_norm_eps", "num_query_tokens",
    "text_config.activation_function", "text_config.do_layer_norm_before", "text_config._remove_final_layer_norm",
    "text_config.enable_bias", "text_config.layer_norm_elementwise_affine", "text_config.tie_word_embeddings",
    "text_config.num_key_value_heads", "text_config.head_dim", "text_config.attention_bias",
    "text_config.mlp_bias", "text_config.rms_norm_eps", "text_config.max_position_embeddings"};

// Values transformers offers that blip2cpp refuses on purpose (learned activation parameters).
const std::set<std::string> kMayRefuse = {"\"prelu\""};

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
  std::set<std::string> fields;
  for (const auto& v : manifest) {
    const std::string name = v["name"], kind = v["kind"], field = v["field"];
    const bool runs = v["transformers"] == "ok";
    fields.insert(field);
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
      EXPECT_LE(diff, 1e-4) << "the numbers differ from transformers'";
      ++matched;
    } catch (const Error& e) {
      const std::string msg = e.what();
      std::cout << "  refused: " << msg << "\n";
      const std::string key = field.substr(field.rfind('.') + 1);
      EXPECT_NE(msg.find(key), std::string::npos) << "the refusal does not name " << key << ": " << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
      EXPECT_FALSE(kMustImplement.count(field) && !kMayRefuse.count(v["value"].dump()))
          << field << " must be implemented, not refused: " << msg;
      EXPECT_FALSE(field.empty()) << "a base model was refused: " << msg;
      ++refused;
    }
  }
  std::cout << manifest.size() << " variants: " << matched << " equal to transformers, " << refused
            << " refused by name\n";
  for (const auto& f : kMustImplement) EXPECT_TRUE(fields.count(f)) << f << " has no variant";
}

}  // namespace
}  // namespace blip2
