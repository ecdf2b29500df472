// The datasets users bring, written here in their real layouts (LAVIS caption JSON for COCO
// Karpathy, Visual Genome and Flickr30k; the CIFAR-100 binary release; image folders), the
// loader's ordering and sharding, bad-input handling, and a CLI training run on COCO + VG.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "blip2/data/caption_datasets.h"
#include "blip2/data/synthetic.h"
#include "blip2/util/common.h"
#include "test_util.h"

using namespace blip2;
using namespace blip2::testing;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const fs::path kFixtures = BLIP2_FIXTURE_DIR;


void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

void copy_image(const std::string& fixture, const fs::path& to) {
  fs::create_directories(to.parent_path());
  fs::copy_file(kFixtures / "images" / fixture, to, fs::copy_options::overwrite_existing);
}

// A dataset root laid out as the seed's docs show.
struct MiniData {
  fs::path root;
  MiniData() {
    root = fs::temp_directory_path() / ("blip2_data_" + std::to_string(::getpid()));
    fs::remove_all(root);
    auto coco = root / "coco2014" / "coco";
    copy_image("rgb_420.jpg", coco / "images" / "train2014" / "COCO_train2014_1.jpg");
    copy_image("rgb.png", coco / "images" / "train2014" / "COCO_train2014_2.jpg");
    copy_image("grey.jpg", coco / "images" / "val2014" / "COCO_val2014_3.jpg");
    copy_image("cmyk.jpg", coco / "images" / "val2014" / "COCO_val2014_4.jpg");
    write(coco / "annotations" / "coco_karpathy_train.json", json::array({
        {{"image", "train2014/COCO_train2014_1.jpg"}, {"caption", "A man riding a horse."}, {"image_id", "coco_1"}},
        {{"image", "train2014/COCO_train2014_1.jpg"}, {"caption", "A horse on a beach!"}, {"image_id", "coco_1"}},
        {{"image", "train2014/COCO_train2014_2.jpg"}, {"caption", "Two dogs playing."}, {"image_id", "coco_2"}},
    }).dump());
    write(coco / "annotations" / "coco_karpathy_test.json", json::array({
        {{"image", "val2014/COCO_val2014_3.jpg"}, {"caption", {"a cat", "a sleeping cat", "cat on sofa"}}},
        {{"image", "val2014/COCO_val2014_4.jpg"}, {"caption", {"a red bus", "bus in the street"}}},
    }).dump());
    copy_image("palette.png", root / "vg" / "images" / "VG_100K" / "1.jpg");
    copy_image("l.png", root / "vg" / "images" / "VG_100K" / "2.jpg");
    write(root / "vg" / "annotations" / "vg_caption.json", json::array({
        {{"image", "VG_100K/1.jpg"}, {"caption", "trees behind a fence"}, {"image_id", 1}},
        {{"image", "VG_100K/2.jpg"}, {"caption", "white clouds"}, {"image_id", 2}},
    }).dump());
    copy_image("rgba.png", root / "flickr30k" / "images" / "flickr30k-images" / "10.jpg");
    write(root / "flickr30k" / "annotations" / "test.json", json::array({
        {{"image", "flickr30k-images/10.jpg"}, {"caption", {"x", "y", "z", "w", "v"}}},
    }).dump());
  }
  ~MiniData() { fs::remove_all(root); }
  DataLoaderConfig loader(std::vector<std::string> anns, std::vector<std::string> dirs,
                          const std::string& stage) const {
    DataLoaderConfig c;
    c.type = "MultiImgCapDataLoader";
    c.dataset_dir = root.string();
    c.annotation_files = std::move(anns);
    c.image_dirs = std::move(dirs);
    c.stage = stage;
    return c;
  }
};

ImageTransform eval32() { return make_image_transform({}, false, 32); }


}  // namespace

TEST(Datasets, CocoPlusVgTrainPairs) {
  MiniData d;
  CaptionDataset ds(d.loader({"coco2014/coco/annotations/coco_karpathy_train.json", "vg/annotations/vg_caption.json"},
                             {"coco2014/coco/images", "vg/images"}, "train"),
                    make_image_transform({}, true, 32));
  EXPECT_EQ(ds.size(), 5);
  auto s = ds.get(0, 7);
  EXPECT_EQ(s.caption, "A man riding a horse.");
  EXPECT_EQ(s.image.sizes(), (std::vector<int64_t>{3, 32, 32}));
  EXPECT_TRUE(torch::equal(ds.get(0, 7).image, s.image));      // seeded augmentation
  EXPECT_FALSE(torch::equal(ds.get(0, 8).image, s.image));
  EXPECT_EQ(ds.get(4, 0).caption, "white clouds");
}

