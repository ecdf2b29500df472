// The one file that includes c10d's backends (see dist.h).
#include "blip2/dist/dist.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include "blip2/util/common.h"

#if !defined(USE_C10D_GLOO)
#error "blip2cpp's dist needs a torch built with Gloo (USE_C10D_GLOO)"
#endif

namespace blip2::dist {

namespace {

using PG = c10::intrusive_ptr<c10d::ProcessGroup>;

bool local_scope = false;  // see LocalScope (no-grad evaluation only: one flag, any thread)

struct State {
  bool checked = false;  // init_from_env ran (with or without a group)
  int rank = 0, world = 1, local_rank = 0, dp = 1, tp = 1;
  std::chrono::milliseconds timeout{300000};
  c10::intrusive_ptr<c10d::Store> store;
  PG world_group, dp_group, tp_group;
  int64_t string_rounds = 0;
};

State& state() {
  static State s;
  return s;
}

std::string env(const char* name, const std::string& fallback = "") {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

int64_t env_int(const char* name, int64_t fallback) {
  const std::string v = env(name);
  if (v.empty()) return fallback;
  try {
    size_t used = 0;
    const long long x = std::stoll(v, &used);
    if (used == v.size()) return x;
  } catch (const std::exception&) {
  }
  throw Error(std::string(name) + "=" + v + ": not an integer");
}

// The first line of an exception from c10d/gloo, without LibTorch's C++ stack.
std::string first_message(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return first_line(c->what_without_backtrace());
  return first_line(e.what());
}

// Runs one collective and waits for it; a failure (a peer gone, a timeout) becomes one line naming
// this rank.
double blocked_s = 0;  // wall time spent in run(): see blocked_seconds()

void run(const PG& pg, const char* what, const std::function<c10::intrusive_ptr<c10d::Work>(c10d::ProcessGroup&)>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    auto work = f(*pg);
    work->wait();
    blocked_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } catch (const std::exception& e) {
    throw Error(describe_failure(std::string(what) + ": " + first_message(e)));
  }
}

// One Gloo device per interface of GLOO_SOCKET_IFNAME (comma-separated, as torch reads it), or
// the default one.
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices() {
  std::vector<std::shared_ptr<::gloo::transport::Device>> out;
  const std::string ifaces = env("GLOO_SOCKET_IFNAME");
  for (size_t at = 0; !ifaces.empty() && at <= ifaces.size();) {
    const size_t comma = std::min(ifaces.find(',', at), ifaces.size());
    const std::string iface = ifaces.substr(at, comma - at);
    check(!iface.empty(), "GLOO_SOCKET_IFNAME=" + ifaces + ": an empty interface name");
    try {
      out.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } catch (const std::exception& e) {
      throw Error("rank " + std::to_string(rank()) + ": GLOO_SOCKET_IFNAME=" + ifaces + ": " + iface + ": " +
                  first_message(e));
    }
    at = comma + 1;
  }
  if (out.empty()) out.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return out;
}

// BLIP2_DIST_CUDA_BACKEND: how CUDA tensors travel (see make_group).
std::string cuda_backend() {
  const std::string b = env("BLIP2_DIST_CUDA_BACKEND", "nccl");
  check(b == "nccl" || b == "gloo", "BLIP2_DIST_CUDA_BACKEND=" + b + ": expected nccl or gloo");
  return b;
}

// A process group of `size` ranks meeting under `prefix` in the store; this process is `rank`.
PG make_group(const std::string& prefix, int rank, int size) {
  State& s = state();
  auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, s.store);
  auto options = c10d::ProcessGroupGloo::Options::create(s.timeout);
  options->devices = gloo_devices();
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  // CUDA tensors: NCCL (one GPU per rank), or Gloo through host copies (several ranks may then
  // share a GPU) with BLIP2_DIST_CUDA_BACKEND=gloo, and always in a build without NCCL.
#ifdef USE_C10D_NCCL
  if (torch::cuda::is_available() && cuda_backend() == "nccl") {
    auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
    nccl_options->timeout = s.timeout;
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, nccl_options);
    pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
    return pg;
  }
#endif
  pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::GLOO, gloo);
  return pg;
}

const PG& group(Group g) {
  State& s = state();
  static const PG none;
  if (g == Group::dp && local_scope) return none;
  switch (g) {
    case Group::world: return s.world_group;
    case Group::dp: return s.dp_group;
    case Group::tp: return s.tp_group;
  }
  return s.world_group;
}

int group_size(Group g) {
  switch (g) {
    case Group::world: return world_size();
    case Group::dp: return dp_size();
    case Group::tp: return tp_size();
  }
  return 1;
}

