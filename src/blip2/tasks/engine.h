// The one training loop. A stage (stage-1 Q-Former pretraining, stage-2 training against a
// frozen LLM, the tiny preset's LLM pretraining, any later objective) supplies its model, a
// `step(batch) -> losses` function and how its weights are saved and loaded; the engine owns the
// rest: AdamW groups, the warmup + cosine schedule, gradient accumulation, clipping, bf16
// autocast, atomic checkpoints that resume bit for bit (weights, optimizer, every generator, the
// data position), progress, metrics.jsonl and throughput.
//
// Host synchronisation happens only every log_interval optimizer steps: the step losses stay on
// the device until then and are read back together (one copy), and samples/s is measured over
// the interval after that copy has waited for the device.
#pragma once

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/data/dataset.h"
#include "blip2/models/layers.h"
#include "blip2/tasks/optim.h"

namespace blip2 {

// What one micro-batch's forward computed: the loss to minimise and the parts to log.
struct StepLosses {
  torch::Tensor loss;
  std::vector<std::pair<std::string, torch::Tensor>> parts;  // e.g. {"loss_itc", ...}
};

// One optimizer step as logged (losses averaged over its micro-batches).
struct StepLog {
  int64_t step = 0, epoch = 0;
  double loss = 0, lr = 0, samples_per_s = 0;
  std::vector<std::pair<std::string, double>> parts;
  // The part called `name` (an Error naming it when the objective logs none).
  double part(const std::string& name) const;
};

// Where a run stands; saved in each checkpoint.
struct TrainState {
  int64_t step = 0;   // optimizer steps done
  int64_t epoch = 0;  // current epoch
  int64_t batch = 0;  // next micro-batch within the epoch
  // What the position counts in: micro-batches of batch_size on each of data_parallel ranks,
  // accumulation per optimizer step (a resume needs the same global micro-batch, batch_size x
  // data_parallel, and accumulation; 0 = not recorded, a checkpoint of an older build).
  int64_t batch_size = 0, accumulation = 0;
  int64_t data_parallel = 1, model_parallel = 1;
  int64_t samples = 0;  // global samples consumed by the optimizer steps so far
};

// A stage's side of training.
struct Objective {
  std::string name;                                 // the progress label ("train", "stage2", "llm")
  torch::nn::Module* model = nullptr;               // its requires_grad parameters train
  std::function<StepLosses(const Batch&)> step;     // forward on a batch already on the device
  std::function<void()> after_update;               // after each optimizer step (optional)
  // Some trainable parameters may get no gradient in a step (the data-parallel gradient
  // reduction must then look for them, as DDP's find_unused_parameters).
  bool unused_parameters = false;
  // Writes the model's files into a checkpoint directory being filled (optional: no checkpoints).
  // Every rank calls it, for the collectives of gathering tensor-parallel shards; rank 0 is given
  // the directory, the others an empty path (write nothing).
  std::function<void(const std::filesystem::path& dir)> save;
  // Resume: loads the weights of the checkpoint directory into the model (optional).
  std::function<void(const std::string& dir)> load;
};

// Sees the parameters of each optimizer step (1-based) once their gradients are averaged.
using GradientProbe = std::function<void(int64_t step, const std::vector<torch::Tensor>& params)>;

struct EngineOptions {
  int64_t epochs = 1;
  int64_t max_steps = -1;         // optimizer steps; -1 = all epochs
  int64_t accumulation = 1;       // micro-batches per optimizer step
  int64_t log_interval = 10;      // optimizer steps between host reads of the losses
  int64_t save_steps = 0;         // checkpoint every N optimizer steps; 0 = each epoch end
  double max_grad_norm = 0;       // 0 = no clipping
  bool autocast = false;          // bf16 autocast around the forward
  LrScheduleConfig schedule;
  OptimizerConfig optimizer;
  std::string output_dir;         // checkpoints and metrics.jsonl; "" = neither
  std::string resume_from;        // a checkpoint directory with trainer_state.pt; "" = a fresh start
  torch::Device device = torch::kCPU;
  int64_t seed = 42;                           // under data parallelism each rank draws from seed + dp rank
  std::string gradient_reduction = "bucketed";  // parallel_config.gradient_reduction
  // Called after each optimizer step's gradients are averaged, before clipping (tests, probes).
  GradientProbe on_gradients;
  // The runner's options for the run config's stage (runner_config, optimizer, lr_schedule).
  static EngineOptions from(const RunConfig& cfg, torch::Device device);
};

// Trains `objective` on `loader`'s batches; returns one StepLog per optimizer step run here
// (a resumed run: the steps after its checkpoint). Writes output_dir/train_summary.json.
std::vector<StepLog> train(Objective& objective, const BatchLoader& loader, const EngineOptions& options);

// output_dir/checkpoint/step_N written by `fill` into a temporary directory, then renamed into
// place and named by checkpoint/latest: an interrupted save leaves the previous one intact.
std::filesystem::path write_checkpoint(const std::string& output_dir, int64_t step,
                                       const std::function<void(const std::filesystem::path& tmp)>& fill);
// trainer_state.pt of a checkpoint: the optimizer, the position (TrainState) and every rank's
// random generators, enough to continue bit for bit at the same world size. Every rank calls
// save (the generators are gathered); rank 0 writes. At another world size, load re-seeds the
// generators and says so.
// `shards`: the optimized parameters (by their index in optimized_parameters(opt)) that are
// tensor-parallel shards: their AdamW moments are stored whole (gathered over the tp group, a
// collective), and a load keeps each rank's slice of them, at any model_parallel.
using ParameterShards = std::map<size_t, TensorShard>;
void save_train_state(const std::filesystem::path& file, torch::optim::Optimizer& opt, const TrainState& st,
                      torch::Device device, const ParameterShards& shards = {});
TrainState load_train_state(const std::string& checkpoint_dir, torch::optim::Optimizer& opt, torch::Device device,
                            const ParameterShards& shards = {});
// The checkpoint directory --resume_training continues from (load_checkpoint resolved, with a
// trainer_state.pt), checked to be of this run's stage (its config.yaml).
std::string resume_checkpoint_dir(const RunConfig& cfg);
// output_dir/metrics.jsonl opened for appending; a resumed run keeps the lines of the steps up
// to `keep_through` and drops the rest.
std::ofstream open_metrics(const std::string& output_dir, int64_t keep_through);

}  // namespace blip2
