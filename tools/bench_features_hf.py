"""Image feature extraction of transformers' Blip2ForImageTextRetrieval at full size (EVA ViT-g/14 +
Q-Former), to compare with bench/bench_features.cpp on the same weights (issue 14).

    .venv/bin/python tools/bench_features_hf.py --write DIR        # random full-size weights, fp32
    .venv/bin/python tools/bench_features_hf.py DIR [--batch 1] [--repeats 3]

Times get_image_features-style work: vision_model -> Q-Former over the 32 queries -> the
normalised vision projection, under no_grad, on random 224-px images; the median after a warm-up.
"""
import argparse
import statistics
import time

import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval


def write(out):
    # As Salesforce/blip2-itm-vit-g: the Q-Former vocabulary is BERT's 30,522 + [DEC].
    torch.manual_seed(0)
    config = Blip2Config(vision_config=dict(), qformer_config=dict(use_qformer_text_input=True, vocab_size=30523), num_query_tokens=32)
    model = Blip2ForImageTextRetrieval(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    print("wrote", out, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")


def run(path, batch, repeats):
    model = Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    s = model.config.vision_config.image_size
    images = torch.randn(batch, 3, s, s)

    def features():
        with torch.no_grad():
            embeds = model.vision_model(pixel_values=images).last_hidden_state
            queries = model.query_tokens.expand(batch, -1, -1)
            q = model.qformer(query_embeds=queries, encoder_hidden_states=embeds,
                              encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long)).last_hidden_state
            return torch.nn.functional.normalize(model.vision_projection(q), dim=-1)

    features()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        features()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print("transformers: batch %d, threads %d: %.2f s per batch, %.3f images/s" % (batch, torch.get_num_threads(), t, batch / t))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.write:
        write(a.dir)
    else:
        run(a.dir, a.batch, a.repeats)
