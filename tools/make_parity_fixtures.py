"""Writes tests/fixtures/parity/: a tiny random Hugging Face Blip2ForImageTextRetrieval saved as
Hugging Face saves it (config.json + model.safetensors), inputs, and what transformers computes
from them: the ViT's last hidden state (after post_layernorm = ln_vision), the Q-Former's query
output, the normalised image and text features, the ITC similarity (max over queries) and the
ITM logits. The same weights are also written in LAVIS' .pth layout (torch.save of
{"model": state_dict, "optimizer": ..., "epoch": ...}, with LAVIS' names, a stage-1 LM head and
temp), the ViT alone as eva_vit_g.pth has it (no prefix), and a bicubic position-embedding
interpolation.

The generation half (write_generation) builds tiny random Blip2ForConditionalGeneration models
with an OPT and with a Llama language model, saves them (hf_opt/, hf_llama/), their language
models alone (opt_llm/, llama_llm/, and llama_llm as Baichuan-7B lays it out with the fused
W_pack: baichuan_llm/), the OPT model in LAVIS' stage-2 layout (blip2_opt_lavis.pth: query path,
ln_vision, opt_proj; eva_vit_opt.pth: its ViT), and what transformers computes: logits, and the
token ids `generate` returns for greedy, beam and repetition-penalty settings, batched with
left padding.

    .venv/bin/pip install transformers safetensors && .venv/bin/python tools/make_parity_fixtures.py
"""
import collections
import os
import re

import torch
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

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
    write_generation("opt")
    write_generation("llama")
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
    sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"]  # LAVIS saves the tied bias twice
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


VISION = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=7, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
TEXT = {
    "opt": dict(model_type="opt", vocab_size=96, hidden_size=40, num_hidden_layers=2, ffn_dim=72,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=40,
                do_layer_norm_before=True, activation_function="relu", dropout=0.0,
                attention_dropout=0.0, bos_token_id=2, eos_token_id=50, pad_token_id=1,
                tie_word_embeddings=True),
    "llama": dict(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=88,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False),
}
IMAGE_TOKEN = 95  # the last row of the tiny vocabularies, as <image> is in the hub's OPT config


def generated(out, prompt_len, eos):
    """The new tokens of each row, -1 after the first EOS (transformers pads finished rows)."""
    new = out[:, prompt_len:].clone()
    for row in new:
        hit = (row == eos).nonzero()
        if len(hit):
            row[hit[0, 0] + 1:] = -1
    return new


