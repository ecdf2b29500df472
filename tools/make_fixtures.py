"""Writes tests/fixtures/: small committed inputs and what the Python reference makes of them.

  images/      JPEG and PNG files of every mode Pillow's convert("RGB") handles, odd sizes
  images.json  per image: size, and the files holding Pillow's decoded RGB and its
               Image.resize((w, h), BICUBIC) output (raw HWC uint8)
  text/        corpus.json (a few thousand lines: English, accents, Chinese, emoji, punctuation
               runs, long words, odd whitespace, empty strings), two vocabularies made here
               (uncased English-style, cased Chinese-style), and for each Hugging Face
               BertTokenizer's ids ([DEC] added as bos), plus LAVIS caption cleaning

Run from the repository root with a Python that has pillow, numpy and transformers:
    .venv/bin/pip install "pillow<13" numpy transformers && .venv/bin/python tools/make_fixtures.py
Pillow 12 is the reference for resizing: Pillow 13 changed the order of the two resampling
passes for some sizes (the 8-bit intermediate makes the order visible).
Deterministic: the same versions write the same files.
"""
import collections
import json
import os
import random
import re

import numpy as np
from PIL import Image
from transformers import BertTokenizer as BertTokenizerFast  # tokenizers-backed (transformers 5)
# The Python BertTokenizer that LAVIS and MindFormers use (named BertTokenizer before v5).
from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as BertTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def pattern(w, h, seed):
    """A smooth colour field with edges and noise: resampling errors show up everywhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / 3.1 + seed) * np.cos(y / 5.3)
    g = 255 * ((x + 2 * y) % 17 > 8)
    b = 255 * x / max(w - 1, 1)
    img = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images():
    os.makedirs(os.path.join(ROOT, "images"), exist_ok=True)
    specs = []  # (file, make image, save kwargs, resize targets)
    rgb = lambda w, h, s: Image.fromarray(pattern(w, h, s))
    specs.append(("rgb_420.jpg", rgb(301, 211, 1), dict(quality=90), [(224, 224), (37, 500)]))
    specs.append(("rgb_444_odd.jpg", rgb(37, 23, 2), dict(quality=95, subsampling=0), [(224, 224), (5, 3)]))
    specs.append(("grey.jpg", rgb(50, 31, 3).convert("L"), dict(quality=85), [(24, 24)]))
    specs.append(("cmyk.jpg", rgb(29, 41, 4).convert("CMYK"), dict(quality=90), [(24, 24)]))
    specs.append(("rgb.png", rgb(45, 33, 5), {}, [(24, 24), (90, 7)]))
    rgba = rgb(40, 27, 6).convert("RGBA")
    rgba.putalpha(Image.fromarray(pattern(40, 27, 7)[:, :, 0]))
    specs.append(("rgba.png", rgba, {}, [(24, 24)]))
    specs.append(("l.png", rgb(33, 19, 8).convert("L"), {}, [(24, 24)]))
    specs.append(("la.png", rgba.convert("LA"), {}, [(24, 24)]))
    specs.append(("one_bit.png", rgb(21, 17, 9).convert("1"), {}, [(24, 24)]))
    pal = rgb(31, 29, 10).convert("P", palette=Image.ADAPTIVE, colors=37)
    specs.append(("palette.png", pal, {}, [(24, 24)]))
    specs.append(("palette_trns.png", pal, dict(transparency=3), [(24, 24)]))
    index = []
    for name, img, kwargs, targets in specs:
        path = os.path.join(ROOT, "images", name)
        img.save(path, **kwargs)
        with Image.open(path) as f:  # what a loader sees: decode, convert("RGB")
            decoded = f.convert("RGB")
        stem = name.rsplit(".", 1)[0]
        entry = {"file": name, "mode": img.mode, "width": decoded.width, "height": decoded.height,
                 "decoded": f"{stem}.rgb", "resized": []}
        with open(os.path.join(ROOT, "images", entry["decoded"]), "wb") as f:
            f.write(np.asarray(decoded).tobytes())
        for w, h in targets:
            out = decoded.resize((w, h), Image.BICUBIC)
            fname = f"{stem}_{w}x{h}.rgb"
            with open(os.path.join(ROOT, "images", fname), "wb") as f:
                f.write(np.asarray(out).tobytes())
            entry["resized"].append({"width": w, "height": h, "file": fname})
        if name == "rgb.png":  # RandAugment's table ops, as PIL.ImageOps computes them
            from PIL import ImageOps
            for op in ("autocontrast", "equalize"):
                fname = f"{stem}_{op}.rgb"
                with open(os.path.join(ROOT, "images", fname), "wb") as f:
                    f.write(np.asarray(getattr(ImageOps, op)(decoded)).tobytes())
                entry[op] = fname
        index.append(entry)
    with open(os.path.join(ROOT, "images.json"), "w") as f:
        json.dump(index, f, indent=1)


WORDS = ("a man riding a horse on the beach two dogs playing with ball in grass "
         "kitchen table people standing near red bus street city snow mountain "
         "woman holding umbrella rain child eating pizza cat sleeping sofa airplane "
         "flying blue sky giraffe zoo tennis player racket surfing wave boat harbor").split()
ACCENTED = ["café", "naïve", "Ångström", "résumé", "São", "Zürich", "façade", "jalapeño",
            "Crème", "brûlée", "Øresund", "İstanbul", "ΣΟΦΟΣ", "Ελλάδα", "straße", "Ⅻ", "ﬁne"]
CHINESE = ["一只狗在草地上奔跑", "详细描述图片内容。", "###问题:\n详细描述图片内容。\n\n###答案:",
           "这是一张图片,上面有一朵黄色的花", "北京 天安门", "猫和狗", "红色的公共汽车"]
EMOJI = ["😀", "🐶", "🌻", "👍🏽", "🇫🇷", "❤️", "🚀✨"]
ODD = ["!!!???...", "--", "(a)", "[x]", "#tag", "@user", "e-mail", "don't", "U.S.A.", "3.14",
       "1,000", "$5", "50%", "a/b", "\"quoted\"", "~tilde~", "co-operate", "…", "«ok»", "¿qué?"]
SPACES = [" ", "  ", "\t", "\u00a0", "\u3000", "\u2009", "\n", " \r\n "]


def corpus_lines(n, seed):
    rng = random.Random(seed)
    lines = ["", " ", "\t\n", "a", "A", "x" * 150, "supercalifragilisticexpialidocious" * 3,
             "A B C", "ÀÉÎÕÜ", "\u0000zero\u200bwidth\u00adsoft", "mixed中文and English 混合"]
    pools = [WORDS] * 6 + [ACCENTED, CHINESE, EMOJI, ODD]
    while len(lines) < n:
        k = rng.randint(1, 40)
        parts = []
        for _ in range(k):
            pool = rng.choice(pools)
            w = rng.choice(pool)
            if rng.random() < 0.15:
                w = w.upper() if rng.random() < 0.5 else w.capitalize()
            parts.append(w)
            parts.append(rng.choice(SPACES) if rng.random() < 0.1 else " ")
        lines.append("".join(parts).strip(" ") if rng.random() < 0.9 else "".join(parts))
    return lines


def make_vocab(lines, lower, chinese, size, path):
    basic = BasicTokenizer(do_lower_case=lower)
    words = collections.Counter(t for line in lines for t in basic.tokenize(line))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for w in words for c in w})
    vocab = specials + chars + ["##" + c for c in chars]
    if chinese:
        vocab += [chr(c) for c in range(0x4E00, 0x4E00 + 200)]
    pieces = collections.Counter()
    for w, c in words.items():
        for i in range(2, min(len(w), 6)):
            pieces["##" + w[-i:]] += c
    for w, _ in words.most_common(size):
        vocab.append(w)
    for p, _ in pieces.most_common(size // 4):
        vocab.append(p)
    seen, out = set(), []
    for t in vocab:
        if t not in seen:
            seen.add(t)
            out.append(t)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def pre_caption(caption, max_words=50):
    """LAVIS BlipCaptionProcessor.pre_caption."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def write_text():
    d = os.path.join(ROOT, "text")
    os.makedirs(d, exist_ok=True)
    lines = corpus_lines(1500, seed=0)
    with open(os.path.join(d, "corpus.json"), "w", encoding="utf-8") as f:
        json.dump(lines, f, ensure_ascii=False, indent=0)
    for name, lower, chinese in [("uncased", True, False), ("chinese", False, True)]:
        vocab_path = os.path.join(d, f"vocab_{name}.txt")
        make_vocab(lines, lower, chinese, 400, vocab_path)
        tok = BertTokenizer(vocab_path, do_lower_case=lower)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        fast = BertTokenizerFast(vocab_path, do_lower_case=lower)
        fast.add_special_tokens({"bos_token": "[DEC]"})
        differ = sum(fast(line)["input_ids"] != tok(line)["input_ids"] for line in lines)
        print(f"{name}: the tokenizers-backed BertTokenizer differs on {differ} of {len(lines)} lines")
        with open(os.path.join(d, f"expected_{name}.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps({"do_lower_case": lower, "vocab_size": len(tok),
                                "dec_id": tok.convert_tokens_to_ids("[DEC]")}) + "\n")
            for line in lines:
                full = tok(line)["input_ids"]
                cut = tok(line, max_length=16, padding="max_length", truncation=True)
                f.write(json.dumps({"ids": full, "ids16": cut["input_ids"],
                                    "mask16": sum(cut["attention_mask"])}, separators=(",", ":")) + "\n")
    with open(os.path.join(d, "captions.jsonl"), "w", encoding="utf-8") as f:  # line i: corpus[i]
        for line in lines:
            f.write(json.dumps({"out": pre_caption(line), "out5": pre_caption(line, 5)},
                               ensure_ascii=False, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    write_images()
    write_text()
    print("fixtures written to", os.path.normpath(ROOT))
