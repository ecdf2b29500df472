// The Querying Transformer (LAVIS Qformer.py; Hugging Face Blip2QFormerModel).
//
// BERT with three changes: (1) learned queries may precede the text; they get no position
// embeddings but do go through the embedding LayerNorm; (2) every `cross_attention_freq`-th
// layer lets the query slice (only) cross-attend the image features; (3) query positions use
// their own FFN (intermediate_query/output_query), text positions BERT's (intermediate/output).
// Self-attention can return its keys/values (the query pass caches them) and take a prefix
// of cached keys/values (the LM pass attends the cached queries without recomputing them).
//
// Names follow Hugging Face: qformer.{layernorm, encoder.layer.{i}.{attention.{attention.
// {query,key,value}, output.{dense,LayerNorm}}, crossattention.{...}, intermediate.dense,
// output.{dense,LayerNorm}, intermediate_query.dense, output_query.{dense,LayerNorm}}}.
#pragma once

#include <optional>
#include <vector>

#include "blip2/config/config.h"
#include "blip2/models/layers.h"

namespace blip2 {

class BertSelfAttentionImpl : public torch::nn::Module {
 public:
  BertSelfAttentionImpl(const QFormerConfig& c, int64_t kv_width, const InitOptions& init);
  // hidden [B,Lq,H]; context [B,Lk,W] for cross-attention (else hidden); additive_mask
  // broadcastable to [B,heads,Lq,Lk]. `past` is prepended to this call's keys/values and
  // `present` receives the full keys/values. With an undefined context, `past` alone is used
  // as the keys/values (precomputed cross-attention keys/values of an image).
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& context,
                        const torch::Tensor& additive_mask, const KVCache* past, KVCache* present);
  Linear query{nullptr}, key{nullptr}, value{nullptr};
  int64_t heads;
  double dropout;
};
TORCH_MODULE(BertSelfAttention);

// dense -> dropout -> LayerNorm(x + residual), BERT's post-LN sublayer output.
class BertOutputImpl : public torch::nn::Module {
 public:
  BertOutputImpl(int64_t in, int64_t out, double eps, double dropout, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& residual);
  Linear dense{nullptr};
  LayerNorm LayerNorm_{nullptr};
  double dropout;
};
TORCH_MODULE(BertOutput);

class BertAttentionImpl : public torch::nn::Module {
 public:
  BertAttentionImpl(const QFormerConfig& c, int64_t kv_width, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& context,
                        const torch::Tensor& additive_mask, const KVCache* past, KVCache* present);
  BertSelfAttention attention{nullptr};
  BertOutput output{nullptr};
};
TORCH_MODULE(BertAttention);

class QFormerLayerImpl : public torch::nn::Module {
 public:
  // text_path = false builds the query path only (no intermediate/output): stage 2, where LAVIS
  // deletes the text FFN and Hugging Face has use_qformer_text_input = false.
  QFormerLayerImpl(const QFormerConfig& c, int64_t encoder_width, bool cross,
                   const InitOptions& init, bool text_path = true);
  // hidden [B, L, H] whose first `query_length` rows are queries.
  // `cross` (optional) replaces image_embeds with this layer's precomputed image keys/values.
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& additive_mask,
                        int64_t query_length, const torch::Tensor& image_embeds,
                        const KVCache* past, KVCache* present, const KVCache* cross = nullptr);
  BertAttention attention{nullptr}, crossattention{nullptr};
  Linear intermediate{nullptr}, intermediate_query{nullptr};
  BertOutput output{nullptr}, output_query{nullptr};
  bool has_cross;
  Activation act;

 private:
  torch::Tensor ffn(const torch::Tensor& x, bool query);
};
TORCH_MODULE(QFormerLayer);

struct QFormerOutput {
  torch::Tensor last_hidden_state;  // [B, L, H]
  std::vector<KVCache> past;        // per layer, when use_cache
};

class QFormerModelImpl : public torch::nn::Module {
 public:
  QFormerModelImpl(const QFormerConfig& c, int64_t encoder_width, const InitOptions& init,
                   bool text_path = true);
  // embeds: [queries; text word+position embeddings], before the embedding LayerNorm.
  QFormerOutput forward(const torch::Tensor& embeds, const torch::Tensor& additive_mask,
                        int64_t query_length, const torch::Tensor& image_embeds = {},
                        const std::vector<KVCache>* past = nullptr, bool use_cache = false,
                        const std::vector<KVCache>* cross = nullptr);
  // Each cross-attention layer's keys/values of the image ([B, heads, N, head_dim]; empty for
  // layers without cross-attention): computed once per image, reused for every text it meets.
  std::vector<KVCache> cross_kv(const torch::Tensor& image_embeds);
  LayerNorm layernorm{nullptr};
  torch::nn::ModuleList layers;
  QFormerConfig config;
};
TORCH_MODULE(QFormerModel);

// Cross-attention keys/values (from cross_kv) of some images: `rows` of them, or image `i`
// repeated `k` times (a view, no copy). Layers without cross-attention stay empty.
std::vector<KVCache> select_rows(const std::vector<KVCache>& cross, const torch::Tensor& rows);
std::vector<KVCache> repeat_row(const std::vector<KVCache>& cross, int64_t i, int64_t k);

// Word + absolute position embeddings of the text (top-level `embeddings` in HF's layout).
class TextEmbeddingsImpl : public torch::nn::Module {
 public:
  TextEmbeddingsImpl(const QFormerConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& ids, int64_t past_length = 0);  // [B,L] -> [B,L,H]
  Embedding word_embeddings{nullptr}, position_embeddings{nullptr};
};
TORCH_MODULE(TextEmbeddings);

// BertOnlyMLMHead: transform (dense, GELU, LayerNorm) then the decoder tied to the word
// embeddings plus its own bias. Named cls.predictions.* (LAVIS' name; HF has no stage-1 LM).
class LMHeadImpl : public torch::nn::Module, public ParameterInit {
 public:
  LMHeadImpl(const QFormerConfig& c, const InitOptions& init);
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& word_embeddings);
  bool init_parameter(const std::string& name) override;  // predictions.bias (its layers: theirs)
  Linear dense{nullptr};
  LayerNorm LayerNorm_{nullptr};
  torch::Tensor bias;
  Activation act;
};
TORCH_MODULE(LMHead);

}  // namespace blip2
