// blip2 serve: the wire format (parsing, base64, streaming text), and the server itself as a user
// runs it: the blip2 binary started on a free port with the tiny models, spoken to over loopback.
// Answers are checked against the library's own pipelines run in this process (the tiny presets'
// random initialisation is seeded, so both hold the same weights); bad input must be a 4xx with an
// OpenAI error body and leave the server serving.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <zlib.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "blip2/api/api.h"
#include "blip2/serve/client.h"
#include "blip2/serve/load_client.h"
#include "blip2/serve/openai.h"
#include "blip2/util/common.h"
#include "server_process.h"
#include "test_util.h"

using namespace blip2;
using namespace blip2::serve;
using blip2::testing::ServerProcess;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kImage = std::string(BLIP2_FIXTURE_DIR) + "/images/rgb.png";

std::string image_b64(const std::string& path = kImage) {
  const auto bytes = read_file(path);
  return base64_encode(bytes.data(), bytes.size());
}

json chat_body(const std::string& prompt, int max_tokens, bool stream = false) {
  json content = json::array({{{"type", "text"}, {"text", prompt}},
                              {{"type", "image_url"}, {"image_url", {{"url", "data:image/png;base64," + image_b64()}}}}});
  json b = {{"messages", {{{"role", "user"}, {"content", content}}}}, {"max_tokens", max_tokens}};
  if (stream) b["stream"] = true;
  return b;
}

json completion_body(const std::string& prompt, int max_tokens) {
  return {{"prompt", prompt}, {"image", image_b64()}, {"max_tokens", max_tokens}};
}

json parse(const HttpResponse& r) { return json::parse(r.body); }

// The streamed text of an SSE body, and whether it ended with [DONE].
std::pair<std::string, bool> streamed_text(const std::string& body) {
  std::string text;
  bool done = false;
  for (const auto& d : sse_data(body)) {
    if (d == "[DONE]") {
      done = true;
      continue;
    }
    auto j = json::parse(d);
    const auto& c = j["choices"][0];
    if (c.contains("delta") && c["delta"].contains("content")) text += c["delta"]["content"].get<std::string>();
    if (c.contains("text")) text += c["text"].get<std::string>();
  }
  return {text, done};
}

int64_t rss_kib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6));
  return -1;
}

// A PNG whose header declares width x height (valid CRCs, no pixel data).
std::string png_header(uint32_t width, uint32_t height) {
  auto be = [](uint32_t v) {
    return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
  };
  std::string ihdr = "IHDR" + be(width) + be(height) + std::string("\x08\x02\x00\x00\x00", 5);
  const auto crc = static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(ihdr.data()), static_cast<uInt>(ihdr.size())));
  std::string idat = "IDAT" + std::string("\x78\x9c\x03\x00\x00\x00\x00\x01", 8);
  const auto crc2 = static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(idat.data()), static_cast<uInt>(idat.size())));
  return std::string("\x89PNG\r\n\x1a\n", 8) + be(13) + ihdr + be(crc) + be(8) + idat + be(crc2);
}

}  // namespace

// ---- the wire format, without a server ----

TEST(ServeWire, Base64RoundTripsAndRefusesWhatIsNotBase64) {
  for (const std::string& s : std::vector<std::string>{"", "a", "ab", "abc", "abcd", std::string("\0\xff\x10", 3)}) {
    const auto enc = base64_encode(s.data(), s.size());
    if (s.empty()) continue;
    auto dec = base64_decode(enc);
    ASSERT_TRUE(dec.has_value()) << enc;
    EXPECT_EQ(*dec, s);
  }
  EXPECT_EQ(base64_encode("hello", 5), "aGVsbG8=");
  EXPECT_EQ(*base64_decode("aGVsbG8"), "hello");  // padding optional
  EXPECT_FALSE(base64_decode("aGVs bG8=").has_value());
  EXPECT_FALSE(base64_decode("a").has_value());
  EXPECT_FALSE(base64_decode("****").has_value());
}

