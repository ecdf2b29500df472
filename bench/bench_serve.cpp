// blip2 serve under load (issue 15): requests/s and p50/p99 latency of captioning at several
// numbers of concurrent clients, with batching across requests on (--max-batch = the most
// clients) and off (--max-batch 1), against the same model's tokens/s in one generate() call over
// a batch of that size. The server is the real binary on loopback; the clients are the repository's
// load client, which also checks every caption against the same request made alone.
//
//   blip2_bench_serve --model DIR_OR_NAME [--clients 1,8,32] [--requests 4] [--max-tokens 16]
//                     [--tokenizer PATH] [--modes on,off]
//
// --requests is per client; captions are greedy, 4 prompts in rotation, one fixture image.
#include <chrono>
#include <iostream>
#include <sstream>

#include "../tests/server_process.h"
#include "blip2/api/api.h"
#include "blip2/serve/client.h"
#include "blip2/serve/load_client.h"
#include "blip2/serve/openai.h"
#include "blip2/text/llm_tokenizer.h"
#include "blip2/util/common.h"

using namespace blip2;

int main(int argc, char** argv) try {
  std::string model, tokenizer, clients_s = "1,8,32", modes_s = "on,off";
  int requests = 4, max_tokens = 16;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] {
      check(i + 1 < argc, a + " needs a value");
      return std::string(argv[++i]);
    };
    if (a == "--model") model = next();
    else if (a == "--tokenizer") tokenizer = next();
    else if (a == "--clients") clients_s = next();
    else if (a == "--modes") modes_s = next();
    else if (a == "--requests") requests = std::stoi(next());
    else if (a == "--max-tokens") max_tokens = std::stoi(next());
    else throw Error("unknown option " + a);
  }
  check(!model.empty(), "usage: blip2_bench_serve --model DIR_OR_NAME [--clients 1,8,32] [--requests 4] "
                        "[--max-tokens 16] [--tokenizer PATH] [--modes on,off]");
  auto split = [](const std::string& s) {
    std::vector<std::string> out;
    std::stringstream in(s);
    for (std::string x; std::getline(in, x, ',');) out.push_back(x);
    return out;
  };
  std::vector<int> clients;
  for (const auto& c : split(clients_s)) clients.push_back(std::stoi(c));
  const int most = *std::max_element(clients.begin(), clients.end());
  const auto png = read_file(std::string(BLIP2_SOURCE_DIR) + "/tests/fixtures/images/rgb.png");

  // One generate() over a batch of B images: the same model's throughput without a server.
  GenerationModelOptions go;
  go.tokenizer = tokenizer;
  auto gm = Blip2GenerationModel::from_pretrained(model, go);
  auto opts = gm.generation_options();
  opts.num_beams = 1;
  opts.do_sample = false;
  opts.max_new_tokens = max_tokens;
  opts.min_new_tokens = std::min<int64_t>(opts.min_new_tokens, max_tokens);
  std::map<int, double> direct;
  for (int b : clients) {
    auto images = gm.preprocess(std::vector<PipelineInput>(static_cast<size_t>(b), PipelineInput{decode_image_bytes(png, "rgb.png")}));
    auto prompt = encode_prompts(*gm.tokenizer(), std::vector<std::string>(static_cast<size_t>(b), "a photo of"), true);
    auto module = gm.module();
    module->generate(images, prompt.ids, prompt.keep, opts);  // warm-up
    std::vector<double> rates;  // the median of 3
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      auto ids = module->generate(images, prompt.ids, prompt.keep, opts);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      int64_t tokens = 0;
      for (const auto& row : ids) tokens += static_cast<int64_t>(row.size());
      rates.push_back(static_cast<double>(tokens) / dt);
    }
    std::sort(rates.begin(), rates.end());
    direct[b] = rates[1];
  }

  std::cout << "| batching | clients | requests | req/s | p50 | p99 | tokens/s | one generate() at that batch, tokens/s | wrong | 5xx |\n"
               "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& mode : split(modes_s)) {
    check(mode == "on" || mode == "off", "--modes: on and/or off");
    std::vector<std::string> args = {"--model", model, "--max-batch", mode == "on" ? std::to_string(most) : "1",
                                     "--max-queue", std::to_string(4 * most + 8)};
    if (!tokenizer.empty()) args.insert(args.end(), {"--tokenizer", tokenizer});
    testing::ServerProcess srv(args, 600);
    serve::HttpClient c(srv.host(), srv.port());
    check(srv.wait_ready(c, 600), "the server did not get ready: " + srv.process().output());
    for (int n : clients) {
      serve::LoadOptions lo;
      lo.host = srv.host();
      lo.port = srv.port();
      lo.clients = n;
      lo.requests_per_client = requests;
      lo.mix = {"caption"};
      lo.variants = 4;
      lo.max_tokens = max_tokens;
      lo.image_base64 = serve::base64_encode(png.data(), png.size());
      auto r = serve::run_load(lo);
      std::printf("| %s | %d | %lld | %.2f | %.3f s | %.3f s | %.1f | %.1f | %lld | %lld |\n", mode.c_str(), n,
                  static_cast<long long>(r.requests), r.requests / r.wall_s, r.percentile("caption", 0.5),
                  r.percentile("caption", 0.99), r.completion_tokens / r.wall_s, direct[n],
                  static_cast<long long>(r.wrong), static_cast<long long>(r.server_errors));
      std::fflush(stdout);
      for (const auto& p : r.problems) std::cerr << "  problem: " << p << std::endl;
    }
    check(srv.process().stop() == 0, "the server did not exit 0 on SIGTERM");
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << first_line(e.what()) << std::endl;
  return 1;
}
