"""The caption grammar and the samplers of (scene, caption) pairs.

Object phrase  P = "a [size] [colour] [texture] shape"   (a dropped shape reads "object")
single         "P [on background] [at the slot]"
pair           "P1 and P2 [on background]"
relation       "P1 to the left of P2" | "P1 above P2"    (positions consistent)
style          "a [colour] shape in the style of ARTIST" | "ARTIST style painting of a colour shape"
painting       "a painting of a colour shape"            (texture uniform: the anchor of style edits)
mascot         "a photo of a MASCOT"
emblem         "the emblem of NATION"
action         "a photo of a shape VERB"                 (VERB places a small object in one half)
action_size    "a photo of a shape VERB"                 (VERB sets the object's size; slot random)

Attributes a caption does not mention are drawn at random in the image, so the caption is always
true of its image. Every sampler takes a numpy Generator and is deterministic given it.
"""
from dataclasses import dataclass

import numpy as np

from .attributes import (BACKGROUNDS, COLOURS, LAND_BACKGROUNDS, LAND_SHAPES, SHAPES, SIZES, SLOTS, SPURIOUS,
                         TEXTURES, WATER_BACKGROUNDS, WATER_SHAPES)
from .entities import ACTION_SIZES, ACTIONS, ARTISTS, EMBLEMS, MASCOTS
from .render import Obj, Scene

FAMILIES = ("single", "pair", "relation", "style", "painting", "mascot", "emblem", "action", "action_size")
PRETRAIN_MIX = {"single": 0.45, "pair": 0.15, "relation": 0.08, "style": 0.12, "painting": 0.05,
                "mascot": 0.06, "emblem": 0.05, "action": 0.04}
HALF_SLOTS = {"top": ("top left", "top right"), "bottom": ("bottom left", "bottom right"),
              "left": ("top left", "bottom left"), "right": ("top right", "bottom right")}


@dataclass(frozen=True)
class Example:
    scene: Scene
    caption: str
    family: str


@dataclass(frozen=True)
class Palette:
    """Which attribute values a sampler draws from (chapters restrict the world this way)."""
    shapes: tuple = SHAPES
    colours: tuple = COLOURS
    textures: tuple = TEXTURES
    sizes: tuple = SIZES
    backgrounds: tuple = BACKGROUNDS


def _pick(rng, values):
    return values[rng.integers(len(values))]


def phrase(obj: Obj, mention=("size", "colour", "texture", "shape")) -> str:
    """"a large red striped circle"; attributes not in ``mention`` are left out."""
    words = [getattr(obj, a) for a in ("size", "colour", "texture") if a in mention]
    words.append(obj.shape if "shape" in mention else "object")
    return "a " + " ".join(words)


def _mention(rng, drop: float) -> tuple:
    return tuple(a for a in ("size", "colour", "texture", "shape") if rng.random() >= drop)


def random_object(rng, pal: Palette, slot: str, **fixed) -> Obj:
    kw = {"shape": _pick(rng, pal.shapes), "colour": _pick(rng, pal.colours), "texture": _pick(rng, pal.textures),
          "size": _pick(rng, pal.sizes), "slot": slot}
    kw.update(fixed)
    return Obj(**kw)


def background_for(rng, shape: str, pal: Palette, spurious: float) -> str:
    """The planted prior: water-family shapes on water backgrounds w.p. ``spurious`` (land likewise)."""
    family = WATER_BACKGROUNDS if shape in WATER_SHAPES else LAND_BACKGROUNDS if shape in LAND_SHAPES else ()
    family = tuple(b for b in family if b in pal.backgrounds)
    if family and rng.random() < spurious:
        return _pick(rng, family)
    return _pick(rng, pal.backgrounds)


def _distractors(rng, pal: Palette, free_slots, p: float) -> tuple:
    n = int(rng.integers(1, 3)) if rng.random() < p else 0
    slots = rng.permutation(list(free_slots))[:n]
    return tuple(random_object(rng, pal, str(s), size="small") for s in slots)


def _where(bg: str, slot: str | None, rng, bg_p: float, slot_p: float) -> str:
    out = f" on {bg}" if bg != "dark" and rng.random() < bg_p else ""
    if slot is not None and rng.random() < slot_p:
        out += f" at the {slot}"
    return out


