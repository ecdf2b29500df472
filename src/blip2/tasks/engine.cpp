#include "blip2/tasks/engine.h"

#include <chrono>
#include <cmath>
#include <iostream>
#include <set>
#include <sstream>

#include "blip2/dist/dist.h"
#include "blip2/io/checkpoint.h"
#include "blip2/models/layers.h"
#include "blip2/util/common.h"
#include "blip2/util/device.h"

namespace blip2 {
namespace fs = std::filesystem;

namespace {

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

// torch.nn.utils.clip_grad_norm_ without its host read of the norm: the scale stays on the device.
// `sharded`: tensor-parallel shards, whose squares are summed over the tp group (the norm of the
// whole model's gradient, the same on every tp rank).
void clip_gradients(const std::vector<torch::Tensor>& params, double max_norm,
                    const std::set<const void*>& sharded) {
  std::vector<torch::Tensor> whole, shards;
  for (const auto& p : params)
    if (p.grad().defined())
      (sharded.count(p.unsafeGetTensorImpl()) ? shards : whole).push_back(p.grad().detach().norm(2).to(torch::kFloat32));
  if (whole.empty() && shards.empty()) return;
  torch::Tensor total;
  if (shards.empty()) {
    total = torch::stack(whole).norm(2);
  } else {
    auto squares = dist::reduce_from_tp(torch::stack(shards).pow(2).sum());
    if (!whole.empty()) squares = squares + torch::stack(whole).pow(2).sum();
    total = squares.sqrt();
  }
  auto scale = torch::clamp_max(max_norm / (total + 1e-6), 1.0);
  for (const auto& p : params)
    if (p.grad().defined()) p.grad().detach().mul_(scale.to(p.grad().scalar_type()));
}

// The losses of the optimizer steps since the last host read, still on the device.
struct PendingStep {
  StepLog log;
  std::vector<torch::Tensor> values;  // loss, then each part (0-dim, averaged over micro-batches)
};

}  // namespace

double StepLog::part(const std::string& name) const {
  for (const auto& [k, v] : parts)
    if (k == name) return v;
  throw Error("step log has no '" + name + "'");
}

EngineOptions EngineOptions::from(const RunConfig& cfg, torch::Device device) {
  const auto& rc = cfg.runner_config;
  EngineOptions o;
  o.epochs = rc.epochs;
  o.max_steps = rc.max_steps;
  o.accumulation = rc.gradient_accumulation_steps;
  o.log_interval = rc.log_interval;
  o.save_steps = rc.save_steps;
  o.max_grad_norm = rc.max_grad_norm;
  o.autocast = rc.bf16_autocast;
  o.schedule = cfg.lr_schedule;
  o.optimizer = cfg.optimizer;
  o.output_dir = cfg.output_dir;
  o.device = device;
  o.seed = cfg.seed;
  o.gradient_reduction = cfg.parallel_config.gradient_reduction;
  return o;
}

std::vector<StepLog> train(Objective& obj, const BatchLoader& loader, const EngineOptions& o) {
  const int64_t a = o.accumulation;
  const int64_t micro_per_epoch = loader.batches_per_epoch();
  check(a >= 1, "runner_config.gradient_accumulation_steps: " + std::to_string(a) + " must be >= 1");
  check(micro_per_epoch >= a, "runner_config.gradient_accumulation_steps: " + std::to_string(a) +
                                  " batches per optimizer step, but an epoch has only " +
                                  std::to_string(micro_per_epoch));
  const int64_t per_epoch = micro_per_epoch / a;  // optimizer steps; a remainder of batches is dropped
  if (micro_per_epoch % a != 0)
    log_warn(obj.name + ": the last " + std::to_string(micro_per_epoch % a) + " of each epoch's " +
             std::to_string(micro_per_epoch) + " batches are left out (runner_config.gradient_accumulation_steps " +
             std::to_string(a) + " makes steps of " + std::to_string(a) + " batches)");
  const int64_t all = o.epochs * per_epoch;
  const int64_t total = o.schedule.total_steps > 0 ? o.schedule.total_steps : all;
  const int64_t last = o.max_steps >= 0 ? std::min(o.max_steps, all) : all;

  int64_t trainable = 0;
  auto opt = make_adamw(*obj.model, o.optimizer, o.schedule.learning_rate, &trainable);
  const auto params = optimized_parameters(*opt);
  std::set<const void*> sharded;
  ParameterShards param_shards;  // by index in `params`
  {
    const auto shards = tensor_shards(*obj.model);
    std::map<const void*, TensorShard> by_impl;
    for (const auto& p : obj.model->named_parameters())
      if (auto s = shards.find(p.key()); s != shards.end()) {
        sharded.insert(p.value().unsafeGetTensorImpl());
        by_impl[p.value().unsafeGetTensorImpl()] = s->second;
      }
    for (size_t i = 0; i < params.size(); ++i)
      if (auto s = by_impl.find(params[i].unsafeGetTensorImpl()); s != by_impl.end()) param_shards[i] = s->second;
  }
  TrainState st;
  const int64_t batch_size = loader.options().batch_size, dp = dist::dp_size();
  // Every replica starts from rank 0's weights (DDP's broadcast), then draws its own randomness.
  {
    std::vector<torch::Tensor> states = obj.model->parameters();
    for (const auto& b : obj.model->buffers()) states.push_back(b);
    dist::broadcast_parameters(states);
    if (dp > 1) torch::manual_seed(static_cast<uint64_t>(o.seed + dist::dp_rank()));
  }
  if (!o.resume_from.empty()) {
    if (obj.load) obj.load(o.resume_from);
    st = load_train_state(o.resume_from, *opt, o.device, param_shards);
    // The data position counts global micro-batches of the checkpoint's size and accumulation:
    // with other values it would point elsewhere in the epoch.
    check(st.accumulation == 0 || st.accumulation == a,
          "runner_config.gradient_accumulation_steps: " + std::to_string(a) + ", but " + o.resume_from +
              " was written with " + std::to_string(st.accumulation) + " (resume with the same value)");
    check(st.batch_size == 0 || st.batch_size * st.data_parallel == batch_size * dp,
          "runner_config.batch_size: " + std::to_string(batch_size) + " x data_parallel " + std::to_string(dp) +
              ", but " + o.resume_from + " was written with " + std::to_string(st.batch_size) + " x " +
              std::to_string(st.data_parallel) + " (resume with the same global batch)");
  }
  st.batch_size = batch_size;
  st.accumulation = a;
  st.data_parallel = dp;
  st.model_parallel = dist::tp_size();
  dist::GradientSync sync(params, o.gradient_reduction, obj.unused_parameters);
  const bool write = !o.output_dir.empty() && dist::is_main_process();
  std::ofstream metrics;
  if (write) metrics = open_metrics(o.output_dir, st.step);
  log_info(obj.name + ": " + std::to_string(trainable) + " of " + std::to_string(count_parameters(*obj.model)) +
           " parameters trainable" + (sharded.empty() ? std::string() : std::string(" (this rank's tensor-parallel shards)")) +
           ", " + std::to_string(o.epochs) + " epochs x " + std::to_string(per_epoch) +
           " steps" + (a > 1 ? " of " + std::to_string(a) + " accumulated batches" : std::string()) +
           ", device " + o.device.str() + (o.autocast ? ", bf16 autocast" : ""));

  // Every rank takes part (the generators are gathered); the others wait until rank 0 has written.
  auto save = [&]() {
    if (!obj.save || o.output_dir.empty()) return;
    if (dist::is_main_process()) {
      write_checkpoint(o.output_dir, st.step, [&](const fs::path& tmp) {
        obj.save(tmp);
        save_train_state(tmp / "trainer_state.pt", *opt, st, o.device, param_shards);
      });
    } else {
      obj.save({});  // takes part in gathering tensor-parallel shards; writes nothing
      save_train_state({}, *opt, st, o.device, param_shards);
    }
    dist::barrier();
  };

  obj.model->train();
  std::vector<StepLog> logs;
  std::vector<PendingStep> pending;
  int64_t pending_samples = 0;
  auto since = std::chrono::steady_clock::now();
  const auto loop_start = since;
  const double blocked_start = dist::blocked_seconds();
  Progress progress(obj.name, last, o.log_interval);
  // Reads the pending losses back in one copy (the only wait for the device), then logs them.
  auto flush = [&]() {
    if (pending.empty()) return;
    std::vector<torch::Tensor> values;
    for (const auto& p : pending)
      for (const auto& v : p.values) values.push_back(v.reshape({1}).to(torch::kFloat64));
    auto host = torch::cat(values).cpu();
    if (dp > 1) {  // every rank logs the losses averaged over the replicas
      dist::all_reduce(host, dist::Group::dp);
      host.div_(static_cast<double>(dp));
    }
    const auto now = std::chrono::steady_clock::now();
    const double secs = std::chrono::duration<double>(now - since).count();
    since = now;
    const double sps = static_cast<double>(pending_samples) / std::max(secs, 1e-9);
    const double* h = host.data_ptr<double>();
    for (auto& p : pending) {
      StepLog& log = p.log;
      log.loss = *h++;
      for (auto& part : log.parts) part.second = *h++;
      log.samples_per_s = sps;
      check(std::isfinite(log.loss), obj.name + ": the loss became " + std::to_string(log.loss) + " at step " +
                                         std::to_string(log.step) + " (lower the learning rate?)");
      if (write) {
        nlohmann::json j{{"step", log.step}, {"epoch", log.epoch}, {"loss", log.loss}};
        for (const auto& [k, v] : log.parts) j[k] = v;
        j["lr"] = log.lr;
        j["samples_per_s"] = sps;
        metrics << j.dump() << "\n";
      }
      logs.push_back(log);
    }
    if (write) metrics.flush();
    const StepLog& l = logs.back();
    std::string status = "loss " + format_float(l.loss);
    for (const auto& [k, v] : l.parts) status += " " + (k.rfind("loss_", 0) == 0 ? k.substr(5) : k) + " " + format_float(v);
    status += " lr " + format_float(l.lr * 1e4, 3) + "e-4 " + format_float(sps, 1) + " samples/s";
    progress.update(l.step, status);
    pending.clear();
    pending_samples = 0;
  };

  int64_t saved_at = -1;
  for (int64_t epoch = st.epoch; epoch < o.epochs && st.step < last; ++epoch) {
    const int64_t start = epoch == st.epoch ? st.batch : 0;
    BatchLoader::Stream stream(loader, epoch, start, per_epoch * a);  // not the dropped remainder
    for (int64_t b = start; b + a <= per_epoch * a && st.step < last; b += a) {
      const double lr = learning_rate(o.schedule, {st.step, epoch, b / a, a, total, o.epochs});
      set_lr(*opt, lr);
      opt->zero_grad();
      PendingStep p;
      p.log.step = st.step + 1;
      p.log.epoch = epoch;
      p.log.lr = lr;
      for (int64_t m = 0; m < a; ++m) {
        const Batch batch = stream.next().to(o.device);
        const bool last_micro = m == a - 1;  // gradients are averaged over ranks after this one
        sync.begin(last_micro);
        StepLosses out;
        {
          AutocastGuard autocast(o.autocast, o.device);
          out = obj.step(batch);
        }
        auto loss = a > 1 ? out.loss / static_cast<double>(a) : out.loss;
        sync.after_forward(loss, last_micro);
        loss.backward();
        auto add = [&](size_t i, const torch::Tensor& v) {
          auto x = v.detach().to(torch::kFloat32) / static_cast<double>(a);
          if (i < p.values.size()) p.values[i] = p.values[i] + x;
          else p.values.push_back(x);
        };
        add(0, out.loss);
        for (size_t i = 0; i < out.parts.size(); ++i) {
          if (m == 0) p.log.parts.emplace_back(out.parts[i].first, 0.0);
          add(i + 1, out.parts[i].second);
        }
        pending_samples += batch.images.size(0) * dp;
      }
      sync.finish();
      if (o.on_gradients) o.on_gradients(st.step + 1, params);
      if (o.max_grad_norm > 0) clip_gradients(params, o.max_grad_norm, sharded);
      opt->step();
      if (obj.after_update) obj.after_update();
      st.step += 1;
      st.samples += a * batch_size * dp;
      st.batch = b + a;
      st.epoch = epoch;
      if (st.batch + a > per_epoch * a) {
        st.epoch = epoch + 1;
        st.batch = 0;
      }
      pending.push_back(std::move(p));
      if (st.step % o.log_interval == 0 || st.step == last) flush();
      if (o.save_steps > 0 && st.step % o.save_steps == 0) {
        flush();
        save();
        saved_at = st.step;
        since = std::chrono::steady_clock::now();  // throughput counts training, not saving
      }
    }
    if (o.save_steps == 0 && saved_at != st.step) {
      flush();
      save();
      saved_at = st.step;
      since = std::chrono::steady_clock::now();
    }
  }
  flush();
  progress.finish();
  if (saved_at != st.step && !logs.empty()) save();
  if (loader.skipped() > 0) log_warn("skipped " + std::to_string(loader.skipped()) + " unreadable training samples");

  if (!logs.empty() && write) {
    const size_t k = std::max<size_t>(1, std::min<size_t>(20, logs.size() / 5));
    auto mean = [&](size_t begin, size_t end, const std::function<double(const StepLog&)>& f) {
      double s = 0;
      for (size_t i = begin; i < end; ++i) s += f(logs[i]);
      return s / static_cast<double>(end - begin);
    };
    nlohmann::json summary;
    std::string table = "loss        start     end\n";
    std::vector<std::pair<std::string, std::function<double(const StepLog&)>>> columns{
        {"loss", [](const StepLog& l) { return l.loss; }}};
    for (const auto& [name, v] : logs.front().parts)
      columns.emplace_back(name, [name = name](const StepLog& l) { return l.part(name); });
    for (const auto& [name, f] : columns) {
      const double first = mean(0, k, f), end = mean(logs.size() - k, logs.size(), f);
      summary[name] = {{"start", first}, {"end", end}};
      table += name + std::string(name.size() < 12 ? 12 - name.size() : 1, ' ') + format_float(first) + "  " +
               format_float(end) + "\n";
    }
    // Throughput after the first interval (which pays for warm-up).
    size_t from = std::min(logs.size() - 1, static_cast<size_t>(o.log_interval));
    const double sps = mean(from, logs.size(), [](const StepLog& l) { return l.samples_per_s; });
    summary["samples_per_s"] = sps;
    summary["steps"] = st.step;
    std::string comm;
    if (dist::initialized()) {  // rank 0's view: the time its steps waited for the other ranks
      const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - loop_start).count();
      const double waited = dist::blocked_seconds() - blocked_start;
      summary["train_seconds"] = total;
      summary["collective_wait_seconds"] = waited;
      comm = "communication: " + format_float(waited, 2) + " s of " + format_float(total, 2) +
             " s waiting in blocking collectives (" + format_float(100.0 * waited / std::max(total, 1e-9), 1) +
             "%; parallel_config.gradient_reduction " + o.gradient_reduction +
             (o.gradient_reduction == "bucketed" ? ", whose all-reduces overlap backward and are not counted" : "") +
             ")\n";
    }
    bool itm = false;
    for (const auto& [name, v] : logs.front().parts) itm = itm || name == "loss_itm";
    std::cout << "\n" << obj.name << ":\n" << table << "(mean of the first and last " << k << " steps"
              << (itm ? "; ITM at chance: 0.6365" : "") << ")\n"
              << "throughput: " << format_float(sps, 1) << " samples/s\n" << comm;
    atomic_write(fs::path(o.output_dir) / "train_summary.json", summary.dump(2) + "\n");
  }
  return logs;
}

