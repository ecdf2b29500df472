"""Writes tests/fixtures/lavis_oracle/: what LAVIS' own stage-1 BLIP-2 code (`Blip2Qformer`,
GitHub salesforce/LAVIS at commit 506965b) computes on a tiny configuration, so the C++ port can
be tested against LAVIS itself rather than against a re-typing of its formulas.

Files written:
  vocab.txt          the 100-line WordPiece vocabulary the tokenizer was built from (LAVIS adds
                     [DEC] as bos, so the tokenizer and the Q-Former vocabulary have 101 tokens)
  captions.txt       the four captions (text_input), one a line
  model.pth          torch.save({"model": state_dict}) of the initial (perturbed) weights, with
                     LAVIS' names, as LAVIS checkpoints are stored
  no_decay.txt       trainable parameter names LAVIS' optimizer grouping puts at weight decay 0
  oracle.safetensors images; per case ("dup": samples carry image_id [0, 0, 1, 2]; "nodup": no
                     image_id) the input_ids / attention_mask LAVIS' tokenizer produced, the four
                     losses, the hard-negative indices (argmax sampler), the ITM negative-sampling
                     weights, the gradient of every trainable parameter after loss.backward()
                     ("<case>.grad.<name>") and every trainable parameter after one AdamW step
                     with LAVIS' grouping and LAVIS' LinearWarmupCosineLRScheduler
                     ("<case>.after.<name>"); and lr, weight_decay, beta1, beta2, eps; and
                     the scheduler's lr over epochs 0-9 x iterations 0-3 of RUN_CFG
                     ("schedule.epoch", "schedule.iteration", "schedule.lr").

Nothing is re-implemented: the model, its losses, the optimizer grouping
(Blip2Base.get_optimizer_params through RunnerBase.optimizer) and the learning-rate scheduler are
LAVIS' code. Only what would download or import unrelated packages is bypassed (tools/lavis_offline.py,
shared with tools/bench_lavis.py):
  * `lavis`, `lavis.models`, `lavis.runners`, `timm`, `timm.models` are registered as bare
    packages pointing at the real folders (their __init__ files import every model / dataset, or
    torchvision); torchvision, webdataset and lavis.datasets are stubbed only while importing;
  * in lavis.models.blip2_models.blip2, BertTokenizer.from_pretrained (-> the local vocab.txt),
    BertConfig.from_pretrained (-> a tiny BertConfig), BertLMHeadModel.from_pretrained (-> LAVIS'
    Qformer.BertLMHeadModel(config)) and create_eva_vit_g (-> LAVIS' eva_vit.VisionTransformer at
    a tiny size with EVA-g's fixed arguments, fp32, no weights loaded) are replaced;
  * forward calls dist.get_rank(): a one-process gloo group (init_method file://) is created, so
    concat_all_gather runs as in LAVIS training (it detaches the gathered side);
  * torch.multinomial, as seen from blip2_qformer, returns the argmax of the weight row (asserted
    > 0, no NaN), so the hard negatives are deterministic; F.softmax there is wrapped to record
    the negative-sampling weights.
All weights are LAVIS' own init (torch.manual_seed(0)) plus 0.1 * randn on every parameter but
temp, so that no tensor sits at a trivial init value; dropout is 0; one thread.

How to run (no network needed beyond the package registries):

    python3 -m venv /tmp/lavis_venv
    /tmp/lavis_venv/bin/pip install torch==2.13.0
    /tmp/lavis_venv/bin/pip install --no-deps salesforce-lavis==1.0.2
    /tmp/lavis_venv/bin/pip install transformers==4.26.1 huggingface-hub==0.14.1 numpy==1.26.4 \\
        fairscale==0.4.4 iopath==0.1.10 omegaconf pandas pyyaml safetensors
    /tmp/lavis_venv/bin/pip install --no-deps timm==0.4.12
    # LAVIS' GitHub code at 506965b (the fetch tool, or a git clone of salesforce/LAVIS):
    mkdir -p /tmp/lavis_src
    git --git-dir=<LAVIS .git> archive 506965b lavis/models lavis/common lavis/runners \\
        | tar -x -C /tmp/lavis_src
    /tmp/lavis_venv/bin/python tools/make_lavis_oracle.py [--lavis-src /tmp/lavis_src] [--out DIR]

The script also runs a check that is not written to the fixtures: the "nodup" case with LAVIS'
concat_all_gather replaced by the identity (gradient through the gathered side of ITC), and
prints how the losses and the query_tokens gradient norm change.
"""
import argparse
import collections
import copy
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lavis_offline import (ModuleView, import_lavis, init_process_group,
                           install_offline_constructors, make_optimizer_and_scheduler)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "lavis_oracle")

