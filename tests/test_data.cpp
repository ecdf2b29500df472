// Images and text reach the model as the Python reference prepares them: decoding and resizing
// against Pillow, tokenisation against Hugging Face's BertTokenizer, caption cleaning against
// LAVIS. Expected outputs come from tools/make_fixtures.py.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "blip2/text/text.h"
#include "blip2/util/common.h"
#include "test_util.h"
#include "blip2/vision/image.h"

using namespace blip2;
using namespace blip2::testing;
namespace fs = std::filesystem;

namespace {

const fs::path kFixtures = BLIP2_FIXTURE_DIR;


// max |a - b| over uint8 buffers, and how many bytes differ
std::pair<int, int64_t> compare(const std::vector<uint8_t>& a, const std::string& b) {
  EXPECT_EQ(a.size(), b.size());
  int worst = 0;
  int64_t differ = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    int d = std::abs(int(a[i]) - int(static_cast<uint8_t>(b[i])));
    worst = std::max(worst, d);
    differ += d != 0;
  }
  return {worst, differ};
}

std::vector<nlohmann::json> read_jsonl(const fs::path& p) {
  std::ifstream in(p);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST(Images, DecodeIsExactAndResizeMatchesPillow) {
  auto index = nlohmann::json::parse(read_file(kFixtures / "images.json"));
  ASSERT_GE(index.size(), 10u);
  for (const auto& e : index) {
    const std::string name = e["file"];
    Image img = load_image((kFixtures / "images" / name).string());
    ASSERT_EQ(img.width, e["width"].get<int64_t>()) << name;
    ASSERT_EQ(img.height, e["height"].get<int64_t>()) << name;
    auto [worst, differ] = compare(img.rgb, read_file(kFixtures / "images" / e["decoded"].get<std::string>()));
    EXPECT_EQ(worst, 0) << name << ": decode differs from Pillow in " << differ << " bytes";
    for (const auto& r : e["resized"]) {
      Image out = resize_bicubic(img, r["width"], r["height"]);
      auto [w2, d2] = compare(out.rgb, read_file(kFixtures / "images" / r["file"].get<std::string>()));
      // The target is <= 1/255; Pillow's fixed-point arithmetic is reproduced, so exact.
      EXPECT_EQ(w2, 0) << name << " -> " << r["width"] << "x" << r["height"] << ": " << d2
                       << " bytes differ, worst by " << w2;
    }
  }
}

TEST(Images, RandAugmentTablesMatchPillowAndOpsAreSeeded) {
  auto index = nlohmann::json::parse(read_file(kFixtures / "images.json"));
  for (const auto& e : index) {
    if (!e.contains("equalize")) continue;
    Image img = load_image((kFixtures / "images" / e["file"].get<std::string>()).string());
    EXPECT_EQ(compare(equalize(img).rgb, read_file(kFixtures / "images" / e["equalize"].get<std::string>())).first, 0);
    EXPECT_EQ(compare(autocontrast(img).rgb, read_file(kFixtures / "images" / e["autocontrast"].get<std::string>())).first, 0);
  }
  Image img = load_image((kFixtures / "images" / "rgb.png").string());
  std::mt19937_64 a(1), b(1);
  int changed = 0;
  for (int i = 0; i < 20; ++i) {
    Image x = rand_augment(img, a), y = rand_augment(img, b);
    EXPECT_EQ(x.rgb, y.rgb);
    EXPECT_EQ(x.width, img.width);
    changed += x.rgb != img.rgb;
  }
  EXPECT_GT(changed, 5);  // P(no op applied) = 1/4 per call
}

TEST(Images, EvalTransformNormalisesWithClipStatistics) {
  Image img{2, 1, {0, 128, 255, 10, 20, 30}};
  auto t = eval_transform(img, 2);  // same size: no resampling
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{3, 2, 2}));
  EXPECT_NEAR(t[0][0][0].item<float>(), (0.0f - 0.48145466f) / 0.26862954f, 1e-5);
  EXPECT_NEAR(t[1][0][0].item<float>(), (128 / 255.0f - 0.4578275f) / 0.26130258f, 1e-5);
  EXPECT_NEAR(t[2][0][1].item<float>(), (30 / 255.0f - 0.40821073f) / 0.27577711f, 1e-5);
}

TEST(Images, TrainTransformIsSeededAndCropsWithinTheImage) {
  Image img = load_image((kFixtures / "images" / "rgb_420.jpg").string());
  TrainTransformOptions o;
  o.size = 32;
  std::mt19937_64 a(5), b(5), c(6);
  auto x = train_transform(img, o, a), y = train_transform(img, o, b), z = train_transform(img, o, c);
  EXPECT_EQ(x.sizes(), (std::vector<int64_t>{3, 32, 32}));
  EXPECT_TRUE(torch::equal(x, y));
  EXPECT_FALSE(torch::equal(x, z));
  Image flipped = hflip(img);
  EXPECT_EQ(flipped.row(3)[0], img.row(3)[(img.width - 1) * 3]);
}

