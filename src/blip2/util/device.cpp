#include "blip2/util/device.h"

#include <cstdlib>

#include <ATen/autocast_mode.h>

#include <mutex>

#include "blip2/config/config.h"
#include "blip2/util/common.h"

namespace blip2 {

torch::Device parse_device(const std::string& target) {
  check(is_device_target(target), "device_target: '" + target + "' is not cpu|cuda|cuda:N (N < 128)");
  if (target == "cpu") return torch::Device(torch::kCPU);
  if (target == "cuda") return torch::Device(torch::kCUDA);
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(std::stoi(target.substr(5))));
}

torch::Device pick_device(const std::string& target) {
  torch::Device device = parse_device(target);
  // Under a launcher, "cuda" is the GPU of this process's LOCAL_RANK.
  const char* local_rank = std::getenv("LOCAL_RANK");
  const char* world = std::getenv("WORLD_SIZE");
  if (device.is_cuda() && !device.has_index() && local_rank && world && std::atoi(world) > 1)
    device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(std::atoi(local_rank)));
  if (device.is_cuda()) {
    check(torch::cuda::is_available(),
          "device_target is " + target + " but no CUDA device is available to this torch build");
    const auto n = static_cast<int64_t>(torch::cuda::device_count());
    check(!device.has_index() || device.index() < n,
          "device_target is " + target + " but this machine has " + std::to_string(n) + " CUDA device" +
              (n == 1 ? "" : "s") + " (cuda:0 .. cuda:" + std::to_string(n - 1) + ")");
  }
  return device;
}

torch::Tensor to_device_async(const torch::Tensor& host, const torch::Device& device) {
  if (!device.is_cuda() || host.device() == device) return host.to(device);
  return (host.is_pinned() ? host : host.pin_memory()).to(device, /*non_blocking=*/true);
}

AutocastGuard::AutocastGuard(bool enabled, const torch::Device& device) : on_(enabled), type_(device.type()) {
  if (!on_) return;
  prev_enabled_ = at::autocast::is_autocast_enabled(type_);
  prev_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, at::kBFloat16);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!on_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(type_, prev_enabled_);
  at::autocast::set_autocast_dtype(type_, prev_dtype_);
}

NoAutocast::NoAutocast(const torch::Device& device)
    : type_(device.type()), prev_enabled_(at::autocast::is_autocast_enabled(type_)) {
  if (prev_enabled_) at::autocast::set_autocast_enabled(type_, false);
}

NoAutocast::~NoAutocast() {
  if (prev_enabled_) at::autocast::set_autocast_enabled(type_, true);
}

torch::Tensor rng_state(torch::Device device) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(torch::Device device, const torch::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace blip2
