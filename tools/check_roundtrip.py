"""Round trip LAVIS .pth -> `blip2 convert` -> `blip2 export --to hf` -> transformers.

Stage 1: loads the exported directory with transformers' Blip2ForImageTextRetrieval and checks
that it computes what the original tiny model computed (tests/fixtures/parity/hf_itm_io.safetensors).
Stage 2: LAVIS' blip2_pretrained_opt-style file (query path, ln_vision, opt_proj) + the bare ViT
+ the OPT directory, converted and exported, loaded as Blip2ForConditionalGeneration: the logits
and the greedy and beam-search ids of tests/fixtures/parity/hf_opt_io.safetensors.

    .venv/bin/python tools/check_roundtrip.py build/blip2
"""
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

PARITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "parity")


def main():
    blip2 = sys.argv[1] if len(sys.argv) > 1 else "build/blip2"
    with tempfile.TemporaryDirectory() as tmp:
        canon, hf = os.path.join(tmp, "canon"), os.path.join(tmp, "hf")
        subprocess.run([blip2, "convert", os.path.join(PARITY, "blip2_lavis.pth"), "--model",
                        os.path.join(PARITY, "hf_itm"), "--out", canon], check=True)
        subprocess.run([blip2, "export", "--to", "hf", canon, "--out", hf], check=True)
        model = Blip2ForImageTextRetrieval.from_pretrained(hf).eval()
        io = load_file(os.path.join(PARITY, "hf_itm_io.safetensors"))
        with torch.no_grad():
            itc = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"],
                        attention_mask=io["attention_mask"], use_image_text_matching_head=False)
            itm = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"],
                        attention_mask=io["attention_mask"], use_image_text_matching_head=True)
        for name, got in [("itc_logits_per_image", itc.logits_per_image),
                          ("itm_logits", itm.logits_per_image),
                          ("image_feat", itc.image_embeds), ("text_feat", itc.text_embeds)]:
            diff = (got - io[name]).abs().max().item()
            print(f"{name}: max |diff| {diff:.3g}")
            assert diff < 1e-4, name
        stage2(blip2, tmp)
    print("round trip LAVIS -> blip2cpp -> Hugging Face: OK")


def stage2(blip2, tmp):
    canon, hf = os.path.join(tmp, "canon2"), os.path.join(tmp, "hf2")
    subprocess.run([blip2, "convert", os.path.join(PARITY, "blip2_opt_lavis.pth"),
                    os.path.join(PARITY, "eva_vit_opt.pth"), os.path.join(PARITY, "opt_llm"),
                    "--model", os.path.join(PARITY, "hf_opt"), "--out", canon], check=True)
    subprocess.run([blip2, "export", "--to", "hf", canon, "--out", hf], check=True)
    model = Blip2ForConditionalGeneration.from_pretrained(hf).eval()
    io = load_file(os.path.join(PARITY, "hf_opt_io.safetensors"))
    eos = int(io["eos_token_id"][0])
    with torch.no_grad():
        logits = model(pixel_values=io["pixel_values"], input_ids=io["input_ids"]).logits
        diff = (logits - io["logits"]).abs().max().item()
        print(f"stage-2 logits: max |diff| {diff:.3g}")
        assert diff < 1e-4
        for name, kw in [("greedy", {}), ("beam3", {"num_beams": 3, "length_penalty": 1.0})]:
            out = model.generate(pixel_values=io["pixel_values"], input_ids=io["padded_ids"],
                                 attention_mask=io["padded_mask"], do_sample=False, max_new_tokens=7,
                                 eos_token_id=eos, pad_token_id=model.config.text_config.pad_token_id, **kw)
            new = out[:, io["padded_ids"].shape[1]:]
            for row, want in zip(new.tolist(), io[name].tolist()):
                want = [t for t in want if t >= 0]
                assert row[:len(want)] == want, (name, row, want)
            print(f"stage-2 {name} ids: equal")


if __name__ == "__main__":
    main()
