#include "blip2/models/layers.h"

#include "blip2/dist/dist.h"

#include <cmath>
#include <map>
#include <optional>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

namespace {

// The layer's share of `n` features over the tp group (the whole `n` when it is not split).
int64_t tp_share(int64_t n, int64_t parts, const std::string& what) {
  const int64_t tp = dist::tp_size();
  if (tp == 1) return n;
  check(n % (tp * parts) == 0, what + " " + std::to_string(n) + (parts > 1 ? " (in " + std::to_string(parts) + " blocks)" : "") +
                                   " is not divisible by parallel_config.model_parallel " + std::to_string(tp));
  return n / tp;
}

}  // namespace

// This rank's part of a layer split `p` ways along `dim` (in `parts` blocks).
static TensorShard local_shard(int64_t dim, int64_t parts) {
  TensorShard s;
  s.dim = dim;
  s.parts = parts;
  s.rank = dist::tp_rank();
  s.size = dist::tp_size();
  return s;
}

namespace {
// BERT's N(0, std), or torch.nn.Linear's default for std < 0: kaiming_uniform(a=sqrt(5)) ==
// U(-1/sqrt(in), 1/sqrt(in)) for the weight, and the same bound for the bias (else zero).
void draw_linear_weight(torch::Tensor& w, double std) {
  if (std >= 0) {
    w.normal_(0.0, std);
  } else {
    const double bound = 1.0 / std::sqrt(static_cast<double>(w.size(1)));
    w.uniform_(-bound, bound);
  }
}
void draw_linear_bias(torch::Tensor& b, int64_t in, double std) {
  if (std >= 0) {
    b.zero_();
  } else {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    b.uniform_(-bound, bound);
  }
}
}  // namespace

// A split layer's parameters are drawn whole, as one process draws them (the same random numbers
// in the same order), and this rank keeps its slice: the ranks' shards together are the
// one-process layer, and what is initialised after it is too.
LinearImpl::LinearImpl(int64_t in, int64_t out, bool has_bias, const InitOptions& init, Parallel p, int64_t parts_)
    : parallel(dist::tp_size() > 1 ? p : Parallel::none), parts(parts_), init_std(init.std) {
  torch::NoGradGuard no_grad;
  check(p == Parallel::none || p == Parallel::column || p == Parallel::row, "Linear: vocab split is for embeddings");
  if (parallel == Parallel::column) tp_share(out, parts, "output features");
  if (parallel == Parallel::row) tp_share(in, 1, "input features");
  auto w = torch::empty({out, in}, init.options);
  if (init.draw) draw_linear_weight(w, init.std);
  torch::Tensor b;
  if (has_bias) {
    b = torch::zeros({out}, init.options);
    if (init.draw) draw_linear_bias(b, in, init.std);
  }
  if (parallel == Parallel::column) {
    w = take_shard(w, local_shard(0, parts)).clone();
    if (b.defined()) b = take_shard(b, local_shard(0, parts)).clone();
  } else if (parallel == Parallel::row) {
    w = take_shard(w, local_shard(1, 1)).clone();
  }
  weight = register_parameter("weight", w);
  if (b.defined()) bias = register_parameter("bias", b);
}

namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<c10::Scalar>>,
                                   std::optional<c10::string_view>);

// mkldnn::_linear_pointwise (oneDNN's inner product, what torch.compile's CPU backend calls), when
// this LibTorch has it.
const c10::TypedOperatorHandle<LinearPointwise>* onednn_linear_op() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h) return std::nullopt;
    return h->typed<LinearPointwise>();
  }();
  return op ? &*op : nullptr;
}

bool use_onednn(const torch::Tensor& x, const torch::Tensor& w) {
  if (!x.is_cpu() || !w.is_cpu() || x.scalar_type() != torch::kFloat32 || w.scalar_type() != torch::kFloat32)
    return false;
  if (torch::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad())) return false;
  if (at::autocast::is_autocast_enabled(at::kCPU)) return false;  // autocast's linear runs in bf16
  return x.dim() >= 1 && x.numel() > 0 && at::globalContext().userEnabledMkldnn() && onednn_linear_op();
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (!use_onednn(x, weight) || (bias.defined() && bias.requires_grad() && torch::GradMode::is_enabled()))
    return torch::nn::functional::linear(x, weight, bias);
  const int64_t in = x.size(-1);
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  std::optional<at::Tensor> b;
  if (bias.defined()) b = bias;
  auto y = onednn_linear_op()->call(x.reshape({-1, in}).contiguous(), weight.contiguous(), b, "none",
                                    c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  return y.view(shape);
}

