// Devices, autocast and random generators: what every task needs to place and run a model.
#pragma once

#include <string>

#include <torch/torch.h>

namespace blip2 {

// The device device_target names: cpu, cuda (the current device) or cuda:N.
torch::Device parse_device(const std::string& target);
// The same, checked against this machine (an error naming the target when it has no such device).
torch::Device pick_device(const std::string& target);

// A host tensor on `device` without blocking the host: through page-locked memory on CUDA; on
// the CPU the tensor itself.
torch::Tensor to_device_async(const torch::Tensor& host, const torch::Device& device);

// runner_config.bf16_autocast for a scope: bf16 autocast on the device's type (CUDA, or the CPU,
// where LibTorch has it too); a no-op when disabled. Restores the previous state on exit.
class AutocastGuard {
 public:
  AutocastGuard(bool enabled, const torch::Device& device);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_;
  at::DeviceType type_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

// Autocast off on `device`'s type for a scope (similarities, softmaxes and losses stay fp32).
class NoAutocast {
 public:
  explicit NoAutocast(const torch::Device& device);
  ~NoAutocast();
  NoAutocast(const NoAutocast&) = delete;
  NoAutocast& operator=(const NoAutocast&) = delete;

 private:
  at::DeviceType type_;
  bool prev_enabled_;
};

// The state of `device`'s default generator (cuda:N's own, not the current device's).
torch::Tensor rng_state(torch::Device device);
void set_rng_state(torch::Device device, const torch::Tensor& state);

}  // namespace blip2
