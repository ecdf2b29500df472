// Typed run configuration: the seed's YAML layout (MindFormers `configs/blip2/*.yaml`) parsed
// into structs with commented defaults, plus the presets registry (the support list).
//
// Every struct lists its fields once, in `visit`, which both the strict YAML reader (unknown
// keys and wrong types are errors naming the file and key path) and the writer use.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace blip2 {

// EVA ViT-g/14 as BLIP-2 uses it (39 of EVA-CLIP-g's 40 blocks, no final norm).
struct VisionConfig {
  std::string type = "ViTConfig";
  int64_t image_size = 224;            // input side in pixels (364 for COCO-finetuned weights)
  int64_t patch_size = 14;             // 224/14 = 16x16 patches + CLS = 257 tokens
  int64_t num_channels = 3;
  int64_t hidden_size = 1408;
  int64_t num_hidden_layers = 39;
  int64_t num_attention_heads = 16;    // head dim 88
  int64_t intermediate_size = 6144;    // int(1408 * 4.3637)
  double layer_norm_eps = 1e-6;        // inside the ViT
  double post_layernorm_eps = 1e-5;    // ln_vision: LAVIS uses nn.LayerNorm's default (HF: 1e-6)
  std::string hidden_act = "gelu";     // exact (erf) GELU; any of transformers' ACT2FN names
  bool qkv_bias = true;                // q and v biases (the key never has one)
  double attention_dropout = 0.0;      // on the attention probabilities, when the ViT trains
  double initializer_range = 0.02;
  std::string checkpoint_name_or_path; // ViT weights on their own (eva_vit_g.pth); "" = none

  template <class V> void visit(V& v) {
    v("type", type); v("image_size", image_size); v("patch_size", patch_size);
    v("num_channels", num_channels); v("hidden_size", hidden_size);
    v("num_hidden_layers", num_hidden_layers); v("num_attention_heads", num_attention_heads);
    v("intermediate_size", intermediate_size); v("layer_norm_eps", layer_norm_eps);
    v("post_layernorm_eps", post_layernorm_eps); v("hidden_act", hidden_act);
    v("qkv_bias", qkv_bias); v("attention_dropout", attention_dropout);
    v("initializer_range", initializer_range);
    v("checkpoint_name_or_path", checkpoint_name_or_path);
  }
  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};

// The Querying Transformer: BERT-base with cross-attention every `cross_attention_freq` layers.
struct QFormerConfig {
  std::string type = "QFormerConfig";
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t query_length = 32;           // number of learned queries
  int64_t cross_attention_freq = 2;    // cross-attention in layers 0, 2, 4, ...
  int64_t encoder_width = 0;           // image feature width; 0 = vision_config.hidden_size
  int64_t vocab_size = 30522;          // tokenizer vocabulary before the added [DEC]
  int64_t special_token_nums = 1;      // tokens appended to the vocabulary ([DEC])
  bool resize_token_embeddings = true; // embeddings sized vocab_size + special_token_nums
  int64_t bos_token_id = 30522;        // [DEC]
  int64_t sep_token_id = 102;          // [SEP], also EOS when generating
  int64_t pad_token_id = 0;
  int64_t max_position_embeddings = 512;
  double layer_norm_eps = 1e-12;
  double hidden_dropout_prob = 0.1;
  double attention_probs_dropout_prob = 0.1;
  std::string hidden_act = "gelu";     // exact GELU (MindFormers' tanh GELU is a known bug); any
                                       // of transformers' ACT2FN names (FFN and the LM head)
  double initializer_range = 0.02;
  int64_t head_embed_dim = 256;        // ITC projection size
  std::string checkpoint_name_or_path; // BERT initialisation; "" = random

  template <class V> void visit(V& v) {
    v("type", type); v("num_hidden_layers", num_hidden_layers);
    v("num_attention_heads", num_attention_heads); v("hidden_size", hidden_size);
    v("intermediate_size", intermediate_size); v("query_length", query_length);
    v("cross_attention_freq", cross_attention_freq); v("encoder_width", encoder_width);
    v("vocab_size", vocab_size); v("special_token_nums", special_token_nums);
    v("resize_token_embeddings", resize_token_embeddings); v("bos_token_id", bos_token_id);
    v("sep_token_id", sep_token_id); v("pad_token_id", pad_token_id);
    v("max_position_embeddings", max_position_embeddings); v("layer_norm_eps", layer_norm_eps);
    v("hidden_dropout_prob", hidden_dropout_prob);
    v("attention_probs_dropout_prob", attention_probs_dropout_prob);
    v("hidden_act", hidden_act); v("initializer_range", initializer_range);
    v("head_embed_dim", head_embed_dim);
    v("checkpoint_name_or_path", checkpoint_name_or_path);
  }
  int64_t embedding_vocab_size() const {
    return vocab_size + (resize_token_embeddings ? special_token_nums : 0);
  }
};

