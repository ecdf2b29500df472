// Several processes on c10d's Gloo backend. The test binary starts itself once per rank (the
// DistRank.Work test, which runs only when BLIP2_TEST_RANK_JOB names a job directory); the
// ranks meet through a FileStore in that directory, and every collective has a timeout, so a
// bug fails a test instead of hanging it.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <thread>
#include <tuple>

#include "blip2/api/runner.h"
#include "blip2/dist/dist.h"
#include "blip2/io/checkpoint.h"
#include "blip2/models/eva_vit.h"
#include "blip2/models/generation.h"
#include "blip2/models/llm/llm.h"
#include "blip2/models/blip2_qformer.h"
#include "blip2/tasks/factory.h"
#include "blip2/tasks/optim.h"
#include "blip2/tasks/stage1.h"
#include "blip2/tasks/stage2.h"
#include "test_util.h"

extern char** environ;

namespace blip2 {
namespace {
namespace fs = std::filesystem;
using namespace blip2::testing;

// ---- the rank side ----

std::string env_or(const char* name, const std::string& fallback = "") {
  const char* v = std::getenv(name);
  return v ? std::string(v) : fallback;
}

// Trains (stage 1 or 2 by the config) and writes what each step logged and the averaged
// gradients it saw: result_rank<R>.pt = {losses [steps, 1 + parts], gradients [steps, n]}.
void train_job(const fs::path& job, const RunConfig& cfg) {
  const int die_rank = std::stoi(env_or("BLIP2_TEST_DIE_RANK", "-1"));
  const int64_t die_step = std::stoll(env_or("BLIP2_TEST_DIE_STEP", "-1"));
  std::vector<torch::Tensor> grads;
  GradientProbe probe = [&](int64_t step, const std::vector<torch::Tensor>& params) {
    if (dist::rank() == die_rank && step == die_step) std::_Exit(3);  // a rank that dies mid-run
    std::vector<torch::Tensor> flat;
    for (const auto& p : params)
      flat.push_back(p.grad().defined() ? p.grad().detach().reshape({-1}).to(torch::kFloat64)
                                        : torch::zeros({p.numel()}, torch::kFloat64));
    grads.push_back(torch::cat(flat));
  };
  std::vector<StepLog> logs;
  if (cfg.model.model_config.text_config) logs = Stage2Task(cfg).train(probe);
  else logs = Stage1Task(cfg).train(probe);
  std::vector<torch::Tensor> rows;
  for (const auto& l : logs) {
    std::vector<double> v{l.loss};
    for (const auto& [name, x] : l.parts) v.push_back(x);
    rows.push_back(torch::tensor(v, torch::kFloat64));
  }
  std::vector<torch::Tensor> out{torch::stack(rows), torch::stack(grads)};
  torch::save(out, (job / ("result_rank" + std::to_string(dist::rank()) + ".pt")).string());
}

void eval_job(const fs::path& job, const RunConfig& cfg) {
  Stage1Task task(cfg);
  nlohmann::json j;
  j["zero_shot"] = task.evaluate_zero_shot();
  auto r = task.evaluate_retrieval();
  r.erase("rerank_seconds");
  r.erase("rerank_images_per_s");
  j["retrieval"] = r;
  const auto ev = task.evaluate();
  j["eval_itc_retrieval"] = ev.itc_retrieval.to_json();
  j["eval_loss_itc"] = ev.loss_itc;
  j["eval_loss_itm"] = ev.loss_itm;
  j["eval_loss"] = ev.loss;
  std::ofstream(job / ("eval_rank" + std::to_string(dist::rank()) + ".json")) << j.dump(2);
}

// BLIP2_TEST_DEVICE=cuda:0 runs these tests' models on that GPU (a device check; with
// BLIP2_DIST_CUDA_BACKEND=gloo several ranks share it). Default: the CPU.
std::string test_device() { return env_or("BLIP2_TEST_DEVICE", "cpu"); }

// ---- tensor parallelism: the same probes at tp 1 (in the test) and tp 2 (in the ranks) ----

TextConfig tp_text_config(const std::string& family) {
  TextConfig c;
  c.type = family == "opt" ? "OPTConfig" : "LlamaConfig";
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_key_value_heads = family == "opt" ? 0 : 2;  // Llama with grouped-query attention
  c.intermediate_size = 64;
  c.vocab_size = 96;
  c.max_position_embeddings = 64;
  c.attention_bias = family == "llama";  // biased column and row layers on both families
  c.tie_word_embeddings = family == "opt";
  c.eos_token_id = 3;
  return c;
}

VisionConfig tp_vision_config() {
  VisionConfig c;
  c.hidden_size = 32;
  c.num_attention_heads = 4;
  c.intermediate_size = 64;
  return c;
}

std::vector<std::string> tp_families() { return {"llama", "opt"}; }

torch::Tensor id_rows(const std::vector<std::vector<int64_t>>& rows) {
  size_t n = 0;
  for (const auto& r : rows) n = std::max(n, r.size());
  auto t = torch::full({static_cast<int64_t>(rows.size()), static_cast<int64_t>(n)}, -1, torch::kLong);
  for (size_t i = 0; i < rows.size(); ++i)
    for (size_t j = 0; j < rows[i].size(); ++j) t[i][j] = rows[i][j];
  return t;
}

// Each parameter's gradient (grad.NAME) and, for a shard, where it lies (shard.NAME = dim, parts,
// rank, size).
void add_gradients(TensorMap& out, const std::string& tag, const torch::nn::Module& m) {
  const auto shards = tensor_shards(m);
  for (const auto& p : m.named_parameters()) {
    out[tag + "grad." + p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::zeros_like(p.value());
    if (auto s = shards.find(p.key()); s != shards.end())
      out[tag + "shard." + p.key()] = torch::tensor({s->second.dim, s->second.parts, int64_t{s->second.rank},
                                                     int64_t{s->second.size}});
  }
}

// Logits, a label-smoothed loss and its gradients (the parameters' and the prefix's), greedy and
// beam-search ids of one LLM; an EVA block's output and gradients.
TensorMap tp_probe(CausalLMImpl& lm, const std::string& tag) {
  TensorMap out;
  const auto& c = lm.config;
  lm.eval();
  torch::manual_seed(7);
  const torch::Device device(test_device());
  auto prefix = torch::randn({2, 3, c.hidden_size}).to(device);
  auto ids = torch::randint(4, c.vocab_size, {2, 5}, torch::kLong);
  auto keep = torch::ones({2, 8}, torch::kLong);
  keep[1][3] = 0;  // a padded prompt position
  ids = ids.to(device);
  keep = keep.to(device);
  const auto positions = positions_from_keep(keep, 8);
  {
    torch::NoGradGuard no_grad;
    out[tag + "logits"] = lm.forward(torch::cat({prefix, lm.embed(ids)}, 1), keep, positions, nullptr).contiguous();
  }
  auto pre = prefix.clone().requires_grad_(true);
  auto local = lm.forward(torch::cat({pre, lm.embed(ids)}, 1), keep, positions, nullptr, false, /*vocab_local=*/true);
  auto labels = torch::cat({torch::full({2, 3}, -100, ids.options()), ids}, 1);
  labels[0][5] = -100;
  auto loss = next_token_loss(local, labels, /*label_smoothing=*/0.1, false, /*vocab_parallel=*/true);
  loss.backward();
  out[tag + "loss"] = loss.detach().reshape({1});
  out[tag + "logits_local_width"] = torch::tensor({local.size(-1)});
  out[tag + "prefix_grad"] = pre.grad().clone();
  add_gradients(out, tag, lm);
  GenerationOptions g;
  g.max_new_tokens = 6;
  g.eos_token_ids = {c.eos_token_id};
  auto prompt = ids.narrow(1, 0, 3), prompt_keep = torch::ones_like(prompt);
  g.num_beams = 1;
  out[tag + "greedy"] = id_rows(generate(lm, prefix, prompt, prompt_keep, g));
  g.num_beams = 3;
  out[tag + "beam"] = id_rows(generate(lm, prefix, prompt, prompt_keep, g));
  return out;
}

TensorMap eva_probe(EvaBlockImpl& block) {
  TensorMap out;
  torch::manual_seed(9);
  auto x = torch::randn({2, 5, 32}).to(torch::Device(test_device()));
  auto y = block.forward(x);
  (y * torch::randn_like(y)).sum().backward();
  out["eva.out"] = y.detach().contiguous().cpu();
  add_gradients(out, "eva.", block);
  return out;
}

// Builds the probes' models (at this process's tp) from the weights the test wrote, runs them.
TensorMap run_tp_probes(const fs::path& job) {
  TensorMap out;
  InitOptions init;
  init.options = init.options.device(torch::Device(test_device()));
  // The whole tensors: gathered from the loaded shards (whole.*), and of a model initialised from
  // the seed (init.*: the shards are the one-process draws).
  auto whole = [&](const std::string& tag, const torch::nn::Module& m) {
    for (const auto& [k, v] : state_dict(m)) out[tag + k] = v.detach().clone();
  };
  for (const auto& f : tp_families()) {
    auto lm = make_causal_lm(tp_text_config(f), init);
    load_into(*lm, load_safetensors((job / (f + ".safetensors")).string()), f);
    whole("whole." + f + ".", *lm);
    for (auto& [k, v] : tp_probe(*lm, f + ".")) out[k] = v;
    torch::manual_seed(0);
    whole("init." + f + ".", *make_causal_lm(tp_text_config(f), init));
  }
  EvaBlock block(tp_vision_config(), init);
  load_into(*block, load_safetensors((job / "eva.safetensors").string()), "eva");
  whole("whole.eva.", *block);
  for (auto& [k, v] : eva_probe(*block)) out[k] = v;
  for (auto& [k, v] : out) v = v.cpu();
  return out;
}

void tp_job(const fs::path& job) {
  dist::Request r;
  r.use_parallel = true;
  r.model_parallel = std::stoi(env_or("WORLD_SIZE", "1"));
  r.config_text = "tp probes";
  dist::init_from_env(r);
  save_safetensors((job / ("tp_rank" + std::to_string(dist::rank()) + ".safetensors")).string(), run_tp_probes(job));
}

// Stage-1 evaluation on a caption dataset: retrieval over each distinct image and caption.
void caption_eval_job(const fs::path& job, const RunConfig& cfg) {
  Stage1Task task(cfg);
  nlohmann::json j;
  j["eval_itc_retrieval"] = task.evaluate().itc_retrieval.to_json();
  auto r = task.evaluate_retrieval();
  r.erase("rerank_seconds");
  r.erase("rerank_images_per_s");
  j["retrieval"] = r;
  std::ofstream(job / ("eval_rank" + std::to_string(dist::rank()) + ".json")) << j.dump(2);
}

TEST(DistRank, Work) {
  const std::string dir = env_or("BLIP2_TEST_RANK_JOB");
  if (dir.empty()) GTEST_SKIP() << "a rank of a multi-process test (started by the Dist tests)";
  const fs::path job(dir);
  const int rank = std::stoi(env_or("RANK", "0"));
  try {
    const std::string name = env_or("BLIP2_TEST_CONFIG", "config.yaml"), kind = read_file(job / "kind");
    if (kind == "tp") {
      tp_job(job);
    } else {
      const RunConfig cfg = load_run_config((job / name).string());
      if (kind == "eval") eval_job(job, cfg);
      else if (kind == "eval_captions") caption_eval_job(job, cfg);
      else train_job(job, cfg);
    }
    dist::shutdown();
  } catch (const std::exception& e) {
    std::ofstream(job / ("error_rank" + std::to_string(rank) + ".txt")) << first_line(e.what());
    std::cerr << "error: " << first_line(e.what()) << std::endl;
    std::_Exit(1);  // at once: the closed connections stop the other ranks
  }
}

// ---- the test side ----

struct Ranks {
  std::vector<int> codes;  // exit codes; -1 = killed at the deadline
  double seconds = 0;
};

// Starts `world` ranks of this binary on `job` and waits for all of them (at most timeout_s).
Ranks run_ranks(const fs::path& job, int world, const std::map<std::string, std::string>& extra = {},
                int timeout_s = 300, const std::map<int, std::map<std::string, std::string>>& per_rank = {}) {
  fs::remove(job / "store");
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    std::map<std::string, std::string> vars{{"RANK", std::to_string(r)}, {"LOCAL_RANK", std::to_string(r)},
                                            {"WORLD_SIZE", std::to_string(world)},
                                            {"LOCAL_WORLD_SIZE", std::to_string(world)},
                                            {"BLIP2_DIST_FILE_STORE", (job / "store").string()},
                                            {"BLIP2_DIST_TIMEOUT_S", "60"}, {"OMP_NUM_THREADS", "1"},
                                            {"BLIP2_TEST_RANK_JOB", job.string()}};
    for (const auto& [k, v] : extra) vars[k] = v;
    if (auto it = per_rank.find(r); it != per_rank.end())
      for (const auto& [k, v] : it->second) vars[k] = v;
    std::vector<std::string> env_strings;
    for (char** e = environ; *e; ++e) {
      const std::string kv(*e);
      if (!vars.count(kv.substr(0, kv.find('=')))) env_strings.push_back(kv);
    }
    for (const auto& [k, v] : vars) env_strings.push_back(k + "=" + v);
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string self = fs::read_symlink("/proc/self/exe").string(), filter = "--gtest_filter=DistRank.Work";
    std::vector<char*> argv{self.data(), filter.data(), nullptr};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    const std::string log = (job / ("log_rank" + std::to_string(r) + ".txt")).string();
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid = 0;
    EXPECT_EQ(posix_spawn(&pid, self.c_str(), &fa, nullptr, argv.data(), envp.data()), 0);
    posix_spawn_file_actions_destroy(&fa);
    pids.push_back(pid);
  }
  Ranks out;
  out.codes.assign(world, -2);
  const auto deadline = t0 + std::chrono::seconds(timeout_s);
  int left = world;
  while (left > 0) {
    for (int r = 0; r < world; ++r) {
      if (out.codes[r] != -2) continue;
      int status = 0;
      if (waitpid(pids[r], &status, WNOHANG) == pids[r]) {
        out.codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        --left;
      }
    }
    if (left > 0 && std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < world; ++r)
        if (out.codes[r] == -2) {
          kill(pids[r], SIGKILL);
          waitpid(pids[r], nullptr, 0);
          out.codes[r] = -1;
        }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

std::string logs_of(const fs::path& job, int world) {
  std::string s;
  for (int r = 0; r < world; ++r) {
    const auto p = job / ("log_rank" + std::to_string(r) + ".txt");
    if (fs::exists(p)) s += "--- rank " + std::to_string(r) + " ---\n" + read_file(p).substr(0, 4000) + "\n";
  }
  return s;
}

void write_job(const fs::path& job, RunConfig cfg, const std::string& kind) {
  fs::remove_all(job);
  fs::create_directories(job);
  cfg.device_target = test_device();
  std::ofstream(job / "config.yaml") << to_yaml(cfg);
  std::ofstream(job / "kind") << kind;
}

// A small stage-1 run on the synthetic data whose steps do not depend on how the global batch
// is split: gathers with gradient, argmax negatives, the LM mean over the global batch's tokens,
// captions padded to each batch's longest (different lengths on the ranks), no dropout.
RunConfig stage1_config(int dp, int64_t global_batch, const fs::path& out) {
  RunConfig c = load_run_config(std::string(BLIP2_CONFIG_DIR) + "/tiny_pretrain_stage_1.yaml");
  c.use_parallel = true;
  c.parallel_config.data_parallel = dp;
  c.runner_config.batch_size = global_batch / dp;
  c.runner_config.epochs = 1;
  c.runner_config.max_steps = 3;
  c.runner_config.log_interval = 1;
  c.runner_config.eval_tasks.clear();
  c.train_dataset.data_loader.num_samples = 64;
  c.train_dataset.text_transforms.padding = "longest";
  c.eval_dataset.data_loader.num_samples = 48;
  c.eval_dataset.batch_size = 10;  // uneven: 5 batches, the last of 8
  c.lr_schedule.warmup_steps = 1;
  auto& m = c.model.model_config;
  m.itc_gather = "with_grad";
  m.itm_negatives = "argmax";
  m.lm_loss_normalization = "global_tokens";
  c.output_dir = out.string();
  return c;
}

// Stage 2 of the tiny preset, three steps of the global batch 8 over dp x tp ranks, the LM mean
// over the global batch's tokens, random weights (not the demo's stage 1), no LLM pretraining.
RunConfig stage2_config(int dp, int tp, const fs::path& out) {
  RunConfig c = load_run_config(std::string(BLIP2_CONFIG_DIR) + "/tiny_pretrain_stage_2.yaml");
  c.use_parallel = true;
  c.parallel_config.data_parallel = dp;
  c.parallel_config.model_parallel = tp;
  c.runner_config.batch_size = 8 / dp;
  c.runner_config.epochs = 1;
  c.runner_config.max_steps = 3;
  c.runner_config.log_interval = 1;
  c.runner_config.llm_pretrain_epochs = 0;
  c.train_dataset.data_loader.num_samples = 64;
  c.lr_schedule.warmup_steps = 1;
  c.model.model_config.lm_loss_normalization = "global_tokens";
  c.model.model_config.checkpoint_name_or_path = "";
  c.output_dir = out.string();
  return c;
}

struct Result {
  torch::Tensor losses, grads;
};

Result result_of(const fs::path& job, int rank = 0) {
  std::vector<torch::Tensor> v;
  torch::load(v, (job / ("result_rank" + std::to_string(rank) + ".pt")).string());
  return {v.at(0), v.at(1)};
}

// |a - b| <= atol + rtol |b| everywhere, with the worst offender in the message.
void expect_close(const torch::Tensor& a, const torch::Tensor& b, double atol, double rtol, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  auto excess = (a - b).abs() - (atol + rtol * b.abs());
  const double worst = excess.max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |a-b| " << (a - b).abs().max().item<double>();
}

Ranks run_or_report(const fs::path& job, int world, const std::map<std::string, std::string>& extra = {}) {
  auto r = run_ranks(job, world, extra);
  for (int code : r.codes) EXPECT_EQ(code, 0) << logs_of(job, world);
  return r;
}

TEST(Dist, Stage1DataParallelEqualsOneProcessOnTheGlobalBatch) {
  const auto root = temp_dir("dist_stage1");
  write_job(root / "one", stage1_config(1, 8, root / "one" / "out"), "train");
  write_job(root / "two", stage1_config(2, 8, root / "two" / "out"), "train");
  run_or_report(root / "one", 1);
  run_or_report(root / "two", 2);
  if (HasFailure()) return;
  const auto one = result_of(root / "one"), two = result_of(root / "two"), two_b = result_of(root / "two", 1);
  ASSERT_EQ(one.losses.size(0), 3);
  expect_close(two.losses, one.losses, 1e-5, 0, "losses, dp 2 x 4 vs 1 x 8");
  expect_close(two.grads, one.grads, 1e-5, 1e-4, "gradients, dp 2 x 4 vs 1 x 8");
  // The replicas stay identical: both ranks hold the same averaged gradients.
  EXPECT_TRUE(torch::equal(two.grads, two_b.grads));
  // The control: with LAVIS' detached gathers the gradients depend on the split, by design.
  auto lavis = stage1_config(2, 8, root / "lavis" / "out");
  lavis.model.model_config.itc_gather = "no_grad";
  write_job(root / "lavis", lavis, "train");
  run_or_report(root / "lavis", 2);
  if (HasFailure()) return;
  const auto detached = result_of(root / "lavis");
  EXPECT_GT(((detached.grads[0] - one.grads[0]).abs() - (1e-5 + 1e-4 * one.grads[0].abs())).max().item<double>(), 0.0)
      << "the comparison cannot tell detached gathers from gathers with gradient";
  // Rank 0 alone wrote the run's files.
  EXPECT_TRUE(fs::exists(root / "two" / "out" / "checkpoint" / "latest"));
  const std::string metrics = read_file(root / "two" / "out" / "metrics.jsonl");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), 3) << metrics;
}

TEST(Dist, LavisDefaultsAtTwoRanksEqualAOneProcessEmulationOfThem) {
  // LAVIS' semantics at 2 ranks, emulated in one process from the model's own pieces: each
  // rank's loss from its own samples with the other side of ITC detached (concat_all_gather is
  // @torch.no_grad, its own slice included), ITM negatives from the whole batch's similarities
  // with every image_embeds carrying gradient (all_gather_with_grad), the LM mean over the rank's
  // own tokens; the replicas' gradients averaged (DDP). Negatives by argmax: sampled ones would
  // compare two ranks' generators, not the semantics.
  const auto root = temp_dir("dist_lavis_emulation");
  auto two = stage1_config(2, 8, root / "two" / "out");
  two.runner_config.max_steps = 1;
  auto& m = two.model.model_config;
  m.itc_gather = "no_grad";
  m.lm_loss_normalization = "local_tokens";
  m.itm_negatives = "argmax";
  write_job(root / "two", two, "train");
  run_or_report(root / "two", 2);
  if (HasFailure()) return;
  const auto ranks = result_of(root / "two");

  auto one = two;
  one.parallel_config.data_parallel = 1;
  one.runner_config.batch_size = 8;
  one.output_dir = (root / "emulation").string();
  Stage1Task task(one);  // the run's seed: rank 0's initial weights, which the ranks share
  auto model = task.model();
  model->train();
  const auto loader = make_batch_loader(one, one.train_dataset, true, task.tokenizer());
  const Batch b = loader.batch(0, 0);
  // Rank r held every 2nd sample of the epoch's order from r; the gathers concatenate in rank order.
  auto order = torch::cat({torch::arange(0, 8, 2), torch::arange(1, 8, 2)});
  auto images = b.images.index_select(0, order), ids = b.ids.index_select(0, order),
       keep = b.keep.index_select(0, order), image_ids = b.image_ids.index_select(0, order).to(torch::kLong);
  const auto& q = model->config().qformer_config;
  auto image_embeds = model->encode_image(images);
  auto query = model->query_pass(image_embeds, /*use_cache=*/true);
  auto feats = model->image_features(query.hidden);
  auto text = model->text_features(model->text_pass(ids, keep));
  torch::Tensor total = torch::zeros({}), itc_sum = torch::zeros({}), itm_sum = torch::zeros({}), lm_sum = torch::zeros({});
  for (int r = 0; r < 2; ++r) {
    auto mine = [&](const torch::Tensor& x) { return x.narrow(0, 4 * r, 4); };
    auto sim_i2t = max_over_queries(mine(feats), text.detach()) / model->temp;
    auto sim_t2i = max_over_queries(feats.detach(), mine(text)).t() / model->temp;
    auto positives = itc_positives(mine(image_ids), image_ids, 4, 8, 4 * r, torch::kCPU);
    auto loss_itc = itc_loss(sim_i2t, sim_t2i, positives, 0.1);
    auto neg = hard_negatives(sim_i2t.detach(), sim_t2i.detach(), positives, /*sample=*/false);
    auto itm = model->itm_logits(
        torch::cat({mine(image_embeds), image_embeds.index_select(0, neg.image_for_text), mine(image_embeds)}),
        torch::cat({mine(ids), mine(ids), ids.index_select(0, neg.text_for_image)}),
        torch::cat({mine(keep), mine(keep), keep.index_select(0, neg.text_for_image)}));
    auto itm_labels = torch::cat({torch::ones({4}, torch::kLong), torch::zeros({8}, torch::kLong)});
    auto loss_itm = torch::nn::functional::cross_entropy(itm, itm_labels);
    std::vector<KVCache> past;
    for (const auto& kv : query.past) past.push_back({mine(kv.key), mine(kv.value)});
    auto [decoder_ids, labels] = lm_inputs(mine(ids), q.bos_token_id, q.pad_token_id);
    auto loss_lm = lm_loss(model->lm_logits(decoder_ids, mine(keep), past), labels, 0.1, false);
    total = total + (loss_itc + loss_itm + loss_lm) / 2;
    itc_sum = itc_sum + loss_itc.detach() / 2;
    itm_sum = itm_sum + loss_itm.detach() / 2;
    lm_sum = lm_sum + loss_lm.detach() / 2;
  }
  total.backward();
  auto opt = make_adamw(*model, one.optimizer, one.lr_schedule.learning_rate);
  std::vector<torch::Tensor> flat;
  for (const auto& p : optimized_parameters(*opt))
    flat.push_back(p.grad().defined() ? p.grad().reshape({-1}).to(torch::kFloat64) : torch::zeros({p.numel()}, torch::kFloat64));
  const auto emulated = torch::tensor({total.item<double>(), itc_sum.item<double>(), itm_sum.item<double>(), lm_sum.item<double>()},
                                      torch::kFloat64);
  expect_close(ranks.losses[0], emulated, 1e-5, 0, "step 1's loss, itc, itm, lm: 2 ranks vs the emulation");
  expect_close(ranks.grads[0], torch::cat(flat), 1e-5, 1e-4, "step 1's averaged gradients: 2 ranks vs the emulation");
}

TEST(Dist, BucketedReducerEqualsCoalescedAllReduce) {
  const auto root = temp_dir("dist_reducer");
  auto bucketed = stage1_config(2, 8, root / "b" / "out");
  auto coalesced = bucketed;
  coalesced.output_dir = (root / "c" / "out").string();
  coalesced.parallel_config.gradient_reduction = "coalesced";
  // LAVIS' defaults this time: sampled negatives, detached gathers, per-rank token means.
  for (auto* c : {&bucketed, &coalesced}) {
    c->model.model_config.itc_gather = "no_grad";
    c->model.model_config.itm_negatives = "sample";
    c->model.model_config.lm_loss_normalization = "local_tokens";
  }
  write_job(root / "b", bucketed, "train");
  write_job(root / "c", coalesced, "train");
  run_or_report(root / "b", 2);
  run_or_report(root / "c", 2);
  if (HasFailure()) return;
  const auto b = result_of(root / "b"), c = result_of(root / "c");
  expect_close(b.losses, c.losses, 1e-6, 0, "losses, Reducer vs coalesced");
  expect_close(b.grads, c.grads, 1e-6, 1e-5, "gradients, Reducer vs coalesced");
}

TEST(Dist, Stage2DataParallelEqualsOneProcessOnTheGlobalBatch) {
  const auto root = temp_dir("dist_stage2");
  write_job(root / "one", stage2_config(1, 1, root / "one" / "out"), "train");
  write_job(root / "two", stage2_config(2, 1, root / "two" / "out"), "train");
  run_or_report(root / "one", 1);
  run_or_report(root / "two", 2);
  if (HasFailure()) return;
  const auto one = result_of(root / "one"), two = result_of(root / "two");
  expect_close(two.losses, one.losses, 1e-5, 0, "stage-2 losses, dp 2 x 4 vs 1 x 8");
  expect_close(two.grads, one.grads, 1e-5, 1e-4, "stage-2 gradients, dp 2 x 4 vs 1 x 8");
}

TEST(Dist, Stage2AtDataParallel2xTensorParallel2EqualsOneProcessAndResumesAcross) {
  // Four ranks (dp 2 x tp 2: the LLM split over each pair) against one process on the same global
  // batch, all from the same whole weights; then a checkpoint of either resumed by the other.
  const auto root = temp_dir("dist_tp_stage2");
  auto make = [&](int dp, int tp, const fs::path& out) {
    RunConfig c = stage2_config(dp, tp, out);
    c.runner_config.save_steps = 1;
    return c;
  };
  // The whole starting weights (LLM included), written by one process.
  auto seed = make(1, 1, root / "seed" / "out");
  seed.runner_config.max_steps = 1;
  seed.runner_config.save_frozen_weights = true;
  write_job(root / "seed", seed, "train");
  run_or_report(root / "seed", 1);
  if (HasFailure()) return;
  const std::string start = (root / "seed" / "out" / "checkpoint" / "step_00000001").string();
  auto from_start = [&](int dp, int tp, const std::string& name) {
    auto c = make(dp, tp, root / name / "out");
    c.model.model_config.checkpoint_name_or_path = start;
    return c;
  };
  write_job(root / "one", from_start(1, 1, "one"), "train");
  write_job(root / "four", from_start(2, 2, "four"), "train");
  run_or_report(root / "one", 1);
  run_or_report(root / "four", 4);
  if (HasFailure()) return;
  const auto one = result_of(root / "one"), four = result_of(root / "four");
  ASSERT_EQ(one.losses.size(0), 3);
  expect_close(four.losses, one.losses, 1e-5, 0, "stage-2 losses, dp 2 x tp 2 x 4 vs 1 x 8");
  expect_close(four.grads, one.grads, 1e-5, 1e-4, "stage-2 gradients, dp 2 x tp 2 x 4 vs 1 x 8");
  for (int rank = 1; rank < 4; ++rank)  // every rank holds the same replicated gradients
    EXPECT_TRUE(torch::allclose(result_of(root / "four", rank).grads, four.grads, 1e-6, 1e-6)) << rank;
  EXPECT_NE(read_file(root / "four" / "log_rank0.txt").find("data_parallel 2 x model_parallel 2"), std::string::npos);
  // Resume step 3 from step 2's checkpoint: the 4-rank one at 1 rank, the 1-rank one at 4.
  for (const auto& [written, dp, world] : {std::tuple{"four", 1, 1}, std::tuple{"one", 2, 4}}) {
    const std::string name = std::string("resume_") + written;
    auto c = from_start(dp, dp, name);
    c.resume_training = true;
    c.load_checkpoint = (root / written / "out" / "checkpoint" / "step_00000002").string();
    write_job(root / name, c, "train");
    run_or_report(root / name, world);
    if (HasFailure()) return;
    const auto resumed = result_of(root / name), whole = result_of(root / written);
    ASSERT_EQ(resumed.losses.size(0), 1) << name;
    expect_close(resumed.losses[0], whole.losses[2], 1e-5, 0, "step 3's losses, " + name);
    expect_close(resumed.grads[0], whole.grads[2], 1e-5, 1e-4, "step 3's gradients, " + name);
  }
}

TEST(Dist, AnLlmPretrainedAtTensorParallel2IsWrittenWholeAndEqualsOneProcess) {
  // Stage 2 of the tiny preset at tp 2 pretrains its random LLM sharded; llm/ and the checkpoint
  // hold the whole tensors under their canonical names, equal to what one process pretrains.
  const auto root = temp_dir("dist_tp_llm");
  RunConfig c = load_run_config(std::string(BLIP2_CONFIG_DIR) + "/tiny_pretrain_stage_2.yaml");
  c.use_parallel = true;
  c.parallel_config.model_parallel = 2;
  c.runner_config.llm_pretrain_epochs = 1;
  c.runner_config.epochs = 1;
  c.runner_config.max_steps = 1;
  c.runner_config.save_frozen_weights = true;
  c.train_dataset.data_loader.num_samples = 128;
  c.model.model_config.checkpoint_name_or_path = "";
  c.output_dir = (root / "out").string();
  c.output_dir = (root / "two" / "out").string();
  auto single = c;
  single.use_parallel = false;
  single.parallel_config.model_parallel = 1;
  single.output_dir = (root / "one" / "out").string();
  write_job(root / "two", c, "train");
  write_job(root / "one", single, "train");
  run_or_report(root / "two", 2);
  run_or_report(root / "one", 1);
  if (HasFailure()) return;
  const auto llm = load_safetensors((root / "two" / "out" / "llm" / "model.safetensors").string());
  const auto ckpt = load_safetensors((root / "two" / "out" / "checkpoint" / "step_00000001" / "model.safetensors").string());
  // The same LLM as one process pretrains: the same initial draws, the same steps (to rounding,
  // which Adam's normalised updates lift to ~1e-5 in the weights; a wrong shard or a duplicated
  // draw is off by the weights' own size, ~0.02).
  const auto one = load_safetensors((root / "one" / "out" / "llm" / "model.safetensors").string());
  ASSERT_EQ(one.size(), llm.size());
  for (const auto& [name, w] : one) expect_close(llm.at(name), w, 1e-4, 1e-4, "pretrained " + name + ", tp 2 vs 1");
  const auto& t = *c.model.model_config.text_config;
  ASSERT_TRUE(llm.count("model.embed_tokens.weight"));
  EXPECT_EQ(llm.at("model.embed_tokens.weight").sizes(), (std::vector<int64_t>{t.vocab_size, t.hidden_size}));
  EXPECT_EQ(llm.at("model.layers.0.mlp.down_proj.weight").sizes(), (std::vector<int64_t>{t.hidden_size, t.ffn_size()}));
  for (const auto& [name, w] : llm) {
    ASSERT_TRUE(ckpt.count("language_model." + name)) << name;
    EXPECT_TRUE(torch::equal(ckpt.at("language_model." + name), w)) << name;
  }
}

TEST(Dist, Stage1AtTensorParallel2EqualsOneProcessAndResumesAcross) {
  // The tiny preset trains its ViT, whose layers split at tp 2: trainable shards, their gradient
  // clipping and their AdamW moments in checkpoints. Four steps at tp 2 against one process; then
  // step 2's checkpoint of each resumed at the other size and at its own: steps 3 and 4 (whose
  // update uses the restored moments) are the ones the writing run took.
  const auto root = temp_dir("dist_tp_stage1");
  auto make = [&](int tp, const fs::path& out) {
    auto c = stage1_config(1, 8, out);
    c.parallel_config.model_parallel = tp;
    c.runner_config.max_steps = 4;
    c.runner_config.save_steps = 1;
    c.runner_config.max_grad_norm = 0.05;  // binds: the norm over the shards must be the whole one
    return c;
  };
  write_job(root / "one", make(1, root / "one" / "out"), "train");
  write_job(root / "tp2", make(2, root / "tp2" / "out"), "train");
  run_or_report(root / "one", 1);
  run_or_report(root / "tp2", 2);
  if (HasFailure()) return;
  const auto one = result_of(root / "one"), tp2 = result_of(root / "tp2");
  ASSERT_EQ(one.losses.size(0), 4);
  expect_close(tp2.losses, one.losses, 1e-5, 1e-5, "stage-1 losses, tp 2 vs 1");
  for (const auto& [written, tp] : {std::pair{"tp2", 1}, std::pair{"one", 2}, std::pair{"tp2", 2}}) {
    const std::string name = std::string("resume_") + written + "_at_tp" + std::to_string(tp);
    auto c = make(tp, root / name / "out");
    c.resume_training = true;
    c.load_checkpoint = (root / written / "out" / "checkpoint" / "step_00000002").string();
    write_job(root / name, c, "train");
    run_or_report(root / name, tp);
    if (HasFailure()) return;
    const auto resumed = result_of(root / name), whole = result_of(root / written);
    ASSERT_EQ(resumed.losses.size(0), 2) << name;
    expect_close(resumed.losses, whole.losses.narrow(0, 2, 2), 1e-5, 1e-5, "steps 3-4's losses, " + name);
  }
}

TEST(Dist, ACheckpointResumesAtAnotherWorldSizeFromTheSameGlobalSample) {
  // Save at dp 2 x 4, resume at dp 1 x 8 (and back): the next step is the one the writing run took.
  const auto root = temp_dir("dist_resume");
  for (const auto& [from, to] : {std::pair{2, 1}, std::pair{1, 2}}) {
    const std::string tag = std::to_string(from) + "to" + std::to_string(to);
    auto first = stage1_config(from, 8, root / ("a" + tag) / "out");
    first.runner_config.save_steps = 1;
    write_job(root / ("a" + tag), first, "train");
    run_or_report(root / ("a" + tag), from);
    auto second = stage1_config(to, 8, root / ("b" + tag) / "out");
    second.resume_training = true;
    second.load_checkpoint = (root / ("a" + tag) / "out" / "checkpoint" / "step_00000002").string();
    write_job(root / ("b" + tag), second, "train");
    run_or_report(root / ("b" + tag), to);
    if (HasFailure()) return;
    const auto whole = result_of(root / ("a" + tag)), resumed = result_of(root / ("b" + tag));
    ASSERT_EQ(resumed.losses.size(0), 1) << tag;
    expect_close(resumed.losses[0], whole.losses[2], 1e-5, 0, "step 3's losses, " + tag);
    expect_close(resumed.grads[0], whole.grads[2], 1e-5, 1e-4, "step 3's gradients, " + tag);
    const std::string log = read_file(root / ("b" + tag) / "log_rank0.txt");
    EXPECT_NE(log.find("the random generators were re-seeded"), std::string::npos) << log;
  }
}

TEST(Dist, TensorParallelEqualsOneProcess) {
  // Llama (GQA, biases) and OPT (tied vocabulary-parallel lm_head) and an EVA block, split over 2
  // ranks and loaded from the whole weights: logits, the vocabulary-parallel label-smoothed loss
  // against PyTorch's cross_entropy, the gradients (each shard's a slice of the whole one),
  // greedy and beam ids.
  const auto job = temp_dir("dist_tp");
  fs::remove_all(job);
  fs::create_directories(job);
  TensorMap ref;
  for (const auto& f : tp_families()) {
    torch::manual_seed(0);
    auto lm = make_causal_lm(tp_text_config(f), InitOptions{});
    save_safetensors((job / (f + ".safetensors")).string(), state_dict(*lm));
  }
  {
    torch::manual_seed(0);
    EvaBlock block(tp_vision_config(), InitOptions{});
    for (auto& p : block->named_parameters())  // nonzero q/v biases
      if (p.key().find("_bias") != std::string::npos) p.value().data().normal_();
    save_safetensors((job / "eva.safetensors").string(), state_dict(*block));
  }
  ref = run_tp_probes(job);  // this process: tp 1
  std::ofstream(job / "kind") << "tp";
  run_or_report(job, 2);
  if (HasFailure()) return;
  for (int rank = 0; rank < 2; ++rank) {
    const auto got = load_safetensors((job / ("tp_rank" + std::to_string(rank) + ".safetensors")).string());
    const std::string r = "rank " + std::to_string(rank) + ": ";
    int shards = 0;
    for (const auto& [name, want] : ref) {
      if (name.find("shard.") != std::string::npos) continue;
      ASSERT_TRUE(got.count(name)) << r << name;
      const auto& have = got.at(name);
      if (name.rfind("whole.", 0) == 0 || name.rfind("init.", 0) == 0 || name.find("greedy") != std::string::npos ||
          name.find("beam") != std::string::npos) {
        EXPECT_TRUE(torch::equal(have, want)) << r << name << "\n" << have << "\n" << want;
      } else if (name.find("logits_local_width") != std::string::npos) {
        EXPECT_EQ(have.item<int64_t>() * 2, want.item<int64_t>()) << r << name;
      } else if (const auto g = name.find("grad."); g != std::string::npos && name.find("prefix_grad") == std::string::npos) {
        const std::string shard_key = name.substr(0, g) + "shard." + name.substr(g + 5);
        torch::Tensor expected = want;
        if (got.count(shard_key)) {
          const auto s = got.at(shard_key);
          expected = take_shard(want, TensorShard{s[0].item<int64_t>(), s[1].item<int64_t>(),
                                                  static_cast<int>(s[2].item<int64_t>()), static_cast<int>(s[3].item<int64_t>())});
          ++shards;
        }
        expect_close(have, expected.contiguous(), 1e-5, 1e-4, r + name);
      } else {
        expect_close(have.to(torch::kFloat64), want.to(torch::kFloat64), 1e-5, 1e-4, r + name);
      }
    }
    // Llama: q k v o gate up down + the q k v biases, x 2 layers, embed, lm_head; OPT: q k v out
    // fc1 fc2 + the q k v fc1 biases, x 2, embed (lm_head tied); EVA: qkv, projection, fc1, fc2,
    // fc1's bias, q_bias, v_bias. (Row layers' biases are whole.)
    EXPECT_EQ(shards, (2 * 10 + 2) + (2 * 10 + 1) + 7) << r << "sharded parameters compared";
  }
}

TEST(Dist, EvaluationAtTwoRanksEqualsOneProcessExactly) {
  // dp 2 (whole batches per rank, features and re-ranking rows sharded) and tp 2 (the ViT split)
  // against one process; ITM negatives sampled as LAVIS does (each batch draws from seed + b).
  const auto root = temp_dir("dist_eval");
  auto c = stage1_config(1, 8, root / "out");
  c.run_mode = "eval";
  c.eval_dataset.k_test = 12;
  c.model.model_config.itm_negatives = "sample";
  auto dp2 = c, tp2 = c;
  dp2.parallel_config.data_parallel = 2;
  tp2.parallel_config.model_parallel = 2;
  write_job(root / "one", c, "eval");
  write_job(root / "two", dp2, "eval");
  write_job(root / "tp2", tp2, "eval");
  run_or_report(root / "one", 1);
  run_or_report(root / "two", 2);
  run_or_report(root / "tp2", 2);
  if (HasFailure()) return;
  const auto one = nlohmann::json::parse(read_file(root / "one" / "eval_rank0.json"));
  for (const char* name : {"two", "tp2"}) {
    const auto other = nlohmann::json::parse(read_file(root / name / "eval_rank0.json"));
    EXPECT_EQ(one["zero_shot"], other["zero_shot"]) << name;
    EXPECT_EQ(one["retrieval"], other["retrieval"]) << name;
    EXPECT_EQ(one["eval_itc_retrieval"], other["eval_itc_retrieval"]) << name;
    // The same batches and negatives: the loss sums agree to rounding.
    for (const char* loss : {"eval_loss_itc", "eval_loss_itm", "eval_loss"})
      EXPECT_NEAR(one[loss].get<double>(), other[loss].get<double>(), 1e-6) << name << " " << loss;
    EXPECT_EQ(other["retrieval"], nlohmann::json::parse(read_file(root / name / "eval_rank1.json"))["retrieval"]) << name;
  }
}

TEST(Dist, CaptionRetrievalEvaluationAtTwoRanksEqualsOneProcessExactly) {
  // A COCO-style test split (4 images, 8 captions, batches of 1 image / 3 texts: uneven shards).
  const auto root = temp_dir("dist_caption_eval");
  fs::remove_all(root);
  const fs::path fixtures = BLIP2_FIXTURE_DIR;
  nlohmann::json ann = nlohmann::json::array();
  const std::vector<std::pair<std::string, std::vector<std::string>>> images{
      {"rgb_420.jpg", {"a man riding a horse", "a horse on a beach"}},
      {"grey.jpg", {"a sleeping cat", "cat on a sofa", "a grey cat"}},
      {"cmyk.jpg", {"a red bus"}},
      {"rgb.png", {"two dogs playing", "dogs in a park"}}};
  for (const auto& [file, captions] : images) {
    fs::create_directories(root / "images");
    fs::copy_file(fixtures / "images" / file, root / "images" / file);
    ann.push_back({{"image", file}, {"caption", captions}});
  }
  std::ofstream(root / "test.json") << ann.dump();
  std::string cfg = read_file(fs::path(BLIP2_CONFIG_DIR) / "tiny_pretrain_stage_1.yaml");
  const std::string vocab = (fixtures / "text" / "vocab_uncased.txt").string();
  auto replace = [&](const std::string& from, const std::string& to) {
    const auto at = cfg.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    cfg.replace(at, from.size(), to);
  };
  replace("    type: SyntheticShapes\n    stage: eval\n    shuffle: false\n    num_samples: 256",
          "    type: MultiImgCapDataLoader\n    dataset_dir: " + root.string() +
              "\n    annotation_files: [test.json]\n    image_dirs: [images]\n    stage: eval");
  replace("    vocab_file: \"\"", "    vocab_file: " + vocab);
  replace("  tokenizer:\n    type: BertTokenizer\n    max_length: 16\n  batch_size: 64",
          "  tokenizer:\n    type: BertTokenizer\n    max_length: 16\n    vocab_file: " + vocab + "\n  batch_size: 3");
  replace("vocab_size: 50\n      special_token_nums: 1\n      bos_token_id: 50",
          "vocab_size: 439\n      special_token_nums: 1\n      bos_token_id: 439");
  if (HasFailure()) return;
  RunConfig c = parse_run_config(cfg, "caption_eval.yaml");
  c.processor.tokenizer.vocab_file = vocab;
  c.run_mode = "eval";
  c.use_parallel = true;
  c.eval_dataset.k_test = 10;  // more than there are candidates: every pair re-ranked
  c.runner_config.eval_tasks = {"image_to_text_retrieval"};
  c.model.model_config.itm_negatives = "sample";
  auto two = c;
  two.parallel_config.data_parallel = 2;
  write_job(root / "one", c, "eval_captions");
  write_job(root / "two", two, "eval_captions");
  run_or_report(root / "one", 1);
  run_or_report(root / "two", 2);
  if (HasFailure()) return;
  const auto one_j = nlohmann::json::parse(read_file(root / "one" / "eval_rank0.json"));
  const auto two_j = nlohmann::json::parse(read_file(root / "two" / "eval_rank0.json"));
  EXPECT_EQ(one_j["eval_itc_retrieval"]["num_images"], 4);
  EXPECT_EQ(one_j["eval_itc_retrieval"]["num_texts"], 8);
  EXPECT_EQ(one_j["eval_itc_retrieval"], two_j["eval_itc_retrieval"]);
  EXPECT_EQ(one_j["retrieval"], two_j["retrieval"]);
}

TEST(Dist, ARankThatDiesStopsTheOthersWithAMessageAndKeepsTheLastCheckpoint) {
  const auto root = temp_dir("dist_die");
  auto c = stage1_config(2, 8, root / "out");
  c.runner_config.save_steps = 1;
  write_job(root, c, "train");
  const auto r = run_ranks(root, 2, {{"BLIP2_TEST_DIE_RANK", "1"}, {"BLIP2_TEST_DIE_STEP", "2"}}, 120);
  EXPECT_EQ(r.codes[1], 3);
  EXPECT_EQ(r.codes[0], 1) << logs_of(root, 2);  // an error, not a hang (-1) or a crash
  EXPECT_LT(r.seconds, 60.0) << "the surviving rank waited for its timeout";
  const std::string msg = fs::exists(root / "error_rank0.txt") ? read_file(root / "error_rank0.txt") : "";
  EXPECT_NE(msg.find("rank 0:"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  // Step 1's checkpoint is complete, and nothing half-written is named latest.
  EXPECT_EQ(read_file(root / "out" / "checkpoint" / "latest"), "step_00000001\n");
  EXPECT_TRUE(fs::exists(root / "out" / "checkpoint" / "step_00000001" / "trainer_state.pt"));
}

TEST(Dist, RanksWithDifferentConfigsAreRefusedByEveryRank) {
  const auto root = temp_dir("dist_mismatch");
  auto c = stage1_config(2, 8, root / "out");
  write_job(root, c, "train");
  c.lr_schedule.learning_rate *= 2;
  std::ofstream(root / "other.yaml") << to_yaml(c);
  const auto r = run_ranks(root, 2, {}, 120, {{1, {{"BLIP2_TEST_CONFIG", "other.yaml"}}}});
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_EQ(r.codes[rank], 1) << logs_of(root, 2);
    const auto f = root / ("error_rank" + std::to_string(rank) + ".txt");
    const std::string msg = fs::exists(f) ? read_file(f) : "";
    EXPECT_NE(msg.find("rank " + std::to_string(rank) + ": the resolved config of rank(s) 1 differs from rank 0's"),
              std::string::npos) << msg;
  }
}

TEST(Dist, LauncherMistakesAreOneLineErrors) {
  const auto root = temp_dir("dist_env");
  auto c = stage1_config(2, 8, root / "out");
  std::ofstream(root / "dp2.yaml") << to_yaml(c);
  const std::string cfg = " run --config " + (root / "dp2.yaml").string();
  // Nobody listens at this MASTER_ADDR:MASTER_PORT: a bounded wait, then the address in one line.
  auto r = run_program("WORLD_SIZE=2 RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=9 BLIP2_DIST_TIMEOUT_S=2 " +
                           std::string(BLIP2_CLI), cfg);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("rank 1: cannot reach the rendezvous store at MASTER_ADDR:MASTER_PORT 127.0.0.1:9"),
            std::string::npos) << r.out;
  r = run_program("WORLD_SIZE=2 RANK=0 " + std::string(BLIP2_CLI), cfg);
  EXPECT_NE(r.out.find("MASTER_ADDR is not set"), std::string::npos) << r.out;
  r = run_program("WORLD_SIZE=4 RANK=0 " + std::string(BLIP2_CLI), cfg);
  EXPECT_NE(r.out.find("data_parallel 2 x model_parallel 1 = 2 cards, but WORLD_SIZE is 4"), std::string::npos) << r.out;
  r = run_program(BLIP2_CLI, cfg);  // no launcher
  EXPECT_NE(r.out.find("= 2 cards, but WORLD_SIZE is 1 (start the ranks with torchrun"), std::string::npos) << r.out;
  r = run_program("WORLD_SIZE=2 RANK=0 " + std::string(BLIP2_CLI),  // the tiny config: use_parallel false
                  " run --output_dir " + (root / "tiny").string());
  EXPECT_NE(r.out.find("WORLD_SIZE=2 but use_parallel is false"), std::string::npos) << r.out;
}

TEST(Dist, TorchrunTrainsTheTinyPresetEndToEnd) {
  // torchrun is the Python that setup.sh gave the build its torch (python -m torch.distributed.run).
  const auto root = temp_dir("dist_torchrun");
  // The preset's own settings (LAVIS' semantics), on two ranks, briefly.
  auto c = load_run_config(std::string(BLIP2_CONFIG_DIR) + "/tiny_pretrain_stage_1.yaml");
  c.use_parallel = true;
  c.parallel_config.data_parallel = 2;
  c.runner_config.batch_size = 32;
  c.runner_config.epochs = 1;
  c.runner_config.max_steps = 6;
  c.runner_config.log_interval = 2;
  c.runner_config.eval_tasks = {"zero_shot_image_classification"};
  c.eval_dataset.data_loader.num_samples = 64;
  c.output_dir = (root / "out").string();
  std::ofstream(root / "dp2.yaml") << to_yaml(c);
  const auto r = run_program("OMP_NUM_THREADS=1 " + std::string(BLIP2_PYTHON),
                             "-m torch.distributed.run --standalone --nproc_per_node 2 --no-python " +
                                 std::string(BLIP2_CLI) + " run --config " + (root / "dp2.yaml").string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("rank 0 of 2: data_parallel 2 x model_parallel 1"), std::string::npos) << r.out;
  const std::string metrics = read_file(root / "out" / "metrics.jsonl");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), 6) << metrics;
  EXPECT_EQ(read_file(root / "out" / "checkpoint" / "latest"), "step_00000006\n");
  EXPECT_TRUE(fs::exists(root / "out" / "zero_shot_eval_results.json"));
  // Results are printed once (rank 0), not once per rank.
  size_t printed = 0;
  for (size_t at = r.out.find("held-out zero-shot"); at != std::string::npos; at = r.out.find("held-out zero-shot", at + 1))
    ++printed;
  EXPECT_EQ(printed, 1u) << r.out;
}

}  // namespace
}  // namespace blip2