CAPTIONS = [
    "a red circle on the left",
    "a small blue square",
    "two green triangles at the top",
    "a dog",
]
DUP_IMAGE_IDS = [0, 0, 1, 2]

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = (
    "cat bird fish tree house car road sky sun moon star water river lake hill field grass "
    "flower leaf stone rock sand snow rain cloud wind light dark night day man woman child boy "
    "girl person people hand head face eye door window wall floor table chair bed cup plate "
    "bowl bottle box bag ball book paper pen phone screen yellow black white orange purple pink "
    "brown gray large tiny big round flat tall short long old new three four five one right "
    "bottom middle center under over near far next"
).split()

# Tiny shapes (the C++ test builds the same).
VIT = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.25)
QFORMER = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
               max_position_embeddings=40, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, initializer_range=0.02,
               hidden_act="gelu")
BLIP2 = dict(vit_model="eva_clip_g", img_size=28, drop_path_rate=0, use_grad_checkpoint=False,
             vit_precision="fp32", freeze_vit=True, num_query_token=6, cross_attention_freq=2,
             embed_dim=16, max_txt_len=12)
# LAVIS' BLIP-2 pretraining run settings (run_cfg of its pretrain configs / RunnerBase defaults).
RUN_CFG = dict(init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=2, max_epoch=10,
               weight_decay=0.05, beta2=0.999)


def write_vocab(path):
    words = []
    for caption in CAPTIONS:
        for w in caption.split():
            if w not in words:
                words.append(w)
    for w in FILLER:
        if len(SPECIAL) + len(words) >= 100:
            break
        if w not in words:
            words.append(w)
    lines = SPECIAL + words
    assert len(lines) == 100, len(lines)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


# ---------------------------------------------------------------------------------------------
# Recording what forward does


class Recorder:
    def __init__(self):
        self.reset()

    def reset(self):
        self.negatives = []
        self.softmax = []
        self.tokens = []

    def multinomial(self, weights, num_samples, *args, **kwargs):
        assert num_samples == 1 and not args and not kwargs, (num_samples, args, kwargs)
        assert weights.dim() == 1
        assert not torch.isnan(weights).any(), weights
        idx = int(torch.argmax(weights).item())
        assert weights[idx].item() > 0, weights
        self.negatives.append(idx)
        return torch.tensor([idx], dtype=torch.long, device=weights.device)

    def softmax_fn(self, real_softmax):
        def softmax(x, *args, **kwargs):
            out = real_softmax(x, *args, **kwargs)
            self.softmax.append(out.detach().clone())
            return out
        return softmax


class TokenizerView:
    """Wraps LAVIS' tokenizer to record what it returns inside forward."""

    def __init__(self, tokenizer, recorder):
        self._tokenizer = tokenizer
        self._recorder = recorder

    def __call__(self, *args, **kwargs):
        out = self._tokenizer(*args, **kwargs)
        self._recorder.tokens.append((out.input_ids.clone(), out.attention_mask.clone()))
        return out

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)