// The frozen decoder LLM of stage 2 (LlamaConfig in the seed). type LlamaConfig covers Llama and
// Baichuan-7B (Llama with a fused W_pack projection, vocabulary 64000); OPTConfig is OPT.
// Defaults are Llama-7B's. The architecture keys after `tie_word_embeddings` are those of
// transformers' LlamaConfig / OPTConfig that change the numbers (io/hf_config reads them from a
// config.json). The generation keys are the seed's (top_k, top_p, do_sample,
// repetition_penalty, max_decode_length, use_past) plus LAVIS' captioning settings.
struct TextConfig {
  std::string type = "LlamaConfig";    // LlamaConfig | OPTConfig
  int64_t seq_length = 64;             // longest training sequence: query_length + max_txt_len
  int64_t hidden_size = 4096;
  int64_t num_layers = 32;
  int64_t num_heads = 32;
  int64_t vocab_size = 32000;
  int64_t intermediate_size = 0;       // FFN width; 0 = Llama's rule from multiple_of (11008)
  int64_t multiple_of = 256;
  int64_t max_position_embeddings = 2048;  // context length (OPT: its learned positions)
  double rms_norm_eps = 1e-6;          // Llama
  double layer_norm_eps = 1e-5;        // OPT
  double rope_theta = 10000.0;         // Llama
  bool tie_word_embeddings = false;    // lm_head shares embed_tokens (OPT: true)
  std::string hidden_act;              // "" = the family's: silu (Llama), relu (OPT); any ACT2FN name
  // Llama
  int64_t num_key_value_heads = 0;     // grouped-query attention; 0 = num_heads
  int64_t head_dim = 0;                // 0 = hidden_size / num_heads
  bool attention_bias = false;         // q/k/v/o projections with biases
  bool mlp_bias = false;               // gate/up/down projections with biases
  std::string rope_type = "default";   // default | linear | llama3 (transformers' rope_parameters)
  double rope_factor = 1.0;            // linear, llama3
  double rope_low_freq_factor = 1.0;   // llama3
  double rope_high_freq_factor = 4.0;  // llama3
  int64_t rope_original_max_position_embeddings = 8192;  // llama3
  // OPT
  bool enable_bias = true;             // biases on the projections and fc1/fc2
  bool do_layer_norm_before = true;    // pre-LayerNorm (false: post-LayerNorm, as OPT-350m)
  bool layer_norm_elementwise_affine = true;  // LayerNorms with weight and bias
  bool remove_final_layer_norm = false;       // no final LayerNorm (transformers' _remove_final_layer_norm)
  // Training-only regularisation. blip2cpp runs the LLM in eval mode (frozen, as BLIP-2 does), where
  // they change nothing; training the LLM (freeze_text false, llm_pretrain_epochs) with them is refused.
  double dropout = 0.0, attention_dropout = 0.0, layerdrop = 0.0;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;            // OPT: 50118 ("\n")
  int64_t pad_token_id = 0;
  int64_t image_token_id = -1;         // Hugging Face's <image> placeholder id; -1 = none
  std::string checkpoint_name_or_path; // the LLM's own weights (a Hugging Face directory)
  // Generation (LAVIS captioning defaults: 5 beams, at most 30 new tokens).
  int64_t num_beams = 5;
  int64_t max_new_tokens = 30;
  int64_t min_new_tokens = 1;
  double length_penalty = 1.0;
  double repetition_penalty = 1.0;
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 0;                   // sampling: keep the k most likely tokens (0 = all)
  double top_p = 1.0;                  // sampling: nucleus mass
  int64_t max_decode_length = 512;     // prompt + new tokens, at most
  bool use_past = true;                // key/value cache while decoding