fs::path write_checkpoint(const std::string& output_dir, int64_t step,
                          const std::function<void(const fs::path& tmp)>& fill) {
  const fs::path root = fs::path(output_dir) / "checkpoint";
  const fs::path dir = root / step_dir_name(step);
  const fs::path tmp = root / (step_dir_name(step) + ".tmp");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  fill(tmp);
  fs::remove_all(dir);
  fs::rename(tmp, dir);
  atomic_write(root / "latest", dir.filename().string() + "\n");
  log_info("checkpoint saved: " + dir.string());
  return dir;
}

namespace {

// Every rank's generator state, one row per rank (rank order).
torch::Tensor rank_rows(const torch::Tensor& state) {
  auto row = state.reshape({1, -1}).contiguous();
  return dist::initialized() ? dist::all_gather(row, dist::Group::world) : row;
}

}  // namespace

void save_train_state(const fs::path& file, torch::optim::Optimizer& opt, const TrainState& st,
                      torch::Device device, const ParameterShards& shards) {
  const auto cpu_rows = rank_rows(rng_state(torch::kCPU));
  const auto cuda_rows = device.is_cuda() ? rank_rows(rng_state(device)) : torch::Tensor();
  // The moments of tensor-parallel shards, whole (every rank of the tp group takes part).
  std::vector<std::pair<std::string, torch::Tensor>> whole;
  const auto params = optimized_parameters(opt);
  for (const auto& [i, shard] : shards) {
    auto it = opt.state().find(params[i].unsafeGetTensorImpl());
    if (it == opt.state().end()) continue;  // no step yet: no moments (the same on every rank)
    const auto& a = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    whole.emplace_back("tp_exp_avg_" + std::to_string(i), gather_shards(a.exp_avg(), shard).cpu());
    whole.emplace_back("tp_exp_avg_sq_" + std::to_string(i), gather_shards(a.exp_avg_sq(), shard).cpu());
    if (a.max_exp_avg_sq().defined())
      whole.emplace_back("tp_max_exp_avg_sq_" + std::to_string(i), gather_shards(a.max_exp_avg_sq(), shard).cpu());
  }
  if (file.empty()) return;  // another rank: its generators are in rank 0's file
  torch::serialize::OutputArchive archive;
  opt.save(archive);
  for (const auto& [key, t] : whole) archive.write(key, t);
  archive.write("step", torch::tensor(st.step));
  archive.write("epoch", torch::tensor(st.epoch));
  archive.write("batch", torch::tensor(st.batch));
  archive.write("batch_size", torch::tensor(st.batch_size));
  archive.write("accumulation", torch::tensor(st.accumulation));
  archive.write("data_parallel", torch::tensor(st.data_parallel));
  archive.write("model_parallel", torch::tensor(st.model_parallel));
  archive.write("samples", torch::tensor(st.samples));
  archive.write("rng_cpu", cpu_rows[0].clone());
  archive.write("rng_cpu_ranks", cpu_rows);
  if (device.is_cuda()) {
    archive.write("rng_cuda", cuda_rows[0].clone());
    archive.write("rng_cuda_ranks", cuda_rows);
  }
  archive.save_to(file.string());
}

