"""The tiny vision transformers of Chapter 7 (RepDecompose), trained on ToyNet (ch07 spec 5.2).

    vit      DeiT-toy: timm ViT (32 px, patch 4, 6 blocks x 64 wide, 4 heads; 65 tokens), supervised
    vit_ssl  SSL-toy: the same ViT with a convolutional stem (16 tokens), trained with SimCLR (NT-Xent) on groups of
             near-duplicate scenes, then a linear ToyNet head on frozen features
    swin     Swin-toy: timm Swin (patch 2, window 4, stages 16 -> 32 -> 64 wide, grids 16 -> 8 -> 4)

Every model reads [0, 1] images (N, 3, 32, 32) as they come from ``toyworld.toynet`` (no
normalisation) and outputs ToyNet logits (N, 36) over ``toyworld.TOYNET_CLASSES``; its features
z (N, 64) are ``model.forward_head(model.forward_features(x), pre_logits=True)``. One module
trains three zoo names, so ``train`` and ``load`` take the name.
"""
import json
from dataclasses import replace

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from .. import provenance
from .. import toyworld as tw
from ..errors import BadParameter
from ..toyworld.attributes import BACKGROUNDS
from ..toyworld.datasets import JITTER, TOYNET_PALETTE, toynet_draw
from . import loop, store

NAMES = ("vit", "vit_ssl", "swin")
NAME = None  # no single name: the CLI and models.load pass one of NAMES to train(name) / load(name)
N_CLASSES = len(tw.TOYNET_CLASSES)
VIT = ("vit_small_patch16_224", dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4,
                                     num_classes=N_CLASSES, drop_path_rate=0.1))
SWIN = ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2),
                                             num_heads=(1, 2, 4), num_classes=N_CLASSES, drop_path_rate=0.1))
# SSL-toy: DeiT-toy's blocks on a convolutional stem (ConvStem below): 16 tokens of 8 x 8 px instead of 64 of 4 x 4
SSL_VIT = (VIT[0], {**VIT[1], "patch_size": 8, "embed_layer": "conv_stem"})
ARCH = {"vit": VIT, "vit_ssl": SSL_VIT, "swin": SWIN}
# shipped settings. Fresh renders every step (infinite data, +-2 px jitter built in) make crop
# augmentation, label smoothing and weight decay unnecessary; equal-compute pilots showed they only
# slow fitting, and a batch of 32 beat 64 at equal compute.
SETTINGS = {"vit": dict(steps=10_000, batch_size=32, lr=1e-3),
            "vit_ssl": dict(steps=2800, batch_size=42, lr=1e-3),
            "swin": dict(steps=6000, batch_size=32, lr=2e-3)}
GATES = {"vit": ("heldout_accuracy", 0.85), "swin": ("heldout_accuracy", 0.85),
         "vit_ssl": ("linear_probe_accuracy", 0.7)}
HELDOUT_SEED = 70_001  # fresh seed: never a training step's stream (those are [seed, step])
PROBE_SEED = 70_002  # the linear heads' (SSL head, background probe) training images
TAU = 0.2
VIEW_NOISE = 0.2  # SSL views: Gaussian pixel noise with std drawn from U(0, VIEW_NOISE) per image