  template <class V> void visit(V& v) {
    v("type", type); v("seq_length", seq_length); v("hidden_size", hidden_size);
    v("num_layers", num_layers); v("num_heads", num_heads); v("vocab_size", vocab_size);
    v("intermediate_size", intermediate_size); v("multiple_of", multiple_of);
    v("max_position_embeddings", max_position_embeddings);
    v("rms_norm_eps", rms_norm_eps); v("layer_norm_eps", layer_norm_eps);
    v("rope_theta", rope_theta); v("tie_word_embeddings", tie_word_embeddings);
    v("hidden_act", hidden_act); v("num_key_value_heads", num_key_value_heads);
    v("head_dim", head_dim); v("attention_bias", attention_bias); v("mlp_bias", mlp_bias);
    v("rope_type", rope_type); v("rope_factor", rope_factor);
    v("rope_low_freq_factor", rope_low_freq_factor); v("rope_high_freq_factor", rope_high_freq_factor);
    v("rope_original_max_position_embeddings", rope_original_max_position_embeddings);
    v("enable_bias", enable_bias); v("do_layer_norm_before", do_layer_norm_before);
    v("layer_norm_elementwise_affine", layer_norm_elementwise_affine);
    v("remove_final_layer_norm", remove_final_layer_norm);
    v("dropout", dropout); v("attention_dropout", attention_dropout); v("layerdrop", layerdrop);
    v("bos_token_id", bos_token_id); v("eos_token_id", eos_token_id);
    v("pad_token_id", pad_token_id); v("image_token_id", image_token_id);
    v("checkpoint_name_or_path", checkpoint_name_or_path);
    v("num_beams", num_beams); v("max_new_tokens", max_new_tokens);
    v("min_new_tokens", min_new_tokens); v("length_penalty", length_penalty);
    v("repetition_penalty", repetition_penalty); v("do_sample", do_sample);
    v("temperature", temperature); v("top_k", top_k); v("top_p", top_p);
    v("max_decode_length", max_decode_length); v("use_past", use_past);
  }
  bool is_opt() const { return type == "OPTConfig"; }
  std::string activation() const { return !hidden_act.empty() ? hidden_act : is_opt() ? "relu" : "silu"; }
  int64_t kv_heads() const { return num_key_value_heads > 0 ? num_key_value_heads : num_heads; }
  int64_t head_size() const { return head_dim > 0 ? head_dim : hidden_size / num_heads; }
  // Llama: multiple_of * ceil(int(2 * 4h / 3) / multiple_of) = 11008 for h = 4096.
  int64_t ffn_size() const {
    if (intermediate_size > 0) return intermediate_size;
    const int64_t base = 2 * 4 * hidden_size / 3;
    return multiple_of * ((base + multiple_of - 1) / multiple_of);
  }
};

// model.model_config (Blip2Config in the seed).
struct Blip2Config {
  std::string type = "Blip2Config";
  int64_t max_txt_len = 32;            // text tokens per caption, [CLS] and [SEP] included
  std::string checkpoint_name_or_path; // whole-model weights; "" = random init
  bool prompt = false;                 // stage 2: a fixed prompt precedes the caption
  int64_t prompt_length = 0;           // its token count
  bool freeze_vision = true;           // ViT frozen: no grad, eval mode
  bool freeze_text = true;             // stage-2 LLM frozen
  // The dtype the frozen ViT (and the stage-2 LLM) are created and held in, once. auto = bfloat16
  // on CUDA, float32 on the CPU; the Q-Former, ln_vision and the projections stay float32.
  std::string frozen_dtype = "auto";
  double temperature = 0.07;           // initial ITC temperature (learnable `temp`)
  // A load that leaves tensors of the model at their random initialisation (or brings tensors it
  // has no place for) is an error unless this is true; the load report then names them.
  bool allow_partial_load = false;
  // Stage-1 training semantics. itc_gather: the gathered side of ITC carries no gradient
  // ("no_grad": LAVIS' concat_all_gather, at every world size) or does ("with_grad": gradients
  // that do not depend on the world size). itm_negatives: each ITM hard negative drawn from
  // softmax(similarity) with same-image pairs masked ("sample", LAVIS) or the most similar
  // other image/text ("argmax", deterministic, for tests).
  std::string itc_gather = "no_grad";
  std::string itm_negatives = "sample";
  // The LM loss under data parallelism: each rank's mean over its tokens, which DDP then averages
  // ("local_tokens", LAVIS: it depends on how tokens fall across ranks), or the mean over the
  // global batch's tokens ("global_tokens": token counts all-reduced; equal at every world size).
  std::string lm_loss_normalization = "local_tokens";
  // How the ViT's and the LLM's linear layers hold their weights: "float" (the run's dtype) or
  // "int8": weight-only, per output channel, with fp32 scales (on the CPU the products run
  // through ATen's _weight_int8pack_mm in bf16: activations, scales and the product's output are
  // rounded to bf16, W8A16). Float weights are
  // quantised as they load; `blip2 quantize` writes a directory of int8 weights, whose
  // config.yaml says int8. Evaluation and prediction only, without tensor parallelism.
  std::string weights = "float";
  VisionConfig vision_config;
  QFormerConfig qformer_config;
  std::optional<TextConfig> text_config;  // stage 2 only