TEST(Images, BadFilesAreNamed) {
  auto dir = fs::temp_directory_path() / ("blip2_img_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::string jpg = read_file(kFixtures / "images" / "rgb_420.jpg");
  std::string png = read_file(kFixtures / "images" / "rgb.png");
  std::ofstream(dir / "cut.jpg", std::ios::binary) << jpg.substr(0, 40);
  std::ofstream(dir / "cut.png", std::ios::binary) << png.substr(0, png.size() / 2);
  std::ofstream(dir / "text.jpg", std::ios::binary) << "hello";
  std::ofstream(dir / "empty.png", std::ios::binary) << "";
  EXPECT_NE(error_of([&] { load_image((dir / "cut.jpg").string()); }).find("cut.jpg: corrupt JPEG"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_image((dir / "cut.png").string()); }).find("cut.png: corrupt PNG"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_image((dir / "text.jpg").string()); }).find("text.jpg: not a JPEG or PNG"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_image((dir / "empty.png").string()); }).find("(empty file)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_image((dir / "missing.jpg").string()); }).find("missing.jpg: image not found"),
            std::string::npos);
  fs::remove_all(dir);
}

TEST(Text, TokenizerMatchesHuggingFaceOnTheCorpus) {
  auto corpus = nlohmann::json::parse(read_file(kFixtures / "text" / "corpus.json"));
  for (const char* name : {"uncased", "chinese"}) {
    auto expected = read_jsonl(kFixtures / "text" / (std::string("expected_") + name + ".jsonl"));
    ASSERT_EQ(expected.size(), corpus.size() + 1);
    const auto& head = expected[0];
    auto tok = WordPieceTokenizer::from_file(
        (kFixtures / "text" / (std::string("vocab_") + name + ".txt")).string(),
        head["do_lower_case"].get<bool>());
    EXPECT_EQ(tok.size(), head["vocab_size"].get<int64_t>());
    EXPECT_EQ(tok.bos_id(), head["dec_id"].get<int64_t>());
    int mismatches = 0;
    for (size_t i = 0; i < corpus.size(); ++i) {
      const std::string text = corpus[i];
      const auto& want = expected[i + 1];
      auto ids = tok.encode(text);
      auto enc = tok.encode_batch({text}, 16, "max_length");
      std::vector<int64_t> ids16(enc.ids.data_ptr<int64_t>(), enc.ids.data_ptr<int64_t>() + 16);
      bool ok = ids == want["ids"].get<std::vector<int64_t>>() &&
                ids16 == want["ids16"].get<std::vector<int64_t>>() &&
                enc.keep.sum().item<int64_t>() == want["mask16"].get<int64_t>();
      if (!ok && ++mismatches <= 3)
        ADD_FAILURE() << name << " line " << i << ": " << nlohmann::json(text).dump()
                      << "\n  want " << want["ids"].dump() << "\n  got  " << nlohmann::json(ids).dump();
    }
    EXPECT_EQ(mismatches, 0) << name;
  }
}

TEST(Text, CaptionCleaningMatchesLavis) {
  auto corpus = nlohmann::json::parse(read_file(kFixtures / "text" / "corpus.json"));
  auto expected = read_jsonl(kFixtures / "text" / "captions.jsonl");
  ASSERT_EQ(expected.size(), corpus.size());
  int mismatches = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    std::string got = clean_caption(corpus[i], 50), got5 = clean_caption(corpus[i], 5);
    if ((got != expected[i]["out"] || got5 != expected[i]["out5"]) && ++mismatches <= 3)
      ADD_FAILURE() << "line " << i << ": " << nlohmann::json(corpus[i]).dump() << "\n  want "
                    << expected[i]["out"].dump() << "\n  got  " << nlohmann::json(got).dump();
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(clean_caption("A Dog.", 50, "a photo of "), "a photo of a dog");
}

TEST(Text, VocabularyErrorsAreNamed) {
  EXPECT_EQ(error_of([] { WordPieceTokenizer::from_file("/nonexistent/vocab.txt"); }),
            "/nonexistent/vocab.txt: vocabulary file not found");
  auto p = fs::temp_directory_path() / ("blip2_vocab_" + std::to_string(::getpid()) + ".txt");
  std::ofstream(p) << "[PAD]\n[UNK]\nhello\n";
  EXPECT_NE(error_of([&] { WordPieceTokenizer::from_file(p.string()); }).find("vocabulary has no [CLS]"),
            std::string::npos);
  fs::remove(p);
}