std::pair<torch::Tensor, torch::Tensor> quantize_int8(const torch::Tensor& w) {
  torch::NoGradGuard no_grad;
  auto wf = w.to(torch::kFloat32);
  // max |w| per row from one pass (aminmax) and a single temporary for the rounding: the same
  // numbers as abs().amax() and round().clamp(), at a third of the time on a 2.7B model.
  auto [lo, hi] = torch::aminmax(wf, 1);
  auto amax = torch::maximum(hi, -lo);  // NaN where a row has one, inf where a row has one
  auto bad = torch::isfinite(amax).logical_not().nonzero();
  if (bad.numel() > 0)
    throw Error("a non-finite weight (NaN or inf) in output row " + std::to_string(bad[0].item<int64_t>()) +
                ": int8 cannot represent it");
  auto scale = amax.clamp_min(1e-12) / 127.0;
  auto t = wf / scale.unsqueeze(1);
  t.round_().clamp_(-127, 127);
  return {t.to(torch::kInt8), scale};
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& bias) {
  torch::Tensor y;
  // ATen's CPU kernel reads the input features in blocks of 16 (other widths crash it).
  if (x.is_cpu() && x.size(-1) % 16 == 0) {
    const int64_t in = x.size(-1);
    auto shape = x.sizes().vec();
    shape.back() = q.size(0);
    auto x2 = x.reshape({-1, in}).to(torch::kBFloat16).contiguous();
    y = at::_weight_int8pack_mm(x2, q, scale.to(torch::kBFloat16)).to(x.scalar_type()).view(shape);
  } else {
    y = torch::nn::functional::linear(x, q.to(x.scalar_type()) * scale.to(x.scalar_type()).unsqueeze(1));
  }
  return bias.defined() ? y + bias.to(y.scalar_type()) : y;
}

void LinearImpl::to_int8(bool quantise) {
  torch::NoGradGuard no_grad;
  check(parallel == Parallel::none, "model_config.weights: int8 is not available with tensor parallelism");
  if (is_int8()) return;
  torch::Tensor q, s;
  if (quantise) {
    std::tie(q, s) = quantize_int8(weight);
  } else {
    q = torch::empty(weight.sizes(), weight.options().dtype(torch::kInt8));
    s = torch::ones({weight.size(0)}, weight.options().dtype(torch::kFloat32));
  }
  parameters_["weight"] = q;  // the same name: checkpoints and loads address it as before
  weight = q;
  weight_scale = register_buffer("weight_scale", s);
}

torch::Tensor LinearImpl::forward_with_bias(const torch::Tensor& x, const torch::Tensor& b) const {
  return is_int8() ? int8_linear(x, weight, weight_scale, b) : blip2::linear(x, weight, b);
}

torch::Tensor LinearImpl::forward_copied(const torch::Tensor& x) const { return forward_with_bias(x, bias); }

torch::Tensor LinearImpl::forward(const torch::Tensor& x) const {
  switch (parallel) {
    case Parallel::column: return forward_with_bias(dist::copy_to_tp(x), bias);
    case Parallel::row: {
      auto y = dist::reduce_from_tp(forward_with_bias(x, {}));
      return bias.defined() ? y + bias : y;
    }
    default: return forward_with_bias(x, bias);
  }
}

int64_t linears_to_int8(torch::nn::Module& model, const std::vector<std::string>& prefixes, bool quantise) {
  int64_t n = 0;
  for (const auto& item : model.named_modules()) {
    auto* linear = dynamic_cast<LinearImpl*>(item.value().get());
    if (!linear) continue;
    const std::string name = item.key() + ".";
    if (std::none_of(prefixes.begin(), prefixes.end(), [&](const std::string& p) { return name.rfind(p, 0) == 0; }))
      continue;
    try {
      linear->to_int8(quantise);
    } catch (const Error& e) {
      throw Error(item.key() + ".weight: " + e.what());
    }
    ++n;
  }
  return n;
}

