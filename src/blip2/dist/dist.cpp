#include "blip2/dist/dist.h"

#include <cstdlib>
#include <string>

#include "blip2/util/common.h"

namespace blip2::dist {

int rank() { return 0; }
int world_size() { return 1; }

void init_from_env(bool use_parallel, int64_t data_parallel, int64_t model_parallel) {
  const char* ws = std::getenv("WORLD_SIZE");
  int requested = ws ? std::atoi(ws) : 1;
  if (requested > 1)
    throw Error("WORLD_SIZE=" + std::to_string(requested) +
                " but this build runs a single process; multi-card training is not available yet");
  if (use_parallel && data_parallel * model_parallel != 1)
    throw Error("use_parallel with parallel_config data_parallel x model_parallel = " +
                std::to_string(data_parallel * model_parallel) +
                " cards, but only 1 process is running");
}

torch::Tensor all_gather_no_grad(const torch::Tensor& t) { return t.detach(); }
torch::Tensor all_gather_with_grad(const torch::Tensor& t) { return t; }
void all_reduce_gradients(const std::vector<torch::Tensor>&) {}

}  // namespace blip2::dist