  template <class V> void visit(V& v) {
    v("type", type); v("max_txt_len", max_txt_len);
    v("checkpoint_name_or_path", checkpoint_name_or_path); v("prompt", prompt);
    v("prompt_length", prompt_length); v("freeze_vision", freeze_vision);
    v("freeze_text", freeze_text); v("frozen_dtype", frozen_dtype); v("temperature", temperature);
    v("allow_partial_load", allow_partial_load);
    v("itc_gather", itc_gather); v("itm_negatives", itm_negatives);
    v("lm_loss_normalization", lm_loss_normalization); v("weights", weights);
    v("vision_config", vision_config); v("qformer_config", qformer_config);
    v("text_config", text_config);
  }
  int64_t encoder_width() const {
    return qformer_config.encoder_width > 0 ? qformer_config.encoder_width
                                            : vision_config.hidden_size;
  }
};

struct ArchConfig {
  std::string type = "Blip2Qformer";
  template <class V> void visit(V& v) { v("type", type); }
};

struct ModelSection {
  Blip2Config model_config;
  ArchConfig arch;
  template <class V> void visit(V& v) { v("model_config", model_config); v("arch", arch); }
};

struct DataLoaderConfig {
  // SyntheticShapes | MultiImgCapDataLoader (COCO, VG, Flickr30k caption JSON) |
  // Cifar100DataLoader (binary release) | ImageFolder (a directory of images)
  std::string type = "SyntheticShapes";
  std::string dataset_dir;               // root of annotation_files / image_dirs
  std::vector<std::string> annotation_files;
  std::vector<std::string> image_dirs;
  std::string stage = "train";           // train | eval (synthetic: train | heldout)
  bool shuffle = true;
  int64_t num_samples = 0;               // synthetic: images in the split (0 = its default)
  bool skip_bad_samples = false;         // skip unreadable images (counted and reported)
  // The sentence a class label is put into: CIFAR-100's caption of an image, and the
  // hypothesis of zero_shot_image_classification. Must contain "{}".
  std::string hypothesis_template = "a picture of {}";
  // zero_shot_image_classification: several templates; a label scores its best one (the max
  // over templates of the cosine). When given, they replace hypothesis_template there.
  std::vector<std::string> hypothesis_templates;
  bool fine_label = true;                // CIFAR-100: 100 fine classes (else 20 coarse)
  // zero_shot_image_classification: the labels to choose from (default: the dataset's class
  // names).
  std::vector<std::string> candidate_labels;

  template <class V> void visit(V& v) {
    v("type", type); v("dataset_dir", dataset_dir); v("annotation_files", annotation_files);
    v("image_dirs", image_dirs); v("stage", stage); v("shuffle", shuffle);
    v("num_samples", num_samples); v("skip_bad_samples", skip_bad_samples);
    v("hypothesis_template", hypothesis_template); v("hypothesis_templates", hypothesis_templates);
    v("fine_label", fine_label);
    v("candidate_labels", candidate_labels);
  }
};

// CaptionTransform: LAVIS' caption cleaning, then tokenisation.
struct TextTransformConfig {
  std::string type = "CaptionTransform";
  std::string prompt;                  // prepended after cleaning
  int64_t max_words = 50;
  int64_t max_length = 32;             // tokens, padded and truncated to this
  std::string padding = "max_length";
  template <class V> void visit(V& v) {
    v("type", type); v("prompt", prompt); v("max_words", max_words);
    v("max_length", max_length); v("padding", padding);
  }
};

