"""Round trip LAVIS .pth -> `blip2 convert` -> `blip2 export --to hf` -> transformers.

Loads the exported directory with transformers' Blip2ForImageTextRetrieval and checks that it
computes what the original tiny model computed (tests/fixtures/parity/hf_itm_io.safetensors).

    .venv/bin/python tools/check_roundtrip.py build/blip2
"""
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import Blip2ForImageTextRetrieval

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
    print("round trip LAVIS -> blip2cpp -> Hugging Face: OK")


if __name__ == "__main__":
    main()
