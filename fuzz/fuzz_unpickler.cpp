// Fuzz target (libFuzzer interface): the restricted unpickler on arbitrary data.pkl bytes, with
// storages of deterministic sizes. It must either build a state dict of tensors inside their
// storages or throw blip2::Error; it never executes anything the pickle names.
#include <cstdint>
#include <string>

#include "blip2/io/pth.h"
#include "blip2/util/common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string pickle(reinterpret_cast<const char*>(data), size);
  auto storage = [](const std::string& key) {
    // 0..4095 bytes, chosen by the key, filled with a pattern.
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : key) h = (h ^ c) * 1099511628211ull;
    return torch::arange(static_cast<int64_t>(h % 4096), torch::kInt64).to(torch::kUInt8);
  };
  try {
    auto tensors = blip2::unpickle_state_dict(pickle, "fuzz.pth", storage);
    for (auto& [name, t] : tensors)
      if (t.numel() > 0) (void)t.contiguous().flatten().view(torch::kUInt8).sum().item<int64_t>();
  } catch (const blip2::Error&) {
  }
  return 0;
}