struct TokenizerConfig {
  std::string type = "BertTokenizer";
  int64_t max_length = 32;
  std::string vocab_file;              // "" = the built-in synthetic vocabulary
  std::string pad_token = "[PAD]";
  std::string bos_token = "[DEC]";
  bool do_lower_case = true;
  template <class V> void visit(V& v) {
    v("type", type); v("max_length", max_length); v("vocab_file", vocab_file);
    v("pad_token", pad_token); v("bos_token", bos_token); v("do_lower_case", do_lower_case);
  }
};

// Image preprocessing. blip2_image_train: RandomResizedCrop + flip (the default for training);
// blip_image_train: the same plus RandomAugment(2, 5) (LAVIS uses it for VG);
// blip_image_eval: bicubic resize to S x S (the default otherwise).
struct ImageTransformConfig {
  std::string type;                    // "" = by split; blip2_image_train | blip_image_train | blip_image_eval
  int64_t image_size = 0;              // 0 = model.model_config.vision_config.image_size
  double scale_min = 0.5, scale_max = 1.0;
  bool hflip = true;
  template <class V> void visit(V& v) {
    v("type", type); v("image_size", image_size); v("scale_min", scale_min);
    v("scale_max", scale_max); v("hflip", hflip);
  }
};

struct DatasetConfig {
  DataLoaderConfig data_loader;
  ImageTransformConfig image_transforms;
  TextTransformConfig text_transforms;
  TokenizerConfig tokenizer;
  int64_t batch_size = 0;              // 0 = runner_config.batch_size
  bool drop_remainder = true;
  int64_t num_parallel_workers = 2;
  // image_to_text_retrieval: candidates re-ranked by ITM per query (at least 10: R@10 is
  // reported); ITM + ITC (true) or ITM alone; each image's cross-attention keys/values computed
  // once (a speed switch).
  int64_t k_test = 128;
  bool add_extra_itm_score = true;
  bool reuse_cross_kv = true;
  // image_to_text_retrieval: images whose cross-attention keys/values are held at once while
  // re-ranking (the memory knob: ~25 MB an image with ViT-g at 364 px; >= 1).
  int64_t rerank_chunk_size = 16;
  // zero_shot_image_classification: the top labels of each image re-ranked by ITM + ITC
  // (0 = ITC only, as the seed).
  int64_t itm_top_k = 0;
  // Batches built ahead on background threads while the current one trains (>= 1).
  int64_t prefetch_size = 2;
  template <class V> void visit(V& v) {
    v("prefetch_size", prefetch_size);
    v("data_loader", data_loader); v("image_transforms", image_transforms);
    v("text_transforms", text_transforms);
    v("tokenizer", tokenizer); v("batch_size", batch_size);
    v("drop_remainder", drop_remainder); v("num_parallel_workers", num_parallel_workers);
    v("k_test", k_test); v("add_extra_itm_score", add_extra_itm_score);
    v("reuse_cross_kv", reuse_cross_kv); v("itm_top_k", itm_top_k);
    v("rerank_chunk_size", rerank_chunk_size);
  }
};

struct RunnerConfig {
  int64_t epochs = 10;
  int64_t batch_size = 80;             // per card
  int64_t log_interval = 10;           // steps between log lines (non-terminal output)
  int64_t save_steps = 0;              // checkpoint every N steps; 0 = at each epoch end
  int64_t max_steps = -1;              // stop after this many steps (schedule unchanged); -1 = all
  double max_grad_norm = 0.0;          // gradient clipping; 0 = off
  // Micro-batches whose gradients add up to one optimizer step (each loss divided by it); the
  // schedule, max_steps, save_steps and the logged step count optimizer steps.
  int64_t gradient_accumulation_steps = 1;
  // The trainable part's matmuls under bf16 autocast (CUDA, or the CPU's); master weights,
  // similarities, softmaxes and losses stay fp32.
  bool bf16_autocast = false;
  bool save_frozen_weights = true;     // include the frozen ViT in checkpoints
  // Evaluations `blip2 run --run_mode train` runs on eval_dataset after training, besides the
  // losses: image_to_text_retrieval, zero_shot_image_classification.
  std::vector<std::string> eval_tasks;
  // Stage 2 with a randomly initialised LLM (the tiny preset): epochs of language-model
  // pretraining on the training captions before the LLM is frozen; 0 = none (a real LLM).
  int64_t llm_pretrain_epochs = 0;
  double llm_pretrain_lr = 1e-3;
  template <class V> void visit(V& v) {
    v("epochs", epochs); v("batch_size", batch_size); v("log_interval", log_interval);
    v("save_steps", save_steps); v("max_steps", max_steps); v("max_grad_norm", max_grad_norm);
    v("gradient_accumulation_steps", gradient_accumulation_steps);
    v("bf16_autocast", bf16_autocast); v("save_frozen_weights", save_frozen_weights);
    v("eval_tasks", eval_tasks); v("llm_pretrain_epochs", llm_pretrain_epochs);
    v("llm_pretrain_lr", llm_pretrain_lr);
  }
};