// FNV-1a, enough to tell configs apart.
std::string digest(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

void connect_store() {
  State& s = state();
  const std::string file = env("BLIP2_DIST_FILE_STORE");
  const std::string restart = env("TORCHELASTIC_RESTART_COUNT", "0");
  c10::intrusive_ptr<c10d::Store> store;
  if (!file.empty()) {
    try {
      store = c10::make_intrusive<c10d::FileStore>(file, s.world);
    } catch (const std::exception& e) {
      throw Error("rank " + std::to_string(s.rank) + ": BLIP2_DIST_FILE_STORE=" + file + ": " + first_message(e));
    }
  } else {
    const std::string host = env("MASTER_ADDR");
    const int64_t port = env_int("MASTER_PORT", -1);
    check(!host.empty(), "WORLD_SIZE=" + std::to_string(s.world) +
                             " but MASTER_ADDR is not set (launch with torchrun, or set MASTER_ADDR and MASTER_PORT)");
    check(port > 0 && port < 65536, "WORLD_SIZE=" + std::to_string(s.world) +
                                        ": MASTER_PORT must be a port number (1-65535)");
    const bool agent = env("TORCHELASTIC_USE_AGENT_STORE") == "True";
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = !agent && s.rank == 0;  // under torchrun the agent hosts the store
    o.numWorkers = static_cast<size_t>(s.world);
    o.waitWorkers = o.isServer;
    o.timeout = s.timeout;
    try {
      store = c10::make_intrusive<c10d::TCPStore>(host, o);
    } catch (const std::exception& e) {
      throw Error("rank " + std::to_string(s.rank) + ": cannot " + (o.isServer ? "host" : "reach") +
                  " the rendezvous store at MASTER_ADDR:MASTER_PORT " + host + ":" + std::to_string(port) + " (" +
                  first_message(e) + ")");
    }
  }
  s.store = c10::make_intrusive<c10d::PrefixStore>("blip2/attempt_" + restart, store);
}

}  // namespace

double blocked_seconds() { return blocked_s; }

std::string describe_failure(const std::string& what) {
  return "rank " + std::to_string(rank()) + ": " + what +
         " (another rank probably stopped or timed out; its own message says why)";
}

void init_from_env(const Request& r) {
  State& s = state();
  const int64_t world = env_int("WORLD_SIZE", 1);
  check(world >= 1, "WORLD_SIZE=" + std::to_string(world) + " must be >= 1");
  check(r.pipeline_stage == 1, "parallel_config.pipeline_stage: " + std::to_string(r.pipeline_stage) +
                                   ": pipeline parallelism is not implemented (1 = none)");
  const int64_t cards = r.use_parallel ? r.data_parallel * r.model_parallel : 1;
  // The variables read below are checked in one process too (never accepted and ignored).
  const int64_t timeout_s = env_int("BLIP2_DIST_TIMEOUT_S", 300);
  check(timeout_s > 0, "BLIP2_DIST_TIMEOUT_S must be positive");
  cuda_backend();
  if (s.checked) {
    check(cards == s.dp * s.tp && (!r.use_parallel || (r.data_parallel == s.dp && r.model_parallel == s.tp)),
          "parallel_config: data_parallel " + std::to_string(r.data_parallel) + " x model_parallel " +
              std::to_string(r.model_parallel) + " differs from the running mesh " + std::to_string(s.dp) + " x " +
              std::to_string(s.tp));
    return;
  }
  if (r.use_parallel)
    check(cards == world, "use_parallel: parallel_config data_parallel " + std::to_string(r.data_parallel) +
                              " x model_parallel " + std::to_string(r.model_parallel) + " = " +
                              std::to_string(cards) + " cards, but WORLD_SIZE is " + std::to_string(world) +
                              (world == 1 ? " (start the ranks with torchrun --nproc_per_node N)" : ""));
  else
    check(world == 1, "WORLD_SIZE=" + std::to_string(world) +
                          " but use_parallel is false: set use_parallel: true and parallel_config data_parallel x "
                          "model_parallel = " + std::to_string(world));
  s.checked = true;
  if (world == 1) return;

  s.world = static_cast<int>(world);
  s.rank = static_cast<int>(env_int("RANK", -1));
  check(s.rank >= 0 && s.rank < s.world, "RANK=" + env("RANK") + " must be in [0, WORLD_SIZE=" +
                                             std::to_string(world) + ")");
  s.local_rank = static_cast<int>(env_int("LOCAL_RANK", 0));
  s.dp = static_cast<int>(r.data_parallel);
  s.tp = static_cast<int>(r.model_parallel);
  s.timeout = std::chrono::milliseconds(timeout_s * 1000);
  try {
    connect_store();

    // Every rank must run the same resolved config: compare digests through the store.
    const auto digests = all_gather_strings(digest(r.config_text), "config");
    std::string differ;
    for (int i = 1; i < s.world; ++i)
      if (digests[i] != digests[0]) differ += (differ.empty() ? "" : ", ") + std::to_string(i);
    check(differ.empty(), "rank " + std::to_string(s.rank) + ": the resolved config of rank(s) " + differ +
                              " differs from rank 0's: every rank must run the same config");

    try {
      s.world_group = make_group("world", s.rank, s.world);
      if (s.dp > 1) s.dp_group = make_group("dp/" + std::to_string(tp_rank()), dp_rank(), s.dp);
      if (s.tp > 1) s.tp_group = make_group("tp/" + std::to_string(dp_rank()), tp_rank(), s.tp);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(describe_failure("connecting to the other ranks: " + first_message(e)));
    }
  } catch (...) {
    s = State{};
    s.checked = false;
    throw;
  }
  // The CPU cores are shared by this machine's ranks: without OMP_NUM_THREADS (torchrun sets 1),
  // each takes its share instead of all of them (oversubscribed, every rank slows down).
  if (env("OMP_NUM_THREADS").empty()) {
    const int64_t local = std::max<int64_t>(1, env_int("LOCAL_WORLD_SIZE", s.world));
    const int64_t cores = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
    torch::set_num_threads(static_cast<int>(std::max<int64_t>(1, cores / local)));
  }
  set_log_rank(s.rank);
  log_info("rank " + std::to_string(s.rank) + " of " + std::to_string(s.world) + ": data_parallel " +
           std::to_string(s.dp) + " x model_parallel " + std::to_string(s.tp) + ", collectives time out after " +
           std::to_string(timeout_s) + " s, " + std::to_string(torch::get_num_threads()) + " CPU thread(s) per rank");
}

