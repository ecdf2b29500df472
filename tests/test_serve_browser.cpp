// The web page of `blip2 serve`, driven in headless Chromium over WebDriver: an image uploaded,
// a caption streamed into the page (equal to the server's non-streamed answer), label bars drawn
// from /v1/classify, match rows from /v1/match, and a screenshot of the result.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "blip2/serve/client.h"
#include "server_process.h"
#include "blip2/serve/openai.h"
#include "webdriver.h"

using namespace blip2;
using namespace blip2::testing;
using nlohmann::json;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// A JavaScript expression: the data-state of the element with this id.
std::string state_of(const std::string& id) { return "document.getElementById('" + id + "').dataset.state"; }

}  // namespace

TEST(Browser, CaptionStreamsAndLabelBarsShow) {
  // scripts/setup.sh installs both: a machine without them has not been set up.
  ASSERT_TRUE(browser_available()) << "needs /usr/bin/chromium and /usr/bin/chromedriver (run scripts/setup.sh)";
  ServerProcess srv({"--model", "tiny_stage2", "--stage1", "tiny"});
  serve::HttpClient c(srv.host(), srv.port());
  ASSERT_TRUE(srv.wait_ready(c)) << srv.process().output();
  const std::string image = std::string(BLIP2_FIXTURE_DIR) + "/images/rgb.png";
  const int max_tokens = 12;

  {
    WebDriverSession wd;
    wd.navigate("http://" + srv.host() + ":" + std::to_string(srv.port()) + "/");
    EXPECT_TRUE(wd.wait_until(state_of("status") + " === 'ok'", 30)) << wd.text(wd.find("#status"));
    EXPECT_NE(wd.text(wd.find("#status")).find("tiny_stage2"), std::string::npos) << wd.text(wd.find("#status"));

    // The image, read by the page into a data: URL and shown.
    wd.send_keys(wd.find("#file"), image);
    ASSERT_TRUE(wd.wait_until("document.getElementById('preview').naturalWidth > 0", 10));

    // The caption, streamed: equal to the server's non-streamed greedy answer.
    const auto tokens = wd.find("#max-tokens");
    wd.clear(tokens);
    wd.send_keys(tokens, std::to_string(max_tokens));
    const auto answer = wd.find("#answer");
    EXPECT_EQ(wd.attribute(answer, "data-state"), "idle");
    wd.click(wd.find("#caption-btn"));
    ASSERT_TRUE(wd.wait_until(state_of("answer") + " === 'done' || " + state_of("answer") + " === 'error'", 60));
    ASSERT_EQ(wd.attribute(answer, "data-state"), "done") << wd.text(answer);
    // Read as a stream: the role event, at least one content event and the finish event.
    EXPECT_GE(std::stoi(wd.attribute(answer, "data-events")), 3);
    const std::string streamed = wd.execute("return document.getElementById('answer').textContent").get<std::string>();
    EXPECT_FALSE(trim(streamed).empty());
    EXPECT_FALSE(trim(wd.text(answer)).empty());

    const json request = {
        {"messages",
         {{{"role", "user"},
           {"content",
            {{{"type", "text"}, {"text", ""}},
             {{"type", "image_url"},
              {"image_url", {{"url", "data:image/png;base64," + [&] { const auto b = read_bytes(image); return blip2::serve::base64_encode(b.data(), b.size()); }()}}}}}}}}},
        {"max_tokens", max_tokens},
        {"stream", false}};
    const auto r = c.post("/v1/chat/completions", request.dump());
    ASSERT_EQ(r.status, 200) << r.body;
    const std::string direct = json::parse(r.body).at("choices").at(0).at("message").at("content").get<std::string>();
    EXPECT_EQ(trim(streamed), trim(direct));

    // Zero-shot bars: one per label, scores in [0,1] summing to 1, sorted descending.
    const auto labels = wd.find("#labels");
    wd.clear(labels);
    wd.send_keys(labels, "cat, dog, car");
    wd.click(wd.find("#classify-btn"));
    ASSERT_TRUE(wd.wait_until(state_of("bars") + " === 'done' || " + state_of("bars") + " === 'error'", 60));
    ASSERT_EQ(wd.attribute(wd.find("#bars"), "data-state"), "done") << wd.text(wd.find("#bars"));
    const auto bars = wd.find_all("#bars .bar");
    ASSERT_EQ(bars.size(), 3u);
    std::vector<std::string> seen;
    double sum = 0, previous = 2;
    for (const auto& bar : bars) {
      seen.push_back(wd.attribute(bar, "data-label"));
      const double score = std::stod(wd.attribute(bar, "data-score"));
      EXPECT_GE(score, 0.0);
      EXPECT_LE(score, 1.0);
      EXPECT_LE(score, previous) << "bars are not sorted by score, descending";
      previous = score;
      sum += score;
    }
    EXPECT_NEAR(sum, 1.0, 1e-3);
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(seen, (std::vector<std::string>{"car", "cat", "dog"}));

    // Image-text match: one row per text, in input order, ITM a probability.
    const auto texts = wd.find("#texts");
    wd.clear(texts);
    wd.send_keys(texts, "a photo of a cat\na red car");
    wd.click(wd.find("#match-btn"));
    ASSERT_TRUE(wd.wait_until(state_of("matches") + " === 'done' || " + state_of("matches") + " === 'error'", 60));
    ASSERT_EQ(wd.attribute(wd.find("#matches"), "data-state"), "done") << wd.text(wd.find("#matches"));
    const auto rows = wd.find_all("#matches tr.match");
    ASSERT_EQ(rows.size(), 2u);
    EXPECT_EQ(wd.attribute(rows[0], "data-text"), "a photo of a cat");
    EXPECT_EQ(wd.attribute(rows[1], "data-text"), "a red car");
    for (const auto& row : rows) {
      const double itm = std::stod(wd.attribute(row, "data-itm"));
      EXPECT_GE(itm, 0.0);
      EXPECT_LE(itm, 1.0);
    }

    const std::string png = wd.screenshot_png();
    const std::string shot = ::testing::TempDir() + "/blip2_serve_page.png";
    std::ofstream(shot, std::ios::binary) << png;
    EXPECT_EQ(png.compare(0, 8, std::string("\x89PNG\r\n\x1a\n", 8)), 0) << shot;
    EXPECT_GT(png.size(), 10u * 1024) << shot;
  }  // the session ends and chromedriver stops before the server does

  EXPECT_EQ(srv.process().stop(), 0) << srv.process().output();
}