def write_generation(kind):
    torch.manual_seed(3 if kind == "opt" else 4)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=80, max_position_embeddings=40, cross_attention_frequency=2,
                            encoder_hidden_size=32, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, use_qformer_text_input=False),
        text_config=dict(TEXT[kind]), num_query_tokens=6, image_token_index=IMAGE_TOKEN)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if not name.startswith("language_model") else 0.3))
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p[d:2 * d] = 0
    text = config.text_config
    q, bos, pad = config.num_query_tokens, text.bos_token_id, text.pad_token_id
    img = [IMAGE_TOKEN] * q
    pixel_values = torch.randn(2, 3, 28, 28)
    # Same-length prompts (logits, repetition penalty) and left-padded ones (batched generation).
    full = torch.tensor([img + [bos, 10, 11, 12], img + [bos, 20, 21, 22]])
    padded = torch.tensor([img + [bos, 30, 31, 32], [pad, pad] + img + [bos, 40]])
    padded_mask = (torch.arange(padded.shape[1])[None] >= torch.tensor([[0], [2]])).long()

    def gen(ids, mask, eos, **kw):
        with torch.no_grad():
            out = model.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                                 do_sample=False, max_new_tokens=7, eos_token_id=eos,
                                 pad_token_id=pad, **kw)
        return generated(out, ids.shape[1], eos)

    # EOS is a token greedy decoding reaches mid-way, so stopping at EOS is exercised.
    probe = gen(padded, padded_mask, IMAGE_TOKEN)
    eos = int(probe[0, 3])
    model.config.text_config.eos_token_id = eos
    model.language_model.config.eos_token_id = eos
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=full,
                       attention_mask=torch.ones_like(full)).logits
        prefix = model.get_image_features(pixel_values=pixel_values).pooler_output
    tensors = {
        "pixel_values": pixel_values, "input_ids": full, "logits": logits.contiguous(),
        "language_model_inputs": prefix.contiguous(),
        "padded_ids": padded, "padded_mask": padded_mask,
        "eos_token_id": torch.tensor([eos]),
        "greedy": gen(padded, padded_mask, eos),
        "beam3": gen(padded, padded_mask, eos, num_beams=3, length_penalty=1.0),
        "beam3_lp0_min2": gen(padded, padded_mask, eos, num_beams=3, length_penalty=0.0, min_new_tokens=2),
        "beam2_lp2": gen(full, torch.ones_like(full), eos, num_beams=2, length_penalty=2.0),
        "greedy_rep_min5": gen(full, torch.ones_like(full), eos, repetition_penalty=1.5, min_new_tokens=5),
        "no_prompt": gen(torch.tensor([img + [bos]] * 2), torch.ones(2, q + 1, dtype=torch.long), eos),
    }
    root = os.path.join(ROOT, "hf_" + kind)
    model.save_pretrained(root, safe_serialization=True)
    save_file(tensors, os.path.join(ROOT, "hf_%s_io.safetensors" % kind))
    llm = model.language_model
    if kind == "opt":
        llm.save_pretrained(os.path.join(ROOT, "opt_llm"), safe_serialization=True)
        write_lavis_stage2(model, "opt_proj")
    else:  # sharded, as 7B checkpoints are
        llm.save_pretrained(os.path.join(ROOT, "llama_llm"), safe_serialization=True, max_shard_size="40KB")
        write_baichuan(llm)


def write_lavis_stage2(model, proj):
    """LAVIS' stage-2 file keeps only what it trained: query path, ln_vision, the projection."""
    sd = collections.OrderedDict()
    vit = collections.OrderedDict()
    for name, t in model.state_dict().items():
        if name.startswith("language_model."):
            continue
        if name.startswith("language_projection."):
            sd[proj + name[len("language_projection"):]] = t.clone()
        elif name.startswith("vision_model.") and not name.startswith("vision_model.post_layernorm"):
            lavis = to_lavis(name)[len("visual_encoder."):]
            if name.endswith("self_attn.qkv.bias"):
                d = t.shape[0] // 3
                base = lavis[: -len("qkv.bias")]
                vit[base + "q_bias"] = t[:d].clone()
                vit[base + "v_bias"] = t[2 * d:].clone()
            else:
                vit[lavis] = t.clone()
        else:
            sd[to_lavis(name)] = t.clone()
    torch.save({"model": sd, "epoch": 1}, os.path.join(ROOT, "blip2_opt_lavis.pth"))
    torch.save(vit, os.path.join(ROOT, "eva_vit_opt.pth"))


def write_baichuan(llm):
    """Baichuan-7B is Llama with q, k and v fused into one W_pack projection; its release is a
    pytorch_model.bin next to a config.json of model_type "baichuan"."""
    import json
    sd = collections.OrderedDict()
    for name, t in llm.state_dict().items():
        m = re.match(r"(model\.layers\.\d+\.self_attn\.)([qkv])_proj\.weight$", name)
        if m:
            if m.group(2) == "q":
                p = m.group(1)
                sd[p + "W_pack.weight"] = torch.cat([llm.state_dict()[p + x + "_proj.weight"] for x in "qkv"])
            continue
        sd[name] = t.clone()
    out = os.path.join(ROOT, "baichuan_llm")
    os.makedirs(out, exist_ok=True)
    torch.save(sd, os.path.join(out, "pytorch_model.bin"))
    c = llm.config
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan",
                   "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                   "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                   "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps, "hidden_act": "silu",
                   "max_position_embeddings": c.max_position_embeddings, "bos_token_id": c.bos_token_id,
                   "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
                   "tie_word_embeddings": False}, f, indent=2)


if __name__ == "__main__":
    main()
