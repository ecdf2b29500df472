#include "blip2/tasks/factory.h"

#include "blip2/data/caption_datasets.h"
#include "blip2/data/synthetic.h"
#include "blip2/dist/dist.h"
#include "blip2/io/checkpoint.h"
#include "blip2/util/common.h"
#include "blip2/vision/image.h"

namespace blip2 {

torch::Dtype frozen_dtype(const Blip2Config& c, torch::Device device) {
  if (c.frozen_dtype == "bfloat16") return torch::kBFloat16;
  if (c.frozen_dtype == "float32") return torch::kFloat32;
  return device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
}

Blip2Llm build_stage2_model(const Blip2Config& c, WeightLedger& ledger, torch::Device device, bool draw) {
  const InitOptions frozen{torch::TensorOptions().dtype(frozen_dtype(c, device)).device(device), 0.02, draw};
  Blip2Llm model(c, InitOptions{torch::TensorOptions().dtype(torch::kFloat32), 0.02, draw}, frozen);
  if (c.weights == "int8") linears_to_int8(*model, {"vision_model.", "language_model."}, draw);
  if (!c.vision_config.checkpoint_name_or_path.empty())
    load_model_weights(*model, c.vision_config.checkpoint_name_or_path, ledger, "vision_model.");
  if (!c.text_config->checkpoint_name_or_path.empty())
    load_model_weights(*model, c.text_config->checkpoint_name_or_path, ledger, "language_model.");
  if (!c.checkpoint_name_or_path.empty()) load_model_weights(*model, c.checkpoint_name_or_path, ledger);
  return model;
}

Blip2Qformer build_model(const Blip2Config& mc, WeightLedger& l, torch::Device device, bool draw) {
  const InitOptions frozen{torch::TensorOptions().dtype(frozen_dtype(mc, device)).device(device), 0.02, draw};
  Blip2Qformer model(mc, InitOptions{torch::TensorOptions().dtype(torch::kFloat32), 0.02, draw}, frozen);
  if (mc.weights == "int8") linears_to_int8(*model, {"vision_model."}, draw);
  // The ViT alone (eva_vit_g.pth, or any checkpoint holding vision_model.*).
  if (!mc.vision_config.checkpoint_name_or_path.empty())
    load_model_weights(*model, mc.vision_config.checkpoint_name_or_path, l, "vision_model.");
  if (!mc.checkpoint_name_or_path.empty()) load_model_weights(*model, mc.checkpoint_name_or_path, l);
  return model;
}

LoadReport load_model_weights(torch::nn::Module& model, const std::string& path, WeightLedger& ledger,
                              const std::string& prefix) {
  const std::string where = locate_weights(path);
  return ledger.load(model, load_checkpoint_tensors(where), where, prefix);
}

void adopt_checkpoint_architectures(RunConfig& cfg) {
  auto& mc = cfg.model.model_config;
  auto adopt = [&](const std::string& path, ArchitectureParts wanted) {
    if (path.empty()) return;
    auto a = checkpoint_architecture(path);
    if (!a) return;
    const ArchitectureParts parts{a->parts.vision && wanted.vision, a->parts.qformer && wanted.qformer,
                                  a->parts.text && wanted.text, a->parts.settings && wanted.settings};
    adopt_architecture(cfg, a->config, a->source, parts);
  };
  adopt(mc.vision_config.checkpoint_name_or_path, {true, false, false, false});
  if (mc.text_config) adopt(mc.text_config->checkpoint_name_or_path, {false, false, true, false});
  adopt(mc.checkpoint_name_or_path, {true, true, true, true});
  adopt(cfg.load_checkpoint, {true, true, true, true});
  validate(cfg, cfg.source);
  set_max_image_pixels(cfg.max_image_pixels);
}

void require_checkpoint_architecture(const Blip2Config& built, const std::string& path) {
  auto a = checkpoint_architecture(path);
  if (!a) return;
  RunConfig run;
  run.model.model_config = built;
  for (const auto& [key, value] : flatten(built)) run.given[key] = "the model as built";
  adopt_architecture(run, a->config, a->source, a->parts);  // any difference is an error
}

bool skip_draws(const RunConfig& cfg) {
  const auto& mc = cfg.model.model_config;
  const bool named = !cfg.load_checkpoint.empty() || !mc.checkpoint_name_or_path.empty() ||
                     !mc.vision_config.checkpoint_name_or_path.empty() ||
                     (mc.text_config && !mc.text_config->checkpoint_name_or_path.empty());
  return cfg.run_mode != "train" && named && !mc.allow_partial_load;
}

CoveragePolicy coverage_policy(const RunConfig& cfg, bool training) {
  CoveragePolicy p;
  p.allow_partial = cfg.model.model_config.allow_partial_load;
  p.training = training;
  p.llm_trained_here = training && cfg.runner_config.llm_pretrain_epochs > 0;
  return p;
}

std::shared_ptr<WordPieceTokenizer> model_tokenizer(const TokenizerConfig& tc, const QFormerConfig& q,
                                                    const std::string& section) {
  auto tok = make_tokenizer(tc);
  auto key = std::string("model.model_config.qformer_config.");
  check(tok->size() <= q.embedding_vocab_size(),
        key + "vocab_size: the tokenizer has " + std::to_string(tok->size()) +
            " tokens but the embedding table only " + std::to_string(q.embedding_vocab_size()) +
            " (" + section + ".tokenizer.vocab_file names the vocabulary)");
  check(tok->bos_id() == q.bos_token_id,
        key + "bos_token_id is " + std::to_string(q.bos_token_id) + " but the tokenizer's " +
            tc.bos_token + " is " + std::to_string(tok->bos_id()));
  check(tok->pad_id() == q.pad_token_id,
        key + "pad_token_id is " + std::to_string(q.pad_token_id) + " but the tokenizer's [PAD] is " +
            std::to_string(tok->pad_id()));
  return tok;
}

void require_weights(const std::vector<std::string>& missing, const std::vector<std::string>& prefixes,
                     const std::string& task) {
  for (const auto& prefix : prefixes)
    for (const auto& m : missing)
      if (m.rfind(prefix, 0) == 0)
        throw Error("task " + task + " needs the model's " + prefix.substr(0, prefix.size() - 1) +
                    ", but the loaded weights have none (missing '" + m + "'); load a checkpoint that "
                    "has it (a LAVIS stage-1 file, a Hugging Face Blip2ForImageTextRetrieval, or ours)");
}

BatchLoader make_batch_loader(const RunConfig& cfg, const DatasetConfig& d, bool train,
                              std::shared_ptr<const WordPieceTokenizer> tokenizer) {
  auto dataset = make_dataset(d, cfg.model.model_config.vision_config.image_size,
                              static_cast<uint64_t>(cfg.seed), train ? "train_dataset" : "eval_dataset");
  LoaderOptions o;
  o.batch_size = d.batch_size > 0 ? d.batch_size : cfg.runner_config.batch_size;
  o.shuffle = train && d.data_loader.shuffle;
  o.drop_last = train ? d.drop_remainder : false;
  o.seed = static_cast<uint64_t>(cfg.seed);
  o.num_workers = d.num_parallel_workers;
  o.skip_bad_samples = d.data_loader.skip_bad_samples;
  // Training shards by data-parallel rank (tensor-parallel peers take the same batches);
  // evaluation loaders see everything and the evaluation loops split the work.
  o.rank = train ? dist::dp_rank() : 0;
  o.world_size = train ? dist::dp_size() : 1;
  o.prefetch = d.prefetch_size;
  o.pin_memory = cfg.device_target != "cpu";
  return BatchLoader(dataset, std::move(tokenizer), d.text_transforms, o);
}

void join_processes(const RunConfig& cfg) {
  dist::Request r;
  r.use_parallel = cfg.use_parallel;
  r.data_parallel = cfg.parallel_config.data_parallel;
  r.model_parallel = cfg.parallel_config.model_parallel;
  r.pipeline_stage = cfg.parallel_config.pipeline_stage;
  r.config_text = to_yaml(cfg);
  dist::init_from_env(r);
}

}  // namespace blip2
