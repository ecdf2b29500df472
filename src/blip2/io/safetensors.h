// safetensors: 8-byte little-endian header length, a JSON header mapping each name to
// {dtype, shape, data_offsets}, then the raw little-endian tensor bytes.
// https://github.com/huggingface/safetensors (format section). Our checkpoints use it.
#pragma once

#include <map>
#include <string>

#include <torch/torch.h>

namespace blip2 {

using TensorMap = std::map<std::string, torch::Tensor>;

// Reads every tensor (CPU, contiguous). Errors name the file and the offending entry.
TensorMap load_safetensors(const std::string& path);
// Writes atomically (temporary name, then rename). `metadata` goes to __metadata__.
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// What loading a name -> tensor map into a module did (like load_state_dict(strict=False)).
struct LoadReport {
  std::vector<std::string> loaded, missing, unexpected;
  std::string summary() const;
};
// "[2,3,4]".
std::string shape_str(const std::vector<int64_t>& shape);
// load_into and state_dict, which know the model's tensor-parallel shards: io/checkpoint.h.
// Gives back to the OS the pages of a tensor that views a memory-mapped safetensors file (they
// are read again from the file if the tensor is used later); anything else is left alone.
void release_file_pages(const torch::Tensor& t);

}  // namespace blip2
