"""Labelled image sets of Chapter 7 (RepDecompose): ToyNet (the ImageNet analogue) and ToyBirds (Waterbirds).

ToyNet: one main object (first 6 shapes x first 6 colours = 36 classes, 3 textures, 2 sizes, random
slot with +-2 px jitter) on any of the 7 backgrounds under the planted prior (spurious = 0.7), plus
0-2 tiny distractors w.p. 0.5. ToyBirds: label waterbird <=> shape in WATER_SHAPES, a small object
with no distractors on a water- or land-family background, a chosen fraction of images "aligned"
(waterbirds on water). Both are deterministic given their seed.
"""
import numpy as np
import torch

from .attributes import COLOURS, LAND_BACKGROUNDS, LAND_SHAPES, SHAPES, SLOTS, TEXTURES, WATER_BACKGROUNDS, WATER_SHAPES
from .captions import Palette, sample
from .render import Obj, Scene, _dilate, background_image, render, render_batch

TOYNET_PALETTE = Palette(shapes=SHAPES[:6], colours=COLOURS[:6], textures=TEXTURES[:3])
# class index = shape index * 6 + colour index
TOYNET_CLASSES = [f"{c} {s}" for s in TOYNET_PALETTE.shapes for c in TOYNET_PALETTE.colours]
SPLITS = ("train", "val", "test")
JITTER = 2.0  # +-2 px around the quadrant centre (spec 5.1)


def toynet_label(obj: Obj) -> int:
    pal = TOYNET_PALETTE
    return pal.shapes.index(obj.shape) * len(pal.colours) + pal.colours.index(obj.colour)


def toynet_draw(rng: np.random.Generator, n: int, masks: bool = False) -> tuple:
    """n ToyNet examples drawn from ``rng`` (the training loops' per-step stream); see ``toynet``."""
    scenes = [sample(rng, "single", pal=TOYNET_PALETTE, distractor_p=0.5, spurious=0.7).scene for _ in range(n)]
    images, object_masks = render_batch(scenes, seed=int(rng.integers(2 ** 31)), jitter=JITTER)
    labels = torch.tensor([toynet_label(s.objects[0]) for s in scenes], dtype=torch.long)
    out = (torch.from_numpy(images), labels, scenes)
    return out + (torch.from_numpy(np.stack([m[0] for m in object_masks])),) if masks else out


def toynet(n: int, seed: int, split: str = "train", masks: bool = False) -> tuple:
    """ToyNet: images (n, 3, 32, 32) float32 in [0, 1], labels (n,) long over TOYNET_CLASSES, the Scenes,
    and with masks=True the main object's exact mask (n, 32, 32) bool (distractors are not in it).

    Each split of a seed is its own stream, so train and val of one seed never share images.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return toynet_draw(np.random.default_rng([seed, SPLITS.index(split)]), n, masks)


def toybirds(n: int, seed: int, aligned: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToyBirds: images (n, 3, 32, 32), labels (n,) (1 = waterbird), groups (n,) = 2 * label + water background.

    Exactly round(n * aligned) images are aligned (group 0: landbird on land, 3: waterbird on water),
    split evenly, the rest evenly between groups 1 and 2; aligned = 0.5 gives the balanced ``uncorr`` set.
    """
    rng = np.random.default_rng([seed, 7])
    n_aligned = round(n * aligned)
    counts = [n_aligned - n_aligned // 2, (n - n_aligned) // 2, n - n_aligned - (n - n_aligned) // 2, n_aligned // 2]
    groups = rng.permutation(np.repeat(np.arange(4), counts))
    scenes = []
    for g in groups:
        label, water = divmod(int(g), 2)
        obj = Obj(str(rng.choice(WATER_SHAPES if label else LAND_SHAPES)), str(rng.choice(TOYNET_PALETTE.colours)),
                  str(rng.choice(TOYNET_PALETTE.textures)), "small", str(rng.choice(SLOTS)))
        scenes.append(Scene((obj,), str(rng.choice(WATER_BACKGROUNDS if water else LAND_BACKGROUNDS))))
    images, _ = render_batch(scenes, seed=int(rng.integers(2 ** 31)), jitter=JITTER)
    groups = torch.from_numpy(groups).long()
    return torch.from_numpy(images), groups // 2, groups


def toybirds_swapped(n: int, seed: int, noise: float = 0.03) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToyBirds counterfactual pairs: each bird drawn once, on a water and on a land background.

    Returns on_water (n, 3, 32, 32), on_land (n, 3, 32, 32) and labels (n,) (1 = waterbird), half of each.
    The bird's pixels (its shape and outline) are the same in both images, and so is the pixel noise; only
    the background differs, so any change in a model's output between the two is the background's doing.
    """
    rng = np.random.default_rng([seed, 11])
    labels = rng.permutation(np.arange(n) % 2)
    on_water, on_land = [], []
    for label in labels:
        obj = Obj(str(rng.choice(WATER_SHAPES if label else LAND_SHAPES)), str(rng.choice(TOYNET_PALETTE.colours)),
                  str(rng.choice(TOYNET_PALETTE.textures)), "small", str(rng.choice(SLOTS)))
        water, land = str(rng.choice(WATER_BACKGROUNDS)), str(rng.choice(LAND_BACKGROUNDS))
        bird, (inside,) = render(Scene((obj,), water), rng, jitter=JITTER, noise=0.0)
        drawn = _dilate(inside)[..., None]  # the shape and its black outline
        grain = rng.normal(0, noise, bird.shape).astype(np.float32)
        for background, out in ((water, on_water), (land, on_land)):
            image = np.where(drawn, bird, background_image(background, rng)) if out is on_land else bird
            out.append(np.clip(image + grain, 0, 1).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(on_water)), torch.from_numpy(np.stack(on_land)), torch.from_numpy(labels).long()
