"""Writes tests/fixtures/parity/: a tiny random Hugging Face Blip2ForImageTextRetrieval saved as
Hugging Face saves it (config.json + model.safetensors), inputs, and what transformers computes
from them: the ViT's last hidden state (after post_layernorm = ln_vision), the Q-Former's query
output, the normalised image and text features, the ITC similarity (max over queries) and the
ITM logits. The same weights are also written in LAVIS' .pth layout (torch.save of
{"model": state_dict, "optimizer": ..., "epoch": ...}, with LAVIS' names, a stage-1 LM head and
temp), the ViT alone as eva_vit_g.pth has it (no prefix), and a bicubic position-embedding
interpolation.

    .venv/bin/pip install transformers safetensors && .venv/bin/python tools/make_parity_fixtures.py
"""
import collections
import os
import re

import torch
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForImageTextRetrieval

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "parity")


def main():
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=7,
                           layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu"),
        qformer_config=dict(vocab_size=101, hidden_size=48, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=80,
                            max_position_embeddings=40, cross_attention_frequency=2,
                            encoder_hidden_size=32, layer_norm_eps=1e-12,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            use_qformer_text_input=True),
        num_query_tokens=6, image_text_hidden_size=16)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # move every tensor off its init value so each one is checked
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("self_attn.qkv.bias"):  # keys carry no bias (EVA convention)
                d = p.shape[0] // 3
                p[d:2 * d] = 0
    out_dir = os.path.join(ROOT, "hf_itm")
    model.save_pretrained(out_dir, safe_serialization=True)

    pixel_values = torch.randn(3, 3, 28, 28)
    input_ids = torch.tensor([[2, 15, 16, 17, 18, 3, 0], [2, 40, 41, 3, 0, 0, 0], [2, 99, 5, 6, 7, 8, 3]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
        query = model.qformer(query_embeds=model.query_tokens.expand(3, -1, -1),
                              encoder_hidden_states=vision).last_hidden_state
        itc = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                    use_image_text_matching_head=False)
        itm = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                    use_image_text_matching_head=True)
    save_file({
        "pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
        "vision_last_hidden_state": vision.contiguous(), "query_output": query.contiguous(),
        "image_feat": itc.image_embeds.contiguous(), "text_feat": itc.text_embeds.contiguous(),
        "itc_logits_per_image": itc.logits_per_image.contiguous(),
        "itm_logits": itm.logits_per_image.contiguous(),
    }, os.path.join(ROOT, "hf_itm_io.safetensors"))
    sd = write_lavis(model)
    write_stage1_losses(model, sd)
    print("parity fixtures written to", os.path.normpath(ROOT))


