"""Imports LAVIS' own BLIP-2 code (GitHub salesforce/LAVIS at commit 506965b, from a local
checkout; never committed here) offline, for the scripts that run it: make_lavis_oracle.py (test
fixtures) and bench_lavis.py (speed comparisons).

Nothing that computes is replaced. Only what would download or import unrelated packages is
bypassed:
  * `lavis`, `lavis.models`, `lavis.runners`, `timm`, `timm.models` are registered as bare
    packages pointing at the real folders (their __init__ files import every model / dataset, or
    torchvision); torchvision, webdataset and lavis.datasets are stubbed only while importing;
  * in lavis.models.blip2_models.blip2, BertTokenizer.from_pretrained (-> a local vocab.txt),
    BertConfig.from_pretrained (-> a BertConfig of the given shape), BertLMHeadModel.from_pretrained
    (-> LAVIS' Qformer.BertLMHeadModel(config), LAVIS' init) and create_eva_vit_g (-> LAVIS'
    eva_vit.VisionTransformer of the given shape with EVA-g's fixed arguments, fp32, no weights
    loaded) are replaced (install_offline_constructors);
  * forward calls dist.get_rank(): init_process_group makes a one-process gloo group, so
    concat_all_gather runs as in LAVIS training.

The environment (see make_lavis_oracle.py's docstring): transformers 4.26.1, timm 0.4.12,
fairscale 0.4.4, omegaconf, iopath, pandas, torch 2.13.0, and LAVIS' folders from
`git archive 506965b lavis/models lavis/common lavis/runners lavis/tasks`.
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from functools import partial

import torch.distributed as dist
import torch.nn as nn


def _bare_package(name, path):
    module = types.ModuleType(name)
    module.__path__ = [path]
    module.__file__ = os.path.join(path, "__init__.py")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = [path]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _stub_modules(names_to_attrs):
    """Installs stub modules; returns the names installed (to remove afterwards)."""
    installed = []
    for name, attrs in names_to_attrs.items():
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        for attr in attrs:
            def unavailable(*args, _attr=attr, **kwargs):
                raise RuntimeError("stubbed while importing LAVIS: " + _attr)
            setattr(module, attr, unavailable)
        sys.modules[name] = module
        installed.append(name)
    return installed


def import_lavis(lavis_src):
    """Imports LAVIS' BLIP-2 modules from lavis_src (the folder holding lavis/); returns them as
    attributes of a namespace: base_model, blip2, qformer, blip2_qformer, eva_vit, optims,
    runner_base."""
    lavis_dir = os.path.join(os.path.abspath(lavis_src), "lavis")
    if not os.path.isfile(os.path.join(lavis_dir, "models", "blip2_models", "blip2_qformer.py")):
        sys.exit("no LAVIS source under %s (see make_lavis_oracle.py's docstring: git archive "
                 "506965b ...)" % lavis_src)
    sys.path.insert(0, os.path.abspath(lavis_src))

    # transformers first, so that its timm / torchvision probes see the real (or no) packages.
    importlib.import_module("transformers")
    importlib.import_module("transformers.modeling_utils")
    importlib.import_module("transformers.models.bert.tokenization_bert")

    # timm's own __init__ imports every model (and torchvision); its layers/hub are what LAVIS uses.
    timm_spec = importlib.util.find_spec("timm")
    timm_dir = timm_spec.submodule_search_locations[0]
    timm = _bare_package("timm", timm_dir)
    _bare_package("timm.models", os.path.join(timm_dir, "models"))
    timm.__version__ = importlib.import_module("timm.version").__version__

    _bare_package("lavis", lavis_dir)
    lavis_models = _bare_package("lavis.models", os.path.join(lavis_dir, "models"))
    stubs = _stub_modules({
        "torchvision": [], "torchvision.datasets": [],
        "torchvision.datasets.utils": ["check_integrity", "download_file_from_google_drive",
                                       "extract_archive"],
    })
    try:
        importlib.import_module("lavis.common.utils")
    finally:
        for name in stubs:
            del sys.modules[name]
    base_model = importlib.import_module("lavis.models.base_model")
    lavis_models.BaseModel = base_model.BaseModel  # what registry.register_model imports

    mods = types.SimpleNamespace()
    mods.base_model = base_model
    mods.blip2 = importlib.import_module("lavis.models.blip2_models.blip2")
    mods.qformer = importlib.import_module("lavis.models.blip2_models.Qformer")
    mods.blip2_qformer = importlib.import_module("lavis.models.blip2_models.blip2_qformer")
    mods.eva_vit = importlib.import_module("lavis.models.eva_vit")
    mods.optims = importlib.import_module("lavis.common.optims")

    # RunnerBase (for its optimizer property) imports webdataset and the dataset code.
    _bare_package("lavis.runners", os.path.join(lavis_dir, "runners"))
    stubs = _stub_modules({
        "webdataset": [],
        "lavis.datasets": [], "lavis.datasets.datasets": [],
        "lavis.datasets.data_utils": ["concat_datasets", "reorg_datasets_by_split"],
        "lavis.datasets.datasets.dataloader_utils": ["IterLoader", "MultiIterLoader",
                                                     "PrefetchLoader"],
    })
    try:
        mods.runner_base = importlib.import_module("lavis.runners.runner_base")
    finally:
        for name in stubs:
            del sys.modules[name]
    return mods


def install_offline_constructors(mods, vocab_path, vocab_size, qformer, vit):
    """Replaces what Blip2Base would download. qformer: BertConfig keyword arguments (LAVIS then
    sets encoder_width, add_cross_attention, cross_attention_freq, query_length itself); vit:
    img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio of the EVA-style ViT."""
    from transformers import BertConfig, BertTokenizer

    def tokenizer_from_pretrained(name, **kwargs):
        assert name == "bert-base-uncased", name
        return BertTokenizer(vocab_file=vocab_path, do_lower_case=True, **kwargs)

    def config_from_pretrained(name, **kwargs):
        assert name == "bert-base-uncased" and not kwargs, (name, kwargs)
        return BertConfig(vocab_size=vocab_size, **qformer)

    def lm_from_pretrained(name, config):
        assert name == "bert-base-uncased", name
        model = mods.qformer.BertLMHeadModel(config)  # LAVIS' class, LAVIS' _init_weights
        return model.eval()  # as PreTrainedModel.from_pretrained leaves it

    def offline_create_eva_vit_g(img_size=224, drop_path_rate=0.4, use_checkpoint=False,
                                 precision="fp16"):
        # create_eva_vit_g's fixed arguments, at the given size; no weights are loaded and, in
        # fp32, create_eva_vit_g does nothing else to the model.
        assert precision == "fp32", precision
        assert img_size == vit["img_size"], img_size
        return mods.eva_vit.VisionTransformer(
            img_size=img_size,
            patch_size=vit["patch_size"],
            use_mean_pooling=False,
            embed_dim=vit["embed_dim"],
            depth=vit["depth"],
            num_heads=vit["num_heads"],
            mlp_ratio=vit["mlp_ratio"],
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_checkpoint=use_checkpoint,
        )

    mods.blip2.BertTokenizer = types.SimpleNamespace(from_pretrained=tokenizer_from_pretrained)
    mods.blip2.BertConfig = types.SimpleNamespace(from_pretrained=config_from_pretrained)
    mods.blip2.BertLMHeadModel = types.SimpleNamespace(from_pretrained=lm_from_pretrained)
    mods.blip2.create_eva_vit_g = offline_create_eva_vit_g


class ModuleView:
    """A stand-in for a module object (torch, F) as one LAVIS module sees it: every attribute is
    the real one except those given."""

    def __init__(self, real, **overrides):
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._real, name)


def init_process_group(tmpdir):
    """A one-process gloo group (LAVIS' forward calls dist.get_rank(), and its gathers run as in
    LAVIS training)."""
    if dist.is_initialized():
        return
    dist.init_process_group("gloo", init_method="file://" + os.path.join(tmpdir, "pg"),
                            rank=0, world_size=1)


def make_optimizer(mods, model, init_lr, weight_decay, beta2):
    """LAVIS' RunnerBase.optimizer property, run on a minimal runner holding the model and the
    run config (it calls model.get_optimizer_params(weight_decay, lr_layer_decay))."""
    from omegaconf import OmegaConf
    runner = types.SimpleNamespace(
        _optimizer=None, _model=model,
        config=types.SimpleNamespace(run_cfg=OmegaConf.create(dict(
            init_lr=init_lr, weight_decay=weight_decay, beta2=beta2))))
    return mods.runner_base.RunnerBase.optimizer.fget(runner)


def make_optimizer_and_scheduler(mods, model, run_cfg):
    """make_optimizer and LAVIS' LinearWarmupCosineLRScheduler over it, from a run config dict
    (init_lr, min_lr, warmup_lr, warmup_steps, max_epoch, weight_decay, beta2)."""
    optimizer = make_optimizer(mods, model, run_cfg["init_lr"], run_cfg["weight_decay"], run_cfg["beta2"])
    scheduler = mods.optims.LinearWarmupCosineLRScheduler(
        optimizer, max_epoch=run_cfg["max_epoch"], min_lr=run_cfg["min_lr"], init_lr=run_cfg["init_lr"],
        warmup_steps=run_cfg["warmup_steps"], warmup_start_lr=run_cfg["warmup_lr"])
    return optimizer, scheduler