bool initialized() { return static_cast<bool>(state().world_group); }

void shutdown() {
  if (initialized()) barrier();
  state() = State{};
  set_log_rank(-1);
}

int rank() { return state().rank; }
int world_size() { return state().world; }
int local_rank() { return state().local_rank; }
int dp_rank() { return state().rank / state().tp; }
int dp_size() { return state().dp; }
int tp_rank() { return state().rank % state().tp; }
int tp_size() { return state().tp; }

int batch_rank() { return local_scope ? 0 : dp_rank(); }
int batch_ranks() { return local_scope ? 1 : dp_size(); }
LocalScope::LocalScope() : outer_(local_scope) { local_scope = true; }
LocalScope::~LocalScope() { local_scope = outer_; }

void combine_rows(torch::Tensor& t) { all_reduce(t, Group::dp); }

void all_reduce(torch::Tensor& t, Group g, bool max) {
  const PG& pg = group(g);
  if (!pg) return;
  check(t.is_contiguous(), "dist::all_reduce needs a contiguous tensor");
  std::vector<torch::Tensor> ts{t};
  c10d::AllreduceOptions o;
  o.reduceOp = max ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  run(pg, "all_reduce", [&](c10d::ProcessGroup& p) { return p.allreduce(ts, o); });
}

torch::Tensor all_gather(const torch::Tensor& t, Group g) {
  const PG& pg = group(g);
  if (!pg) return t;
  auto in = t.contiguous();
  std::vector<std::vector<torch::Tensor>> out(1);
  for (int i = 0; i < group_size(g); ++i) out[0].push_back(torch::empty_like(in));
  std::vector<torch::Tensor> ins{in};
  run(pg, "all_gather", [&](c10d::ProcessGroup& p) { return p.allgather(out, ins); });
  return torch::cat(out[0], 0);
}

void broadcast(torch::Tensor& t, int root, Group g) {
  const PG& pg = group(g);
  if (!pg) return;
  check(t.is_contiguous(), "dist::broadcast needs a contiguous tensor");
  std::vector<torch::Tensor> ts{t};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  run(pg, "broadcast", [&](c10d::ProcessGroup& p) { return p.broadcast(ts, o); });
}

void barrier() {
  const PG& pg = group(Group::world);
  if (!pg) return;
  // A tiny all-reduce rather than Gloo's barrier: it carries the same timeout and failure path.
  auto t = torch::zeros({1});
  all_reduce(t, Group::world);
}

int64_t max_over(int64_t value, Group g) {
  if (!group(g)) return value;
  auto t = torch::tensor({value}, torch::kLong);
  all_reduce(t, g, /*max=*/true);
  return t.item<int64_t>();
}

