// Fuzz target (libFuzzer interface): the safetensors reader on arbitrary bytes. It must either
// return tensors that lie inside the file or throw blip2::Error; anything else (a crash, an
// out-of-bounds read caught by the sanitizers, another exception type) is a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "blip2/io/safetensors.h"
#include "blip2/util/common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/blip2_fuzz_safetensors_" + std::to_string(::getpid());
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    auto tensors = blip2::load_safetensors(path);
    for (auto& [name, t] : tensors)  // touch every byte the reader says is there
      if (t.numel() > 0) (void)t.flatten().view(torch::kUInt8).sum().item<int64_t>();
  } catch (const blip2::Error&) {
  }
  return 0;
}
