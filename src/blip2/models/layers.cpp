#include "blip2/models/layers.h"

#include <cmath>

namespace blip2 {

LinearImpl::LinearImpl(int64_t in, int64_t out, bool has_bias, const InitOptions& init) {
  torch::NoGradGuard no_grad;
  weight = register_parameter("weight", torch::empty({out, in}, init.options));
  if (init.std >= 0) {
    weight.normal_(0.0, init.std);
  } else {  // torch.nn.Linear: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    double bound = 1.0 / std::sqrt(static_cast<double>(in));
    weight.uniform_(-bound, bound);
  }
  if (has_bias) {
    bias = register_parameter("bias", torch::zeros({out}, init.options));
    if (init.std < 0) {
      double bound = 1.0 / std::sqrt(static_cast<double>(in));
      bias.uniform_(-bound, bound);
    }
  }
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) const {
  return torch::nn::functional::linear(x, weight, bias);
}

LayerNormImpl::LayerNormImpl(int64_t dim, double eps_, const InitOptions& init) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}, init.options));
  bias = register_parameter("bias", torch::zeros({dim}, init.options));
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& x) const {
  return torch::layer_norm(x, {weight.size(0)}, weight, bias, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t dim, const InitOptions& init) {
  torch::NoGradGuard no_grad;
  weight = register_parameter("weight", torch::empty({num, dim}, init.options));
  weight.normal_(0.0, init.std);
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) const {
  return torch::embedding(weight, ids);
}

torch::Tensor split_heads(const torch::Tensor& x, int64_t heads) {
  auto b = x.size(0), l = x.size(1), d = x.size(2) / heads;
  return x.view({b, l, heads, d}).transpose(1, 2);
}

torch::Tensor merge_heads(const torch::Tensor& x) {
  auto b = x.size(0), h = x.size(1), l = x.size(2), d = x.size(3);
  return x.transpose(1, 2).reshape({b, l, h * d});
}

torch::Tensor padding_mask(const torch::Tensor& keep) {
  auto m = keep.to(torch::kFloat32).unsqueeze(1).unsqueeze(1);  // [B,1,1,Lk]
  return (1.0 - m) * -10000.0;
}

torch::Tensor causal_prefix_mask(const torch::Tensor& keep, int64_t prefix_len) {
  const int64_t total = keep.size(1), text = total - prefix_len;
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(keep.device());
  auto causal = torch::ones({text, text}, opts).tril();        // [L, L]
  auto prefix = torch::ones({text, prefix_len}, opts);         // [L, P]
  auto allowed = torch::cat({prefix, causal}, 1).unsqueeze(0);  // [1, L, P+L]
  auto m = allowed * keep.to(torch::kFloat32).unsqueeze(1);     // [B, L, P+L]
  return ((1.0 - m) * -10000.0).unsqueeze(1);                   // [B, 1, L, P+L]
}

int64_t count_parameters(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

}  // namespace blip2
