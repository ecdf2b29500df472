"""Speed of LAVIS' own BLIP-2 stage-1 code (GitHub salesforce/LAVIS 506965b, run offline through
tools/lavis_offline.py) against blip2cpp on the same configuration (BENCHMARKS.md, issue 14 item 4).

Environment: LAVIS' folders from `git archive 506965b lavis/models lavis/common lavis/runners
lavis/tasks` under /tmp/lavis_src (make_lavis_oracle.py's docstring), and LAVIS' pins beside the
project's torch 2.13.0:

    .venv/bin/python -m pip install --no-deps --target /tmp/lavis_pkgs transformers==4.26.1 \\
        huggingface-hub==0.14.1 tokenizers==0.13.3 numpy==1.26.4 requests urllib3 certifi \\
        charset-normalizer iopath==0.1.10 portalocker omegaconf antlr4-python3-runtime==4.9.3 \\
        pandas==2.2.3 python-dateutil pytz tzdata six timm==0.4.12 typing_extensions
    .venv/bin/python -m pip install --no-deps --no-build-isolation --target /tmp/lavis_pkgs fairscale==0.4.4
    python3 tools/make_bert_vocab.py /tmp/bert_vocab.txt
    L="env PYTHONPATH=/tmp/lavis_pkgs OMP_NUM_THREADS=2 .venv/bin/python tools/bench_lavis.py"

(a) Stage-1 training step at a mid size (frozen EVA-style ViT 12 x 768 at 224 px / patch 14,
BERT-base-size Q-Former with 32 queries, batch 8, fp32, LAVIS' dropout 0.1, AdamW as LAVIS'
RunnerBase builds it; forward + backward + optimizer step, as BaseTask._train_inner_loop):

    $L stage1 --warmup 3 --steps 8                      # LAVIS' Blip2Qformer
    $L stage1-blip2cpp --binary build/blip2              # blip2cpp, bench/configs/stage1_midsize.yaml

`stage1-blip2cpp` runs `build/blip2 run --config bench/configs/stage1_midsize.yaml` (3 + 8 steps,
log_interval 1) and reads metrics.jsonl: step time = 8 / samples_per_s of each step; peak RSS is
the process's VmHWM when the second-to-last step is logged (before the end-of-run checkpoint and
evaluation) and at exit. Both print the median step time, its spread (min-max of the timed steps),
samples/s, peak RSS, the trainable / frozen parameter counts and the FLOPs per sample (flops_stage1).

(b) Retrieval evaluation (LAVIS' compute_sim_matrix: ITC similarities, then ITM re-ranking of the
k_test best candidates in both directions) on one set of random weights and one synthetic split,
at a reduced width (bench/configs/retrieval_lavis.yaml):

    $L retrieval-setup --out /tmp/bench_ret   # LAVIS-initialised weights (model.pth), 64 PNG images
                                              # x 5 captions (annotations/test.json), images.npy
    $L retrieval --data /tmp/bench_ret        # LAVIS: writes scores_lavis.npz, prints R@K and pairs/s
    OMP_NUM_THREADS=2 build/blip2 run --config bench/configs/retrieval_lavis.yaml \\
        --eval_dataset_dir /tmp/bench_ret --load_checkpoint /tmp/bench_ret/model.pth
    $L retrieval-compare --data /tmp/bench_ret --blip2cpp output/bench_retrieval_lavis
    $L retrieval-check --data /tmp/bench_ret --binary build/blip2   # scores pair by pair

retrieval-compare puts LAVIS' recalls (its RetrievalTask._report_metrics on scores_lavis.npz) beside
blip2cpp's retrieval_results.json and prints blip2cpp's pairs/s (from its rerank_seconds).
retrieval-check compares the scores themselves on 8 images x 8 captions: ITC similarities of every
pair and ITM + ITC of the matched pairs, from blip2cpp's feature extraction against LAVIS' own
forward_image / forward_text / compute_itm (see cmd_retrieval_check).

Pairs re-ranked count Ni x k + Nt x k on both sides (a pair both directions chose counts twice, as
compute_sim_matrix scores it twice). LAVIS' images are the PNGs' pixels (images.npy) normalised
as its blip_image_eval processor does (the PNGs are 224 x 224, so its resize is the identity).
"""
import argparse
import json
import os
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# The words of the synthetic captions (tools/make_bert_vocab.py puts them in /tmp/bert_vocab.txt).
WORDS = ("a photo of the small large big tiny red green blue yellow purple orange circle square "
         "triangle cross ring left right top bottom center middle shape and background dark on in at "
         "with there is this image picture side part").split()