TEST(ServeWire, StreamsShowOnlyTextThatCannotChange) {
  EXPECT_EQ(stable_prefix("a cat  ", {}), "a cat");
  EXPECT_EQ(stable_prefix("a cat\xE2\x80", {}), "a cat");          // an incomplete character
  EXPECT_EQ(stable_prefix("a cat \xEF\xBF\xBD", {}), "a cat");      // U+FFFD of a partial byte sequence
  EXPECT_EQ(stable_prefix("a caf\xC3\xA9", {}), "a caf\xC3\xA9");   // complete: shown
  EXPECT_EQ(stable_prefix("a cat. Que", {"Question"}), "a cat.");   // may become a stop string
  EXPECT_EQ(stable_prefix("a cat. Qx", {"Question"}), "a cat. Qx");
  std::string t = "a cat. Question: why";
  EXPECT_TRUE(cut_at_stop(t, {"Question", "."}));
  EXPECT_EQ(t, "a cat");
  EXPECT_EQ(trim_text("\n a dog \t"), "a dog");
}

TEST(ServeWire, RequestFieldsAreHonouredOrRefusedByName) {
  GenerationOptions d;
  d.num_beams = 5;
  d.max_new_tokens = 30;
  d.min_new_tokens = 8;
  auto r = parse_completion({{"prompt", "hi"}, {"max_tokens", 4}, {"temperature", 0.5}, {"top_k", 3}, {"seed", 9},
                             {"stop", "x"}, {"n", 2}},
                            d);
  EXPECT_EQ(r.options.max_new_tokens, 4);
  EXPECT_EQ(r.options.min_new_tokens, 4);
  EXPECT_TRUE(r.options.do_sample);
  EXPECT_EQ(r.options.num_beams, 1);  // the default beams yield to sampling
  EXPECT_EQ(r.options.top_k, 3);
  EXPECT_EQ(r.options.seed, 9u);
  EXPECT_EQ(r.n, 2);
  EXPECT_EQ(r.stop, std::vector<std::string>{"x"});
  auto refused = [&](const json& body) -> std::string {
    try {
      parse_chat(body, d);
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, 400);
      return e.param;
    }
    return "accepted";
  };
  json msg = {{{"role", "user"}, {"content", "hi"}}};
  EXPECT_EQ(refused({{"messages", msg}, {"logprobs", true}}), "logprobs");
  EXPECT_EQ(refused({{"messages", msg}, {"top_p", 0.5}}), "top_p");  // greedy: top_p would do nothing
  EXPECT_EQ(refused({{"messages", msg}, {"temperature", 1}, {"num_beams", 3}}), "num_beams");
  EXPECT_EQ(refused({{"messages", msg}, {"max_tokens", "ten"}}), "max_tokens");
  EXPECT_EQ(refused({{"messages", json::array()}}), "messages");
  EXPECT_EQ(refused({{"messages", {{{"role", "robot"}, {"content", "hi"}}}}}), "messages[0].role");
  json two_images = {{{"role", "user"},
                      {"content", {{{"type", "image_url"}, {"image_url", {{"url", "a"}}}},
                                   {{"type", "image_url"}, {"image_url", {{"url", "b"}}}}}}}};
  EXPECT_EQ(refused({{"messages", two_images}}), "messages[0].content[1].image_url");
  auto c = parse_chat({{"messages", {{{"role", "system"}, {"content", "Question: what?"}},
                                     {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "Answer:"}}}}}}}},
                      d);
  EXPECT_EQ(c.prompt, "Question: what? Answer:");
  EXPECT_EQ(c.options.num_beams, 5);  // the model's own decoding unless asked otherwise
}

// ---- the server ----

class Serve : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(blip2::testing::temp_dir("serve"));
    fs::create_directories(*dir_ / "allowed");
    fs::copy_file(kImage, *dir_ / "allowed" / "rgb.png", fs::copy_options::overwrite_existing);
    fs::copy_file(kImage, *dir_ / "outside.png", fs::copy_options::overwrite_existing);
    fs::create_symlink(*dir_ / "outside.png", *dir_ / "allowed" / "link.png");
    srv_ = new ServerProcess({"--model", "tiny_stage2", "--stage1", "tiny", "--max-batch", "4", "--max-body", "300000",
                              "--allow-files", (*dir_ / "allowed").string()});
    HttpClient c(srv_->host(), srv_->port());
    ASSERT_TRUE(srv_->wait_ready(c)) << srv_->process().output();
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(srv_->process().stop(), 0) << srv_->process().output();
    delete srv_;
    fs::remove_all(*dir_);
    delete dir_;
  }
  HttpClient client() const { return HttpClient(srv_->host(), srv_->port()); }
  static GenerationOptions greedy(int max_tokens) {
    auto o = image_to_text_pipeline("tiny_stage2").model().generation_options();
    o.max_new_tokens = max_tokens;
    o.min_new_tokens = std::min<int64_t>(o.min_new_tokens, max_tokens);
    return o;
  }
  static std::string pipeline_caption(const std::string& prompt, const GenerationOptions& o) {
    ImageToTextOptions io;
    io.generation = o;
    return image_to_text_pipeline("tiny_stage2", io)({PipelineInput{kImage}}, prompt)[0]["text"];
  }
  static ServerProcess* srv_;
  static fs::path* dir_;
};
ServerProcess* Serve::srv_ = nullptr;
fs::path* Serve::dir_ = nullptr;