class ConvStem(PatchEmbed):
    """timm's patch embedding with its stride-p projection replaced by log2(p) stride-2 3 x 3 convolutions
    (BatchNorm, ReLU; ``stem_width`` channels, doubling) and a 1 x 1 convolution to the embedding width
    (Xiao et al. 2021, "Early convolutions help transformers see better"). (N, 3, H, W) -> (N, H W / p^2, d)."""

    def __init__(self, *args, stem_width: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        layers, c_in, c, p = [], 3, stem_width, self.patch_size[0]
        while p > 1:
            layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in, c, p = c, 2 * c, p // 2
        self.proj = nn.Sequential(*layers, nn.Conv2d(c_in, self.proj.out_channels, 1))


EMBED_LAYERS = {"conv_stem": ConvStem}  # what config.json's "embed_layer" names


def _timm_kwargs(kw: dict) -> dict:
    """config kwargs -> timm.create_model kwargs (an embedding layer is stored by name)."""
    return {**kw, "embed_layer": EMBED_LAYERS[kw["embed_layer"]]} if "embed_layer" in kw else kw


def _check(name: str) -> None:
    if name not in NAMES:
        raise BadParameter(f"unknown RepDecompose model {name!r}; choose from {NAMES}")


def create(name: str, num_classes: int = N_CLASSES) -> nn.Module:
    """A fresh (random) timm model of zoo model ``name``; pretrained weights are never fetched."""
    _check(name)
    arch, kw = ARCH[name]
    return timm.create_model(arch, pretrained=False, **_timm_kwargs({**kw, "num_classes": num_classes}))


def scaled(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: what the models see while training (zero-centred inputs fit faster)."""
    return images * 2 - 1


@torch.no_grad()
def fold_input_scaling(model: nn.Module) -> nn.Module:
    """Make a model trained on ``scaled`` images read [0, 1] images, exactly.

    The patch embedding is a stride = kernel convolution without padding, so
    conv(W, 2x - 1) + b = conv(2W, x) + (b - sum W) for every patch.
    """
    proj = model.patch_embed.proj
    proj.bias -= proj.weight.sum((1, 2, 3))
    proj.weight *= 2
    return model


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-logit features z (N, 64) of images (N, 3, 32, 32): the CLS token (ViT) or mean token (Swin)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _seed_global(gen: torch.Generator) -> None:
    """Stochastic depth draws from torch's global RNG; seed it from the step's generator so resumes repeat."""
    torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """SimCLR loss of two views' projections (N, d): each view must pick its partner among 2N - 1."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


@torch.inference_mode()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Features z (N, 64) in eval mode."""
    model.eval()
    return torch.cat([features(model, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted ToyNet class (N,) in eval mode."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def fit_linear(z: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-4, iters: int = 300) -> nn.Linear:
    """Multinomial logistic regression on features z (N, d) -> a Linear(d, n_classes) on the raw features.

    Fitted by L-BFGS on standardised features (well conditioned), then the standardisation is
    folded into the weights so the head applies to z as the model produces it.
    """
    mu, sd = z.mean(0), z.std(0) + 1e-6
    x = (z - mu) / sd
    w = torch.zeros(n_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(z.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(w / sd)
        head.bias.copy_(b - (w / sd) @ mu)
    return head


def probe(z_train, y_train, z_test, y_test, n_classes: int) -> float:
    """Held-out accuracy of a linear probe fitted on (z_train, y_train)."""
    head = fit_linear(z_train, y_train, n_classes)
    with torch.no_grad():
        return float((head(z_test).argmax(1) == y_test).float().mean())


def background_labels(scenes) -> torch.Tensor:
    return torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])


def evaluate(model: nn.Module, probe_set, heldout) -> dict:
    """Held-out ToyNet accuracy (and its shape / colour parts) and the background linear probe of z."""
    x, y, scenes = heldout
    pred = predict(model, x)
    n_col = len(tw.COLOURS[:6])
    px, _, pscenes = probe_set
    bg = probe(embed(model, px), background_labels(pscenes), embed(model, x), background_labels(scenes),
               len(BACKGROUNDS))
    return {"heldout_accuracy": float((pred == y).float().mean()),
            "heldout_shape_accuracy": float((pred // n_col == y // n_col).float().mean()),
            "heldout_colour_accuracy": float((pred % n_col == y % n_col).float().mean()),
            "background_probe_accuracy": bg}


def _supervised(model, batch_size):
    def step(rng, gen, i):
        model.train()
        _seed_global(gen)
        images, labels, _ = toynet_draw(rng, batch_size)
        loss = F.cross_entropy(model(scaled(images)), labels)
        loss.backward()
        return loss.detach()
    return step


# quadrant mirrors: a view may move every object to the mirrored quadrant (shapes stay upright)
MIRROR = ({"top left": "top right", "top right": "top left",
           "bottom left": "bottom right", "bottom right": "bottom left"},
          {"top left": "bottom left", "bottom left": "top left",
           "top right": "bottom right", "bottom right": "top right"})
SIBLINGS = 6  # a group holds every ToyNet shape (or colour) once, or 6 of the 7 backgrounds


# what the siblings of group g differ in (g modulo 7): ToyNet's two factors, and the background that Chapter 7
# retrieves by text (H6); a contrastive model never has to encode what no negative differs in
GROUP_ATTRIBUTES = ("shape", "colour", "shape", "background", "shape", "shape", "shape")


def sibling_groups(rng: np.random.Generator, n: int, k: int = SIBLINGS) -> list:
    """n (Scene, render seed) in n / k groups of siblings: one ToyNet scene and render seed per group, and
    within group g only GROUP_ATTRIBUTES[g % 7] differs (the main object's shape or colour, or the
    background). Siblings are each other's hard negatives: with everything else shared, down to the pixel
    noise, only that attribute tells them apart (the toy analogue of a curated set of near-duplicates)."""
    values = {"shape": TOYNET_PALETTE.shapes, "colour": TOYNET_PALETTE.colours, "background": TOYNET_PALETTE.backgrounds}
    out = []
    for g in range(n // k):
        base = tw.sample(rng, "single", pal=TOYNET_PALETTE, distractor_p=0.5, spurious=0.7).scene
        seed = int(rng.integers(2 ** 31))
        attribute = GROUP_ATTRIBUTES[g % len(GROUP_ATTRIBUTES)]
        for value in rng.permutation(values[attribute])[:k]:
            if attribute == "background":
                out.append((replace(base, background=str(value)), seed))
            else:
                out.append((replace(base, objects=(replace(base.objects[0], **{attribute: str(value)}),)), seed))
    return out


def mirrored_render(items: list, rng: np.random.Generator) -> torch.Tensor:
    """Each (scene, seed) rendered with its quadrants mirrored left-right and/or top-bottom at random,
    images (N, 3, 32, 32): two such views differ in position by whole quadrants, which crops of a
    32 px image cannot do, so the features must place shape independently of position."""
    images = []
    for scene, seed in items:
        for swap in (m for m, flip in zip(MIRROR, rng.integers(2, size=2)) if flip):
            move = lambda o, swap=swap: replace(o, slot=swap[o.slot])  # noqa: E731
            scene = replace(scene, objects=tuple(map(move, scene.objects)),
                            distractors=tuple(map(move, scene.distractors)))
        images.append(tw.render(scene, seed, jitter=JITTER)[0].transpose(2, 0, 1))
    return torch.from_numpy(np.stack(images))


def noisy(images: torch.Tensor, gen: torch.Generator, sigma: float = VIEW_NOISE) -> torch.Tensor:
    """(N, 3, H, W) images plus Gaussian noise whose std is drawn from U(0, sigma) per image, clamped to [0, 1]."""
    std = torch.rand(len(images), 1, 1, 1, generator=gen) * sigma
    return (images + torch.randn(images.shape, generator=gen) * std).clamp(0, 1)


def _simclr(model, projector, batch_size):
    def step(rng, gen, i):
        model.train()
        _seed_global(gen)
        items = sibling_groups(rng, batch_size)
        # a view = mirrored quadrants + pixel noise, nothing else: crops, zooms and shifts slowed learning shape
        # 2-3 fold (supervised too), and noise stops the shared render noise from identifying a group
        v1, v2 = (noisy(mirrored_render(items, rng), gen) for _ in range(2))
        loss = nt_xent(projector(features(model, v1)), projector(features(model, v2)))
        loss.backward()
        return loss.detach()
    return step


def train(name: str, steps: int | None = None, batch_size: int | None = None, seed: int = 0, lr: float | None = None,
          ship: bool = True, resume: bool = True, n_probe: int = 12_000, n_heldout: int = 2000) -> dict:
    """Train zoo model ``name`` (one of NAMES); defaults come from SETTINGS[name]."""
    _check(name)
    cfg = SETTINGS[name]
    steps, batch_size, lr = (cfg[k] if v is None else v for k, v in
                             (("steps", steps), ("batch_size", batch_size), ("lr", lr)))
    torch.manual_seed(seed)
    ssl = name == "vit_ssl"
    model = create(name, num_classes=0 if ssl else N_CLASSES)
    modules = {"model": model}
    if ssl:
        modules["projector"] = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        step = _simclr(model, modules["projector"], batch_size)
    else:
        step = _supervised(model, batch_size)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    run = loop.train(name, modules, opt, step, steps, seed, sched=sched, resume=resume)

    if not ssl:  # SSL-toy trained on [0, 1] images (its stem's BatchNorm absorbs the scale)
        fold_input_scaling(model)  # from here on the model reads [0, 1] images
    probe_set, heldout = tw.toynet(n_probe, PROBE_SEED), tw.toynet(n_heldout, HELDOUT_SEED, "val")
    if ssl:  # DINO-style linear evaluation: a ToyNet head on frozen features becomes the model's head
        head = fit_linear(embed(model, probe_set[0]), probe_set[1], N_CLASSES)
        backbone, model = model, create(name)
        model.load_state_dict({**backbone.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}})
    metrics = evaluate(model, probe_set, heldout)
    if ssl:
        metrics["linear_probe_accuracy"] = metrics["heldout_accuracy"]
    key, threshold = GATES[name]
    gates = {key: store.gate(metrics[key], threshold)}
    extra = {"batch_size": batch_size, "lr": lr, "params": sum(p.numel() for p in model.parameters()),
             "final_loss": float(np.mean(run["losses"][-50:])), "metrics": {k: round(v, 4) for k, v in metrics.items()},
             "heldout": f"toynet({n_heldout}, seed={HELDOUT_SEED}, split='val')"}
    if ship:
        d = store.zoo_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        store.save_weights(d / "model.safetensors", model.state_dict(), half=True)
        provenance.write_json(d / "config.json", config(name))
        loop.ship(name, run, seed=seed, steps=steps, gates=gates, extra=extra)
    return {"gates": gates, **extra, **run}


def config(name: str) -> dict:
    """What config.json records: enough to rebuild the module with timm.create_model."""
    arch, kw = ARCH[name]
    out = {"architecture": arch, "timm_kwargs": {**kw, "pretrained": False}, "classes": tw.TOYNET_CLASSES,
           "input": "[0, 1] RGB (N, 3, 32, 32), no normalisation"}
    if name == "vit_ssl":
        out["training"] = (f"SimCLR NT-Xent (tau={TAU}) with num_classes=0 on groups of {SIBLINGS} scenes that differ "
                           f"in one attribute only, group g in {GROUP_ATTRIBUTES}[g % {len(GROUP_ATTRIBUTES)}]; "
                           f"views = mirrored quadrants + pixel noise (std up to {VIEW_NOISE}); then head = linear "
                           f"probe on frozen features (toynet(12000, seed={PROBE_SEED}))")
    return out


def load(name: str) -> nn.Module:
    """The timm model of zoo model ``name`` in eval mode, after verifying its files against card.json."""
    _check(name)
    store.verify(name)
    d = store.zoo_dir(name)
    cfg = json.loads((d / "config.json").read_text())
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["timm_kwargs"].items()}
    model = timm.create_model(cfg["architecture"], **_timm_kwargs(kw))
    model.load_state_dict(store.load_weights(d / "model.safetensors"))
    return model.eval()


def measure(name: str, model: nn.Module, n: int = 2000, seed: int = HELDOUT_SEED) -> dict:
    """The gate metric under the card's name on n fresh ToyNet images: held-out accuracy of the shipped
    model (for vit_ssl, whose shipped head is the linear probe, that is the linear-probe accuracy)."""
    x, y, _ = tw.toynet(n, seed, "val")
    return {GATES[name][0]: float((predict(model, x) == y).float().mean())}