def write_stage1_losses(model, sd):
    """LAVIS' stage-1 losses (blip2_qformer.py) on the tiny weights, written out in PyTorch on
    top of the Hugging Face modules: ITC with label smoothing 0.1 over max-over-query
    similarities / temp; ITM for given negatives; LM with [DEC] and the multimodal causal mask
    (the uncached equivalent of LAVIS' pass over the cached query keys/values)."""
    F = torch.nn.functional
    torch.manual_seed(2)
    q_len = model.config.num_query_tokens
    vocab = model.config.qformer_config.vocab_size
    bos, temp = vocab - 1, float(sd["temp"])
    images = torch.randn(3, 3, 28, 28)
    ids = torch.tensor([[2, 11, 12, 13, 14, 15, 3, 0], [2, 21, 22, 3, 0, 0, 0, 0],
                        [2, 31, 32, 33, 34, 35, 36, 3]])
    keep = (ids != 0).long()
    neg_image_for_text = torch.tensor([1, 2, 0])
    neg_text_for_image = torch.tensor([2, 0, 1])
    b = ids.shape[0]
    with torch.no_grad():
        v = model.vision_model(pixel_values=images).last_hidden_state
        qt = model.query_tokens.expand(b, -1, -1)
        q = model.qformer(query_embeds=qt, encoder_hidden_states=v).last_hidden_state
        image_feats = F.normalize(model.vision_projection(q), dim=-1)
        t = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0,
                          attention_mask=keep).last_hidden_state
        text_feat = F.normalize(model.text_projection(t[:, 0]), dim=-1)
        sim_i2t = (image_feats @ text_feat.t()).max(1).values / temp            # [image, text]
        sim_t2i = (text_feat @ image_feats.permute(0, 2, 1)).max(-1).values.t() / temp  # [text, image]
        targets = torch.arange(b)
        loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) +
                    F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

        ids3 = torch.cat([ids, ids, ids[neg_text_for_image]])
        keep3 = torch.cat([keep, keep, keep[neg_text_for_image]])
        v3 = torch.cat([v, v[neg_image_for_text], v])
        qt3 = model.query_tokens.expand(3 * b, -1, -1)
        h = model.qformer(query_embeds=model.embeddings(input_ids=ids3, query_embeds=qt3),
                          query_length=q_len,
                          attention_mask=torch.cat([torch.ones(3 * b, q_len, dtype=torch.long), keep3], 1),
                          encoder_hidden_states=v3).last_hidden_state
        itm_logits = model.itm_head(h[:, :q_len]).mean(1)
        loss_itm = F.cross_entropy(itm_logits, torch.cat([torch.ones(b), torch.zeros(2 * b)]).long())

        dec = ids.clone()
        dec[:, 0] = bos
        labels = dec.masked_fill(dec == 0, -100)
        length = ids.shape[1]
        allowed = torch.zeros(q_len + length, q_len + length)
        allowed[:q_len, :q_len] = 1
        allowed[q_len:, :q_len] = 1
        allowed[q_len:, q_len:] = torch.tril(torch.ones(length, length))
        full = torch.cat([torch.ones(b, q_len, dtype=torch.long), keep], 1)
        mask = (allowed[None] * full[:, None, :].float()).bool()[:, None]
        h = model.qformer(query_embeds=model.embeddings(input_ids=dec, query_embeds=qt),
                          query_length=q_len, attention_mask=mask,
                          encoder_hidden_states=v).last_hidden_state[:, q_len:]
        p = "Qformer.cls.predictions."
        x = F.linear(h, sd[p + "transform.dense.weight"], sd[p + "transform.dense.bias"])
        x = F.layer_norm(F.gelu(x), (x.shape[-1],), sd[p + "transform.LayerNorm.weight"],
                         sd[p + "transform.LayerNorm.bias"], eps=1e-12)
        lm_logits = F.linear(x, sd["Qformer.bert.embeddings.word_embeddings.weight"], sd[p + "bias"])
        loss_lm = F.cross_entropy(lm_logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                  label_smoothing=0.1, ignore_index=-100)
    save_file({"pixel_values": images, "input_ids": ids, "attention_mask": keep,
               "neg_image_for_text": neg_image_for_text, "neg_text_for_image": neg_text_for_image,
               "loss_itc": loss_itc.reshape(1), "loss_itm": loss_itm.reshape(1), "loss_lm": loss_lm.reshape(1),
               "lm_logits": lm_logits.contiguous(), "itm_logits": itm_logits.contiguous()},
              os.path.join(ROOT, "stage1_losses.safetensors"))


LAVIS_RULES = [  # Hugging Face name -> LAVIS name (the inverse of the conversion script's)
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.", r"visual_encoder.blocks.\1.attn."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^embeddings\.", "Qformer.bert.embeddings."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"^vision_projection\.", "vision_proj."),
    (r"^text_projection\.", "text_proj."),
]


def to_lavis(name):
    for pattern, repl in LAVIS_RULES:
        if re.search(pattern, name):
            return re.sub(pattern, repl, name, count=1)
    return name


def write_lavis(model):
    torch.manual_seed(1)
    sd = collections.OrderedDict()
    for name, t in model.state_dict().items():
        if name.endswith("self_attn.qkv.bias"):
            d = t.shape[0] // 3
            base = to_lavis(name[: -len("qkv.bias")])
            sd[base + "q_bias"] = t[:d].clone()
            sd[base + "v_bias"] = t[2 * d:].clone()
        else:
            sd[to_lavis(name)] = t.clone()
    h = model.config.qformer_config.hidden_size
    vocab = model.config.qformer_config.vocab_size
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    sd["Qformer.cls.predictions.bias"] = torch.randn(vocab)
    sd["Qformer.cls.predictions.transform.dense.weight"] = torch.randn(h, h) * 0.1
    sd["Qformer.cls.predictions.transform.dense.bias"] = torch.randn(h) * 0.1
    sd["Qformer.cls.predictions.transform.LayerNorm.weight"] = 1 + torch.randn(h) * 0.1
    sd["Qformer.cls.predictions.transform.LayerNorm.bias"] = torch.randn(h) * 0.1
    sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.bert.embeddings.word_embeddings.weight"]
    sd["temp"] = torch.tensor(0.07)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "config": {"run": {"seed": 42}}, "epoch": 3, "scaler": None},
               os.path.join(ROOT, "blip2_lavis.pth"))
    vit = collections.OrderedDict((k[len("visual_encoder."):], v) for k, v in sd.items()
                                  if k.startswith("visual_encoder."))
    torch.save(vit, os.path.join(ROOT, "eva_vit_lavis.pth"))
    pos = sd["visual_encoder.pos_embed"]  # [1, 1 + 4*4, 32] -> [1, 1 + 6*6, 32]
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    interp = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    save_file({"pos_embed": pos.contiguous(), "interpolated": interp.contiguous(),
               "cls_bias": sd["Qformer.cls.predictions.bias"]},
              os.path.join(ROOT, "lavis_extras.safetensors"))
    return sd


if __name__ == "__main__":
    main()