TEST_F(Serve, CaptionsAreThePipelinesAndAStreamSendsTheSameText) {
  auto c = client();
  const auto expected = pipeline_caption("a photo of", greedy(10));
  ASSERT_FALSE(expected.empty());
  auto r = c.post("/v1/completions", completion_body("a photo of", 10).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  auto j = parse(r);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "tiny_stage2");
  EXPECT_EQ(j["choices"][0]["text"], expected);
  EXPECT_GT(j["usage"]["completion_tokens"].get<int>(), 0);

  auto chat = c.post("/v1/chat/completions", chat_body("a photo of", 10).dump());
  ASSERT_EQ(chat.status, 200) << chat.body;
  EXPECT_EQ(parse(chat)["choices"][0]["message"]["content"], expected);
  EXPECT_EQ(parse(chat)["object"], "chat.completion");

  auto s = c.post_stream("/v1/chat/completions", chat_body("a photo of", 10, true).dump(),
                         [](const std::string&) { return true; });
  ASSERT_EQ(s.status, 200) << s.body;
  EXPECT_NE(s.header("Content-Type").find("text/event-stream"), std::string::npos);
  auto [text, done] = streamed_text(s.body);
  EXPECT_TRUE(done);
  EXPECT_EQ(text, expected);
  const auto events = sse_data(s.body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(json::parse(events.front())["choices"][0]["delta"]["role"], "assistant");
  EXPECT_FALSE(json::parse(events[events.size() - 2])["choices"][0]["finish_reason"].is_null());

  auto cs = c.post_stream("/v1/completions", [] { auto b = completion_body("a photo of", 10); b["stream"] = true; return b; }().dump(),
                          [](const std::string&) { return true; });
  EXPECT_EQ(streamed_text(cs.body).first, expected);
}

TEST_F(Serve, BeamSearchAndSamplingAreTheLibrarysAndChoicesTakeTheNextSeeds) {
  auto c = client();
  auto o = greedy(8);
  o.num_beams = 3;
  auto body = completion_body("", 8);
  body["num_beams"] = 3;
  auto r = c.post("/v1/completions", body.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(parse(r)["choices"][0]["text"], pipeline_caption("", o));

  auto s = greedy(8);
  s.do_sample = true;
  s.temperature = 1.3;
  s.top_k = 10;
  s.seed = 7;
  body = completion_body("the", 8);
  body.update({{"temperature", 1.3}, {"top_k", 10}, {"seed", 7}, {"n", 2}});
  r = c.post("/v1/completions", body.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  auto j = parse(r);
  ASSERT_EQ(j["choices"].size(), 2u);
  EXPECT_EQ(j["choices"][0]["text"], pipeline_caption("the", s));
  s.seed = 8;
  EXPECT_EQ(j["choices"][1]["text"], pipeline_caption("the", s));
}

TEST_F(Serve, StopStringsCutTheTextInBothForms) {
  auto c = client();
  const auto full = pipeline_caption("a photo of", greedy(12));
  const auto space = full.find(' ', 1);
  ASSERT_NE(space, std::string::npos) << full;
  const std::string stop = full.substr(space, 3);
  auto body = completion_body("a photo of", 12);
  body["stop"] = {stop};
  auto r = c.post("/v1/completions", body.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  auto j = parse(r);
  auto want = full.substr(0, full.find(stop));
  EXPECT_EQ(j["choices"][0]["text"], trim_text(want));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  body["stream"] = true;
  auto s = c.post_stream("/v1/completions", body.dump(), [](const std::string&) { return true; });
  EXPECT_EQ(streamed_text(s.body).first, trim_text(want));
}

TEST_F(Serve, StageOneEndpointsAreThePipelines) {
  auto c = client();
  const std::vector<std::string> labels = {"red", "green", "blue", "a circle"};
  PipelineOptions po;
  po.candidate_labels = labels;
  auto expected = pipeline("zero_shot_image_classification", "tiny", po)({PipelineInput{kImage}})[0];
  auto r = c.post("/v1/classify", json({{"image", "data:image/png;base64," + image_b64()}, {"candidate_labels", labels}}).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  auto got = parse(r)["results"];
  ASSERT_EQ(got.size(), labels.size());
  double sum = 0;
  for (size_t i = 0; i < labels.size(); ++i) {
    EXPECT_EQ(got[i]["label"], expected[i]["label"]);
    EXPECT_NEAR(got[i]["score"].get<double>(), expected[i]["score"].get<double>(), 1e-6);
    sum += got[i]["score"].get<double>();
  }
  EXPECT_NEAR(sum, 1.0, 1e-6);

  auto model = Blip2Model::from_pretrained("tiny");
  auto images = model.preprocess(std::vector<std::string>{kImage});
  auto img_f = model.extract_features(images, {}, "image").image_embeds_proj[0];      // [Q, E]
  auto txt_f = model.extract_features({}, {"red", "a circle"}, "text").text_embeds_proj.select(1, 0);  // [T, E]
  auto itc = std::get<0>(torch::matmul(img_f, txt_f.t()).max(0));
  r = c.post("/v1/match", json({{"image", image_b64()}, {"texts", {"red", "a circle"}}}).dump());
  ASSERT_EQ(r.status, 200) << r.body;
  auto m = parse(r)["results"];
  ASSERT_EQ(m.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_NEAR(m[i]["itc_score"].get<double>(), itc[i].item<double>(), 1e-5);
    EXPECT_GE(m[i]["itm_score"].get<double>(), 0.0);
    EXPECT_LE(m[i]["itm_score"].get<double>(), 1.0);
  }
  EXPECT_EQ(m[1]["text"], "a circle");

  json input = json::array({"red", {{"image", image_b64()}}});
  auto ef = c.post("/v1/embeddings", json({{"input", input}}).dump());
  auto eb = c.post("/v1/embeddings", json({{"input", input}, {"encoding_format", "base64"}}).dump());
  auto en = c.post("/v1/embeddings", json({{"input", input}, {"pooling", "none"}}).dump());
  ASSERT_EQ(ef.status, 200) << ef.body;
  ASSERT_EQ(eb.status, 200) << eb.body;
  ASSERT_EQ(en.status, 200) << en.body;
  auto fj = parse(ef), bj = parse(eb), nj = parse(en);
  EXPECT_EQ(fj["object"], "list");
  for (int i = 0; i < 2; ++i) {
    auto f = fj["data"][i]["embedding"].get<std::vector<float>>();
    auto bytes = *base64_decode(bj["data"][i]["embedding"].get<std::string>());
    ASSERT_EQ(bytes.size(), f.size() * 4);
    EXPECT_EQ(std::memcmp(bytes.data(), f.data(), bytes.size()), 0);  // the same floats, little-endian
  }
  auto text_v = fj["data"][0]["embedding"].get<std::vector<float>>();
  ASSERT_EQ(static_cast<int64_t>(text_v.size()), txt_f.size(1));
  for (int64_t k = 0; k < txt_f.size(1); ++k) EXPECT_NEAR(text_v[k], txt_f[0][k].item<float>(), 1e-5);
  auto pooled = torch::tensor(fj["data"][1]["embedding"].get<std::vector<float>>());
  EXPECT_NEAR(pooled.norm().item<double>(), 1.0, 1e-5);
  auto per_query = nj["data"][1];
  EXPECT_EQ(per_query["shape"], json({img_f.size(0), img_f.size(1)}));
  auto pq = torch::tensor(per_query["embedding"].get<std::vector<float>>()).view({img_f.size(0), img_f.size(1)});
  EXPECT_TRUE(torch::allclose(pq, img_f, 1e-5, 1e-5));
}

TEST_F(Serve, BadInputIsA4xxWithAnErrorBodyAndTheServerKeepsServing) {
  auto c = client();
  const auto jpeg = read_file(std::string(BLIP2_FIXTURE_DIR) + "/images/grey.jpg");
  const auto truncated = base64_encode(jpeg.data(), jpeg.size() / 2);
  const auto bomb = png_header(40000, 40000);
  struct Case {
    std::string name, path, body;
    int status;
    std::string says;
  };
  auto with_image = [](const std::string& image) { return json({{"prompt", "x"}, {"image", image}, {"max_tokens", 2}}).dump(); };
  const std::vector<Case> cases = {
      {"malformed JSON", "/v1/completions", "{\"prompt\": ", 400, "not valid JSON"},
      {"not an object", "/v1/completions", "[1, 2]", 400, "JSON object"},
      {"body over --max-body", "/v1/completions", with_image(std::string(400000, 'A')), 413, "--max-body"},
      {"base64 that is not an image", "/v1/completions", with_image("aGVsbG8gd29ybGQ="), 400, "image"},
      {"not base64", "/v1/completions", with_image("%%%"), 400, "not a data: URL, base64"},
      {"truncated JPEG", "/v1/completions", with_image(truncated), 400, "image"},
      {"decompression bomb", "/v1/completions", with_image(base64_encode(bomb.data(), bomb.size())), 400, "pixels"},
      {"a data: URL that is not an image", "/v1/completions", with_image("data:text/plain;base64,aGk="), 400, "not an image"},
      {"a remote URL", "/v1/completions", with_image("https://example.com/cat.png"), 400, "not fetched"},
      {"file:// outside --allow-files", "/v1/completions", with_image("file://" + (*dir_ / "outside.png").string()), 403, "outside"},
      {"file:// escaping with ..", "/v1/completions",
       with_image("file://" + (*dir_ / "allowed" / ".." / "outside.png").string()), 403, "outside"},
      {"unknown model", "/v1/completions", json({{"prompt", "x"}, {"model", "gpt-4"}}).dump(), 404, "gpt-4"},
      {"stage-1 model asked for text", "/v1/completions", json({{"prompt", "x"}, {"model", "tiny"}}).dump(), 404, "tiny"},
      {"too many tokens", "/v1/completions", json({{"prompt", "x"}, {"max_tokens", 5000}}).dump(), 400, "context"},
      {"an unknown field", "/v1/completions", json({{"prompt", "x"}, {"logprobs", 2}}).dump(), 400, "logprobs"},
      {"a wrong type", "/v1/chat/completions", json({{"messages", "hi"}}).dump(), 400, "messages"},
      {"no labels", "/v1/classify", json({{"image", image_b64()}, {"candidate_labels", json::array()}}).dump(), 400, "candidate_labels"},
      {"a template without {}", "/v1/classify",
       json({{"image", image_b64()}, {"candidate_labels", {"a"}}, {"hypothesis_template", "a photo"}}).dump(), 400, "{}"},
      {"token arrays as input", "/v1/embeddings", json({{"input", {{1, 2, 3}}}}).dump(), 400, "input[0]"},
      {"unknown endpoint", "/v1/images/generations", "{}", 404, "no endpoint"},
      {"n over --max-batch", "/v1/completions", json({{"prompt", "x"}, {"n", 5}, {"temperature", 1}}).dump(), 400, "--max-batch"},
      {"a temperature that overflows", "/v1/completions", json({{"prompt", "x"}, {"temperature", 1e-300}}).dump(), 400, "temperature"},
      {"two different token limits", "/v1/chat/completions",
       json({{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"max_tokens", 3}, {"max_completion_tokens", 4}}).dump(), 400, "differs"},
      {"nothing to condition on", "/v1/completions", json({{"prompt", " "}}).dump(), 400, "nothing to condition on"},
      {"a number for encoding_format", "/v1/embeddings", json({{"input", "a"}, {"encoding_format", 5}}).dump(), 400, "encoding_format"},
      {"null pooling", "/v1/embeddings", json({{"input", "a"}, {"pooling", nullptr}}).dump(), 400, "pooling"},
      {"file:// through a symlink out of --allow-files", "/v1/completions",
       with_image("file://" + (*dir_ / "allowed" / "link.png").string()), 403, "outside"},
      {"a bad %-escape in a file:// URL", "/v1/completions", with_image("file://" + (*dir_ / "allowed" / "%zz.png").string()), 400, "escape"},
  };
  for (const auto& k : cases) {
    auto r = c.post(k.path, k.body);
    EXPECT_EQ(r.status, k.status) << k.name << ": " << r.body;
    auto j = json::parse(r.body, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << k.name << ": " << r.body;
    ASSERT_TRUE(j.contains("error")) << k.name;
    EXPECT_NE(j["error"]["message"].get<std::string>().find(k.says), std::string::npos) << k.name << ": " << r.body;
    EXPECT_TRUE(j["error"]["type"].is_string()) << k.name;
  }
  // Bodies of unknown size, refused before they are read.
  const std::string chunked = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n";
  auto raw = raw_http(srv_->host(), srv_->port(), chunked);
  EXPECT_EQ(raw.rfind("HTTP/1.1 411", 0), 0u) << raw;
  EXPECT_NE(raw.find("\"error\""), std::string::npos);
  auto gz = c.post("/v1/completions", "xxxx", "application/json", {{"Content-Encoding", "gzip"}});
  EXPECT_EQ(gz.status, 415) << gz.body;
  // A file under --allow-files is read (its path %-escaped or not).
  auto ok = c.post("/v1/completions", with_image("file://" + (*dir_ / "allowed" / "rgb.png").string()));
  EXPECT_EQ(ok.status, 200) << ok.body;
  ok = c.post("/v1/completions", with_image("file://" + (*dir_ / "allowed" / "r%67b.png").string()));
  EXPECT_EQ(ok.status, 200) << ok.body;
  // A path cannot write into /metrics.
  raw = raw_http(srv_->host(), srv_->port(),
                 "POST /x%22%7D%0Aevil_metric%201%0A HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 "Connection: close\r\n\r\n0\r\n\r\n");
  EXPECT_EQ(raw.rfind("HTTP/1.1 411", 0), 0u) << raw;
  EXPECT_EQ(c.get("/metrics").body.find("evil_metric"), std::string::npos);
  // Still serving, and the errors were counted by kind.
  EXPECT_EQ(c.get("/health").status, 200);
  EXPECT_EQ(c.post("/v1/completions", completion_body("", 3).dump()).status, 200);
  auto metrics = c.get("/metrics").body;
  EXPECT_NE(metrics.find("blip2_errors_total{kind=\"payload_too_large\"}"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("blip2_errors_total{kind=\"forbidden\"}"), std::string::npos);
  EXPECT_NE(metrics.find("blip2_errors_total{kind=\"unsupported_body\"} 3"), std::string::npos) << metrics;
}

TEST_F(Serve, AClientThatLeavesMidStreamFreesItsRows) {
  auto c = client();
  const auto counter = [&](const std::string& key) {
    const auto m = client().get("/metrics").body;
    const auto at = m.find("\n" + key + " ");  // the sample line, not the HELP line
    return at == std::string::npos ? -1.0 : std::stod(m.substr(at + key.size() + 2));
  };
  const double tokens_before = counter("blip2_tokens_generated_total");
  // Four sampled choices to the end of the tiny model's 64 positions (no image): 4 x 60 tokens
  // if nobody stopped it. The client reads the first event and hangs up.
  json body = {{"prompt", "the"}, {"max_tokens", 60}, {"min_tokens", 60}, {"stream", true},
               {"n", 4}, {"temperature", 1.0}, {"seed", 3}};
  int chunks = 0;
  auto r = c.post_stream("/v1/completions", body.dump(), [&](const std::string&) { return ++chunks < 2; });
  EXPECT_EQ(r.status, 200);
  // The server notices at its next write or poll, drops the rows and counts the request.
  bool freed = false;
  for (int i = 0; i < 200 && !freed; ++i) {
    freed = counter("blip2_cancelled_requests_total") >= 1 && counter("blip2_active_sequences") == 0;
    if (!freed) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  EXPECT_TRUE(freed) << client().get("/metrics").body;
  EXPECT_LT(counter("blip2_tokens_generated_total") - tokens_before, 4 * 60);
  EXPECT_NE(client().get("/metrics").body.find("status=\"499\""), std::string::npos);
  EXPECT_EQ(client().post("/v1/completions", completion_body("", 3).dump()).status, 200);
}

TEST_F(Serve, ModelsHealthAndThePage) {
  auto c = client();
  auto models = parse(c.get("/v1/models"));
  ASSERT_EQ(models["data"].size(), 2u);
  EXPECT_EQ(models["data"][0]["id"], "tiny_stage2");
  EXPECT_EQ(models["data"][1]["id"], "tiny");
  EXPECT_EQ(parse(c.get("/health"))["status"], "ok");
  auto page = c.get("/");
  EXPECT_EQ(page.status, 200);
  EXPECT_NE(page.header("Content-Type").find("text/html"), std::string::npos);
  EXPECT_NE(page.body.find("caption-btn"), std::string::npos);
}

// ---- servers with other settings ----

TEST(ServeLimits, ApiKeyAndAbsentModels) {
  ServerProcess srv({"--stage1", "tiny", "--api-key", "s3cret"});
  HttpClient c(srv.host(), srv.port());
  // Asked at once, the server is usually still loading: /health says so with a 503 (and the
  // endpoints answer 503 too) until the models are in.
  auto early = c.get("/health");
  if (early.status == 503) EXPECT_EQ(parse(early)["status"], "loading") << early.body;
  else EXPECT_EQ(early.status, 200) << early.body;
  ASSERT_TRUE(srv.wait_ready(c));
  const std::string body = json({{"image", image_b64()}, {"texts", {"a"}}}).dump();
  EXPECT_EQ(c.post("/v1/match", body).status, 401);
  auto wrong = c.post("/v1/match", body, "application/json", {{"Authorization", "Bearer nope"}});
  EXPECT_EQ(wrong.status, 401);
  EXPECT_EQ(parse(wrong)["error"]["code"], "invalid_api_key");
  const HeaderList key = {{"Authorization", "Bearer s3cret"}};
  EXPECT_EQ(c.post("/v1/match", body, "application/json", key).status, 200);
  EXPECT_EQ(c.get("/metrics").status, 401);
  EXPECT_EQ(c.get("/health").status, 200);  // no key needed to ask whether it is up
  auto no_text = c.post("/v1/completions", json({{"prompt", "x"}}).dump(), "application/json", key);
  EXPECT_EQ(no_text.status, 404);
  EXPECT_NE(parse(no_text)["error"]["message"].get<std::string>().find("--model"), std::string::npos);
  auto file = c.post("/v1/match", json({{"image", "file://" + kImage}, {"texts", {"a"}}}).dump(), "application/json", key);
  EXPECT_EQ(file.status, 403);
  EXPECT_EQ(srv.process().stop(), 0);
}

TEST(ServeLimits, AFullQueueIs503WithRetryAfterAndSigtermFinishesWhatIsInFlight) {
  ServerProcess srv({"--model", "tiny_stage2", "--max-batch", "1", "--max-queue", "1"});
  HttpClient c0(srv.host(), srv.port());
  ASSERT_TRUE(srv.wait_ready(c0));
  // Beam search over 5 beams to the end of the context: slow enough that arrivals pile up.
  const std::string body = json({{"prompt", "the"}, {"num_beams", 5}, {"max_tokens", 60}, {"min_tokens", 60}}).dump();
  std::vector<HttpResponse> out(8);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < out.size(); ++i)
    threads.emplace_back([&, i] { out[i] = HttpClient(srv.host(), srv.port()).post("/v1/completions", body); });
  for (auto& t : threads) t.join();
  int ok = 0, busy = 0;
  for (const auto& r : out) {
    if (r.status == 200) ++ok;
    if (r.status == 503) {
      ++busy;
      EXPECT_EQ(r.header("Retry-After"), "1");
      EXPECT_NE(r.body.find("busy"), std::string::npos) << r.body;
    }
  }
  EXPECT_EQ(ok + busy, 8);
  EXPECT_GE(ok, 1);
  EXPECT_GE(busy, 1);

  // SIGTERM while a streamed beam search runs: new requests are refused, the stream is finished,
  // then the server exits 0.
  json late_body = {{"messages", {{{"role", "user"}, {"content", "the"}}}}, {"num_beams", 5},
                    {"max_tokens", 60}, {"min_tokens", 60}, {"stream", true}};
  HttpResponse late;
  std::atomic<bool> started{false};
  std::thread t([&] {
    late = HttpClient(srv.host(), srv.port()).post_stream("/v1/chat/completions", late_body.dump(), [&](const std::string&) {
      started = true;
      return true;
    });
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ::kill(srv.process().pid(), SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  auto refused = HttpClient(srv.host(), srv.port()).post("/v1/completions", json({{"prompt", "x"}}).dump());
  EXPECT_TRUE(refused.status == 503 || refused.status == 0) << refused.status << " " << refused.body;
  t.join();
  EXPECT_EQ(late.status, 200) << late.body << late.error;
  auto [text, done] = streamed_text(late.body);
  EXPECT_TRUE(done) << late.body;
  EXPECT_EQ(srv.process().wait(30), 0) << srv.process().output();
  EXPECT_NE(srv.process().output().find("stopped"), std::string::npos);
}

TEST(ServeLimits, SigtermCutsOffWhatOutlastsTheDrainTimeout) {
  ServerProcess srv({"--model", "tiny_stage2", "--max-batch", "1", "--drain-timeout", "0"});
  HttpClient c(srv.host(), srv.port());
  ASSERT_TRUE(srv.wait_ready(c));
  // Several long beam searches, one running and the rest queued: with no time to drain, each is
  // answered 503 (not left hanging) and the server still exits 0.
  const std::string body = json({{"prompt", "the"}, {"num_beams", 8}, {"max_tokens", 60}, {"min_tokens", 60}}).dump();
  std::vector<HttpResponse> out(4);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < out.size(); ++i)
    threads.emplace_back([&, i] { out[i] = HttpClient(srv.host(), srv.port()).post("/v1/completions", body); });
  for (int i = 0; i < 200; ++i) {  // until they are in the server
    const auto m = c.get("/metrics").body;
    if (m.find("blip2_queue_length 3") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(srv.process().stop(), 0) << srv.process().output();
  for (auto& t : threads) t.join();
  int cut = 0;
  for (const auto& r : out) {
    EXPECT_TRUE(r.status == 200 || r.status == 503) << r.status << " " << r.body << r.error;
    cut += r.status == 503;
  }
  EXPECT_GE(cut, 1);
}

TEST(ServeLoad, MixedConcurrentLoadHasNoServerErrorsRightAnswersAndStableMemory) {
  ServerProcess srv({"--model", "tiny_stage2", "--stage1", "tiny", "--max-batch", "4"});
  HttpClient c(srv.host(), srv.port());
  ASSERT_TRUE(srv.wait_ready(c));
  LoadOptions o;
  o.host = srv.host();
  o.port = srv.port();
  o.clients = 6;
  o.requests_per_client = 7;
  o.image_base64 = image_b64();
  o.mix = {"caption", "chat_stream", "classify", "match", "chat_sample", "embed", "bad"};
  std::vector<int64_t> rss;
  for (int round = 0; round < 3; ++round) {
    auto res = run_load(o);
    EXPECT_EQ(res.requests, o.clients * o.requests_per_client);
    EXPECT_EQ(res.server_errors, 0) << res.summary().dump();
    EXPECT_EQ(res.unexpected, 0) << res.summary().dump();
    EXPECT_EQ(res.wrong, 0) << res.summary().dump();
    EXPECT_GT(res.expected_4xx, 0);
    rss.push_back(rss_kib(srv.process().pid()));
  }
  // Memory settles after the first round (allocator pools, the decoder's cache rows).
  EXPECT_LT(rss[2], rss[1] * 11 / 10 + 8192) << rss[0] << " " << rss[1] << " " << rss[2];
  // Requests shared decode steps.
  auto m = c.get("/metrics").body;
  const auto count_at = [&](const std::string& key) {
    const auto at = m.find(key);
    return at == std::string::npos ? -1 : std::stoll(m.substr(at + key.size()));
  };
  const auto singles = count_at("blip2_decode_batch_size_bucket{le=\"1\"} ");
  const auto all = count_at("blip2_decode_batch_size_count ");
  const auto at = m.find("blip2_decode_batch_size_sum ");
  const double rows = std::stod(m.substr(at + std::string("blip2_decode_batch_size_sum ").size()));
  EXPECT_GT(all - singles, all / 4) << m;  // a good share of the steps decoded several requests
  EXPECT_GT(rows / static_cast<double>(all), 1.5) << m;
  // Images of concurrent requests went through the ViT together.
  EXPECT_GT(count_at("blip2_image_batch_size_count "), count_at("blip2_image_batch_size_bucket{le=\"1\"} ")) << m;
  EXPECT_EQ(srv.process().stop(), 0);
}
