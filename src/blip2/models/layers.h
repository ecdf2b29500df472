// Building blocks whose parameters are created with explicit TensorOptions, so a whole model
// can be built on the meta device (shapes only, no memory) or directly on CUDA.
#pragma once

#include <map>
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
// draw = false leaves the weights as allocated (uninitialised): for a model whose every tensor a
// checkpoint is about to overwrite (build_loaded_model), where drawing them is wasted time.
struct InitOptions {
  torch::TensorOptions options = torch::TensorOptions().dtype(torch::kFloat32);
  double std = 0.02;
  bool draw = true;
};

// How a layer is split over the tensor-parallel group (Megatron-LM). With model_parallel 1 every
// layer is whole, whatever it asks for.
//   column: the output features (weight rows, bias) split in tp equal slices, in `parts` equal
//           blocks each split so (EVA's fused qkv: parts 3); the input enters with copy_to_tp.
//   row:    the input features (weight columns) split; the partial products are summed over the
//           group (reduce_from_tp), then the whole bias is added.
//   vocab:  an embedding's rows (the vocabulary) split; lookups outside a rank's rows are zero and
//           the group sums them.
enum class Parallel { none, column, row, vocab };

// Where a tensor-parallel parameter's shard lies in the whole tensor: this rank's slice `rank`
// of `size` along `dim`, taken in each of `parts` equal blocks.
struct TensorShard {
  int64_t dim = 0, parts = 1;
  int rank = 0, size = 1;
};
// The whole tensor's slice this shard holds (a view where it can be: a memory-mapped checkpoint
// is then read only there).
torch::Tensor take_shard(const torch::Tensor& full, const TensorShard& s);
// The whole tensor, gathered from the tp group's shards (every tp rank must call it).
torch::Tensor gather_shards(const torch::Tensor& local, const TensorShard& s);
// A module whose own parameters (not those of its Linear/Embedding children) are sharded.
class ShardedParameters {
 public:
  virtual ~ShardedParameters() = default;
  virtual std::map<std::string, TensorShard> local_shards() const = 0;  // by the parameter's own name
};
// The sharded parameters of `model` by name (empty without tensor parallelism).
std::map<std::string, TensorShard> tensor_shards(const torch::nn::Module& model);

// y = x W^T + b (torch.nn.functional.linear). On the CPU, for inference in fp32 (no gradient
// wanted, no autocast), through oneDNN's inner product instead of MKL's sgemm: on this project's 2-core AMD
// EPYC it is faster at every shape measured (1.3-2.7x at the few rows of a decode step, ~1.4x at
// one image's 257 ViT tokens; bench/bench_limits). Results differ from sgemm's by rounding only.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias = {});

// Weight-only int8, per output channel and symmetric: scale[o] = max_i |W[o,i]| / 127 (fp32),
// q = round(W / scale) in [-127, 127]. Returns {q int8 [out, in], scale fp32 [out]}. A NaN or inf
// weight is an Error naming its row (the quantised row would be meaningless).
std::pair<torch::Tensor, torch::Tensor> quantize_int8(const torch::Tensor& w);
// x (q * scale)^T + b. On the CPU through ATen's _weight_int8pack_mm, with x and the scales
// rounded to bf16 for the product (that kernel's path; its bf16 output is returned in x's dtype)
// when the input width is a multiple of 16 (what the kernel handles); otherwise, and on other
// devices, through the dequantised weight (built for the call).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& bias = {});

// A module that can initialise some of its own parameters again as its constructor does with
// InitOptions::draw (the same rule, fresh random numbers): for a model built without drawing
// whose loads left a few tensors random (build_loaded), so only those are drawn.
class ParameterInit {
 public:
  virtual ~ParameterInit() = default;
  // Initialises the parameter `name` (relative to this module, e.g. "weight" or
  // "predictions.bias"); false when this module has no rule for it here (then nothing is drawn).
  virtual bool init_parameter(const std::string& name) = 0;
};
// Initialises each of `names` (the model's parameter names, in the order given) through the
// nearest enclosing ParameterInit module that has a rule for it. False as soon as one has none
// (a layer split over the tensor-parallel group, an int8 layer, a parameter of no known module):
// the caller then builds the model again with every draw.
bool init_parameters(torch::nn::Module& model, const std::vector<std::string>& names);

