"""Writes tests/fixtures/variants/: one tiny random BLIP-2 per config field that changes the
numbers, as transformers saves it, with what transformers computes from it.

For every field of Blip2VisionConfig, Blip2QFormerConfig, OPTConfig, LlamaConfig and Blip2Config
(less PretrainedConfig's generic ones), the table below gives the values to try, or says why a
field has no variant; a field in neither makes this script fail, so a new transformers field cannot
slip by. Each variant is a base model with that one field changed (a few fields that must move
together, move together), built by transformers, saved by save_pretrained (config.json +
model.safetensors), and run on fixed inputs:
  - stage 1 (Blip2ForImageTextRetrieval): the normalised image and text features and the ITM
    logits;
  - stage 2 (Blip2ForConditionalGeneration, an OPT or a Llama inside): the logits.
A few variants edit config.json by hand after saving (keys transformers 4.x wrote, keys no class
has); their expected outputs come from transformers loading the edited directory. When
transformers itself cannot build or run a variant, it is recorded as such.

tests/test_variants.cpp walks variants.json and asserts, for each, either parity with these
outputs (max abs diff <= 1e-4) or a refusal whose message names the field.

    .venv/bin/pip install transformers==5.24.0 safetensors && .venv/bin/python tools/make_variant_fixtures.py
"""
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                          Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig, OPTConfig, PretrainedConfig)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "variants")

