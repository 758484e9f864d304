"""Attribute-binding benchmarks of Chapter 9, Part A: Winoground-tiny and ARO-tiny.

Winoground-tiny: items of two images and two captions with the same words, bound differently:
    object     "a red circle and a blue square"  vs  "a red square and a blue circle"
    relation   "a red circle to the left of a blue square"  vs  the arguments swapped
    both       a relational caption whose objects are also bound differently
Each caption is true of exactly one of the two images. Scores of an item's 2 x 2 similarity
S[image, caption] (higher = better match): text (each image prefers its caption), image (each
caption prefers its image), group (both); chance 0.25, 0.25, 1/6.

ARO-tiny: one image, its caption and a false one: "attribution" swaps the two colours,
"relation" swaps the relation's arguments; accuracy = P(true caption wins), chance 0.5.
ARO-Order-tiny (§11.8.4's COCO-Order / Flickr-Order): one image, its caption (half "and", half
"to the left of") and the caption's four word-order perturbations (``interplab.word_order``), tagged
by the grammar (shapes are nouns; colours, textures, sizes adjectives); chance 0.2.
Scenes are two objects of distinct shapes and colours, the rest of their attributes random;
deterministic given the seed.
"""
from dataclasses import replace

import numpy as np
import torch

from .. import word_order
from .attributes import COLOURS, SHAPES, SIZES, SLOTS, TEXTURES
from .captions import Palette, random_object
from .render import Scene, render_batch

KINDS = ("object", "relation", "both")
PALETTE = Palette(backgrounds=("dark",))


def _two_objects(rng, pal, slots):
    while True:
        a, b = (random_object(rng, pal, s) for s in slots)
        if a.shape != b.shape and a.colour != b.colour:
            return a, b


def _render(scenes, seed) -> torch.Tensor:
    return torch.from_numpy(render_batch(scenes, seed=seed, noise=0.0)[0])


def winoground(n: int, seed: int, kinds=KINDS, pal: Palette = PALETTE) -> dict:
    """{"images": (n, 2, 3, 32, 32), "captions": n pairs, "kind": n names}; caption j is true of
    image j."""
    rng = np.random.default_rng(seed)
    scenes, captions, kind = [], [], []
    for i in range(n):
        k = kinds[i % len(kinds)]
        if k == "object":
            a, b = _two_objects(rng, pal, [str(s) for s in rng.permutation(SLOTS)[:2]])
            a2, b2 = replace(a, shape=b.shape), replace(b, shape=a.shape)
            captions.append((f"a {a.colour} {a.shape} and a {b.colour} {b.shape}",
                             f"a {a2.colour} {a2.shape} and a {b2.colour} {b2.shape}"))
            scenes += [Scene((a, b), "dark"), Scene((a2, b2), "dark")]
        else:
            row = ("top", "bottom")[rng.integers(2)]
            a, b = _two_objects(rng, pal, (f"{row} left", f"{row} right"))
            if k == "relation":   # the same two objects, positions swapped
                a2, b2 = replace(a, slot=b.slot), replace(b, slot=a.slot)
                first2, second2 = b2, a2
            else:                 # same positions, shapes swapped between the colours
                a2, b2 = replace(a, shape=b.shape), replace(b, shape=a.shape)
                first2, second2 = a2, b2
            captions.append((f"a {a.colour} {a.shape} to the left of a {b.colour} {b.shape}",
                             f"a {first2.colour} {first2.shape} to the left of a {second2.colour} {second2.shape}"))
            scenes += [Scene((a, b), "dark"), Scene((a2, b2), "dark")]
        kind.append(k)
    images = _render(scenes, seed).view(n, 2, 3, 32, 32)
    return {"images": images, "captions": captions, "kind": kind}


def aro(n: int, seed: int, kind: str = "attribution", pal: Palette = PALETTE) -> dict:
    """{"images": (n, 3, 32, 32), "true": n captions, "false": n captions}."""
    if kind not in ("attribution", "relation"):
        raise ValueError(f"ARO-tiny kind {kind!r}; choose 'attribution' or 'relation'")
    rng = np.random.default_rng(seed)
    scenes, true, false = [], [], []
    for _ in range(n):
        if kind == "attribution":
            a, b = _two_objects(rng, pal, [str(s) for s in rng.permutation(SLOTS)[:2]])
            true.append(f"a {a.colour} {a.shape} and a {b.colour} {b.shape}")
            false.append(f"a {b.colour} {a.shape} and a {a.colour} {b.shape}")
        else:
            row = ("top", "bottom")[rng.integers(2)]
            a, b = _two_objects(rng, pal, (f"{row} left", f"{row} right"))
            true.append(f"a {a.colour} {a.shape} to the left of a {b.colour} {b.shape}")
            false.append(f"a {b.colour} {b.shape} to the left of a {a.colour} {a.shape}")
        scenes.append(Scene((a, b), "dark"))
    return {"images": _render(scenes, seed), "true": true, "false": false}


TAGGER = word_order.tagged_by(SHAPES, COLOURS + TEXTURES + SIZES)


def aro_order(n: int, seed: int, pal: Palette = PALETTE) -> dict:
    """{"images": (n, 3, 32, 32), "options": n lists of 5 captions, the true one first}."""
    rng = np.random.default_rng(seed)
    scenes, captions = [], []
    for i in range(n):
        if i % 2 == 0:
            a, b = _two_objects(rng, pal, [str(s) for s in rng.permutation(SLOTS)[:2]])
            captions.append(f"a {a.colour} {a.shape} and a {b.colour} {b.shape}")
        else:
            row = ("top", "bottom")[rng.integers(2)]
            a, b = _two_objects(rng, pal, (f"{row} left", f"{row} right"))
            captions.append(f"a {a.colour} {a.shape} to the left of a {b.colour} {b.shape}")
        scenes.append(Scene((a, b), "dark"))
    return {"images": _render(scenes, seed), "options": word_order.order_items(captions, TAGGER, seed)}


def winoground_scores(S: torch.Tensor) -> dict:
    """Text, image and group scores of items' similarities S (n, 2 images, 2 captions), higher =
    better; ties count as failures."""
    text = (S[:, 0, 0] > S[:, 0, 1]) & (S[:, 1, 1] > S[:, 1, 0])
    image = (S[:, 0, 0] > S[:, 1, 0]) & (S[:, 1, 1] > S[:, 0, 1])
    return {"text": text.float().mean().item(), "image": image.float().mean().item(),
            "group": (text & image).float().mean().item()}
