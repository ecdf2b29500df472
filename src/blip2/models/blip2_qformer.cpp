#include "blip2/models/blip2_qformer.h"

#include "blip2/dist/dist.h"
#include "blip2/util/device.h"

namespace blip2 {
namespace F = torch::nn::functional;

Blip2QformerImpl::Blip2QformerImpl(const Blip2Config& c, const InitOptions& init,
                                   const std::optional<InitOptions>& frozen)
    : config_(c) {
  const auto& q = c.qformer_config;
  InitOptions vit_init = init;
  vit_init.std = c.vision_config.initializer_range;
  InitOptions bert_init = init;
  bert_init.std = q.initializer_range;
  InitOptions head_init = init;
  head_init.std = -1;  // torch.nn.Linear default, as LAVIS creates the heads

  if (frozen && c.freeze_vision) vit_init.options = frozen->options;
  vision_model = register_module("vision_model", EvaVisionModel(c.vision_config, vit_init));
  vision_model->post_layernorm->to(init.options.dtype().toScalarType());  // ln_vision trains (float32)
  {
    torch::NoGradGuard no_grad;
    query_tokens = register_parameter(
        "query_tokens", torch::empty({1, q.query_length, q.hidden_size}, init.options));
    if (init.draw) init_parameter("query_tokens");  // the one rule, also for a draw after loading
  }
  embeddings = register_module("embeddings", TextEmbeddings(q, bert_init));
  qformer = register_module("qformer", QFormerModel(q, c.encoder_width(), bert_init));
  vision_projection = register_module(
      "vision_projection", Linear(q.hidden_size, q.head_embed_dim, true, head_init));
  text_projection = register_module(
      "text_projection", Linear(q.hidden_size, q.head_embed_dim, true, head_init));
  itm_head = register_module("itm_head", Linear(q.hidden_size, 2, true, head_init));
  cls = register_module("cls", LMHead(q, bert_init));
  temp = register_parameter("temp", torch::full({}, c.temperature, init.options));

  if (c.freeze_vision) {
    for (auto& p : vision_model->named_parameters())
      if (p.key().rfind("post_layernorm.", 0) != 0) p.value().set_requires_grad(false);
    vision_model->eval();
  }
}

bool Blip2QformerImpl::init_parameter(const std::string& name) {
  if (name == "temp") {
    temp.fill_(config_.temperature);
  } else if (name == "query_tokens") {
    query_tokens.normal_(0.0, config_.qformer_config.initializer_range);
  } else {
    return false;
  }
  return true;
}

void Blip2QformerImpl::train(bool on) {
  torch::nn::Module::train(on);
  if (config_.freeze_vision) {
    vision_model->eval();
  }
}

torch::Tensor Blip2QformerImpl::encode_image(const torch::Tensor& images) {
  // The ViT runs in the dtype it is held in (bf16 when frozen on CUDA), ln_vision in fp32.
  const auto dtype = vision_model->embeddings->position_embedding.scalar_type();
  torch::Tensor feats;
  if (config_.freeze_vision) {
    torch::NoGradGuard no_grad;
    feats = vision_model->forward_features(images.to(dtype));
  } else {
    feats = vision_model->forward_features(images.to(dtype));
  }
  return vision_model->post_layernorm(feats.to(torch::kFloat32));
}

QueryOutput Blip2QformerImpl::query_pass(const torch::Tensor& image_embeds, bool use_cache) {
  auto queries = query_tokens.expand({image_embeds.size(0), -1, -1});
  auto out = qformer->forward(queries, /*additive_mask: none, queries see each other*/ torch::Tensor(),
                              queries.size(1), image_embeds,
                     nullptr, use_cache);
  return {out.last_hidden_state, std::move(out.past)};
}

torch::Tensor Blip2QformerImpl::text_pass(const torch::Tensor& ids, const torch::Tensor& keep) {
  return qformer->forward(embeddings(ids), padding_mask(keep), 0).last_hidden_state;
}

torch::Tensor Blip2QformerImpl::image_features(const torch::Tensor& query_hidden) {
  return F::normalize(vision_projection(query_hidden), F::NormalizeFuncOptions().dim(-1));
}

torch::Tensor Blip2QformerImpl::text_features(const torch::Tensor& text_hidden) {
  return F::normalize(text_projection(text_hidden.select(1, 0)), F::NormalizeFuncOptions().dim(-1));
}

torch::Tensor Blip2QformerImpl::multimodal_pass(const torch::Tensor& image_embeds,
                                                const torch::Tensor& ids, const torch::Tensor& keep) {
  const int64_t n = ids.size(0), nq = query_tokens.size(1);
  auto queries = query_tokens.expand({n, -1, -1});
  auto embeds = torch::cat({queries, embeddings(ids)}, 1);
  auto joint = torch::cat({torch::ones({n, nq}, keep.options()), keep}, 1);
  return qformer->forward(embeds, padding_mask(joint), nq, image_embeds).last_hidden_state;
}

torch::Tensor Blip2QformerImpl::itm_logits(const torch::Tensor& image_embeds,
                                           const torch::Tensor& ids, const torch::Tensor& keep) {
  const int64_t nq = query_tokens.size(1);
  return itm_head(multimodal_pass(image_embeds, ids, keep).narrow(1, 0, nq)).mean(1);
}

Features Blip2QformerImpl::extract_features(const torch::Tensor& images, const torch::Tensor& ids,
                                            const torch::Tensor& keep, const std::string& mode) {
  TORCH_CHECK(mode == "image" || mode == "text" || mode == "multimodal",
              "extract_features: mode '", mode, "' is not image|text|multimodal");
  const bool need_image = mode != "text", need_text = mode != "image";
  TORCH_CHECK(!need_image || images.defined(), "extract_features: mode ", mode, " needs images");
  TORCH_CHECK(!need_text || (ids.defined() && keep.defined()), "extract_features: mode ", mode,
              " needs texts");
  TORCH_CHECK(mode != "multimodal" || images.size(0) == ids.size(0), "extract_features: ",
              images.size(0), " images but ", ids.size(0), " texts (multimodal pairs them)");
  torch::NoGradGuard no_grad;
  Features f;
  torch::Tensor image_embeds;
  if (need_image) {
    image_embeds = encode_image(images);
    f.image_embeds = query_pass(image_embeds, false).hidden;
    if (mode == "image") f.image_embeds_proj = image_features(f.image_embeds);
  }
  if (mode == "text") {
    f.text_embeds = text_pass(ids, keep);
    f.text_embeds_proj = F::normalize(text_projection(f.text_embeds), F::NormalizeFuncOptions().dim(-1));
  }
  if (mode == "multimodal")
    f.multimodal_embeds = multimodal_pass(image_embeds, ids, keep).narrow(1, 0, query_tokens.size(1));
  return f;
}

torch::Tensor Blip2QformerImpl::itm_logits(const std::vector<KVCache>& cross,
                                           const torch::Tensor& ids, const torch::Tensor& keep) {
  const int64_t n = ids.size(0), nq = query_tokens.size(1);
  auto queries = query_tokens.expand({n, -1, -1});
  auto embeds = torch::cat({queries, embeddings(ids)}, 1);
  auto joint = torch::cat({torch::ones({n, nq}, keep.options()), keep}, 1);
  auto hidden = qformer->forward(embeds, padding_mask(joint), nq, torch::Tensor(), nullptr, false, &cross)
                    .last_hidden_state;
  return itm_head(hidden.narrow(1, 0, nq)).mean(1);
}

torch::Tensor Blip2QformerImpl::lm_logits(const torch::Tensor& decoder_ids,
                                          const torch::Tensor& keep,
                                          const std::vector<KVCache>& query_past) {
  const int64_t nq = query_past.front().key.size(2);
  auto joint = torch::cat({torch::ones({decoder_ids.size(0), nq}, keep.options()), keep}, 1);
  auto hidden =
      qformer->forward(embeddings(decoder_ids), causal_prefix_mask(joint, nq), 0, torch::Tensor(),
                       &query_past)
          .last_hidden_state;
  return cls(hidden, embeddings->word_embeddings->weight);
}

Stage1Output Blip2QformerImpl::forward(const torch::Tensor& images, const torch::Tensor& ids,
                                       const torch::Tensor& keep, const torch::Tensor& image_ids) {
  const int64_t b = images.size(0);
  TORCH_CHECK(ids.size(0) == b, "got ", b, " images but ", ids.size(0), " texts");
  TORCH_CHECK(!image_ids.defined() || image_ids.numel() == b, "got ", b, " images but ", image_ids.numel(),
              " image ids");
  const auto& q = config_.qformer_config;

  auto image_embeds = encode_image(images);                  // [B,N,Dv]
  auto query = query_pass(image_embeds, /*use_cache=*/true);  // [B,Q,H]
  auto image_feats = image_features(query.hidden);            // [B,Q,E]
  auto text_feat = text_features(text_pass(ids, keep));       // [B,E]

  // ---- ITC: image-text contrastive, in fp32 (in bf16, similarities near 1/temp = 14 would be
  // rounded to steps of 1/16 before the softmax) ----
  const int64_t offset = dist::batch_rank() * b, world_b = dist::batch_ranks() * b;
  torch::Tensor sim_i2t, sim_t2i, positives;
  {
    NoAutocast fp32(images.device());
    auto img = image_feats.to(torch::kFloat32), txt = text_feat.to(torch::kFloat32);
    // LAVIS gathers the other side without gradient, even in one process (concat_all_gather
    // is @torch.no_grad); itc_gather: with_grad keeps it.
    const bool with_grad = config_.itc_gather == "with_grad";
    auto gather = with_grad ? dist::all_gather_with_grad : dist::all_gather_no_grad;
    auto image_feats_all = gather(img);                                     // [BW,Q,E]
    auto text_feat_all = gather(txt);                                       // [BW,E]
    auto t = temp.to(torch::kFloat32);
    sim_i2t = max_over_queries(img, text_feat_all) / t;                     // [B,BW]
    sim_t2i = max_over_queries(image_feats_all, txt).t() / t;               // [B,BW]
    torch::Tensor local_image_ids, image_ids_all;
    if (image_ids.defined()) {
      local_image_ids = image_ids.to(images.device(), torch::kLong).reshape({-1});
      image_ids_all = dist::all_gather_no_grad(local_image_ids);
    }
    positives = itc_positives(local_image_ids, image_ids_all, b, world_b, offset, images.device());
  }
  auto loss_itc = itc_loss(sim_i2t, sim_t2i, positives, 0.1);

  // ---- ITM: image-text matching with one hard negative each way ----
  // Ranks may pad their texts to different lengths (padding: longest): gather at the longest.
  const int64_t len = dist::max_over(ids.size(1));
  auto pad = [&](const torch::Tensor& t, int64_t value) {
    return t.size(1) == len ? t : F::pad(t, F::PadFuncOptions({0, len - t.size(1)}).value(value));
  };
  auto ids_all = dist::all_gather_no_grad(pad(ids, q.pad_token_id));
  auto keep_all = dist::all_gather_no_grad(pad(keep, 0));
  auto image_embeds_all = dist::all_gather_with_grad(image_embeds);
  auto neg = hard_negatives(sim_i2t.detach(), sim_t2i.detach(), positives, config_.itm_negatives == "sample");
  auto neg_images = image_embeds_all.index_select(0, neg.image_for_text);
  auto neg_ids = ids_all.index_select(0, neg.text_for_image);
  auto neg_keep = keep_all.index_select(0, neg.text_for_image);
  // pairs: (text, image) positives; (text, negative image); (negative text, image)
  auto itm = itm_logits(torch::cat({image_embeds, neg_images, image_embeds}),
                        torch::cat({pad(ids, q.pad_token_id), pad(ids, q.pad_token_id), neg_ids}),
                        torch::cat({pad(keep, 0), pad(keep, 0), neg_keep}));
  auto long_opts = ids.options().dtype(torch::kLong);
  auto itm_labels = torch::cat({torch::ones({b}, long_opts), torch::zeros({2 * b}, long_opts)});
  auto loss_itm = F::cross_entropy(itm.to(torch::kFloat32), itm_labels);

  // ---- LM: image-grounded captioning, reusing the queries' cached keys/values ----
  auto [decoder_ids, labels] = lm_inputs(ids, q.bos_token_id, q.pad_token_id);
  auto loss_lm = lm_loss(lm_logits(decoder_ids, keep, query.past), labels, 0.1,
                         config_.lm_loss_normalization == "global_tokens");

  return {loss_itc + loss_itm + loss_lm, loss_itc, loss_itm, loss_lm, image_feats, text_feat};
}

torch::Tensor max_over_queries(const torch::Tensor& image_feats, const torch::Tensor& text_feats) {
  const int64_t b = image_feats.size(0), nq = image_feats.size(1);
  auto s = torch::matmul(image_feats.reshape({b * nq, -1}), text_feats.t());  // [B*Q, T]
  return s.view({b, nq, -1}).amax(1);
}

torch::Tensor itc_positives(const torch::Tensor& image_ids, const torch::Tensor& image_ids_all,
                            int64_t batch, int64_t world_batch, int64_t offset, torch::Device device) {
  if (image_ids.defined()) return image_ids.view({-1, 1}) == image_ids_all.view({1, -1});
  auto rows = torch::arange(batch, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto pos = torch::zeros({batch, world_batch}, torch::TensorOptions().dtype(torch::kBool).device(device));
  return pos.index_put_({rows, rows + offset}, true);
}

torch::Tensor itc_loss(const torch::Tensor& sim_i2t, const torch::Tensor& sim_t2i,
                       const torch::Tensor& positives, double label_smoothing) {
  auto pos = positives.to(torch::kFloat32);
  auto targets = pos / pos.sum(1, true);
  targets = (1.0 - label_smoothing) * targets + label_smoothing / static_cast<double>(targets.size(1));
  auto ce = [&](const torch::Tensor& sim) {
    return -(torch::log_softmax(sim.to(torch::kFloat32), 1) * targets).sum(1).mean();
  };
  return (ce(sim_i2t) + ce(sim_t2i)) / 2;
}

HardNegatives hard_negatives(const torch::Tensor& sim_i2t, const torch::Tensor& sim_t2i,
                             const torch::Tensor& positives, bool sample) {
  torch::NoGradGuard no_grad;
  auto weights = [&](const torch::Tensor& sim) {
    return torch::softmax(sim.to(torch::kFloat32).masked_fill(positives, -10000.0), 1);
  };
  auto pick = [&](const torch::Tensor& w) {
    return sample ? torch::multinomial(w, 1).squeeze(1) : w.argmax(1);
  };
  // LAVIS draws the image for each text first, then the text for each image.
  auto image_for_text = pick(weights(sim_t2i));
  auto text_for_image = pick(weights(sim_i2t));
  return {image_for_text, text_for_image};
}

std::pair<torch::Tensor, torch::Tensor> lm_inputs(const torch::Tensor& ids, int64_t bos,
                                                  int64_t pad) {
  auto decoder_ids = ids.clone();
  decoder_ids.select(1, 0).fill_(bos);
  auto labels = decoder_ids.masked_fill(decoder_ids == pad, -100);
  return {decoder_ids, labels};
}

torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& labels, double label_smoothing,
                      bool global_tokens) {
  return next_token_loss(logits, labels, label_smoothing, global_tokens);
}

}  // namespace blip2