std::vector<std::string> all_gather_strings(const std::string& value, const std::string& key) {
  State& s = state();
  if (!s.store) return {value};
  const std::string base = "strings/" + key + "/" + std::to_string(s.string_rounds++) + "/";
  std::vector<std::string> out;
  try {
    s.store->set(base + std::to_string(s.rank), std::vector<uint8_t>(value.begin(), value.end()));
    for (int i = 0; i < s.world; ++i) {
      const auto v = s.store->get(base + std::to_string(i));  // waits up to the store's timeout
      out.emplace_back(v.begin(), v.end());
    }
  } catch (const std::exception& e) {
    throw Error(describe_failure("waiting for every rank's '" + key + "': " + first_message(e)));
  }
  return out;
}

namespace {

struct GatherWithGrad : torch::autograd::Function<GatherWithGrad> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& t) {
    ctx->saved_data["rows"] = t.size(0);
    return all_gather(t.detach(), Group::dp);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const int64_t rows = ctx->saved_data["rows"].toInt();
    auto g = grads[0].contiguous().clone();
    all_reduce(g, Group::dp);
    return {g.narrow(0, batch_rank() * rows, rows)};
  }
};

}  // namespace

torch::Tensor all_gather_no_grad(const torch::Tensor& t) {
  torch::NoGradGuard no_grad;
  return all_gather(t.detach(), Group::dp);
}

torch::Tensor all_gather_with_grad(const torch::Tensor& t) {
  if (!group(Group::dp)) return t;
  return GatherWithGrad::apply(t);
}

namespace {

bool has_tp() { return tp_size() > 1 && group(Group::tp); }

struct CopyToTp : torch::autograd::Function<CopyToTp> {
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x) { return x.view_as(x); }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    auto g = grads[0].contiguous().clone();
    all_reduce(g, Group::tp);
    return {g};
  }
};

struct ReduceFromTp : torch::autograd::Function<ReduceFromTp> {
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x) {
    auto y = x.detach().contiguous().clone();
    all_reduce(y, Group::tp);
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0]};
  }
};

torch::Tensor gather_parts(const torch::Tensor& x, int64_t dim) {
  auto parts = all_gather(x.detach().contiguous().unsqueeze(0), Group::tp);  // [tp, ...]
  return torch::cat(parts.unbind(0), dim);
}

