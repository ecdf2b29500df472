// OPT (Hugging Face OPTForCausalLM) as BLIP-2 uses it: pre-LayerNorm decoder layers, learned
// positions with an offset of 2, ReLU FFN, biases everywhere, lm_head tied to the token
// embeddings. OPT-2.7B: 32 layers, width 2560, 32 heads, FFN 10240; OPT-6.7B: 32 / 4096 / 32 /
// 16384; vocabulary 50272 (the BLIP-2 hub configs pad it to 50304). The EOS BLIP-2 uses is "\n"
// (50118). Also as OPTConfig allows: post-LayerNorm layers (do_layer_norm_before false, then no
// final LayerNorm, as OPT-350m), no final LayerNorm (_remove_final_layer_norm), LayerNorms
// without weight and bias, projections without biases, another activation.
//
// Names: model.decoder.{embed_tokens, embed_positions, layers.{i}.{self_attn.{q,k,v,out}_proj,
// self_attn_layer_norm, fc1, fc2, final_layer_norm}, final_layer_norm}, lm_head (tied: not saved).
#pragma once

#include "blip2/models/llm/llm.h"

namespace blip2 {

class OptAttentionImpl : public torch::nn::Module {
 public:
  OptAttentionImpl(const TextConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& additive_mask, KVCache* cache);
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
  int64_t heads;
};
TORCH_MODULE(OptAttention);

class OptDecoderLayerImpl : public torch::nn::Module {
 public:
  OptDecoderLayerImpl(const TextConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& additive_mask, KVCache* cache);
  OptAttention self_attn{nullptr};
  LayerNorm self_attn_layer_norm{nullptr}, final_layer_norm{nullptr};
  Linear fc1{nullptr}, fc2{nullptr};
  Activation act;
  bool norm_before;
};
TORCH_MODULE(OptDecoderLayer);

class OptForCausalLMImpl : public CausalLMImpl {
 public:
  static constexpr int64_t kPositionOffset = 2;
  OptForCausalLMImpl(const TextConfig& c, const InitOptions& init);
  torch::Tensor embed(const torch::Tensor& ids) override;
  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& keep,
                        const torch::Tensor& positions, LlmCache* cache, bool last_only,
                        bool vocab_local = false) override;
  Embedding embed_tokens{nullptr}, embed_positions{nullptr};
  torch::nn::ModuleList layers;
  LayerNorm final_layer_norm{nullptr};  // absent with post-LN layers or _remove_final_layer_norm
  Linear lm_head{nullptr};  // absent when tied (always, for the released OPT models)
};

}  // namespace blip2