TEST(Datasets, ImageIdsAreDenseAndGroupTheCaptionsOfOneImage) {
  // LAVIS' caption datasets: each sample carries the dense index of its annotation's image_id.
  // COCO-train style (an entry per caption): the two entries of coco_1 are one image; VG's
  // integer ids are VG's own, not COCO's; an entry without image_id is told apart by its path.
  MiniData d;
  write(d.root / "vg" / "annotations" / "no_ids.json", json::array({
      {{"image", "VG_100K/1.jpg"}, {"caption", "a fence"}},
      {{"image", "VG_100K/1.jpg"}, {"caption", "trees"}},
      {{"image", "VG_100K/2.jpg"}, {"caption", "clouds"}},
  }).dump());
  CaptionDataset ds(d.loader({"coco2014/coco/annotations/coco_karpathy_train.json", "vg/annotations/vg_caption.json",
                              "vg/annotations/no_ids.json"},
                             {"coco2014/coco/images", "vg/images", "vg/images"}, "train"),
                    make_image_transform({}, true, 32));
  ASSERT_EQ(ds.size(), 8);
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < ds.size(); ++i) ids.push_back(ds.get(i, 0).image_id);
  // coco_1 coco_1 coco_2 | vg 1, vg 2 | 1.jpg 1.jpg 2.jpg (by path: the same files as VG's 1 and 2,
  // which VG's ids do not name across files)
  EXPECT_EQ(ids, (std::vector<int64_t>{0, 0, 1, 2, 3, 4, 4, 5}));
  EXPECT_EQ(ds.num_images(), 6);
  // Retrieval ground truth: both captions of coco_1 are right for its image.
  EXPECT_EQ(ds.img2txt()[0], (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(ds.txt2img(), ids);
  // One image_id for two different files is an error naming both entries and files.
  write(d.root / "vg" / "annotations" / "clash.json", json::array({
      {{"image", "VG_100K/1.jpg"}, {"caption", "a"}, {"image_id", 7}},
      {{"image", "VG_100K/2.jpg"}, {"caption", "b"}, {"image_id", 7}},
  }).dump());
  const auto msg = error_of([&] {
    CaptionDataset(d.loader({"vg/annotations/clash.json"}, {"vg/images"}, "train"), make_image_transform({}, true, 32));
  });
  EXPECT_NE(msg.find("clash.json: entry 1: image_id 7 is also"), std::string::npos) << msg;
  EXPECT_NE(msg.find("clash.json: entry 0's, whose image is another file"), std::string::npos) << msg;
  // Not an integer or a string: named.
  write(d.root / "vg" / "annotations" / "bad_id.json", json::array({
      {{"image", "VG_100K/1.jpg"}, {"caption", "a"}, {"image_id", 1.5}},
  }).dump());
  EXPECT_NE(error_of([&] {
              CaptionDataset(d.loader({"vg/annotations/bad_id.json"}, {"vg/images"}, "train"),
                             make_image_transform({}, true, 32));
            }).find("bad_id.json: entry 0: 'image_id' must be a string or an integer"),
            std::string::npos);
}

TEST(Datasets, EvalSplitsExposeTheRetrievalGroundTruth) {
  MiniData d;
  CaptionDataset coco(d.loader({"coco2014/coco/annotations/coco_karpathy_test.json"},
                               {"coco2014/coco/images"}, "eval"), eval32());
  EXPECT_EQ(coco.num_images(), 2);
  EXPECT_EQ(coco.texts().size(), 5u);
  EXPECT_EQ(coco.img2txt()[0], (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(coco.img2txt()[1], (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(coco.txt2img(), (std::vector<int64_t>{0, 0, 0, 1, 1}));
  // The eval image is the bicubic resize of the decoded file.
  auto want = eval_transform(load_image((kFixtures / "images" / "grey.jpg").string()), 32);
  EXPECT_TRUE(torch::equal(coco.image(0), want));
  CaptionDataset flickr(d.loader({"flickr30k/annotations/test.json"}, {"flickr30k/images"}, "eval"), eval32());
  EXPECT_EQ(flickr.num_images(), 1);
  EXPECT_EQ(flickr.img2txt()[0].size(), 5u);
}

TEST(Datasets, BadAnnotationsAndImagesAreNamed) {
  MiniData d;
  auto ann = d.root / "bad" / "ann.json";
  auto make = [&](const std::string& text) {
    write(ann, text);
    return error_of([&] { CaptionDataset(d.loader({"bad/ann.json"}, {"bad"}, "train"), eval32()); });
  };
  EXPECT_NE(make("[{\"image\": 1").find("ann.json: malformed JSON"), std::string::npos);
  EXPECT_NE(make("{\"image\": \"a.jpg\"}").find("ann.json: expected a list of annotations"), std::string::npos);
  EXPECT_NE(make("[{\"image\": \"a.jpg\", \"caption\": \"x\"}, {\"image\": \"b.jpg\"}]")
                .find("ann.json: entry 1: missing 'caption'"), std::string::npos);
  EXPECT_NE(make("[{\"image\": \"a.jpg\", \"caption\": [1]}]").find("entry 0: 'caption' list holds a non-string"),
            std::string::npos);
  EXPECT_NE(error_of([&] { CaptionDataset(d.loader({"nope.json"}, {"x"}, "train"), eval32()); })
                .find("nope.json: annotation file not found"), std::string::npos);
  EXPECT_NE(error_of([&] { CaptionDataset(d.loader({"a.json", "b.json"}, {"x"}, "train"), eval32()); })
                .find("2 annotation_files but 1 image_dirs"), std::string::npos);

  // A missing and a corrupt image: named with their annotation entry, or skipped and counted.
  write(ann, json::array({{{"image", "gone.jpg"}, {"caption", "a"}},
                          {{"image", "cut.jpg"}, {"caption", "b"}},
                          {{"image", "ok.jpg"}, {"caption", "c"}},
                          {{"image", "ok.jpg"}, {"caption", "d"}}}).dump());
  copy_image("rgb_420.jpg", d.root / "bad" / "ok.jpg");
  write(d.root / "bad" / "cut.jpg", read_file(kFixtures / "images" / "rgb_420.jpg").substr(0, 300));
  auto cfg = d.loader({"bad/ann.json"}, {"bad"}, "train");
  auto ds = std::make_shared<CaptionDataset>(cfg, eval32());
  EXPECT_NE(error_of([&] { ds->get(0); }).find("gone.jpg: image not found (" + ann.string() + ": entry 0)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ds->get(1); }).find("cut.jpg: corrupt JPEG"), std::string::npos);
  auto tok = std::make_shared<WordPieceTokenizer>(SyntheticShapes::vocabulary());
  LoaderOptions o;
  o.batch_size = 4;
  o.shuffle = false;
  BatchLoader strict(ds, tok, {}, o);
  EXPECT_NE(error_of([&] { strict.batch(0, 0); }).find("gone.jpg"), std::string::npos);
  o.skip_bad_samples = true;
  BatchLoader lenient(ds, tok, {}, o);
  Batch b = lenient.batch(0, 0);
  EXPECT_EQ(b.images.size(0), 4);
  // Every failed read counts: gone.jpg once, cut.jpg twice (as itself and as gone.jpg's stand-in).
  EXPECT_EQ(lenient.skipped(), 3);
}

TEST(Datasets, Cifar100Binary) {
  auto dir = fs::temp_directory_path() / ("blip2_cifar_" + std::to_string(::getpid())) / "cifar-100-binary";
  fs::create_directories(dir);
  std::string bytes;
  for (int r = 0; r < 3; ++r) {
    bytes.push_back(static_cast<char>(r));       // coarse
    bytes.push_back(static_cast<char>(10 + r));  // fine
    for (int c = 0; c < 3; ++c) bytes.append(1024, static_cast<char>(50 * c + r));
  }
  write(dir / "test.bin", bytes);
  std::string fine, coarse;
  for (int i = 0; i < 100; ++i) fine += "class" + std::to_string(i) + "\n";
  for (int i = 0; i < 20; ++i) coarse += "super" + std::to_string(i) + "\n";
  write(dir / "fine_label_names.txt", fine);
  write(dir / "coarse_label_names.txt", coarse);
  DataLoaderConfig c;
  c.type = "Cifar100DataLoader";
  c.dataset_dir = dir.parent_path().string();  // the release's parent works too
  c.stage = "test";
  Cifar100Dataset ds(c, eval32());
  EXPECT_EQ(ds.size(), 3);
  auto s = ds.get(2);
  EXPECT_EQ(s.label, 12);
  EXPECT_EQ(s.caption, "a picture of class12");
  Image raw = ds.raw_image(2);
  EXPECT_EQ(raw.rgb[0], 2);
  EXPECT_EQ(raw.rgb[1], 52);
  EXPECT_EQ(raw.rgb[2], 102);
  c.fine_label = false;
  EXPECT_EQ(Cifar100Dataset(c, eval32()).get(1).label, 1);
  write(dir / "test.bin", bytes.substr(0, 5000));
  EXPECT_NE(error_of([&] { Cifar100Dataset(c, eval32()); }).find("test.bin: size 5000 is not a multiple of the 3074-byte"),
            std::string::npos);

  // zero_shot_image_classification --run_mode eval on it: top-1/top-5 over the 100 fine labels.
  write(dir / "test.bin", bytes);
  std::string cfg = read_file(fs::path(BLIP2_CONFIG_DIR) / "tiny_zero_shot.yaml");
  auto replace = [&](const std::string& from, const std::string& to) {
    auto at = cfg.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    cfg.replace(at, from.size(), to);
  };
  replace("    type: SyntheticShapes\n", "    type: Cifar100DataLoader\n    dataset_dir: " + dir.string() + "\n");
  replace("    stage: eval\n", "    stage: test\n");
  replace("    max_length: 16\n  batch_size: 64",
          "    max_length: 16\n    vocab_file: " + (kFixtures / "text" / "vocab_uncased.txt").string() + "\n  batch_size: 64");
  replace("    max_txt_len: 16\n", "    max_txt_len: 16\n    qformer_config: {vocab_size: 439, bos_token_id: 439}\n");
  write(dir / "zs.yaml", cfg);
  auto r = run_cli("run --config " + (dir / "zs.yaml").string() + " --output_dir " + (dir / "out").string());
  ASSERT_EQ(r.code, 0) << r.out;
  auto ev = nlohmann::json::parse(read_file(dir / "out" / "zero_shot_eval_results.json"));
  EXPECT_EQ(ev["num_labels"], 100);
  EXPECT_EQ(ev["num_images"], 3);
  EXPECT_TRUE(ev.contains("top5_accuracy"));
  fs::remove_all(dir.parent_path());
}

TEST(Datasets, ImageFolderListsImagesInOrder) {
  MiniData d;
  ImageFolderDataset ds({(d.root / "coco2014").string()}, eval32());
  ASSERT_EQ(ds.size(), 4);
  EXPECT_LT(ds.paths()[0], ds.paths()[1]);
  EXPECT_EQ(ds.get(0).image.sizes(), (std::vector<int64_t>{3, 32, 32}));
  EXPECT_NE(error_of([&] { ImageFolderDataset({(d.root / "vg" / "annotations").string()}, eval32()); })
                .find("no .jpg/.jpeg/.png images"), std::string::npos);
}

TEST(Loader, DeterministicShuffleAndDisjointShards) {
  auto ds = std::make_shared<SyntheticShapes>("train", 103, 16, 1);
  auto tok = std::make_shared<WordPieceTokenizer>(SyntheticShapes::vocabulary());
  LoaderOptions o;
  o.batch_size = 10;
  o.seed = 3;
  BatchLoader a(ds, tok, {}, o), b(ds, tok, {}, o);
  EXPECT_EQ(a.epoch_order(0), b.epoch_order(0));
  EXPECT_NE(a.epoch_order(0), a.epoch_order(1));
  EXPECT_EQ(a.batches_per_epoch(), 10);  // drop_last
  std::set<int64_t> seen;
  for (int r = 0; r < 2; ++r) {
    LoaderOptions s = o;
    s.rank = r;
    s.world_size = 2;
    BatchLoader shard(ds, tok, {}, s);
    EXPECT_EQ(shard.batches_per_epoch(), 5);
    for (int64_t i : shard.epoch_order(4)) EXPECT_TRUE(seen.insert(i).second) << i;
  }
  EXPECT_EQ(seen.size(), 102u);
  // The prefetching stream yields the same batches as direct access.
  BatchLoader::Stream stream(a, 1, 7);
  for (int64_t i = 7; i < 10; ++i) EXPECT_TRUE(torch::equal(stream.next().ids, a.batch(1, i).ids));
  EXPECT_TRUE(stream.done());
}

TEST(Cli, TrainsOnCocoAndVgAndTokenizes) {
  MiniData d;
  std::string vocab = (kFixtures / "text" / "vocab_uncased.txt").string();
  std::string cfg = read_file(fs::path(BLIP2_CONFIG_DIR) / "tiny_pretrain_stage_1.yaml");
  auto replace = [&](const std::string& from, const std::string& to) {
    auto at = cfg.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    cfg.replace(at, from.size(), to);
  };
  replace("    type: SyntheticShapes\n    stage: train\n    shuffle: true\n    num_samples: 4096",
          "    type: MultiImgCapDataLoader\n    annotation_files: [coco2014/coco/annotations/coco_karpathy_train.json, vg/annotations/vg_caption.json]\n"
          "    image_dirs: [coco2014/coco/images, vg/images]\n    stage: train");
  replace("    type: SyntheticShapes\n    stage: eval\n    shuffle: false\n    num_samples: 256",
          "    type: MultiImgCapDataLoader\n    annotation_files: [coco2014/coco/annotations/coco_karpathy_test.json]\n"
          "    image_dirs: [coco2014/coco/images]\n    stage: eval");
  replace("    vocab_file: \"\"", "    vocab_file: " + vocab);
  replace("  tokenizer:\n    type: BertTokenizer\n    max_length: 16\n  batch_size: 64",
          "  tokenizer:\n    type: BertTokenizer\n    max_length: 16\n    vocab_file: " + vocab + "\n  batch_size: 2");
  replace("  batch_size: 64       #", "  batch_size: 2 #");
  replace("epochs: 12", "epochs: 2");
  replace("eval_tasks: [zero_shot_image_classification, image_to_text_retrieval]", "eval_tasks: [image_to_text_retrieval]");
  replace("vocab_size: 50\n      special_token_nums: 1\n      bos_token_id: 50",
          "vocab_size: 439\n      special_token_nums: 1\n      bos_token_id: 439");
  write(d.root / "coco_vg.yaml", cfg);
  auto out = d.root / "out";
  auto r = run_cli("run --config " + (d.root / "coco_vg.yaml").string() + " --train_dataset_dir " +
                   d.root.string() + " --eval_dataset_dir " + d.root.string() + " --output_dir " + out.string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("2 epochs x 2 steps"), std::string::npos) << r.out;
  std::string metrics = read_file(out / "metrics.jsonl");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), 4);
  auto ev = json::parse(read_file(out / "eval_results.json"));
  EXPECT_EQ(ev["itc_retrieval"]["num_images"], 2);
  EXPECT_EQ(ev["itc_retrieval"]["num_texts"], 5);

  // The retrieval task on the COCO test split, from the checkpoint just trained.
  std::string rcfg = cfg;
  rcfg.replace(rcfg.find("type: contrastive_language_image_pretrain"),
               std::string("type: contrastive_language_image_pretrain").size(), "type: image_to_text_retrieval");
  write(d.root / "retrieval.yaml", rcfg);
  r = run_cli("run --config " + (d.root / "retrieval.yaml").string() + " --run_mode eval --eval_dataset_dir " +
              d.root.string() + " --load_checkpoint " + out.string() + " --output_dir " + (d.root / "ret").string());
  ASSERT_EQ(r.code, 0) << r.out;
  auto ret = json::parse(read_file(d.root / "ret" / "retrieval_results.json"));
  EXPECT_EQ(ret["num_images"], 2);
  EXPECT_EQ(ret["num_texts"], 5);
  for (const char* k : {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                        "img_r_mean", "r_mean", "agg_metrics"})
    EXPECT_TRUE(ret.contains(k)) << k;
  EXPECT_DOUBLE_EQ(ret["txt_r5"].get<double>(), 100.0);  // 2 images: everything is in the top 5

  auto t = run_cli("tokenize --vocab " + vocab + " --max_length 6 --padding max_length \"A man riding a horse.\"");
  EXPECT_EQ(t.code, 0);
  EXPECT_EQ(t.out, "[2,27,294,275,27,3]\n");
}
