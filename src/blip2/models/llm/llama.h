// Llama (Hugging Face LlamaForCausalLM): pre-RMSNorm decoder layers with rotary position
// embeddings (rotate-half convention) and a SwiGLU MLP; Llama-7B: 32 layers, width 4096, 32
// heads, FFN 11008, vocabulary 32000. Also as LlamaConfig allows: grouped-query attention
// (num_key_value_heads), a head_dim of its own, biased projections (attention_bias, mlp_bias),
// another activation, and linear or llama3 RoPE scaling. Baichuan-7B is the same network (vocabulary 64000) whose
// checkpoint fuses q/k/v into W_pack; io/hf splits it on load.
//
// Names: model.embed_tokens, model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
// post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head.
#pragma once

#include "blip2/models/llm/llm.h"

namespace blip2 {

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x) const;  // computed in fp32, as transformers does
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  LlamaAttentionImpl(const TextConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& additive_mask, KVCache* cache);
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  int64_t heads, kv_heads;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module {
 public:
  LlamaMLPImpl(const TextConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x);  // down(act(gate(x)) * up(x)), act = silu
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  Activation act;
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const TextConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& additive_mask, KVCache* cache);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

class LlamaForCausalLMImpl : public CausalLMImpl {
 public:
  LlamaForCausalLMImpl(const TextConfig& c, const InitOptions& init);
  torch::Tensor embed(const torch::Tensor& ids) override;
  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& keep,
                        const torch::Tensor& positions, LlmCache* cache, bool last_only,
                        bool vocab_local = false) override;
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};
  Linear lm_head{nullptr};  // absent when tied to embed_tokens
  torch::Tensor inv_freq;   // [head_dim / 2] fp32, moved to the device of the first forward there;
                            // not saved (as in transformers)
};

// The rotary inverse frequencies [head_dim / 2] (fp32) of rope_type default, linear or llama3,
// as transformers' ROPE_INIT_FUNCTIONS compute them.
torch::Tensor rope_inv_freq(const TextConfig& c);
// cos and sin [B, L, head_dim] of the rotary embedding at `positions` [B, L].
std::pair<torch::Tensor, torch::Tensor> rotary_cos_sin(const torch::Tensor& inv_freq,
                                                       const torch::Tensor& positions,
                                                       torch::Dtype dtype);
// x [B, h, L, D] rotated: x * cos + rotate_half(x) * sin.
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

}  // namespace blip2