struct OptimizerConfig {
  std::string type = "adamw";
  std::vector<double> betas{0.9, 0.98};
  double eps = 1e-8;
  double weight_decay = 0.05;          // not applied to biases and 1-D (norm) parameters
  template <class V> void visit(V& v) {
    v("type", type); v("betas", betas); v("eps", eps); v("weight_decay", weight_decay);
  }
};

// Linear warmup from warmup_lr_init to learning_rate, then cosine down to lr_end.
// type cosine (or CosineWithWarmUpLR, the seed's): per optimizer step, warmup over warmup_steps,
// cosine until total_steps. type linear_warmup_cosine_lr: LAVIS' scheduler, warmup over the
// first warmup_steps batches of epoch 0, then one cosine value per epoch over runner_config.epochs.
struct LrScheduleConfig {
  std::string type = "cosine";
  double learning_rate = 1e-4;
  double lr_end = 1e-5;
  double warmup_lr_init = 1e-6;
  int64_t warmup_steps = 5000;
  int64_t total_steps = -1;            // -1 = epochs x steps per epoch
  template <class V> void visit(V& v) {
    v("type", type); v("learning_rate", learning_rate); v("lr_end", lr_end);
    v("warmup_lr_init", warmup_lr_init); v("warmup_steps", warmup_steps);
    v("total_steps", total_steps);
  }
};

struct ParallelConfig {
  int64_t data_parallel = 1;
  int64_t model_parallel = 1;
  int64_t pipeline_stage = 1;
  // How data-parallel gradients are averaged: "bucketed" (c10d's Reducer, DDP's engine: buckets
  // all-reduced while backward runs) or "coalesced" (one flat all-reduce after backward).
  std::string gradient_reduction = "bucketed";
  template <class V> void visit(V& v) {
    v("data_parallel", data_parallel); v("model_parallel", model_parallel);
    v("pipeline_stage", pipeline_stage); v("gradient_reduction", gradient_reduction);
  }
};

struct ImageProcessorConfig {
  std::string type = "Blip2ImageProcessor";
  int64_t image_size = 224;
  template <class V> void visit(V& v) { v("type", type); v("image_size", image_size); }
};

struct ProcessorConfig {
  std::string type = "Blip2Processor";
  ImageProcessorConfig image_processor;
  TokenizerConfig tokenizer;
  template <class V> void visit(V& v) {
    v("type", type); v("image_processor", image_processor); v("tokenizer", tokenizer);
  }
};

struct TrainerSection {
  std::string type = "contrastive_language_image_pretrain";  // the task
  std::string model_name = "tiny";     // a preset from the support list
  template <class V> void visit(V& v) { v("type", type); v("model_name", model_name); }
};

// The whole file.
struct RunConfig {
  int64_t seed = 42;
  std::string run_mode = "train";      // train | eval | predict
  std::string output_dir = "./output";
  std::string device_target = "cpu";   // cpu | cuda | cuda:N
  std::string load_checkpoint;         // checkpoint directory or file; "" = none
  bool resume_training = false;        // continue optimizer state, step and data position
  bool use_parallel = false;
  // Images whose header declares more pixels are refused before any pixel buffer is allocated
  // (Pillow's limit: twice its MAX_IMAGE_PIXELS of 89,478,485).
  int64_t max_image_pixels = 178956970;
  TrainerSection trainer;
  RunnerConfig runner_config;
  OptimizerConfig optimizer;
  LrScheduleConfig lr_schedule;
  DatasetConfig train_dataset;
  DatasetConfig eval_dataset;
  ModelSection model;
  ProcessorConfig processor;
  ParallelConfig parallel_config;