def run_case(mods, model, initial_state, samples, recorder):
    """One LAVIS training iteration from the initial weights: forward, backward, scheduler step
    (cur_epoch=0, cur_step=1), optimizer step. Returns everything recorded."""
    model.load_state_dict(initial_state, strict=True)
    model.zero_grad(set_to_none=True)
    model.train()  # the ViT stays in eval (LAVIS disables its train())
    assert not model.visual_encoder.training
    recorder.reset()

    optimizer, scheduler = make_optimizer_and_scheduler(mods, model, RUN_CFG)
    scheduler.step(cur_epoch=0, cur_step=1)  # as BaseTask._train_inner_loop, before forward

    output = model(samples)
    output.loss.backward()

    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = collections.OrderedDict()
    no_grad = []
    for n, p in trainable:
        if p.grad is None:
            no_grad.append(n)
        else:
            grads[n] = p.grad.detach().clone()

    optimizer.step()
    after = collections.OrderedDict((n, p.detach().clone()) for n, p in trainable)

    groups = []
    for g in optimizer.param_groups:
        groups.append(dict(names=[names[id(p)] for p in g["params"]], lr=g["lr"],
                           weight_decay=g["weight_decay"], betas=g["betas"], eps=g["eps"],
                           lr_scale=g.get("lr_scale")))
    assert len(recorder.tokens) == 1, len(recorder.tokens)
    assert len(recorder.negatives) == 2 * len(CAPTIONS), recorder.negatives
    assert len(recorder.softmax) == 2, len(recorder.softmax)
    bs = len(CAPTIONS)
    return dict(
        loss=output.loss.detach().clone(), loss_itc=output.loss_itc.detach().clone(),
        loss_itm=output.loss_itm.detach().clone(), loss_lm=output.loss_lm.detach().clone(),
        input_ids=recorder.tokens[0][0], attention_mask=recorder.tokens[0][1],
        # blip2_qformer.forward: the first bs multinomial calls pick a negative image per text
        # (from weights_t2i), the next bs a negative text per image (from weights_i2t).
        image_for_text=torch.tensor(recorder.negatives[:bs], dtype=torch.long),
        text_for_image=torch.tensor(recorder.negatives[bs:], dtype=torch.long),
        weights_t2i=recorder.softmax[0], weights_i2t=recorder.softmax[1],
        grads=grads, no_grad=no_grad, after=after, groups=groups,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lavis-src", default="/tmp/lavis_src",
                        help="folder holding lavis/ from `git archive 506965b lavis/models "
                             "lavis/common lavis/runners`")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    vocab_path = os.path.join(args.out, "vocab.txt")
    vocab_size = write_vocab(vocab_path)
    with open(os.path.join(args.out, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CAPTIONS) + "\n")

    mods = import_lavis(args.lavis_src)
    install_offline_constructors(mods, vocab_path, vocab_size, QFORMER, VIT)

    recorder = Recorder()
    qf = mods.blip2_qformer
    qf.torch = ModuleView(torch, multinomial=recorder.multinomial)
    qf.F = ModuleView(F, softmax=recorder.softmax_fn(F.softmax))

    with tempfile.TemporaryDirectory() as tmpdir:
        init_process_group(tmpdir)

        torch.manual_seed(0)
        model = qf.Blip2Qformer(**BLIP2)
        assert len(model.tokenizer) == vocab_size + 1  # [DEC]
        with torch.no_grad():  # move every tensor off its init value (temp stays 0.07)
            for name, p in model.named_parameters():
                if name != "temp":
                    p.add_(0.1 * torch.randn_like(p))
        model.tokenizer = TokenizerView(model.tokenizer, recorder)
        initial_state = copy.deepcopy(model.state_dict())

        gen = torch.Generator().manual_seed(1234)
        images = torch.randn(4, 3, 28, 28, generator=gen)
        image_ids = torch.tensor(DUP_IMAGE_IDS, dtype=torch.long)

        cases = collections.OrderedDict()
        cases["dup"] = run_case(mods, model, initial_state,
                                {"image": images, "text_input": list(CAPTIONS),
                                 "image_id": image_ids}, recorder)
        cases["nodup"] = run_case(mods, model, initial_state,
                                  {"image": images, "text_input": list(CAPTIONS)}, recorder)

        # Check only (not written): gradient through the gathered side of ITC.
        real_gather = qf.concat_all_gather
        qf.concat_all_gather = lambda t: t
        try:
            identity = run_case(mods, model, initial_state,
                                {"image": images, "text_input": list(CAPTIONS)}, recorder)
        finally:
            qf.concat_all_gather = real_gather
        dist.destroy_process_group()

    # LAVIS' LinearWarmupCosineLRScheduler over a grid of (epoch, iteration), as
    # BaseTask._train_inner_loop calls it before every iteration.
    schedule = []
    probe = torch.nn.Linear(1, 1)
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=RUN_CFG["init_lr"])
    probe_sched = mods.optims.LinearWarmupCosineLRScheduler(
        probe_opt, max_epoch=RUN_CFG["max_epoch"], min_lr=RUN_CFG["min_lr"],
        init_lr=RUN_CFG["init_lr"], warmup_steps=RUN_CFG["warmup_steps"],
        warmup_start_lr=RUN_CFG["warmup_lr"])
    for epoch in range(RUN_CFG["max_epoch"]):
        for it in range(4):
            probe_sched.step(cur_epoch=epoch, cur_step=it)
            schedule.append((epoch, it, probe_opt.param_groups[0]["lr"]))

    # ----- write
    from safetensors.torch import save_file

    tensors = collections.OrderedDict()
    tensors["images"] = images
    tensors["dup.image_ids"] = image_ids
    groups = cases["dup"]["groups"]
    lr = groups[0]["lr"]
    assert all(g["lr"] == lr for g in groups)
    wd = [g["weight_decay"] for g in groups if g["weight_decay"] != 0]
    assert len(set(wd)) == 1
    tensors["lr"] = torch.tensor([lr], dtype=torch.float64)
    tensors["weight_decay"] = torch.tensor([wd[0]], dtype=torch.float64)
    tensors["beta1"] = torch.tensor([groups[0]["betas"][0]], dtype=torch.float64)
    tensors["beta2"] = torch.tensor([groups[0]["betas"][1]], dtype=torch.float64)
    tensors["eps"] = torch.tensor([groups[0]["eps"]], dtype=torch.float64)
    tensors["schedule.epoch"] = torch.tensor([e for e, _, _ in schedule], dtype=torch.int64)
    tensors["schedule.iteration"] = torch.tensor([i for _, i, _ in schedule], dtype=torch.int64)
    tensors["schedule.lr"] = torch.tensor([lr for _, _, lr in schedule], dtype=torch.float64)
    for case, r in cases.items():
        assert r["groups"] == groups
        for k in ("input_ids", "attention_mask", "image_for_text", "text_for_image"):
            tensors["%s.%s" % (case, k)] = r[k].to(torch.int64)
        for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            tensors["%s.%s" % (case, k)] = r[k].reshape(1).to(torch.float32)
        tensors[case + ".weights_t2i"] = r["weights_t2i"]
        tensors[case + ".weights_i2t"] = r["weights_i2t"]
        for n, g in r["grads"].items():
            tensors["%s.grad.%s" % (case, n)] = g
        for n, p in r["after"].items():
            tensors["%s.after.%s" % (case, n)] = p
    tensors = collections.OrderedDict((k, v.detach().contiguous().clone()) for k, v in tensors.items())
    save_file(tensors, os.path.join(args.out, "oracle.safetensors"),
              metadata={"source": "salesforce/LAVIS 506965b Blip2Qformer via "
                                  "tools/make_lavis_oracle.py"})
    os.chmod(os.path.join(args.out, "oracle.safetensors"), 0o644)

    no_decay = [n for g in groups if g["weight_decay"] == 0 for n in g["names"]]
    with open(os.path.join(args.out, "no_decay.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(no_decay) + "\n")

    torch.save({"model": initial_state}, os.path.join(args.out, "model.pth"))

    # ----- report
    print("state_dict:")
    for k, v in initial_state.items():
        print("  %-70s %-16s %s" % (k, tuple(v.shape), str(v.dtype).replace("torch.", "")))
    print("optimizer groups:")
    for g in groups:
        print("  weight_decay=%s lr=%.6g lr_scale=%s betas=%s eps=%s: %d params"
              % (g["weight_decay"], g["lr"], g["lr_scale"], g["betas"], g["eps"], len(g["names"])))
    print("  decay group:", [n for g in groups if g["weight_decay"] != 0 for n in g["names"]])
    for case, r in list(cases.items()) + [("nodup_identity_gather", identity)]:
        print("%s: loss %.7f itc %.7f itm %.7f lm %.7f" % (
            case, r["loss"].item(), r["loss_itc"].item(), r["loss_itm"].item(),
            r["loss_lm"].item()))
        print("  image_for_text", r["image_for_text"].tolist(),
              "text_for_image", r["text_for_image"].tolist())
        print("  weights_t2i", r["weights_t2i"].tolist())
        print("  weights_i2t", r["weights_i2t"].tolist())
        print("  params without grad:", r["no_grad"])
        print("  |grad query_tokens| = %.6f" % r["grads"]["query_tokens"].norm().item())
    changed = [n for n in cases["nodup"]["grads"]
               if not torch.allclose(cases["nodup"]["grads"][n], identity["grads"][n],
                                     rtol=1e-5, atol=1e-7)]
    print("identity gather changes the gradient of %d of %d trainable parameters"
          % (len(changed), len(cases["nodup"]["grads"])))
    print("input_ids", cases["dup"]["input_ids"].tolist())
    print("lr %.10g" % lr)
    total = 0
    for fn in sorted(os.listdir(args.out)):
        size = os.path.getsize(os.path.join(args.out, fn))
        total += size
        print("  %-20s %9d bytes" % (fn, size))
    print("  total %d bytes" % total)


if __name__ == "__main__":
    main()
