// The process-group facade. Everything that changes under data parallelism (ITC gathers,
// hard-negative sampling over the global batch, data sharding, gradient averaging, rank-0
// checkpoint writing) calls these functions, so adding ranks changes no model or loss code.
//
// This build runs one process (world size 1); the collectives are then the identity, as in
// LAVIS when torch.distributed is not initialised.
#pragma once

#include <torch/torch.h>

namespace blip2::dist {

int rank();
int world_size();
inline bool is_main_process() { return rank() == 0; }

// Fails with a clear message when the environment asks for more processes than this build
// supports (WORLD_SIZE > 1), naming the config's parallel settings.
void init_from_env(bool use_parallel, int64_t data_parallel, int64_t model_parallel);

// Concatenates every rank's tensor along dim 0, without gradient (LAVIS' concat_all_gather is
// @torch.no_grad): at world size 1 too it returns the input detached, as LAVIS, which always
// runs stage 1 under a process group, computes it.
torch::Tensor all_gather_no_grad(const torch::Tensor& t);
// Same, but the backward pass returns each rank its slice of the summed gradient
// (LAVIS all_gather_with_grad / GatherLayer).
torch::Tensor all_gather_with_grad(const torch::Tensor& t);
// Averages the gradients of `params` over ranks.
void all_reduce_gradients(const std::vector<torch::Tensor>& params);

}  // namespace blip2::dist