bool LinearImpl::init_parameter(const std::string& name) {
  if (parallel != Parallel::none || is_int8()) return false;
  if (name == "weight") {
    draw_linear_weight(weight, init_std);
    return true;
  }
  if (name == "bias" && bias.defined()) {
    draw_linear_bias(bias, weight.size(1), init_std);
    return true;
  }
  return false;
}

LayerNormImpl::LayerNormImpl(int64_t dim_, double eps_, const InitOptions& init, bool affine)
    : eps(eps_), dim(dim_) {
  if (!affine) return;
  weight = register_parameter("weight", torch::ones({dim}, init.options));
  bias = register_parameter("bias", torch::zeros({dim}, init.options));
}

bool LayerNormImpl::init_parameter(const std::string& name) {
  if (name == "weight" && weight.defined()) weight.fill_(1.0);
  else if (name == "bias" && bias.defined()) bias.zero_();
  else return false;
  return true;
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& x) const {
  return torch::layer_norm(x, {dim}, weight, bias, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t dim, const InitOptions& init, bool vocab_parallel)
    : parallel(vocab_parallel && dist::tp_size() > 1 ? Parallel::vocab : Parallel::none), init_std(init.std) {
  torch::NoGradGuard no_grad;
  const int64_t rows = parallel == Parallel::vocab ? tp_share(num, 1, "vocabulary size") : num;
  first_row = parallel == Parallel::vocab ? dist::tp_rank() * rows : 0;
  auto w = torch::empty({num, dim}, init.options);  // drawn whole, as in one process (see Linear)
  if (init.draw) w.normal_(0.0, init.std);
  weight = register_parameter("weight", parallel == Parallel::vocab ? w.narrow(0, first_row, rows).clone() : w);
}

bool EmbeddingImpl::init_parameter(const std::string& name) {
  if (parallel != Parallel::none || name != "weight") return false;
  weight.normal_(0.0, init_std);
  return true;
}

bool init_parameters(torch::nn::Module& model, const std::vector<std::string>& names) {
  torch::NoGradGuard no_grad;
  // On failure the generator goes back to where it was: the caller's whole-model rebuild then
  // draws what a plain build from the same state draws.
  auto gen = at::detail::getDefaultCPUGenerator();
  const auto state = gen.get_state();
  std::map<std::string, ParameterInit*> owners;  // by module path ("" = the model)
  for (const auto& item : model.named_modules("", /*include_self=*/true))
    if (auto* p = dynamic_cast<ParameterInit*>(item.value().get())) owners[item.key()] = p;
  for (const auto& name : names) {
    // The nearest enclosing module first: "a.b.weight" asks "a.b", then "a", then the model.
    bool done = false;
    std::string path = name;
    while (!done && !path.empty()) {
      const size_t dot = path.rfind('.');
      path = dot == std::string::npos ? "" : path.substr(0, dot);
      const std::string local = path.empty() ? name : name.substr(path.size() + 1);
      auto it = owners.find(path);
      done = it != owners.end() && it->second->init_parameter(local);
    }
    if (!done) {
      gen.set_state(state);
      return false;
    }
  }
  return true;
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) const {
  if (parallel != Parallel::vocab) return torch::embedding(weight, ids);
  auto outside = (ids < first_row).logical_or(ids >= first_row + weight.size(0));
  auto local = (ids - first_row).masked_fill(outside, 0);
  return dist::reduce_from_tp(torch::embedding(weight, local).masked_fill(outside.unsqueeze(-1), 0));
}

torch::Tensor take_shard(const torch::Tensor& full, const TensorShard& s) {
  if (s.size == 1) return full;
  const int64_t n = full.size(s.dim) / s.parts, chunk = n / s.size;
  if (s.parts == 1) return full.narrow(s.dim, s.rank * chunk, chunk);
  auto blocks = full.unflatten(s.dim, {s.parts, n});
  return blocks.narrow(s.dim + 1, s.rank * chunk, chunk).flatten(s.dim, s.dim + 1);
}

torch::Tensor gather_shards(const torch::Tensor& local, const TensorShard& s) {
  torch::NoGradGuard no_grad;
  if (s.size == 1) return local;
  if (s.parts == 1) return dist::gather_from_tp(local, s.dim);
  auto blocks = local.unflatten(s.dim, {s.parts, local.size(s.dim) / s.parts});
  return dist::gather_from_tp(blocks, s.dim + 1).flatten(s.dim, s.dim + 1);
}

std::map<std::string, TensorShard> tensor_shards(const torch::nn::Module& model) {
  std::map<std::string, TensorShard> out;
  if (dist::tp_size() == 1) return out;
  TensorShard base;
  base.rank = dist::tp_rank();
  base.size = dist::tp_size();
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    if (const auto* l = dynamic_cast<const LinearImpl*>(item.value().get())) {
      if (l->parallel == Parallel::none) continue;
      TensorShard s = base;
      s.parts = l->parts;
      s.dim = l->parallel == Parallel::column ? 0 : 1;
      out[prefix + "weight"] = s;
      if (l->bias.defined() && l->parallel == Parallel::column) {
        s.dim = 0;
        out[prefix + "bias"] = s;
      }
    } else if (const auto* e = dynamic_cast<const EmbeddingImpl*>(item.value().get())) {
      if (e->parallel == Parallel::vocab) out[prefix + "weight"] = base;
    } else if (const auto* m = dynamic_cast<const ShardedParameters*>(item.value().get())) {
      for (const auto& [name, s] : m->local_shards()) out[prefix + name] = s;
    }
  }
  return out;
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

torch::Tensor token_cross_entropy(const torch::Tensor& logits, const torch::Tensor& target, double label_smoothing,
                                  bool vocab_parallel) {
  const int64_t v_local = logits.size(-1);
  const bool split = vocab_parallel && dist::tp_size() > 1;
  const int64_t v = split ? v_local * dist::tp_size() : v_local;
  const int64_t first = split ? dist::tp_rank() * v_local : 0;
  auto valid = target != -100;
  // log-sum-exp from the group's partial sums, shifted by the group's max (no gradient: the
  // result does not depend on the shift).
  auto shift = split ? dist::max_from_tp(std::get<0>(logits.max(-1))) : std::get<0>(logits.max(-1)).detach();
  auto shifted = logits - shift.unsqueeze(-1);
  auto sum_exp = shifted.exp().sum(-1);
  auto lse = (split ? dist::reduce_from_tp(sum_exp) : sum_exp).log();
  auto mine = valid.logical_and(target >= first).logical_and(target < first + v_local);
  auto local = (target - first).masked_fill(mine.logical_not(), 0);
  auto picked = shifted.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(mine.logical_not(), 0);
  auto nll = lse - (split ? dist::reduce_from_tp(picked) : picked);
  if (label_smoothing > 0) {
    auto total = shifted.sum(-1);
    auto smooth = lse - (split ? dist::reduce_from_tp(total) : total) / static_cast<double>(v);
    nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth;
  }
  return nll.masked_fill(valid.logical_not(), 0);
}

torch::Tensor next_token_loss(const torch::Tensor& logits, const torch::Tensor& labels, double label_smoothing,
                              bool global_tokens, bool vocab_parallel) {
  const int64_t v = logits.size(-1), t = logits.size(1);
  auto pred = logits.narrow(1, 0, t - 1).reshape({-1, v}).to(torch::kFloat32);
  auto target = labels.narrow(1, 1, t - 1).reshape({-1});
  namespace F = torch::nn::functional;
  const bool split = vocab_parallel && dist::tp_size() > 1;
  auto options = F::CrossEntropyFuncOptions().label_smoothing(label_smoothing).ignore_index(-100);
  if (!global_tokens || dist::batch_ranks() == 1) {
    if (!split) return F::cross_entropy(pred, target, options);
    // PyTorch's mean over the tokens not ignored (NaN when there are none, as it gives).
    return token_cross_entropy(pred, target, label_smoothing, true).sum() / (target != -100).sum();
  }
  auto sum = split ? token_cross_entropy(pred, target, label_smoothing, true).sum()
                   : F::cross_entropy(pred, target, options.reduction(torch::kSum));
  auto count = (target != -100).sum().to(torch::kFloat64).reshape({1}).cpu();
  dist::all_reduce(count, dist::Group::dp);
  return sum * (static_cast<double>(dist::batch_ranks()) / std::max(count.item<double>(), 1.0));
}

}  // namespace blip2