CAPTIONS = ["a small red circle on the left", "a large blue square at the top",
            "a tiny green triangle in the center", "a big yellow ring on the right",
            "a purple cross at the bottom", "there is an orange shape in the middle",
            "a photo of a small blue circle", "a picture of a dark square"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (a) the mid size. QFORMER: BertConfig arguments (bert-base-uncased's values; LAVIS sets
# encoder_width, add_cross_attention, cross_attention_freq, query_length itself).
MID_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, max_position_embeddings=512, hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.02,
                   hidden_act="gelu")
MID_VIT = dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
MID_BLIP2 = dict(vit_model="eva_clip_g", img_size=224, drop_path_rate=0, use_grad_checkpoint=False,
                 vit_precision="fp32", freeze_vit=True, num_query_token=32, cross_attention_freq=2,
                 embed_dim=256, max_txt_len=32)
# (b) the reduced width (bench/configs/retrieval_lavis.yaml has the same numbers).
RET_QFORMER = dict(MID_QFORMER, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                   intermediate_size=1536)
RET_VIT = dict(img_size=224, patch_size=14, embed_dim=256, depth=4, num_heads=4, mlp_ratio=4.0)
RET_BLIP2 = dict(MID_BLIP2)
# LAVIS' pretrain run config (lavis/projects/blip2/train/pretrain_stage1.yaml, RunnerBase defaults).
RUN_CFG = dict(init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=5000, max_epoch=10,
               weight_decay=0.05, beta2=0.999)


# ---------------------------------------------------------------------------------------------
# FLOPs (matrix products only, 2 per multiply-add)


def _layer_flops(n, keys, d, f):
    """One BERT layer's self-attention + FFN on n tokens attending to `keys` tokens (Q, K, V, O
    projections computed for the n new tokens)."""
    return 8 * n * d * d + 4 * n * keys * d + 4 * n * d * f


def _cross_flops(q, nv, dv, d):
    """One cross-attention block: q queries over nv image tokens of width dv."""
    return 4 * q * d * d + 4 * nv * dv * d + 4 * q * nv * d


def vit_flops(vit, n_tokens):
    d = vit["embed_dim"]
    f = int(d * vit["mlp_ratio"])
    patch = 2 * (n_tokens - 1) * 3 * vit["patch_size"] ** 2 * d
    return patch + vit["depth"] * (8 * n_tokens * d * d + 4 * n_tokens * n_tokens * d + 4 * n_tokens * d * f)


def flops_stage1(qf, vit, q, t, vocab, embed_dim, cross_freq=2):
    """Forward + backward FLOPs of one stage-1 training sample as LAVIS' Blip2Qformer.forward
    computes it (blip2cpp does the same passes): the frozen ViT forward, plus 3x the forward of
    the trainable part (backward = 2x forward: weight and input gradients; the gradient reaches
    ln_vision, so the cross-attention K/V input gradients are needed too):
      A query pass: L self+FFN layers on Q queries, Lc cross-attention blocks over Nv tokens
      B text pass (ITC): L layers on T tokens
      C ITM: 3 pairs per sample (positive, negative image, negative text), L layers on Q+T tokens,
        Lc cross blocks for the Q query rows (K/V over Nv recomputed per pair)
      D LM: L layers on T tokens over Q+T keys (the queries' keys/values are cached from A),
        the LM head (dense d x d + decoder d x V on T tokens)
      E projections: vision_proj (Q x d x e), text_proj (d x e), ITM head (3 Q x d x 2)
    Returns (total, vit_forward, qformer_forward)."""
    d, f, L = qf["hidden_size"], qf["intermediate_size"], qf["num_hidden_layers"]
    lc = (L + cross_freq - 1) // cross_freq
    nv = (vit["img_size"] // vit["patch_size"]) ** 2 + 1
    dv = vit["embed_dim"]
    a = L * _layer_flops(q, q, d, f) + lc * _cross_flops(q, nv, dv, d)
    b = L * _layer_flops(t, t, d, f)
    c = 3 * (L * _layer_flops(q + t, q + t, d, f) + lc * _cross_flops(q, nv, dv, d))
    dd = L * _layer_flops(t, q + t, d, f) + 2 * t * d * d + 2 * t * d * vocab
    e = 2 * q * d * embed_dim + 2 * d * embed_dim + 3 * 2 * q * d * 2
    qf_fwd = a + b + c + dd + e
    v = vit_flops(vit, nv)
    return v + 3 * qf_fwd, v, qf_fwd


def flops_itm_pair(qf, vit, q, t, cross_freq=2):
    """Forward FLOPs of one ITM re-ranking pair as compute_itm does it: L layers on Q+T tokens and
    the cross-attention blocks, K/V over the Nv image tokens included (blip2cpp with
    reuse_cross_kv computes those once per image: subtract 4 Nv dv d per cross block)."""
    d, f, L = qf["hidden_size"], qf["intermediate_size"], qf["num_hidden_layers"]
    lc = (L + cross_freq - 1) // cross_freq
    nv = (vit["img_size"] // vit["patch_size"]) ** 2 + 1
    return (L * _layer_flops(q + t, q + t, d, f) + lc * _cross_flops(q, nv, vit["embed_dim"], d)
            + 2 * q * d * 2)


# ---------------------------------------------------------------------------------------------
# LAVIS' model


def build_lavis(lavis_src, vocab, qformer, vit, blip2, seed=0):
    import torch
    from lavis_offline import import_lavis, install_offline_constructors
    with open(vocab, encoding="utf-8") as fh:
        vocab_size = sum(1 for _ in fh)
    mods = import_lavis(lavis_src)
    install_offline_constructors(mods, vocab, vocab_size, qformer, vit)
    torch.manual_seed(seed)
    model = mods.blip2_qformer.Blip2Qformer(**blip2)
    assert len(model.tokenizer) == vocab_size + 1  # [DEC]
    return mods, model


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def report_flops(batch, step_times):
    total, v, qf = flops_stage1(MID_QFORMER, MID_VIT, q=MID_BLIP2["num_query_token"],
                                t=MID_BLIP2["max_txt_len"], vocab=30523,
                                embed_dim=MID_BLIP2["embed_dim"])
    med = statistics.median(step_times)
    print("FLOPs per sample: %.1f G (ViT forward %.1f G + 3 x Q-Former forward %.1f G); "
          "%.1f GFLOP/s at the median step" % (total / 1e9, v / 1e9, qf / 1e9, batch * total / med / 1e9))


def cmd_stage1(args):
    import torch
    torch.set_num_threads(args.threads)
    mods, model = build_lavis(args.lavis_src, args.vocab, MID_QFORMER, MID_VIT, MID_BLIP2)
    from lavis_offline import init_process_group, make_optimizer_and_scheduler
    trainable, frozen = count_parameters(model)
    print("LAVIS Blip2Qformer: %d trainable, %d frozen, %d parameters; threads %d"
          % (trainable, frozen, trainable + frozen, torch.get_num_threads()))
    optimizer, scheduler = make_optimizer_and_scheduler(mods, model, RUN_CFG)
    b = args.batch
    gen = torch.Generator().manual_seed(1234)
    rng = random.Random(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        batches.append({"image": torch.randn(b, 3, 224, 224, generator=gen),
                        "text_input": [rng.choice(CAPTIONS) for _ in range(b)],
                        "image_id": torch.arange(b, dtype=torch.long)})
    print("RSS after building the model and %d batches: %.0f MB" % (len(batches), rss_mb()))
    times = []
    with tempfile.TemporaryDirectory() as tmpdir:
        init_process_group(tmpdir)
        model.train()  # the ViT stays in eval (LAVIS disables its train())
        assert not model.visual_encoder.training and model.Qformer.training
        for i, samples in enumerate(batches):
            t0 = time.perf_counter()
            # BaseTask._train_inner_loop, accum_grad_iters 1, no AMP (CPU)
            scheduler.step(cur_epoch=0, cur_step=i)
            loss = model(samples)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            dt = time.perf_counter() - t0
            kind = "warm-up" if i < args.warmup else "timed"
            print("step %2d (%s): %.2f s, loss %.4f" % (i + 1, kind, dt, loss.item()), flush=True)
            if i >= args.warmup:
                times.append(dt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    med = statistics.median(times)
    print("LAVIS stage-1 step, batch %d, %d threads: median %.2f s (min %.2f, max %.2f over %d "
          "steps after %d warm-up) = %.3f samples/s; peak RSS %.0f MB"
          % (b, torch.get_num_threads(), med, min(times), max(times), len(times), args.warmup,
             b / med, peak))
    report_flops(b, times)


def _vm_hwm_mb(pid):
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def cmd_stage1_blip2cpp(args):
    out = args.output_dir
    cmd = [args.binary, "run", "--config", args.config, "--output_dir", out]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    print("+ OMP_NUM_THREADS=%d %s" % (args.threads, " ".join(cmd)), flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    hwm_at = {}  # steps logged -> VmHWM then
    hwm = None
    while proc.poll() is None:
        h = _vm_hwm_mb(proc.pid)
        if h is not None:
            hwm = h
        n = 0
        if os.path.exists(metrics):
            with open(metrics) as fh:
                n = sum(1 for _ in fh)
        if n not in hwm_at and hwm is not None:
            hwm_at[n] = hwm
        time.sleep(0.05)
    reader.join()
    peak_exit = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    for line in log:
        if " train: " in line or "parameters trainable" in line:
            print(line.rstrip())
    if proc.returncode != 0:
        sys.stdout.write("".join(log[-30:]))
        sys.exit("blip2 failed with status %d" % proc.returncode)
    with open(metrics) as fh:
        rows = [json.loads(line) for line in fh]
    b = args.batch
    step_times = [b / r["samples_per_s"] for r in rows]
    for r, t in zip(rows, step_times):
        kind = "warm-up" if r["step"] <= args.warmup else "timed"
        print("step %2d (%s): %.2f s, loss %.4f" % (r["step"], kind, t, r["loss"]))
    times = step_times[args.warmup:]
    med = statistics.median(times)
    n = len(rows)
    train_peak = hwm_at.get(n - 1)
    print("blip2cpp stage-1 step, batch %d, OMP_NUM_THREADS=%d: median %.2f s (min %.2f, max %.2f "
          "over %d steps after %d warm-up) = %.3f samples/s; peak RSS %.0f MB by step %d, %.0f MB "
          "over the whole run (checkpoint save and evaluation included)"
          % (b, args.threads, med, min(times), max(times), len(times), args.warmup, b / med,
             train_peak or float("nan"), n - 1, peak_exit))
    report_flops(b, times)


# ---------------------------------------------------------------------------------------------
# (b) retrieval


def _png(path, rgb, width, height):
    """Writes 8-bit RGB pixels (bytes, row-major) as a PNG (filter 0 on every row)."""
    raw = b"".join(b"\x00" + rgb[y * width * 3:(y + 1) * width * 3] for y in range(height))

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        fh.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        fh.write(chunk(b"IEND", b""))


def cmd_retrieval_setup(args):
    import numpy as np
    import torch
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "annotations"), exist_ok=True)
    s = RET_VIT["img_size"]
    rng = np.random.default_rng(0)
    # Smooth random colour fields (an 8 x 8 grid upsampled) plus noise, so images differ.
    images = np.empty((args.images, s, s, 3), dtype=np.uint8)
    for i in range(args.images):
        coarse = rng.uniform(0, 255, size=(8, 8, 3))
        fine = np.kron(coarse, np.ones((s // 8, s // 8, 1)))
        images[i] = np.clip(fine + rng.normal(0, 20, size=fine.shape), 0, 255).astype(np.uint8)
    wr = random.Random(0)
    ann = []
    for i in range(args.images):
        name = "img_%03d.png" % i
        _png(os.path.join(args.out, "images", name), images[i].tobytes(), s, s)
        caps = [" ".join(wr.choice(WORDS) for _ in range(wr.randint(4, 12)))
                for _ in range(args.captions)]
        ann.append({"image": name, "caption": caps})
    np.save(os.path.join(args.out, "images.npy"), images)
    with open(os.path.join(args.out, "annotations", "test.json"), "w") as fh:
        json.dump(ann, fh, indent=1)
    # Weights: LAVIS' own initialisation at the reduced width, plus 0.05 * randn on every tensor
    # but temp, so that no tensor sits at a trivial init value (LayerNorm 1/0, biases 0).
    _, model = build_lavis(args.lavis_src, args.vocab, RET_QFORMER, RET_VIT, RET_BLIP2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "temp":
                p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": model.state_dict()}, os.path.join(args.out, "model.pth"))
    trainable, frozen = count_parameters(model)
    print("wrote %s: %d images x %d captions, model.pth (%d parameters: %d trainable, %d frozen)"
          % (args.out, args.images, args.captions, trainable + frozen, trainable, frozen))


class _Dataset:
    def __init__(self, text, image, img2txt, txt2img):
        self.text, self.image, self.img2txt, self.txt2img = text, image, img2txt, txt2img


class _Loader:
    """What compute_sim_matrix reads of a data loader: .dataset (text, image) and batches of
    {"image": tensor}."""

    def __init__(self, dataset, pixels, batch):
        self.dataset, self._pixels, self._batch = dataset, pixels, batch

    def __iter__(self):
        for i in range(0, len(self._pixels), self._batch):
            yield {"image": self._pixels[i:i + self._batch]}

    def __len__(self):
        return (len(self._pixels) + self._batch - 1) // self._batch


def load_split(data):
    import numpy as np
    import torch
    with open(os.path.join(data, "annotations", "test.json")) as fh:
        ann = json.load(fh)
    text, image, img2txt, txt2img = [], [], {}, {}
    for i, a in enumerate(ann):
        image.append(a["image"])
        img2txt[i] = []
        for c in a["caption"]:
            img2txt[i].append(len(text))
            txt2img[len(text)] = i
            text.append(c)
    px = torch.from_numpy(np.load(os.path.join(data, "images.npy"))).permute(0, 3, 1, 2).float()
    px = px / 255.0  # ToTensor, then Normalize (LAVIS' BlipImageEvalProcessor)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return _Dataset(text, image, img2txt, txt2img), ((px - mean) / std).contiguous()


def cmd_retrieval(args):
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    mods, model = build_lavis(args.lavis_src, args.vocab, RET_QFORMER, RET_VIT, RET_BLIP2)
    state = torch.load(os.path.join(args.data, "model.pth"), map_location="cpu")["model"]
    model.load_state_dict(state, strict=True)
    model.eval()
    trainable, frozen = count_parameters(model)
    dataset, pixels = load_split(args.data)
    loader = _Loader(dataset, pixels, args.batch)
    ni, nt = len(dataset.image), len(dataset.text)

    first_itm = []
    real_itm = model.compute_itm

    def timed_itm(*a, **kw):
        if not first_itm:
            first_itm.append(time.perf_counter())
        return real_itm(*a, **kw)
    model.compute_itm = timed_itm
    retrieval = import_retrieval_task(args.lavis_src)
    print("LAVIS compute_sim_matrix: %d images, %d texts, k_test %d, %d parameters, threads %d"
          % (ni, nt, args.k_test, trainable + frozen, torch.get_num_threads()), flush=True)
    with torch.no_grad():  # RunnerBase.evaluation is @torch.no_grad
        t0 = time.perf_counter()
        i2t, t2i = mods.blip2.compute_sim_matrix(model=model, data_loader=loader, k_test=args.k_test)
        t1 = time.perf_counter()
    metrics = report_metrics(retrieval, args.data, i2t, t2i, dataset)
    np.savez(os.path.join(args.data, "scores_lavis.npz"), i2t=i2t, t2i=t2i)
    pairs = (ni + nt) * args.k_test
    rerank = t1 - first_itm[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(metrics))
    print("LAVIS: total %.1f s (features %.1f s, re-ranking %.1f s); %d pairs re-ranked: %.1f "
          "pairs/s over the re-ranking, %.1f over the whole; peak RSS %.0f MB"
          % (t1 - t0, first_itm[0] - t0, rerank, pairs, pairs / rerank, pairs / (t1 - t0), peak))
    f = flops_itm_pair(RET_QFORMER, RET_VIT, q=RET_BLIP2["num_query_token"], t=35)
    print("ITM pair forward: %.2f GFLOP (K/V over the image tokens included); %.1f GFLOP/s"
          % (f / 1e9, f * pairs / rerank / 1e9))


def import_retrieval_task(lavis_src):
    """lavis.tasks.retrieval (for RetrievalTask._report_metrics), without lavis/tasks/__init__
    and the dataset code base_task imports."""
    import importlib
    from lavis_offline import _bare_package, _stub_modules
    lavis_dir = os.path.join(os.path.abspath(lavis_src), "lavis")
    _bare_package("lavis.tasks", os.path.join(lavis_dir, "tasks"))
    stubs = _stub_modules({"lavis.datasets": [], "lavis.datasets.data_utils": ["prepare_sample"]})
    try:
        module = importlib.import_module("lavis.tasks.retrieval")
    finally:
        for name in stubs:
            del sys.modules[name]
    return module


def report_metrics(retrieval, out_dir, i2t, t2i, dataset):
    """LAVIS' RetrievalTask._report_metrics (it appends to output_dir/evaluate.txt)."""
    from lavis.common.registry import registry
    if "output_dir" not in registry.mapping["paths"]:
        registry.register_path("output_dir", out_dir)
    return retrieval.RetrievalTask._report_metrics(i2t, t2i, dataset.txt2img, dataset.img2txt)


def cmd_retrieval_compare(args):
    import numpy as np
    lavis = np.load(os.path.join(args.data, "scores_lavis.npz"))
    with open(os.path.join(args.blip2cpp, "retrieval_results.json")) as fh:
        cpp = json.load(fh)
    dataset, _ = load_split(args.data)
    from lavis_offline import import_lavis
    import_lavis(args.lavis_src)
    retrieval = import_retrieval_task(args.lavis_src)
    ref = report_metrics(retrieval, args.data, lavis["i2t"], lavis["t2i"], dataset)
    print("%-12s %10s %10s" % ("metric", "LAVIS", "blip2cpp"))
    same = True
    for k, v in ref.items():
        c = cpp.get(k, float("nan"))
        print("%-12s %10.4f %10.4f%s" % (k, v, c, "" if abs(v - c) < 1e-6 else "   <- differs"))
        same = same and (abs(v - c) < 1e-6 or k == "agg_metrics")
    print("recalls identical" if same else "recalls DIFFER")
    if "rerank_seconds" in cpp:
        k = args.k_test
        pairs = (cpp["num_images"] + cpp["num_texts"]) * k
        print("blip2cpp: re-ranking %.1f s, %d pairs: %.1f pairs/s"
              % (cpp["rerank_seconds"], pairs, pairs / cpp["rerank_seconds"]))


def cmd_retrieval_check(args):
    """Checks blip2cpp's scores against LAVIS' on the same weights and images, pair by pair:
    blip2cpp's feature extraction (`blip2 run --run_mode predict` on a stage-1 copy of
    bench/configs/retrieval_lavis.yaml) of the first N images and the first caption of each gives
    image_embeds_proj, text_embeds_proj (token 0 = the ITC text feature) and multimodal_embeds
    (each image with its caption); from them: ITC similarities (max over queries) of every pair,
    and each matched pair's ITM logit (itm_head of model.pth, class 1, mean over queries) +
    ITC = the score compute_sim_matrix gives it. LAVIS' side: its forward_image, forward_text,
    text_proj / vision_proj and compute_itm, as compute_sim_matrix calls them (texts padded to 35)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import yaml
    from safetensors.torch import load_file
    torch.set_num_threads(args.threads)
    n = args.n
    dataset, pixels = load_split(args.data)
    texts = [dataset.text[dataset.img2txt[i][0]] for i in range(n)]
    paths = [os.path.join(args.data, "images", dataset.image[i]) for i in range(n)]

    with open(args.config) as fh:
        cfg = yaml.safe_load(fh)
    cfg["trainer"]["type"] = "contrastive_language_image_pretrain"
    cfg["run_mode"] = "predict"
    out = tempfile.mkdtemp(prefix="bench_ret_check_")
    cfg_path = os.path.join(out, "predict.yaml")
    with open(cfg_path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    cmd = [args.binary, "run", "--config", cfg_path, "--load_checkpoint",
           os.path.join(args.data, "model.pth"), "--output_dir", out,
           "--predict_data", ",".join(paths)]
    for t in texts:
        cmd += ["--predict_text", t]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit("blip2 predict failed:\n" + res.stdout[-3000:] + res.stderr[-3000:])
    feats = load_file(os.path.join(out, "features.safetensors"))

    _, model = build_lavis(args.lavis_src, args.vocab, RET_QFORMER, RET_VIT, RET_BLIP2)
    state = torch.load(os.path.join(args.data, "model.pth"), map_location="cpu")["model"]
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        image_feat, vit_feat = model.forward_image(pixels[:n])
        image_embed = F.normalize(model.vision_proj(image_feat), dim=-1)
        tok = model.tokenizer(texts, padding="max_length", truncation=True, max_length=35,
                              return_tensors="pt")
        text_embed = F.normalize(model.text_proj(model.forward_text(tok)))
        sims = torch.einsum("iqe,te->itq", image_embed, text_embed).max(-1).values
        itm = model.compute_itm(image_inputs=vit_feat, text_ids=tok.input_ids,
                                text_atts=tok.attention_mask).float()
        w, b = state["itm_head.weight"][1], state["itm_head.bias"][1]
        c_img = feats["image_embeds_proj"]
        c_txt = feats["text_embeds_proj"][:, 0, :]
        c_sims = torch.einsum("iqe,te->itq", c_img, c_txt).max(-1).values
        c_itm = (feats["multimodal_embeds"] @ w + b).mean(1)

    def diff(name, a, c):
        d = (a - c).abs().max().item()
        print("%-34s max |LAVIS - blip2cpp| = %.3g (LAVIS values span %.3g .. %.3g)"
              % (name, d, a.min().item(), a.max().item()))
        return d
    print("%d images x %d captions (the first caption of each image)" % (n, n))
    diff("image_embeds_proj", image_embed, c_img)
    diff("text feature (text_embeds_proj[:,0])", text_embed, c_txt)
    diff("ITC similarity, all pairs", sims, c_sims)
    diff("ITM logit, matched pairs", itm, c_itm)
    diff("score = ITM + ITC, matched pairs", itm + sims.diagonal(), c_itm + c_sims.diagonal())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lavis-src", default="/tmp/lavis_src")
    ap.add_argument("--vocab", default="/tmp/bert_vocab.txt")
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stage1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p = sub.add_parser("stage1-blip2cpp")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "blip2"))
    p.add_argument("--config", default=os.path.join(ROOT, "bench", "configs", "stage1_midsize.yaml"))
    p.add_argument("--output_dir", default="/tmp/bench_stage1_blip2cpp")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p = sub.add_parser("retrieval-setup")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--captions", type=int, default=5)
    p = sub.add_parser("retrieval")
    p.add_argument("--data", required=True)
    p.add_argument("--k-test", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p = sub.add_parser("retrieval-check")
    p.add_argument("--data", required=True)
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "blip2"))
    p.add_argument("--config", default=os.path.join(ROOT, "bench", "configs", "retrieval_lavis.yaml"))
    p.add_argument("--n", type=int, default=8)
    p = sub.add_parser("retrieval-compare")
    p.add_argument("--data", required=True)
    p.add_argument("--blip2cpp", required=True, help="the blip2 run's output directory")
    p.add_argument("--k-test", type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    {"stage1": cmd_stage1, "stage1-blip2cpp": cmd_stage1_blip2cpp,
     "retrieval-setup": cmd_retrieval_setup, "retrieval": cmd_retrieval,
     "retrieval-compare": cmd_retrieval_compare, "retrieval-check": cmd_retrieval_check}[args.cmd](args)


if __name__ == "__main__":
    main()
