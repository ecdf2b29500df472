#include "blip2/models/layers.h"

#include <cmath>
#include <map>

#include "blip2/util/common.h"

namespace blip2 {

namespace {

const double kSqrt2OverPi = std::sqrt(2.0 / M_PI);

torch::Tensor gelu_erf(const torch::Tensor& x) { return torch::gelu(x); }
torch::Tensor gelu_python(const torch::Tensor& x) { return x * 0.5 * (1.0 + torch::erf(x / std::sqrt(2.0))); }
torch::Tensor gelu_10(const torch::Tensor& x) { return torch::clamp(torch::gelu(x), -10, 10); }
torch::Tensor gelu_new(const torch::Tensor& x) {
  return 0.5 * x * (1.0 + torch::tanh(kSqrt2OverPi * (x + 0.044715 * torch::pow(x, 3.0))));
}
torch::Tensor gelu_python_tanh(const torch::Tensor& x) {
  return x * 0.5 * (1.0 + torch::tanh(kSqrt2OverPi * (x + 0.044715 * torch::pow(x, 3.0))));
}
torch::Tensor gelu_fast(const torch::Tensor& x) {
  return 0.5 * x * (1.0 + torch::tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)));
}
torch::Tensor gelu_tanh(const torch::Tensor& x) { return torch::gelu(x, "tanh"); }
torch::Tensor quick_gelu(const torch::Tensor& x) { return x * torch::sigmoid(1.702 * x); }
torch::Tensor laplace(const torch::Tensor& x) {
  return 0.5 * (1.0 + torch::erf((x - 0.707107) / (0.282095 * std::sqrt(2.0))));
}
torch::Tensor leaky_relu(const torch::Tensor& x) { return torch::leaky_relu(x, 0.01); }
torch::Tensor identity(const torch::Tensor& x) { return x; }
torch::Tensor mish(const torch::Tensor& x) { return torch::mish(x); }
torch::Tensor relu(const torch::Tensor& x) { return torch::relu(x); }
torch::Tensor relu2(const torch::Tensor& x) { return torch::square(torch::relu(x)); }
torch::Tensor relu6(const torch::Tensor& x) { return torch::hardtanh(x, 0.0, 6.0); }
torch::Tensor hardswish(const torch::Tensor& x) { return torch::hardswish(x); }
torch::Tensor sigmoid(const torch::Tensor& x) { return torch::sigmoid(x); }
torch::Tensor silu(const torch::Tensor& x) { return torch::silu(x); }
torch::Tensor tanh_act(const torch::Tensor& x) { return torch::tanh(x); }
torch::Tensor sqrt_softplus(const torch::Tensor& x) { return torch::softplus(x).sqrt(); }

// transformers/activations.py ACT2CLS, less prelu and xielu (learned parameters).
const std::map<std::string, Activation>& activation_table() {
  static const std::map<std::string, Activation> table = {
      {"gelu", gelu_erf},           {"gelu_10", gelu_10},
      {"gelu_fast", gelu_fast},     {"gelu_new", gelu_new},
      {"gelu_python", gelu_python}, {"gelu_pytorch_tanh", gelu_tanh},
      {"gelu_python_tanh", gelu_python_tanh}, {"gelu_accurate", gelu_new},
      {"hardswish", hardswish},     {"laplace", laplace},
      {"leaky_relu", leaky_relu},   {"linear", identity},
      {"mish", mish},               {"quick_gelu", quick_gelu},
      {"relu", relu},               {"relu2", relu2},
      {"relu6", relu6},             {"sigmoid", sigmoid},
      {"silu", silu},               {"sqrtsoftplus", sqrt_softplus},
      {"swish", silu},              {"tanh", tanh_act},
  };
  return table;
}

}  // namespace

Activation activation(const std::string& name) {
  auto it = activation_table().find(name);
  if (it == activation_table().end())
    throw Error("activation '" + name + "' is not implemented (" + join(activation_names(), ", ") + ")");
  return it->second;
}

bool is_activation(const std::string& name) { return activation_table().count(name) > 0; }

std::vector<std::string> activation_names() {
  std::vector<std::string> names;
  for (const auto& [name, fn] : activation_table()) names.push_back(name);
  return names;
}

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

LayerNormImpl::LayerNormImpl(int64_t dim_, double eps_, const InitOptions& init, bool affine)
    : eps(eps_), dim(dim_) {
  if (!affine) return;
  weight = register_parameter("weight", torch::ones({dim}, init.options));
  bias = register_parameter("bias", torch::zeros({dim}, init.options));
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& x) const {
  return torch::layer_norm(x, {dim}, weight, bias, eps);
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