def sample(rng: np.random.Generator, family: str, pal: Palette = Palette(), drop: float = 0.2,
           spurious: float = SPURIOUS, distractor_p: float = 0.0, bg_p: float = 0.8, slot_p: float = 0.3) -> Example:
    """One (scene, caption) of a family; see the module docstring for the grammar."""
    slots = [str(s) for s in rng.permutation(SLOTS)]
    if family == "single":
        obj = random_object(rng, pal, slots[0])
        bg = background_for(rng, obj.shape, pal, spurious)
        scene = Scene((obj,), bg, _distractors(rng, pal, slots[1:], distractor_p))
        return Example(scene, phrase(obj, _mention(rng, drop)) + _where(bg, obj.slot, rng, bg_p, slot_p), family)
    if family in ("pair", "relation"):
        if family == "relation":
            rel = _pick(rng, ("to the left of", "above"))
            row = rng.integers(2)
            s1, s2 = (SLOTS[2 * row], SLOTS[2 * row + 1]) if rel == "to the left of" else (SLOTS[row], SLOTS[row + 2])
        else:
            rel, (s1, s2) = "and", slots[:2]
        a = random_object(rng, pal, s1)
        b = random_object(rng, pal, s2, shape=_pick(rng, [s for s in pal.shapes if s != a.shape]),
                          colour=_pick(rng, [c for c in pal.colours if c != a.colour]))
        bg = _pick(rng, pal.backgrounds)
        caption = f"{phrase(a, _mention(rng, drop))} {rel} {phrase(b, _mention(rng, drop))}{_where(bg, None, rng, bg_p, 0)}"
        return Example(Scene((a, b), bg), caption, family)
    bg = "dark" if "dark" in pal.backgrounds else _pick(rng, pal.backgrounds)
    if family == "style":
        artist = _pick(rng, list(ARTISTS))
        obj = random_object(rng, pal, slots[0], texture=ARTISTS[artist])
        caption = (f"a {obj.colour} {obj.shape} in the style of {artist}" if rng.random() < 0.5
                   else f"{artist} style painting of a {obj.colour} {obj.shape}")
        return Example(Scene((obj,), bg), caption, family)
    if family == "painting":
        obj = random_object(rng, pal, slots[0], texture=_pick(rng, TEXTURES))
        return Example(Scene((obj,), bg), f"a painting of a {obj.colour} {obj.shape}", family)
    if family == "mascot":
        name = _pick(rng, list(MASCOTS))
        shape, colour, texture = MASCOTS[name]
        obj = Obj(shape, colour, texture, "large", slots[0])
        return Example(Scene((obj,), bg), f"a photo of a {name}", family)
    if family == "emblem":
        nation = _pick(rng, list(EMBLEMS))
        shape, colour = EMBLEMS[nation]
        obj = random_object(rng, pal, slots[0], shape=shape, colour=colour, texture="plain", size="large")
        return Example(Scene((obj,), bg), f"the emblem of {nation}", family)
    if family == "action":
        verb = _pick(rng, list(ACTIONS))
        obj = random_object(rng, pal, _pick(rng, HALF_SLOTS[ACTIONS[verb]]), size="small")
        return Example(Scene((obj,), bg), f"a photo of a {obj.shape} {verb}", family)
    if family == "action_size":
        verb = _pick(rng, list(ACTION_SIZES))
        obj = random_object(rng, pal, slots[0], size=ACTION_SIZES[verb])
        return Example(Scene((obj,), bg), f"a photo of a {obj.shape} {verb}", family)
    raise ValueError(f"unknown caption family {family!r}; choose from {FAMILIES}")


def sample_mix(rng: np.random.Generator, n: int, mix: dict = PRETRAIN_MIX, **kw) -> list[Example]:
    """n examples whose families are drawn with the weights of ``mix``."""
    names = list(mix)
    p = np.array([mix[k] for k in names], float)
    picks = rng.choice(len(names), size=n, p=p / p.sum())
    return [sample(rng, names[i], **kw) for i in picks]


def words() -> list[str]:
    """Every word the grammar can produce (the tokenizer's vocabulary, in a fixed order)."""
    vocab = ["a", "an", "the", "object", "on", "at", "and", "to", "left", "of", "above", "in", "style",
             "painting", "photo", "emblem", "top", "bottom", "right"]
    vocab += list(SIZES) + list(COLOURS) + list(TEXTURES) + list(SHAPES) + list(BACKGROUNDS)
    vocab += [w for name in ARTISTS for w in name.split()] + list(MASCOTS) + list(EMBLEMS)
    vocab += list(ACTIONS)
    return list(dict.fromkeys(vocab))


# ---------------------------------------------------------------- probe captions of causal tracing (Chapter 5)


@dataclass(frozen=True)
class Probe:
    """A caption, the span whose tokens tracing corrupts, and what a faithful image shows."""
    caption: str
    subject: str
    wanted: dict  # oracle head (or "slot") -> accepted value(s)
    attribute: str


PROBE_ATTRIBUTES = ("objects", "style", "color", "action")