  template <class V> void visit(V& v) {
    v("seed", seed); v("run_mode", run_mode); v("output_dir", output_dir);
    v("device_target", device_target); v("load_checkpoint", load_checkpoint);
    v("resume_training", resume_training); v("use_parallel", use_parallel);
    v("max_image_pixels", max_image_pixels); v("trainer", trainer);
    v("runner_config", runner_config); v("optimizer", optimizer);
    v("lr_schedule", lr_schedule); v("train_dataset", train_dataset);
    v("eval_dataset", eval_dataset); v("model", model); v("processor", processor);
    v("parallel_config", parallel_config);
  }

  // Not a config field: where each key path the user set explicitly comes from ("train.yaml",
  // "--load_checkpoint"). Architecture fields a checkpoint describes are taken from it unless
  // set here, and a disagreement with a value set here is an error naming both.
  std::map<std::string, std::string> given;
  // Not a config field: the file (or "<embedded tiny config>") it was read from, for messages.
  std::string source = "the run config";
};

// Parses YAML text; `source` names the file in error messages. The model section starts from
// the preset named by trainer.model_name (when it names one; `preset` instead when given) and the
// file overrides its fields. RunConfig::given records the keys the file sets.
RunConfig parse_run_config(const std::string& yaml_text, const std::string& source,
                           const std::string& preset = "");
RunConfig load_run_config(const std::string& path);
// Checks cross-field constraints; errors name `source` and the key path.
void validate(const RunConfig& cfg, const std::string& source);
// The same checks for a model config alone (what a checkpoint's config.json or config.yaml says).
void validate_model_config(const Blip2Config& model, const std::string& source);
// cpu, cuda or cuda:N.
bool is_device_target(const std::string& target);

// Every scalar field of a model config by key path ("model.model_config.qformer_config.hidden_size")
// as text.
std::map<std::string, std::string> flatten(const Blip2Config& c);
// For a model built already (from_pretrained): every model key the run set must be the model's
// (after adopt_architecture, which compares the architecture); else an Error naming both.
void require_given_model_settings(const RunConfig& run, const Blip2Config& model, const std::string& model_source);

// ---- the architecture of a run comes from its weights when they carry one ----

// The parts of a BLIP-2 model a checkpoint's own config (config.json, config.yaml) describes.
// The source recorded in RunConfig::given for model_config.weights when the command line or an API
// option asks for float weights to be quantised as they load.
inline constexpr const char* kQuantiseAtLoad = "--weights (quantise at load)";

struct ArchitectureParts {
  bool vision = false, qformer = false, text = false;
  // Whether the checkpoint's token ids (Q-Former [DEC]/[SEP]/[PAD], the LLM's BOS/EOS/PAD) and
  // training settings (dropout) are the model's own (a whole-model checkpoint) or not (an LLM
  // directory on its own, whose ids the run's config keeps, e.g. OPT's EOS "\n" for captions).
  bool settings = true;
};

// Takes into run.model.model_config the architecture of `from`, a checkpoint's config read from
// `from_source`, for `parts`. A field the run set (run.given) that disagrees is an Error naming
// the key, both values and both sources; any other field takes the checkpoint's value, which is
// then recorded as given by `from_source`, so that two checkpoints that disagree are an error too.
// Fields that are run settings (image_size, dropout, generation) are taken only when not given.
void adopt_architecture(RunConfig& run, const Blip2Config& from, const std::string& from_source,
                        ArchitectureParts parts);
std::string to_yaml(const RunConfig& cfg);
std::string to_yaml(const Blip2Config& cfg);
Blip2Config parse_model_config(const std::string& yaml_text, const std::string& source);

// The embedded default: configs/blip2/tiny_pretrain_stage_1.yaml compiled into the binary.
const std::string& embedded_tiny_config();

// ---- presets: the support list ----
struct Preset {
  std::string name;
  std::string task;
  std::string description;
  Blip2Config config;
};
const std::vector<Preset>& presets();
const Preset* find_preset(const std::string& name);  // nullptr if unknown
std::vector<std::string> support_list();

}  // namespace blip2
