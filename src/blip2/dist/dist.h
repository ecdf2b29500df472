// Processes and their collectives, on PyTorch's own distributed engine (c10d: ProcessGroupGloo
// for CPU tensors, ProcessGroupNCCL for CUDA tensors in a CUDA build, DDP's Reducer for
// gradients). Everything that changes with several processes (ITC gathers, hard negatives over
// the global batch, data sharding, gradient averaging, rank-0 writing, sharded evaluation) calls
// these functions; only dist.cpp sees c10d's types.
//
// The processes form a data_parallel x model_parallel mesh. Ranks r = d * tp + t: the tp ranks of
// one model replica are consecutive (t = tensor-parallel rank), and the dp group of a rank joins
// the ranks holding the same shard in every replica. Without a launcher (no WORLD_SIZE, or 1) there
// is no process group: every collective is the identity, as in LAVIS without torch.distributed —
// except that the gathered side of ITC is still detached (LAVIS always runs stage 1 in a group).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace blip2::dist {

// What the run config asks for (use_parallel, parallel_config) and the resolved config's text,
// which every rank must share (compared by digest at init).
struct Request {
  bool use_parallel = false;
  int64_t data_parallel = 1, model_parallel = 1, pipeline_stage = 1;
  std::string config_text;
};

// Joins the processes the environment describes: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT (a client of torchrun's agent store when TORCHELASTIC_USE_AGENT_STORE=True, else
// rank 0 hosts the TCPStore; BLIP2_DIST_FILE_STORE=PATH meets through a FileStore instead, for a
// shared filesystem or tests). BLIP2_DIST_TIMEOUT_S bounds every collective and the rendezvous
// (default 300). Without WORLD_SIZE > 1 it only checks that the request is for one process.
// A second call checks that it asks for the same mesh.
void init_from_env(const Request& request);
bool initialized();  // a process group exists (WORLD_SIZE > 1)
// Leaves the group (after a barrier); the process can then run single again.
void shutdown();

int rank();
int world_size();
int local_rank();  // LOCAL_RANK: the GPU of this process
int dp_rank();
int dp_size();
int tp_rank();
int tp_size();
inline bool is_main_process() { return rank() == 0; }

enum class Group { world, dp, tp };

// In place; SUM or MAX over the group's ranks (identity without a group).
void all_reduce(torch::Tensor& t, Group g = Group::world, bool max = false);
// The group's tensors concatenated along dim 0, in rank order (all of the same shape).
torch::Tensor all_gather(const torch::Tensor& t, Group g = Group::dp);
// `t` of the group's rank `root` (a rank within the group), in place on every rank.
void broadcast(torch::Tensor& t, int root = 0, Group g = Group::dp);
void barrier();
// The largest value any rank of the group gives (an int read back on the host).
int64_t max_over(int64_t value, Group g = Group::dp);
// Every rank's string, in rank order (through the store; small values only).
std::vector<std::string> all_gather_strings(const std::string& value, const std::string& key);

// The ranks whose micro-batches form the model's global batch: the dp group, or this rank alone
// inside a LocalScope (evaluation loops that hand whole batches to ranks). The model's gathers,
// ITC targets and token counts use these.
int batch_rank();
int batch_ranks();
class LocalScope {
 public:
  LocalScope();
  ~LocalScope();
  LocalScope(const LocalScope&) = delete;
  LocalScope& operator=(const LocalScope&) = delete;

 private:
  bool outer_;
};

// The rows of a [N, ...] tensor that this rank filled, the others zero, summed over the dp group:
// every rank then holds all N rows exactly (MindFormers' zero-fill + SUM; an owned value plus
// zeros is the value).
void combine_rows(torch::Tensor& t);

// LAVIS' concat_all_gather over the dp group (@torch.no_grad): detached at every world size.
torch::Tensor all_gather_no_grad(const torch::Tensor& t);
// LAVIS' all_gather_with_grad (GatherLayer): the backward pass sums the gradient over ranks and
// keeps this rank's slice.
torch::Tensor all_gather_with_grad(const torch::Tensor& t);

// ---- tensor parallelism: Megatron's conjugate operators over the tp group ----
// (identities without a tp group of more than one rank)
// Identity forward; the gradient summed over the tp group: the input of a column-parallel layer,
// whose ranks each see a slice of the output.
torch::Tensor copy_to_tp(const torch::Tensor& x);
// Summed over the tp group forward; identity backward: a row-parallel layer's partial products,
// a vocabulary-parallel embedding's lookups, a vocabulary-parallel loss's partial sums.
torch::Tensor reduce_from_tp(const torch::Tensor& x);
// MAX over the tp group, no gradient (the vocabulary-parallel softmax's shift).
torch::Tensor max_from_tp(const torch::Tensor& x);
// The tp group's tensors (equal shapes) concatenated along `dim` in tp-rank order; the backward
// pass keeps this rank's slice of the gradient.
torch::Tensor gather_from_tp(const torch::Tensor& x, int64_t dim);

// rank 0's values of `tensors` (parameters and buffers) copied into every rank of the dp group,
// as DDP does at construction.
void broadcast_parameters(const std::vector<torch::Tensor>& tensors);

// Averages the gradients of trainable parameters over the dp group.
//   bucketed  — c10d's Reducer (DDP's engine): buckets all-reduced while backward still runs;
//   coalesced — after backward, one flat all-reduce per dtype (the fallback and test oracle).
// Per micro-batch: begin(sync) before its forward and after_forward(loss, sync) before its
// backward, `sync` on the micro-batch after which the gradients are averaged (the last of an
// optimizer step; the others accumulate locally, as DDP's no_sync); then finish() before clipping.
class GradientSync {
 public:
  // find_unused: some parameters may get no gradient in a step (DDP's find_unused_parameters:
  // the Reducer then walks the autograd graph from the loss each step).
  GradientSync(std::vector<torch::Tensor> params, const std::string& mode, bool find_unused = false);
  ~GradientSync();
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;
  void begin(bool sync);
  void after_forward(const torch::Tensor& loss, bool sync);
  void finish();
  const std::string& mode() const { return mode_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<torch::Tensor> params_;
  std::string mode_;
  bool find_unused_;
};

// Wall time this process has spent in blocking collectives (issue to completion), summed since
// start: the communication a step waits for. The bucketed Reducer's all-reduces, which overlap
// the backward pass, are not counted; the coalesced reduction's are.
double blocked_seconds();

// A failure inside a collective, rethrown as one line naming this rank ("rank 1: ...").
std::string describe_failure(const std::string& what);

}  // namespace blip2::dist