VISION = dict(hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, image_size=8,
              patch_size=4, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", attention_dropout=0.0)
QFORMER = dict(vocab_size=41, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
               max_position_embeddings=16, cross_attention_frequency=1, encoder_hidden_size=8,
               layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act="gelu")
TOP = dict(num_query_tokens=4, image_text_hidden_size=8)
# The tiny LLMs use blip2cpp's built-in 50-token vocabulary, so no tokenizer file is needed.
TEXT = {
    "opt": dict(model_type="opt", vocab_size=50, hidden_size=8, num_hidden_layers=2, ffn_dim=12,
                num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=8,
                do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
                bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=True),
    "llama": dict(model_type="llama", vocab_size=50, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6,
                  hidden_act="silu", bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False),
}
ACTIVATIONS = ["quick_gelu", "relu", "silu", "gelu_new", "gelu_pytorch_tanh", "tanh", "gelu_fast", "mish",
               "relu2", "gelu_10", "laplace", "prelu"]

# field -> list of values, or a string: why the field has no variant.
VISION_FIELDS = {
    "hidden_size": [12],  # with qformer_config.encoder_hidden_size, which must equal it
    "intermediate_size": [16],
    "num_hidden_layers": [2],
    "num_attention_heads": [4],
    "image_size": [12],
    "patch_size": [8],
    "hidden_act": ACTIVATIONS,
    "layer_norm_eps": [1e-3],
    "attention_dropout": [0.3],
    "initializer_range": [0.5],
    "qkv_bias": [False],
}
QFORMER_FIELDS = {
    "vocab_size": [45],
    "hidden_size": [12],
    "num_hidden_layers": [3],
    "num_attention_heads": [4],
    "intermediate_size": [16],
    "hidden_act": ["quick_gelu", "relu", "silu", "gelu_new", "tanh"],
    "hidden_dropout_prob": [0.3],
    "attention_probs_dropout_prob": [0.3],
    "max_position_embeddings": [8],
    "initializer_range": [0.5],
    "layer_norm_eps": [1e-5],
    "pad_token_id": [5],
    "cross_attention_frequency": [2],
    "encoder_hidden_size": [12],
    "use_qformer_text_input": [False],
}
TOP_FIELDS = {
    "num_query_tokens": [6],
    "image_text_hidden_size": [6],
    "initializer_factor": [3.0],
    "initializer_range": [0.5],
    "image_token_index": "the placeholder id of stage-2 prompts; every stage-2 variant uses it",
    "use_decoder_only_language_model": "derived by transformers from text_config.model_type",
    "vision_config": "a section", "qformer_config": "a section", "text_config": "a section",
}
OPT_FIELDS = {
    "vocab_size": [60],
    "hidden_size": [12],  # with word_embed_proj_dim, which OPT keeps equal to it
    "num_hidden_layers": [3],
    "ffn_dim": [16],
    "max_position_embeddings": [24],
    "do_layer_norm_before": [False],
    "_remove_final_layer_norm": [True],
    "word_embed_proj_dim": [4],
    "dropout": [0.3],
    "attention_dropout": [0.3],
    "num_attention_heads": [4],
    "activation_function": ["gelu", "silu", "quick_gelu", "gelu_new"],
    "layerdrop": [0.3],
    "init_std": [0.5],
    "use_cache": [False],
    "pad_token_id": [1],
    "bos_token_id": [5],
    "eos_token_id": [6],
    "enable_bias": [False],
    "layer_norm_elementwise_affine": [False],
    "tie_word_embeddings": [False],
}
LLAMA_FIELDS = {
    "vocab_size": [60],
    "hidden_size": [12],
    "intermediate_size": [16],
    "num_hidden_layers": [3],
    "num_attention_heads": [4],
    "num_key_value_heads": [1],
    "hidden_act": ["gelu", "relu", "gelu_pytorch_tanh"],
    "max_position_embeddings": [24],
    "initializer_range": [0.5],
    "rms_norm_eps": [1e-3],
    "use_cache": [False],
    "pad_token_id": [1],
    "bos_token_id": [5],
    "eos_token_id": [6],
    "pretraining_tp": [2],
    "tie_word_embeddings": [True],
    "rope_parameters": [{"rope_type": "default", "rope_theta": 500.0},
                        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                        {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
                        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}],
    "attention_bias": [True],
    "attention_dropout": [0.3],
    "mlp_bias": [True],
    "head_dim": [6],
}
# Keys edited into config.json after saving: what transformers 4.x configs carry, and keys no
# class has. (section, key, value)
HAND_EDITS = [
    ("text_config", "num_beams", 4),           # a 4.x generation default, not at its default
    ("text_config", "max_length", 20),         # the same, at its default
    ("qformer_config", "position_embedding_type", "relative_key"),
    ("qformer_config", "chunk_size_feed_forward", 2),
    ("vision_config", "pruned_heads", {"0": [1]}),
    ("qformer_config", "foo_bar", 1),          # a key no class has
    ("text_config", "activation_dropout", 0.5),  # facebook/opt-* configs carry it; OPT does not read it
    ("", "tie_word_embeddings", False),        # 4.x wrote it at the top level
]


def check_covered(cls, table, name):
    generic = set(PretrainedConfig().to_dict())
    fields = set(cls().to_dict()) - generic
    missing = sorted(fields - set(table))
    if missing:
        raise SystemExit("%s fields with no variant and no reason: %s" % (name, missing))
    extra = sorted(set(table) - fields - {"tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id"})
    if extra:
        raise SystemExit("%s table names fields the class does not have: %s" % (name, extra))


def perturb(model):
    torch.manual_seed(11)
    with torch.no_grad():  # move every tensor off its init value so each one is checked
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p[d:2 * d] = 0
            if name.endswith("norm.weight") or name.endswith("layer_norm.weight") or name.endswith("layernorm.weight"):
                p.add_(1.0 - p.mean())


def write_vocab(path, size):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["tok%d" % i for i in range(size - 5)]
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")


def stage1_outputs(model, config):
    torch.manual_seed(12)
    s = config.vision_config.image_size
    pixel_values = torch.randn(2, 3, s, s)
    input_ids = torch.tensor([[2, 15, 16, 17, 3, 0], [2, 30, 31, 3, 0, 0]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        itc = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                    use_image_text_matching_head=False)
        itm = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                    use_image_text_matching_head=True)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
            "image_feat": itc.image_embeds.contiguous(), "text_feat": itc.text_embeds.contiguous(),
            "itm_logits": itm.logits_per_image.contiguous()}


def stage2_outputs(model, config):
    torch.manual_seed(13)
    s = config.vision_config.image_size
    q = config.num_query_tokens
    pixel_values = torch.randn(2, 3, s, s)
    img = [config.image_token_index] * q
    bos = config.text_config.bos_token_id
    input_ids = torch.tensor([img + [bos, 10, 11, 12], img + [bos, 20, 21, 22]])
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    return {"pixel_values": pixel_values, "input_ids": input_ids, "logits": logits.contiguous()}


def build(kind, vision, qformer, top, text):
    if kind == "stage1":
        config = Blip2Config(vision_config=vision, qformer_config=dict(qformer, use_qformer_text_input=qformer.get(
            "use_qformer_text_input", True)), **top)
        return config, Blip2ForImageTextRetrieval(config).eval()
    top = {k: v for k, v in top.items() if k != "image_text_hidden_size"}
    config = Blip2Config(vision_config=vision, qformer_config=dict(qformer, use_qformer_text_input=False),
                         text_config=text, image_token_index=text["vocab_size"] - 1, **top)
    return config, Blip2ForConditionalGeneration(config).eval()


def run_saved(kind, path):
    cls = Blip2ForImageTextRetrieval if kind == "stage1" else Blip2ForConditionalGeneration
    model = cls.from_pretrained(path).eval()
    return (stage1_outputs if kind == "stage1" else stage2_outputs)(model, model.config)