struct GatherFromTp : torch::autograd::Function<GatherFromTp> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, int64_t dim) {
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["size"] = x.size(dim);
    return gather_parts(x, dim);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const int64_t dim = ctx->saved_data["dim"].toInt(), size = ctx->saved_data["size"].toInt();
    return {grads[0].narrow(dim, tp_rank() * size, size), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor copy_to_tp(const torch::Tensor& x) {
  if (!has_tp()) return x;
  return CopyToTp::apply(x);
}

torch::Tensor reduce_from_tp(const torch::Tensor& x) {
  if (!has_tp()) return x;
  return ReduceFromTp::apply(x);
}

torch::Tensor max_from_tp(const torch::Tensor& x) {
  auto y = x.detach().contiguous().clone();
  if (has_tp()) all_reduce(y, Group::tp, /*max=*/true);
  return y;
}

torch::Tensor gather_from_tp(const torch::Tensor& x, int64_t dim) {
  if (!has_tp()) return x;
  dim = dim < 0 ? dim + x.dim() : dim;
  return GatherFromTp::apply(x, dim);
}

void broadcast_parameters(const std::vector<torch::Tensor>& tensors) {
  if (!group(Group::dp)) return;
  torch::NoGradGuard no_grad;
  // Coalesced by dtype and device, in chunks of at most 256 MiB.
  std::map<std::pair<int, std::string>, std::vector<torch::Tensor>> by_kind;
  for (const auto& t : tensors)
    if (t.defined() && t.numel() > 0)
      by_kind[{static_cast<int>(t.scalar_type()), t.device().str()}].push_back(t);
  const int64_t cap = int64_t{256} << 20;
  for (auto& [kind, list] : by_kind) {
    size_t i = 0;
    while (i < list.size()) {
      std::vector<torch::Tensor> chunk;
      int64_t bytes = 0;
      while (i < list.size() && (chunk.empty() || bytes + list[i].nbytes() <= cap)) {
        bytes += static_cast<int64_t>(list[i].nbytes());
        chunk.push_back(list[i++]);
      }
      std::vector<torch::Tensor> flat_parts;
      for (const auto& t : chunk) flat_parts.push_back(t.reshape({-1}));
      auto flat = torch::cat(flat_parts);
      broadcast(flat, 0, Group::dp);
      int64_t off = 0;
      for (auto& t : chunk) {
        t.copy_(flat.narrow(0, off, t.numel()).view(t.sizes()));
        off += t.numel();
      }
    }
  }
}

struct GradientSync::Impl {
  std::unique_ptr<c10d::Reducer> reducer;
};

GradientSync::GradientSync(std::vector<torch::Tensor> params, const std::string& mode, bool find_unused)
    : params_(std::move(params)), mode_(mode), find_unused_(find_unused) {
  check(mode_ == "bucketed" || mode_ == "coalesced",
        "parallel_config.gradient_reduction: '" + mode_ + "' is not bucketed|coalesced");
  if (!group(Group::dp) || mode_ != "bucketed" || params_.empty()) return;
  impl_ = std::make_unique<Impl>();
  // DDP's buckets: 1 MiB first, 25 MiB after, in reverse order (gradients arrive last layer first).
  const int64_t first_cap = int64_t{1} << 20, cap = int64_t{25} << 20;
  const std::vector<bool> sparse(params_.size(), false);
  auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
      params_, {static_cast<size_t>(first_cap), static_cast<size_t>(cap)}, sparse);
  std::reverse(buckets.begin(), buckets.end());
  std::reverse(limits.begin(), limits.end());
  std::vector<int64_t> limit_list(limits.begin(), limits.end());
  try {
    impl_->reducer = std::make_unique<c10d::Reducer>(
        params_, buckets, state().dp_group, sparse, cap, find_unused_,
        /*gradient_as_bucket_view=*/false, std::unordered_map<size_t, std::string>{}, first_cap,
        /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false, limit_list);
  } catch (const std::exception& e) {
    throw Error(describe_failure("building the gradient reducer: " + first_message(e)));
  }
}

GradientSync::~GradientSync() = default;

void GradientSync::begin(bool sync) {
  if (!impl_) return;
  try {
    if (sync) impl_->reducer->prepare_for_forward();
    impl_->reducer->rebuild_buckets();  // after the first step: buckets in gradient order
  } catch (const std::exception& e) {
    throw Error(describe_failure("gradient reducer: " + first_message(e)));
  }
}

void GradientSync::after_forward(const torch::Tensor& loss, bool sync) {
  if (!impl_ || !sync) return;
  try {
    // With find_unused, the Reducer finds the parameters this step leaves without a gradient.
    impl_->reducer->prepare_for_backward(find_unused_ ? std::vector<torch::Tensor>{loss} : std::vector<torch::Tensor>{});
  } catch (const std::exception& e) {
    throw Error(describe_failure("gradient reducer: " + first_message(e)));
  }
}

void GradientSync::finish() {
  if (!group(Group::dp)) return;
  if (impl_) {  // the Reducer averaged during backward, if every parameter took part
    if (find_unused_) return;
    for (size_t i = 0; i < params_.size(); ++i)
      check(params_[i].grad().defined(),
            "rank " + std::to_string(rank()) + ": trainable parameter " + std::to_string(i) + " of " +
                std::to_string(params_.size()) +
                " got no gradient in this step, which the bucketed Reducer cannot average "
                "(parallel_config.gradient_reduction: coalesced can)");
    return;
  }
  // Coalesced: one flat SUM per dtype, then divide (Gloo has no AVG).
  // A parameter without a gradient here takes part as zeros, and stays without one if no rank
  // gave it any (the optimizer then skips it, as in one process).
  std::map<int, std::vector<torch::Tensor>> by_dtype;
  std::vector<torch::Tensor> had_none;
  for (const auto& p : params_) {
    if (!p.grad().defined()) {
      p.mutable_grad() = torch::zeros_like(p);
      had_none.push_back(p);
    }
    by_dtype[static_cast<int>(p.scalar_type())].push_back(p);
  }
  torch::NoGradGuard no_grad;
  for (auto& [dtype, ps] : by_dtype) {
    std::vector<torch::Tensor> parts;
    for (const auto& p : ps) parts.push_back(p.grad().reshape({-1}));
    auto flat = torch::cat(parts);
    all_reduce(flat, Group::dp);
    flat.div_(dp_size());
    int64_t off = 0;
    for (const auto& p : ps) {
      p.grad().copy_(flat.narrow(0, off, p.numel()).view(p.sizes()));
      off += p.numel();
    }
  }
  for (const auto& p : had_none)
    if (!p.grad().any().item<bool>()) p.mutable_grad() = torch::Tensor();
}

}  // namespace blip2::dist