TrainState load_train_state(const std::string& checkpoint_dir, torch::optim::Optimizer& opt, torch::Device device,
                            const ParameterShards& shards) {
  torch::serialize::InputArchive archive;
  const std::string state_file = (fs::path(checkpoint_dir) / "trainer_state.pt").string();
  auto read = [&](const char* key) {
    torch::Tensor t;  // a fresh tensor per key: read() rebinds its storage
    archive.read(key, t);
    return t;
  };
  auto read_int = [&](const char* key, int64_t fallback) {  // keys an older build did not write
    torch::Tensor t;
    return archive.try_read(key, t) ? t.item<int64_t>() : fallback;
  };
  TrainState st;
  bool reseeded = false;
  try {
    archive.load_from(state_file);
    opt.load(archive);
    // Moments stored whole (written at model_parallel > 1): each parameter takes its slice, or
    // all of them at model_parallel 1; moments a one-process run wrote are whole, and shards here
    // take their slice of those.
    const auto params = optimized_parameters(opt);
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = opt.state().find(params[i].unsafeGetTensorImpl());
      if (it == opt.state().end()) continue;
      auto& a = static_cast<torch::optim::AdamWParamState&>(*it->second);
      const auto shard = shards.find(i);
      auto fit = [&](const char* key, const torch::Tensor& loaded) {
        torch::Tensor t;
        const bool stored = archive.try_read(std::string(key) + std::to_string(i), t);
        if (!stored) t = loaded;
        if (shard != shards.end() && (stored || t.sizes() != params[i].sizes())) t = take_shard(t, shard->second);
        check(t.sizes() == params[i].sizes(),
              state_file + ": the optimizer state of parameter " + std::to_string(i) + " has shape " +
                  shape_str(t.sizes().vec()) + ", the parameter " + shape_str(params[i].sizes().vec()));
        return t.to(params[i].device(), params[i].scalar_type()).contiguous().clone();
      };
      a.exp_avg(fit("tp_exp_avg_", a.exp_avg()));
      a.exp_avg_sq(fit("tp_exp_avg_sq_", a.exp_avg_sq()));
      if (a.max_exp_avg_sq().defined()) a.max_exp_avg_sq(fit("tp_max_exp_avg_sq_", a.max_exp_avg_sq()));
    }
    st.step = read("step").item<int64_t>();
    st.epoch = read("epoch").item<int64_t>();
    st.batch = read("batch").item<int64_t>();
    st.batch_size = read_int("batch_size", 0);
    st.accumulation = read_int("accumulation", 0);
    st.data_parallel = read_int("data_parallel", 1);
    st.model_parallel = read_int("model_parallel", 1);
    st.samples = read_int("samples", 0);
    // Each rank continues its own streams when the world is the one that wrote them.
    auto restore = [&](const char* rows_key, const char* single_key, torch::Device d) {
      torch::Tensor rows;
      if (archive.try_read(rows_key, rows)) {
        if (rows.size(0) != dist::world_size()) return false;
        set_rng_state(d, rows[dist::rank()].clone());
        return true;
      }
      torch::Tensor single;  // a checkpoint of an older, single-process build
      if (dist::world_size() == 1 && archive.try_read(single_key, single)) {
        set_rng_state(d, single);
        return true;
      }
      return false;
    };
    reseeded = !restore("rng_cpu_ranks", "rng_cpu", torch::kCPU);
    if (device.is_cuda()) reseeded = !restore("rng_cuda_ranks", "rng_cuda", device) || reseeded;
  } catch (const c10::Error& e) {
    throw Error(state_file + ": unreadable trainer state (" + first_line(e.what_without_backtrace()).substr(0, 200) +
                ")");
  }
  if (reseeded) {
    // Another world size: the data position carries over, the random streams cannot.
    // Per replica: tensor-parallel peers must keep drawing the same numbers (dropout masks).
    torch::manual_seed(static_cast<uint64_t>(st.step) * 1000003ULL + static_cast<uint64_t>(dist::dp_rank()));
    log_warn(checkpoint_dir + " was written by " + std::to_string(st.data_parallel * st.model_parallel) +
             " rank(s) (data_parallel " + std::to_string(st.data_parallel) + " x model_parallel " +
             std::to_string(st.model_parallel) + "), this run has " + std::to_string(dist::world_size()) +
             ": the data position carries over, the random generators were re-seeded");
  }
  log_info("resuming from " + checkpoint_dir + " at step " + std::to_string(st.step));
  return st;
}

