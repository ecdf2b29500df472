// Building blocks whose parameters are created with explicit TensorOptions, so a whole model
// can be built on the meta device (shapes only, no memory) or directly on CUDA.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

namespace blip2 {

// transformers' ACT2FN by name, each computed as transformers computes it (gelu = erf GELU,
// gelu_new / gelu_pytorch_tanh = the tanh approximation, quick_gelu = x * sigmoid(1.702 x), ...).
// Those with learned parameters (prelu, xielu) are not offered.
using Activation = torch::Tensor (*)(const torch::Tensor&);
Activation activation(const std::string& name);  // an Error for an unknown name
bool is_activation(const std::string& name);
std::vector<std::string> activation_names();

// How to create parameters: device/dtype, and the N(0, std) used for weights (BERT init).
struct InitOptions {
  torch::TensorOptions options = torch::TensorOptions().dtype(torch::kFloat32);
  double std = 0.02;
};

// y = x W^T + b. Weight [out, in] as torch.nn.Linear. `std` < 0 selects torch.nn.Linear's
// default (Kaiming-uniform) init, which BLIP-2's projection and ITM heads use.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x) const;
  torch::Tensor weight, bias;
};
TORCH_MODULE(Linear);

class LayerNormImpl : public torch::nn::Module {
 public:
  // affine false: no weight and bias (OPT's layer_norm_elementwise_affine false).
  LayerNormImpl(int64_t dim, double eps, const InitOptions& init, bool affine = true);
  torch::Tensor forward(const torch::Tensor& x) const;
  torch::Tensor weight, bias;
  double eps;
  int64_t dim;
};
TORCH_MODULE(LayerNorm);

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num, int64_t dim, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& ids) const;
  torch::Tensor weight;
};
TORCH_MODULE(Embedding);

// [B, L, H*D] -> [B, H, L, D] and back.
torch::Tensor split_heads(const torch::Tensor& x, int64_t heads);
torch::Tensor merge_heads(const torch::Tensor& x);

// Additive attention masks as BLIP-2 builds them: (1 - keep) * -10000, shaped to broadcast
// against [B, heads, L_query, L_key].
//   padding_mask:      keep [B, Lk] (1 = token, 0 = pad) -> [B, 1, 1, Lk]   (ITC text, ITM)
//   causal_prefix_mask: keep [B, P + L] over (prefix, text) -> [B, 1, L, P + L]: text token t
//     sees every prefix position plus text positions <= t, minus padding (LM pass, P = queries)
torch::Tensor padding_mask(const torch::Tensor& keep);
torch::Tensor causal_prefix_mask(const torch::Tensor& keep, int64_t prefix_len);

// Keys and values of one self-attention layer, [B, heads, L, head_dim].
struct KVCache {
  torch::Tensor key, value;
};

int64_t count_parameters(const torch::nn::Module& m);

}  // namespace blip2
