"""Frozen feature extractors for few-shot tasks (Chapter 4).

tiny: two small networks trained by the repository on the base classes of the digit-pair
world, in seconds on one CPU thread:

    cnn()   3 conv layers + a 64-d embedding (position-aware: "37" is not "73")
    vit()   timm VisionTransformer, 8x16 images, 2x4 patches of 4x4, depth 2, width 64

``train(model, x, y)`` fits them with cross-entropy (supervised pre-training, the transfer-
learning recipe of Sec. 4.2); ``embed(model, x)`` returns the frozen features.

paper: the 13 backbones of Fig 4.4 as facts (``BACKBONES``: library, model id, pretrained tag,
feature dim), the base model f_theta of Sec. 4.4 (``SELECTORS["pmf"]``: P>M>F's DINO ViT-S/16
meta-trained with ProtoNets on Meta-Dataset's ilsvrc_2012) and ``load_backbone(name)``, which needs
hub access or a local checkpoint under ``data/backbones/`` and otherwise says what to download.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import paths
from ..errors import check_choice, resource_unavailable

IMAGE = (8, 16)


class TinyCNN(nn.Module):
    """(B, 1, 8, 16) -> features (B, dim); ``head`` maps features to base-class logits."""

    def __init__(self, n_classes: int, dim: int = 64, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),  # 4x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),  # 2x4
            nn.Flatten(), nn.Linear(2 * width * 8, dim), nn.ReLU())
        self.head = nn.Linear(dim, n_classes)
        self.num_features = dim

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.forward_features(x))


def cnn(n_classes: int, dim: int = 64, seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(n_classes, dim)


def vit(n_classes: int, dim: int = 64, seed: int = 0):
    """A real timm ``VisionTransformer`` at toy size: 8x4 column patches (4 tokens; square 4x4
    patches trained worse in seconds), depth 2; features are the mean-pooled pre-logits."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=IMAGE, patch_size=(8, 4), in_chans=1, num_classes=n_classes, embed_dim=dim,
                             depth=2, num_heads=4, mlp_ratio=2.0, global_pool="avg")


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 8, lr: float = 3e-3, batch: int = 128,
          seed: int = 0, progress: bool = True) -> nn.Module:
    """Supervised training on base classes: x (n, 1, 8, 16), y (n,) in [0, n_classes). Returns eval()."""
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc=f"train {type(model).__name__}", disable=not progress, leave=False)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def meta_train(model: nn.Module, x: np.ndarray, y: np.ndarray, episodes: int = 300, way: int = 10, shot: int = 5,
               query: int = 10, lr: float = 5e-4, seed: int = 0, progress: bool = True) -> nn.Module:
    """ProtoNet episodes on the base classes after pre-training (P>M>F's recipe, Sec. 4.4): the
    metric, and so the scale of the prototypical loss FastDiffSel ascends, becomes calibrated."""
    from tqdm.auto import tqdm
    rng = np.random.default_rng([seed, 7])
    x, classes = torch.as_tensor(x), np.unique(y)
    members = {c: np.flatnonzero(y == c) for c in classes}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in tqdm(range(episodes), desc=f"meta-train {type(model).__name__}", disable=not progress, leave=False):
        picked = rng.choice(classes, size=way, replace=False)
        idx = np.stack([rng.choice(members[c], size=shot + query, replace=False) for c in picked])  # (way, s+q)
        f = _features(model, x[idx.reshape(-1)]).view(way, shot + query, -1)
        protos = f[:, :shot].mean(1)                                                         # (way, d)
        q = f[:, shot:].reshape(way * query, -1)
        logits = -torch.cdist(q, protos).pow(2)
        loss = F.cross_entropy(logits, torch.arange(way).repeat_interleave(query))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def embed(model: nn.Module, x: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """Frozen features (n, dim) on the CPU of x (n, C, H, W), computed on the model's device."""
    model.eval()
    x = torch.as_tensor(x)
    dev = next(model.parameters()).device
    feats = [_features(model, x[i:i + batch].to(dev)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(feats)


@torch.no_grad()
def embed_images(model: nn.Module, items, batch: int = 64) -> torch.Tensor:
    """Frozen features (n, dim) on the CPU of image files or decoded (H, W, 3) uint8 arrays, each read
    with the model's own resize, crop and normalisation (``imagenet.input_config``)."""
    from .. import imagenet
    model.eval()
    size, crop_pct, _, _ = imagenet.input_config(model)
    pixels, interpolation = imagenet.normalise(model), _interpolation(model)
    return torch.cat([_features(model, pixels(imagenet.load(items[i:i + batch], size, crop_pct, interpolation)))
                      .float().cpu() for i in range(0, len(items), batch)])


def _interpolation(model) -> str:
    """The resize filter of the model's released evaluation transform (torchvision's ResNets: bilinear)."""
    visual = getattr(model, "visual", model)
    cfg = getattr(visual, "preprocess_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("interpolation", "bicubic")


def _features(model, x):
    out = model.forward_features(x)
    if hasattr(model, "forward_head"):  # timm: pooled pre-logits features
        out = model.forward_head(out, pre_logits=True)
    return out


@torch.no_grad()
def base_accuracy(model, x, y) -> float:
    """Top-1 accuracy (%) on held-out base-class images: a quality gate for the extractor."""
    logits = torch.cat([model(torch.as_tensor(x[i:i + 1024])) for i in range(0, len(x), 1024)])
    return 100.0 * (logits.argmax(-1).numpy() == y).mean()


# ------------------------------------------------------------------------------ paper
@dataclass(frozen=True)
class Backbone:
    name: str        # the column name in Fig 4.3 / 4.4
    library: str     # "timm" | "open_clip" | "torch.hub"
    model: str       # timm architecture / open_clip model name / hub entry point
    tag: str         # timm pretrained tag / open_clip pretrained tag / checkpoint URL
    dim: int         # feature dimension used by ProtoNets
    pretraining: str


BACKBONES = {b.name: b for b in [
    Backbone("dino_small", "timm", "vit_small_patch16_224", "dino", 384, "DINO self-supervised, ImageNet-1k"),
    Backbone("dino_base", "timm", "vit_base_patch16_224", "dino", 768, "DINO self-supervised, ImageNet-1k"),
    Backbone("resnet18", "timm", "resnet18", "tv_in1k", 512, "supervised ImageNet-1k (torchvision)"),
    Backbone("resnet34", "timm", "resnet34", "tv_in1k", 512, "supervised ImageNet-1k (torchvision)"),
    Backbone("resnet50", "timm", "resnet50", "tv_in1k", 2048, "supervised ImageNet-1k (torchvision)"),
    Backbone("resnet101", "timm", "resnet101", "tv_in1k", 2048, "supervised ImageNet-1k (torchvision)"),
    Backbone("vit_base_21k", "timm", "vit_base_patch16_224", "augreg_in21k", 768, "supervised ImageNet-21k"),
    Backbone("vit_small_1k", "timm", "deit_small_patch16_224", "fb_in1k", 384, "supervised ImageNet-1k (DeiT)"),
    Backbone("vit_base_1k", "timm", "deit_base_patch16_224", "fb_in1k", 768, "supervised ImageNet-1k (DeiT)"),
    Backbone("beit_base_1k", "timm", "beit_base_patch16_224", "in22k_ft_in22k_in1k", 768,
             "BEiT masked image modelling, fine-tuned ImageNet-1k"),
    Backbone("clip_vit_base", "open_clip", "ViT-B-16", "openai", 512, "CLIP image-text, 400M pairs"),
    Backbone("clip_resnet50", "open_clip", "RN50", "openai", 1024, "CLIP image-text, 400M pairs"),
    Backbone("dino_resnet50", "torch.hub", "resnet50",
             "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth", 2048,
             "DINO self-supervised, ImageNet-1k"),
]}


# P>M>F (Hu et al. 2022), the dissertation's base model: DINO ViT-S/16 meta-trained with ProtoNets on MD's
# ilsvrc_2012 at 128 px, the checkpoint linked as "md_inet_128x128_dinosmall_fp16_lr2e-4" in hushell/pmf_cvpr22's
# README; its test transform resizes to 146 and centre-crops 128 (bilinear), with ImageNet's mean and std.
SELECTORS = {"pmf": Backbone(
    "pmf", "pmf", "vit_small_patch16_224.dino",
    "https://huggingface.co/hushell/pmf_metadataset_dino/resolve/main/md_imagenet_128x128_dinosmall_fp16_lr2e-4/"
    "best.pth", 384, "DINO self-supervised ImageNet-1k, then ProtoNet meta-training on MD ilsvrc_2012 (P>M>F)")}
_ALL = {**BACKBONES, **SELECTORS}
PMF_SIZE = 128
# DINO evaluated every backbone with Resize(256, bicubic) + CenterCrop(224) (its eval_linear / eval_knn);
# timm's default resnet50 config is a1_in1k's (crop 0.95), its dino ViT configs use 0.9.
_EVAL_CFG = {"dino_small": dict(crop_pct=0.875), "dino_base": dict(crop_pct=0.875),
             "dino_resnet50": dict(crop_pct=0.875, interpolation="bicubic"),
             "pmf": dict(input_size=(3, PMF_SIZE, PMF_SIZE), crop_pct=0.875, interpolation="bilinear")}


def backbone_table():
    import pandas as pd
    return pd.DataFrame([b.__dict__ for b in BACKBONES.values()])


def build_backbone(name: str, pretrained: bool = False, **kw) -> nn.Module:
    """The architecture of ``name`` (random weights unless ``pretrained``), classifier removed, with
    its evaluation transform in ``pretrained_cfg``. ``kw`` reaches timm.create_model (e.g. img_size)
    or open_clip.create_model."""
    check_choice("backbone", name, tuple(_ALL))
    b = _ALL[name]
    if b.library == "open_clip":
        import open_clip
        model = open_clip.create_model(b.model, pretrained=b.tag if pretrained else None, **kw)
        return _ClipImage(model.visual, b.dim)
    import timm
    model_id = {"timm": f"{b.model}.{b.tag}", "torch.hub": f"{b.model}.tv_in1k", "pmf": b.model}[b.library]
    if b.library == "pmf":
        kw = {"img_size": PMF_SIZE, **kw}
    model = timm.create_model(model_id, pretrained=pretrained and b.library == "timm", num_classes=0, **kw)
    if b.library == "pmf":   # its ProtoNet's cosine head (logits = scale (cos + bias)); 10 is P>M>F's initial value
        model.register_buffer("cosine_scale", torch.tensor(10.0))
    if name in _EVAL_CFG:
        model.pretrained_cfg = {**model.pretrained_cfg, **_EVAL_CFG[name]}
    if pretrained and b.library == "torch.hub":
        state = torch.hub.load_state_dict_from_url(b.tag, map_location="cpu", progress=False)
        model.load_state_dict(state)  # torchvision key names, which timm ResNets share
    if pretrained and b.library == "pmf":
        model.load_state_dict(pmf_state_dict(_fetch_checkpoint(b.tag, "pmf_md_imagenet_dinosmall.pth"), model))
    return model.eval()


def _fetch_checkpoint(url: str, file_name: str) -> dict:
    """A training checkpoint from ``url`` (cached by torch.hub), unpickled with only the non-tensor types
    such a checkpoint holds (its argparse ``args``) allowed."""
    import argparse
    import pathlib
    path = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    with torch.serialization.safe_globals([argparse.Namespace, pathlib.PosixPath]):
        return torch.load(path, map_location="cpu", weights_only=True)


def pmf_state_dict(checkpoint: dict, model: nn.Module) -> dict:
    """P>M>F's ProtoNet checkpoint ({"model": {"backbone.<DINO ViT key>": ..., "scale_cls", "bias"}})
    as a state dict of timm's ViT-S/16 at ``model``'s input size: DINO's ViT shares timm's key names;
    its 14x14 position embedding is resampled as DINO resamples it at run time (bicubic, scale
    factor (grid + 0.1) / 14, no antialiasing). The learned ``scale_cls`` becomes the ``cosine_scale``
    buffer (FastDiffSel's loss and ProtoNet use it, ``fewshot.select``); ``bias`` shifts every class's
    logit alike and is dropped."""
    import math
    full = checkpoint.get("model", checkpoint)
    state = {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}
    if "scale_cls" in full and hasattr(model, "cosine_scale"):
        state["cosine_scale"] = full["scale_cls"].reshape(()).float()
    pos = state["pos_embed"]
    grid, target = int(math.sqrt(pos.shape[1] - 1)), model.patch_embed.grid_size
    if (grid, grid) != tuple(target):
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, scale_factor=((target[0] + 0.1) / grid, (target[1] + 0.1) / grid),
                              mode="bicubic")
        assert tuple(patch.shape[-2:]) == tuple(target), patch.shape
        state["pos_embed"] = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)
    return state


class _ClipImage(nn.Module):
    """open_clip's image tower with the ``forward_features``-style API the rest uses."""

    def __init__(self, visual, dim):
        super().__init__()
        self.visual, self.num_features = visual, dim

    def forward_features(self, x):
        return self.visual(x)

    def forward(self, x):
        return self.visual(x)


def load_backbone(name: str, device="cpu") -> nn.Module:
    """A pretrained Fig 4.4 backbone or selector (``SELECTORS``): a local file ``data/backbones/<name>.pt``
    (a state dict of ``build_backbone(name)``) when present, otherwise the hub (timm / open_clip /
    torch.hub / the P>M>F checkpoint's URL); offline: a clear error."""
    check_choice("backbone", name, tuple(_ALL))
    local = paths.DATA / "backbones" / f"{name}.pt"
    if local.exists():
        model = build_backbone(name, pretrained=False)
        model.load_state_dict(torch.load(local, map_location="cpu"))
        return model.to(device).eval()
    b = _ALL[name]
    try:
        return build_backbone(name, pretrained=True).to(device).eval()
    except Exception as e:  # hub offline / no network: every library words it differently
        where = {"timm": f"timm/{b.model}.{b.tag} from the Hugging Face hub",
                 "open_clip": f"open_clip {b.model} '{b.tag}' weights",
                 "torch.hub": b.tag, "pmf": b.tag}[b.library]
        raise resource_unavailable(f"backbone {name!r} ({type(e).__name__})",
                                   f"run on a machine with hub access to fetch {where}, or save its "
                                   f"state dict to {local}") from None


# ------------------------------------------------------------------------------ tiny recipe
TINY = {"cnn": dict(build=cnn, epochs=8, lr=3e-3), "vit": dict(build=vit, epochs=15, lr=3e-3)}


def fit_tiny(kind: str, x: np.ndarray, y: np.ndarray, seed: int = 0, episodes: int = 300, holdout: int = 600,
             progress: bool = True):
    """Pre-train (cross-entropy) then meta-train (ProtoNet episodes) ``kind`` on base classes.

    x (n, 1, 8, 16), y (n,) global base-class ids. ``holdout`` images are kept out to report
    base-class top-1 accuracy after pre-training. Returns (model, info dict).
    """
    check_choice("extractor", kind, tuple(TINY))
    import time
    t0 = time.perf_counter()
    classes = np.unique(y)
    yb = np.searchsorted(classes, y)
    perm = np.random.default_rng([seed, 5]).permutation(len(y))
    train_i, val_i = perm[holdout:], perm[:holdout]
    recipe = TINY[kind]
    model = recipe["build"](len(classes), seed=seed)
    train(model, x[train_i], yb[train_i], epochs=recipe["epochs"], lr=recipe["lr"], seed=seed, progress=progress)
    top1 = base_accuracy(model, x[val_i], yb[val_i])
    meta_train(model, x[train_i], yb[train_i], episodes=episodes, seed=seed, progress=progress)
    params = sum(p.numel() for p in model.parameters())
    return model, dict(extractor=kind, params=params, base_classes=len(classes), base_top1=round(top1, 1),
                       epochs=recipe["epochs"], episodes=episodes, seconds=round(time.perf_counter() - t0, 1))
