// AdamW with BLIP-2's parameter groups and the warmup + cosine learning-rate schedule.
#pragma once

#include <memory>

#include <torch/torch.h>

#include "blip2/config/config.h"

namespace blip2 {

// lr at optimizer step `step` (0-based): linear from warmup_lr_init to learning_rate over
// warmup_steps, then cosine from learning_rate to lr_end at total_steps (lr_schedule.type cosine,
// MindFormers' CosineWithWarmUpLR, per step).
double warmup_cosine_lr(const LrScheduleConfig& s, int64_t step, int64_t total_steps);

// LAVIS' LinearWarmupCosineLRScheduler (lr_schedule.type linear_warmup_cosine_lr), set before
// micro-batch `micro` (0-based, within the epoch) of epoch `epoch` of `epochs`: in epoch 0,
// min(learning_rate, warmup_lr_init + (learning_rate - warmup_lr_init) * micro / warmup_steps);
// from epoch 1 on, constant within the epoch: lr_end + (learning_rate - lr_end) *
// (1 + cos(pi * epoch / epochs)) / 2.
double lavis_warmup_cosine_lr(const LrScheduleConfig& s, int64_t micro, int64_t epoch, int64_t epochs);

// Where the engine stands when it sets the learning rate of an optimizer step.
struct SchedulePosition {
  int64_t step = 0;           // optimizer steps done (0-based index of this one)
  int64_t epoch = 0;
  int64_t step_in_epoch = 0;  // optimizer steps done in this epoch
  int64_t accumulation = 1;   // micro-batches per optimizer step
  int64_t total_steps = 1;    // optimizer steps of the whole schedule
  int64_t epochs = 1;
};
// The lr of lr_schedule.type at `at`. LAVIS sets its lr before every micro-batch, so the one an
// optimizer step uses is that of its last micro-batch.
double learning_rate(const LrScheduleConfig& s, const SchedulePosition& at);

void set_lr(torch::optim::Optimizer& opt, double lr);

// AdamW over the trainable parameters of `model` in LAVIS' two groups (Blip2Base.
// get_optimizer_params, lr_layer_decay 1): weight decay off for 1-D parameters and names ending
// in ".bias" (group 1), on for the rest (group 0), which includes the 0-D temperature and the
// 3-D query tokens. `trainable` receives their count.
std::unique_ptr<torch::optim::AdamW> make_adamw(const torch::nn::Module& model, const OptimizerConfig& oc,
                                              double lr, int64_t* trainable = nullptr);
// Every parameter of both groups.
std::vector<torch::Tensor> optimized_parameters(const torch::optim::Optimizer& opt);

}  // namespace blip2