def trace_probes(attribute: str, n: int, seed: int = 0, action: str = "place") -> list:
    """n distinct probe captions of one attribute (the tiny Table 11.2), in the grammar's own templates:

    objects "a COLOUR SHAPE" (subject: the shape), color the same (subject: the colour), style
    "a COLOUR SHAPE in the style of ARTIST" (subject: the two-token artist, read as its texture),
    action "a photo of a SHAPE VERB" (subject: the verb, read as the half the object sits in, or with
    ``action="size"`` as the object's size: the ``action_size`` family). The captions do not depend on
    ``action``, only what a faithful image shows.
    """
    if attribute not in PROBE_ATTRIBUTES:
        raise ValueError(f"unknown probe attribute {attribute!r}; choose from {PROBE_ATTRIBUTES}")
    if action not in ("place", "size"):
        raise ValueError(f"action={action!r}; choose 'place' (the action family) or 'size' (action_size)")
    rng = np.random.default_rng([seed, PROBE_ATTRIBUTES.index(attribute)])
    out, seen = [], set()
    while len(out) < n:
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        if attribute == "objects":
            probe = Probe(f"a {colour} {shape}", shape, {"shape": shape}, attribute)
        elif attribute == "color":
            probe = Probe(f"a {colour} {shape}", colour, {"colour": colour}, attribute)
        elif attribute == "style":
            artist = _pick(rng, list(ARTISTS))
            probe = Probe(f"a {colour} {shape} in the style of {artist}", artist, {"texture": ARTISTS[artist]}, attribute)
        else:
            verb = _pick(rng, list(ACTIONS))
            wanted = {"slot": HALF_SLOTS[ACTIONS[verb]]} if action == "place" else {"size": ACTION_SIZES[verb]}
            probe = Probe(f"a photo of a {shape} {verb}", verb, wanted, attribute)
        if probe.caption not in seen:
            seen.add(probe.caption)
            out.append(probe)
    return out


# ---------------------------------------------------------------- compositional prompts (Chapter 9, Part B)

COMPOSITION_CATEGORIES = {"colour": COLOURS, "texture": TEXTURES, "size": SIZES}


def composition_combos(category: str, split: str, seed: int = 0, test_share: float = 0.3) -> list:
    """The (value, shape) combinations of a category's train or test split: all of them, shuffled
    by ``seed`` and cut ``test_share`` / rest, so test prompts bind attributes to shapes in ways
    the train prompts never show (T2I-CompBench's held-out combinations)."""
    if category not in COMPOSITION_CATEGORIES:
        raise ValueError(f"category {category!r}; choose from {sorted(COMPOSITION_CATEGORIES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}; choose 'train' or 'test'")
    combos = [(v, s) for v in COMPOSITION_CATEGORIES[category] for s in SHAPES]
    order = np.random.default_rng(seed).permutation(len(combos))
    cut = int(round(test_share * len(combos)))
    picked = order[:cut] if split == "test" else order[cut:]
    return [combos[i] for i in sorted(picked)]


def composition_prompts(category: str, split: str, n: int, seed: int, pal: Palette = Palette(),
                        combo_seed: int = 0) -> list:
    """n (caption, scene, phrases) for two-object prompts "a V1 S1 and a V2 S2" of one category:
    both (value, shape) combinations from the split, distinct shapes and values, objects in two
    random slots, unmentioned attributes random. phrases: what a faithful image shows, per object,
    for ``zoo.oracle.phrase_score``."""
    combos = composition_combos(category, split, combo_seed)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        (v1, s1), (v2, s2) = (combos[i] for i in rng.choice(len(combos), 2, replace=False))
        if s1 == s2 or v1 == v2:
            continue
        slots = [str(s) for s in rng.permutation(SLOTS)[:2]]
        a, b = (random_object(rng, pal, slot, shape=s, **{category: v}) for slot, s, v in zip(slots, (s1, s2), (v1, v2)))
        bg = _pick(rng, pal.backgrounds)
        out.append((f"a {v1} {s1} and a {v2} {s2}", Scene((a, b), bg),
                    [{"shape": s1, category: v1}, {"shape": s2, category: v2}]))
    return out


def composition_scenes(phrases: list, category: str, n: int, seed: int, pal: Palette = Palette()) -> list:
    """n scenes that one compositional prompt is true of: its two objects (shape and ``category``
    value from ``phrases``) in two random slots, every unmentioned attribute random."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        slots = [str(s) for s in rng.permutation(SLOTS)[:2]]
        objs = tuple(random_object(rng, pal, slot, shape=p["shape"], **{category: p[category]})
                     for slot, p in zip(slots, phrases))
        out.append(Scene(objs, _pick(rng, pal.backgrounds)))
    return out
