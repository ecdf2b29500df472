"""Seed inputs for the fuzz targets under fuzz/: a small safetensors file and the data.pkl of a
small LAVIS-style torch.save checkpoint ({"model": OrderedDict of tensors}, with a parameter,
a half-precision tensor, a strided view and nested metadata).

    .venv/bin/python tools/make_fuzz_seeds.py    # writes fuzz/corpus/
"""
import collections
import io
import pathlib
import zipfile

import torch
from safetensors.torch import save

OUT = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "corpus"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "vision_model.embeddings.class_embedding": torch.randn(1, 1, 4, generator=g),
        "qformer.layernorm.weight": torch.randn(6, generator=g).half(),
        "query_tokens": torch.randn(1, 2, 6, generator=g).bfloat16(),
        "temp": torch.tensor(0.07),
        "ids": torch.arange(5, dtype=torch.int64),
    }
    (OUT / "seed.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))

    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict()
    sd["visual_encoder.cls_token"] = torch.nn.Parameter(torch.randn(1, 1, 4, generator=g))
    sd["Qformer.bert.embeddings.LayerNorm.weight"] = torch.randn(6, generator=g).half()
    sd["vision_proj.weight"] = base.t()  # a strided view
    sd["ln_vision.bias"] = base[1]       # a view with a storage offset
    buf = io.BytesIO()
    torch.save({"model": sd, "epoch": 3, "config": {"lr": 1e-4, "name": "blip2"}}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        (OUT / "data.pkl").write_bytes(z.read(pkl))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