std::string resume_checkpoint_dir(const RunConfig& cfg) {
  check(!cfg.load_checkpoint.empty(), "resume_training needs load_checkpoint (a checkpoint directory)");
  const std::string dir = locate_weights(cfg.load_checkpoint);
  check(fs::is_directory(dir) && fs::exists(fs::path(dir) / "trainer_state.pt"),
        dir + ": cannot resume, no trainer_state.pt (resume needs a training checkpoint)");
  if (auto a = checkpoint_architecture(dir)) {
    const bool theirs = a->config.text_config.has_value(), mine = cfg.model.model_config.text_config.has_value();
    check(theirs == mine, "load_checkpoint: " + a->source + " is a stage-" + (theirs ? "2" : "1") +
                              " checkpoint, but this run trains stage " + (mine ? "2" : "1") +
                              " (resume_training continues a run of the same stage)");
  }
  return dir;
}

std::ofstream open_metrics(const std::string& output_dir, int64_t keep_through) {
  fs::create_directories(output_dir);
  const fs::path path = fs::path(output_dir) / "metrics.jsonl";
  std::string kept;  // a resumed run keeps the lines of the steps its checkpoint covers
  if (keep_through > 0 && fs::exists(path)) {
    std::istringstream in(read_file(path));
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("step", int64_t{0}) <= keep_through) kept += line + "\n";
    }
  }
  atomic_write(path, kept);
  return std::ofstream(path, std::ios::app);
}

}  // namespace blip2
