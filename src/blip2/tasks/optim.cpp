#include "blip2/tasks/optim.h"

#include <cmath>

namespace blip2 {

double warmup_cosine_lr(const LrScheduleConfig& s, int64_t step, int64_t total_steps) {
  if (step < s.warmup_steps)
    return s.warmup_lr_init + (s.learning_rate - s.warmup_lr_init) * static_cast<double>(step) / s.warmup_steps;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - s.warmup_steps);
  const double progress = std::clamp(static_cast<double>(step - s.warmup_steps) / decay_steps, 0.0, 1.0);
  return s.lr_end + (s.learning_rate - s.lr_end) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

double lavis_warmup_cosine_lr(const LrScheduleConfig& s, int64_t micro, int64_t epoch, int64_t epochs) {
  if (epoch == 0)
    return std::min(s.learning_rate, s.warmup_lr_init + (s.learning_rate - s.warmup_lr_init) *
                                                            static_cast<double>(micro) /
                                                            static_cast<double>(std::max<int64_t>(s.warmup_steps, 1)));
  return (s.learning_rate - s.lr_end) * 0.5 *
             (1.0 + std::cos(M_PI * static_cast<double>(epoch) / static_cast<double>(epochs))) +
         s.lr_end;
}

double learning_rate(const LrScheduleConfig& s, const SchedulePosition& at) {
  if (s.type == "linear_warmup_cosine_lr")
    return lavis_warmup_cosine_lr(s, (at.step_in_epoch + 1) * at.accumulation - 1, at.epoch, at.epochs);
  return warmup_cosine_lr(s, at.step, at.total_steps);
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
}

std::unique_ptr<torch::optim::AdamW> make_adamw(const torch::nn::Module& model, const OptimizerConfig& oc,
                                              double lr, int64_t* trainable) {
  std::vector<torch::Tensor> decay, no_decay;
  int64_t n = 0;
  for (const auto& p : model.named_parameters()) {
    if (!p.value().requires_grad()) continue;
    // Blip2Base.get_optimizer_params: no decay for 1-D tensors and names ending in ".bias";
    // 0-D `temp` and 3-D `query_tokens` are decayed.
    const bool no_wd = p.value().dim() == 1 || p.key().ends_with(".bias");
    (no_wd ? no_decay : decay).push_back(p.value());
    n += p.value().numel();
  }
  if (trainable) *trainable = n;
  auto opts = torch::optim::AdamWOptions(lr).betas({oc.betas[0], oc.betas[1]}).eps(oc.eps).weight_decay(oc.weight_decay);
  auto no_wd_opts = std::make_unique<torch::optim::AdamWOptions>(opts);
  no_wd_opts->weight_decay(0.0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(opts));
  groups.emplace_back(no_decay, std::move(no_wd_opts));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), opts);
}

std::vector<torch::Tensor> optimized_parameters(const torch::optim::Optimizer& opt) {
  std::vector<torch::Tensor> out;
  for (const auto& g : opt.param_groups()) out.insert(out.end(), g.params().begin(), g.params().end());
  return out;
}

}  // namespace blip2
