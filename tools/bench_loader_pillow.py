"""The Python loader a user would otherwise run: Pillow decode + convert("RGB") + resize to
S x S BICUBIC + ToTensor/Normalize (numpy), on a thread pool of N workers, over every image of
a directory. Also writes a COCO-like test set of JPEGs with --make.

    .venv/bin/python tools/bench_loader_pillow.py --make /tmp/bench_images --count 256
    .venv/bin/python tools/bench_loader_pillow.py /tmp/bench_images --threads 2
"""
import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def load(path, size):
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(im, np.float32) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1)


def make(dirname, count):
    os.makedirs(dirname, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = (640, 480) if i % 2 else (500, 375)
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([128 + 100 * np.sin(x / (7 + i % 5)), 255 * (x + y) / (w + h),
                        128 + 60 * np.cos(y / 9)], -1) + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(dirname, f"{i:05d}.jpg"), quality=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--make", action="store_true")
    ap.add_argument("--count", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.make:
        make(a.dir, a.count)
        return
    files = sorted(os.path.join(a.dir, f) for f in os.listdir(a.dir)
                   if f.lower().endswith((".jpg", ".jpeg", ".png")))
    best = 0.0
    with ThreadPoolExecutor(a.threads) as pool:
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            batch = list(pool.map(lambda p: load(p, a.size), files))
            best = max(best, len(batch) / (time.perf_counter() - t0))
    print(f"Pillow loader: {len(files)} images, {a.threads} threads, {a.size}px: "
          f"{best:.1f} images/s (best of {a.repeat})")


if __name__ == "__main__":
    main()