def write_variant(manifest, name, kind, field, value, vision, qformer, top, text, edit=None):
    out = os.path.join(ROOT, name)
    entry = {"name": name, "kind": kind, "field": field, "value": value}
    try:
        torch.manual_seed(10)
        config, model = build(kind, vision, qformer, top, text)
        perturb(model)
        model.save_pretrained(out, safe_serialization=True)
        if edit:
            section, key, v = edit
            path = os.path.join(out, "config.json")
            with open(path) as f:
                j = json.load(f)
            (j[section] if section else j)[key] = v
            with open(path, "w") as f:
                json.dump(j, f, indent=2)
        expected = run_saved(kind, out)
        for f in ("generation_config.json",):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        if kind == "stage1":
            write_vocab(os.path.join(out, "vocab.txt"), qformer["vocab_size"] - 1)
        save_file(expected, os.path.join(out, "expected.safetensors"))
        entry["transformers"] = "ok"
    except Exception as e:  # transformers cannot build or run it: blip2cpp must refuse it
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out, exist_ok=True)
        cfg = {"architectures": ["Blip2ForImageTextRetrieval" if kind == "stage1" else "Blip2ForConditionalGeneration"],
               "model_type": "blip-2", "vision_config": vision, "qformer_config": qformer, **top}
        if kind == "stage2":
            cfg["text_config"] = text
            cfg["image_token_index"] = text["vocab_size"] - 1
            cfg["qformer_config"] = dict(qformer, use_qformer_text_input=False)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        entry["transformers"] = "fails: %s" % str(e).splitlines()[0][:200]
    manifest.append(entry)
    print("%-40s %s" % (name, entry["transformers"]))


def main():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    check_covered(Blip2VisionConfig, VISION_FIELDS, "Blip2VisionConfig")
    check_covered(Blip2QFormerConfig, QFORMER_FIELDS, "Blip2QFormerConfig")
    check_covered(OPTConfig, OPT_FIELDS, "OPTConfig")
    check_covered(LlamaConfig, LLAMA_FIELDS, "LlamaConfig")
    top_fields = set(Blip2Config().to_dict()) - set(PretrainedConfig().to_dict())
    missing = sorted(top_fields - set(TOP_FIELDS))
    if missing:
        raise SystemExit("Blip2Config fields with no variant and no reason: %s" % missing)

    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    manifest = []
    base = lambda: (dict(VISION), dict(QFORMER), dict(TOP))
    write_variant(manifest, "stage1_base", "stage1", "", None, *base(), None)
    for section, table in (("vision_config", VISION_FIELDS), ("qformer_config", QFORMER_FIELDS), ("", TOP_FIELDS)):
        for field, values in table.items():
            if isinstance(values, str):
                continue
            for i, value in enumerate(values):
                vision, qformer, top = base()
                target = {"vision_config": vision, "qformer_config": qformer, "": top}[section]
                target[field] = value
                if section == "vision_config" and field == "hidden_size":
                    qformer["encoder_hidden_size"] = value
                name = "stage1_%s%s%s" % (section + "." if section else "", field, "_%d" % i if len(values) > 1 else "")
                write_variant(manifest, name, "stage1", (section + "." if section else "") + field, value,
                              vision, qformer, top, None)
    for kind, table in (("opt", OPT_FIELDS), ("llama", LLAMA_FIELDS)):
        write_variant(manifest, "stage2_%s_base" % kind, "stage2", "", None, *base(), dict(TEXT[kind]))
        for field, values in table.items():
            if isinstance(values, str):
                continue
            for i, value in enumerate(values):
                text = dict(TEXT[kind])
                text[field] = value
                if kind == "opt" and field == "hidden_size":
                    text["word_embed_proj_dim"] = value
                name = "stage2_%s_%s%s" % (kind, field, "_%d" % i if len(values) > 1 else "")
                write_variant(manifest, name, "stage2", "text_config." + field, value, *base(), text)
    for i, (section, key, value) in enumerate(HAND_EDITS):
        kind = "stage2" if section == "text_config" or section == "" else "stage1"
        text = dict(TEXT["opt"]) if kind == "stage2" else None
        field = (section + "." if section else "") + key
        write_variant(manifest, "edit_%d_%s" % (i, field.replace(".", "_")), kind, field, value, *base(), text,
                      edit=(section, key, value))
    with open(os.path.join(ROOT, "variants.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print("%d variants written to %s" % (len(manifest), os.path.normpath(ROOT)))


if __name__ == "__main__":
    main()
