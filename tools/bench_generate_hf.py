"""Generation speed of transformers' Blip2ForConditionalGeneration, to compare with
bench/bench_generate.cpp on the same weights and settings (issue 6).

    .venv/bin/python tools/bench_generate_hf.py --write DIR [--llm llama|opt|opt-2.7b]  # random model
    .venv/bin/python tools/bench_generate_hf.py DIR [--batch 1] [--new 32] [--beams 1] [--repeats 5] [--dtype fp32|bf16]

The model written: a 224-px, 4-block ViT (width 256), a 4-layer Q-Former (width 256, 32 queries)
and a 12-layer LLM of width 768 (Llama: FFN 2048, vocabulary 32000; OPT: FFN 3072, vocabulary
50272), fp32; or (opt-2.7b) OPT-2.7B's shape: 32 layers of width 2560, FFN 10240, 2.65 B
parameters (10.6 GB in fp32). Timing as the C++ bench: every row makes exactly --new tokens (min = max new
tokens), the prompt is [<image> x 32, BOS]; time to first token = generate() of one new token;
decoding tokens/s = batch x (new - 1) / (full generate - first token); medians after a warm-up.
"""
import argparse
import statistics
import time

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

IMAGE_TOKEN = 1000


def write(out, llm):
    torch.manual_seed(0)
    text = dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False) if llm == "llama" else \
        dict(model_type="opt", vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=512, word_embed_proj_dim=768,
             bos_token_id=2, eos_token_id=50118, pad_token_id=1)
    if llm == "opt-2.7b":
        text.update(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                    max_position_embeddings=2048, word_embed_proj_dim=2560)
    config = Blip2Config(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=4, image_size=224, patch_size=14, qkv_bias=True),
        qformer_config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, encoder_hidden_size=256,
                            use_qformer_text_input=False),
        text_config=text, num_query_tokens=32, image_token_index=IMAGE_TOKEN)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    print("wrote", out, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")


def run(path, batch, new, beams, repeats, dtype):
    model = Blip2ForConditionalGeneration.from_pretrained(
        path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    c = model.config
    torch.manual_seed(0)
    s = c.vision_config.image_size
    images = torch.randn(batch, 3, s, s).to(model.dtype)
    ids = torch.tensor([[c.image_token_index] * c.num_query_tokens + [c.text_config.bos_token_id]] * batch)

    def timed(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(pixel_values=images, input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, num_beams=beams, max_new_tokens=n, min_new_tokens=n)
        secs = time.perf_counter() - t0
        assert out.shape[1] - ids.shape[1] == n
        return secs

    timed(new)
    first, full = [], []
    for _ in range(repeats):
        first.append(timed(1))
        full.append(timed(new))
    ttft, total = statistics.median(first), statistics.median(full)
    tps = batch * (new - 1) / max(total - ttft, 1e-9)
    print("transformers: batch %d, %d new tokens, beams %d, %s, threads %d" % (batch, new, beams, dtype, torch.get_num_threads()))
    print("  time to first token %.2f ms" % (ttft * 1000))
    print("  decoding %.1f tokens/s (generate of %d tokens: %.1f ms)" % (tps, new, total * 1000))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--llm", default="llama", choices=["llama", "opt", "opt-2.7b"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    if a.write:
        write(a.dir, a.llm)
    else:
        run(a.dir, a.batch, a.new, a.beams, a.repeats, a.dtype)