// y = x W^T + b. Weight [out, in] as torch.nn.Linear. `std` < 0 selects torch.nn.Linear's
// default (Kaiming-uniform) init, which BLIP-2's projection and ITM heads use.
class LinearImpl : public torch::nn::Module, public ParameterInit {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const InitOptions& init, Parallel parallel = Parallel::none,
             int64_t parts = 1);
  torch::Tensor forward(const torch::Tensor& x) const;
  // A column-parallel layer whose input already went through dist::copy_to_tp: layers reading
  // one input (q/k/v, gate/up) then all-reduce its gradient once between them, as Megatron does.
  torch::Tensor forward_copied(const torch::Tensor& x) const;
  // x W^T + `b` with another bias than the layer's own (EVA's q/v bias).
  torch::Tensor forward_with_bias(const torch::Tensor& x, const torch::Tensor& b) const;
  // Weight-only int8 (model_config.weights: int8): `weight` becomes int8 [out, in], with the
  // buffer `weight_scale` [out] (fp32) beside it; `quantise` quantises the current weight,
  // otherwise both wait for a load (which quantises float weights as it copies them).
  void to_int8(bool quantise);
  bool is_int8() const { return weight_scale.defined(); }
  bool init_parameter(const std::string& name) override;  // whole float layers only
  torch::Tensor weight, bias, weight_scale;
  Parallel parallel = Parallel::none;  // none when the layer is whole (model_parallel 1)
  int64_t parts = 1;
  double init_std = 0.02;  // InitOptions::std it was built with
};
TORCH_MODULE(Linear);

class LayerNormImpl : public torch::nn::Module, public ParameterInit {
 public:
  // affine false: no weight and bias (OPT's layer_norm_elementwise_affine false).
  LayerNormImpl(int64_t dim, double eps, const InitOptions& init, bool affine = true);
  torch::Tensor forward(const torch::Tensor& x) const;
  bool init_parameter(const std::string& name) override;
  torch::Tensor weight, bias;
  double eps;
  int64_t dim;
};
TORCH_MODULE(LayerNorm);

class EmbeddingImpl : public torch::nn::Module, public ParameterInit {
 public:
  // vocab_parallel: rows split over the tp group (Parallel::vocab).
  EmbeddingImpl(int64_t num, int64_t dim, const InitOptions& init, bool vocab_parallel = false);
  torch::Tensor forward(const torch::Tensor& ids) const;
  bool init_parameter(const std::string& name) override;  // whole tables only
  torch::Tensor weight;
  Parallel parallel = Parallel::none;
  int64_t first_row = 0;  // the first vocabulary row this rank holds
  double init_std = 0.02;
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

// Keys and values of one self-attention layer, [B, heads, L, head_dim]. With a capacity (LLM
// decoding), key/value are allocated once for `capacity` positions and written in place: the
// first `length` are filled. With write_pos (continuous batching: rows at different lengths),
// a one-position step writes row b's key/value at column write_pos[b] and attends the first
// `span` columns (what lies past a row's own length is hidden by the caller's keep mask).
struct KVCache {
  torch::Tensor key, value;
  int64_t capacity = 0;  // 0: key/value are exactly the cache, grown by concatenation
  int64_t length = 0;
  torch::Tensor write_pos = {};  // [B] long, or undefined: every row writes at `length`
  int64_t span = 0;
};

int64_t count_parameters(const torch::nn::Module& m);
// Turns every Linear of `model` under one of `prefixes` into a weight-only int8 layer
// (LinearImpl::to_int8); returns how many.
int64_t linears_to_int8(torch::nn::Module& model, const std::vector<std::string>& prefixes, bool quantise);

// Next-token cross-entropy: logits[:, :-1] against labels[:, 1:], -100 ignored, with PyTorch's
// label smoothing, in fp32. global_tokens: the mean over the whole data-parallel batch's tokens
// (token counts summed over the dp ranks), scaled by the dp size so that the ranks' average, which
// the gradient reduction takes, is that mean; otherwise this rank's token mean (LAVIS).
// vocab_parallel: `logits` hold this tp rank's slice of the vocabulary (a vocabulary-parallel
// lm_head); the loss is then computed from per-token sums over the group (max, sum of exp, the
// target's logit, and for smoothing the sum of logits) and equals the whole-vocabulary one.
torch::Tensor next_token_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                              double label_smoothing, bool global_tokens, bool vocab_parallel = false);
// Per-token cross-entropy [N] of fp32 logits [N, V_local] against targets [N] (-100: 0), with
// PyTorch's label smoothing; vocab_parallel as above.
torch::Tensor token_cross_entropy(const torch::Tensor& logits, const torch::Tensor& target, double label_smoothing,
                                  bool vocab_parallel);

}  // namespace blip2
