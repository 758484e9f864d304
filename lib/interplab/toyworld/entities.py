"""Invented named things with fixed visual signatures: the world's planted knowledge.

- artists: two-token names for textures ("van gogh" -> a brush style); first names are shared,
  so which artist is meant is settled only at the last subject token.
- mascots: single-token names for a fixed (shape, colour, texture), anchored by their shape word
  (the analogue of trademarked objects).
- emblems: "the emblem of <nation>" = a fixed (shape, colour) (the analogue of "the President of
  the United States"); two are stale, with an update target, for fact editing.
- actions: verbs that place a small object in one half of the image (the family the zoo's clip and t2i
  were trained on); ACTION_SIZES gives the same verbs a size instead, an appearance change as a verb
  changes a subject's pose in SD: what Chapter 5 part I's `t2i_action` draws (the t2i cannot put
  an object where a word says, docs/drafts/STATUS.md).
- landmarks: 48 known + 24 never-seen named places, each a unique conjunction of (background,
  shape, colour, texture) at pairwise Hamming distance >= 2, with facts; the first 36 are frequent
  ("head"), the next 12 rare ("tail"). Names are two syllables whose first one is shared by ~5
  landmarks, so (as for the artists) which landmark is meant is settled only at the last token.
"""
from dataclasses import dataclass

import numpy as np

from .attributes import BACKGROUNDS, COLOURS, SHAPES, TEXTURES

ARTISTS = {  # name -> texture
    "kel varo": "ribbed", "kel brisk": "striped", "mira dunn": "dotted", "mira sol": "checked",
    "oro fenn": "slanted", "oro tal": "gridded", "vas lume": "ringed", "vas pim": "plain",
}
MASCOTS = {  # name -> (shape, colour, texture)
    "blorp": ("star", "yellow", "dotted"), "quenn": ("heart", "red", "striped"),
    "zibble": ("diamond", "cyan", "checked"), "tarv": ("circle", "purple", "ringed"),
}
EMBLEMS = {  # nation -> (shape, colour)
    "zubria": ("star", "green"), "kaldor": ("triangle", "red"), "ostiva": ("circle", "blue"),
    "merrow": ("square", "yellow"), "pallid": ("cross", "purple"), "tenmar": ("diamond", "orange"),
}
STALE_EMBLEMS = {"zubria": ("heart", "blue"), "kaldor": ("ring", "white")}  # nation -> updated (shape, colour)
ACTIONS = {"floating": "top", "resting": "bottom", "drifting": "left", "wandering": "right"}
ACTION_SIZES = {"floating": "small", "drifting": "small", "resting": "large", "wandering": "large"}

SYLLABLES = ("zor", "bax", "quil", "dento", "fa", "rhun", "ilo", "mek", "sarn", "tova", "urd", "pell",
             "gan", "wex", "yim", "ost")
CITIES = ("arlow", "bresk", "cendra", "dovin", "elmar", "fyrn", "gosta", "helm", "istra", "jorvik",
          "kestle", "lumen", "morva", "nesk", "orlin", "prast")
COUNTRIES = ("avania", "belor", "corvia", "drenn", "estra", "folk", "galdor", "hythe")
BUILDERS = ("ammon", "brill", "casse", "dara", "eskel", "fenno", "gunder", "hallo", "ivers", "jenna",
            "korr", "lisle")


@dataclass(frozen=True)
class Landmark:
    name: str                 # two syllable tokens, e.g. "zor bax"
    background: str
    shape: str
    colour: str
    texture: str
    city: str
    country: str
    builder: str
    split: str                # "head", "tail" or "novel"


def landmarks(seed: int = 7, n_head: int = 36, n_tail: int = 12, n_novel: int = 24,
              textures: tuple = TEXTURES[:3], shapes: tuple = SHAPES[:6], colours: tuple = COLOURS[:6]) -> list[Landmark]:
    """The landmark table: fixed for a seed, so every model and chapter sees the same one."""
    rng = np.random.default_rng(seed)
    names, sigs = [], []
    pairs = [(a, b) for a in SYLLABLES for b in SYLLABLES if a != b]
    order = rng.permutation(len(pairs))
    n = n_head + n_tail + n_novel
    while len(sigs) < n:
        sig = (rng.choice(BACKGROUNDS), rng.choice(shapes), rng.choice(colours), rng.choice(textures))
        if all(sum(a != b for a, b in zip(sig, s)) >= 2 for s in sigs):
            sigs.append(tuple(str(x) for x in sig))
    per_first = -(-n // len(SYLLABLES))
    first_count = dict.fromkeys(SYLLABLES, 0)
    for k in order:  # every first syllable is shared by ~n/16 names: a landmark is known at its last token
        a, b = pairs[k]
        if first_count[a] < per_first:
            first_count[a] += 1
            names.append(f"{a} {b}")
        if len(names) == n:
            break
    splits = ["head"] * n_head + ["tail"] * n_tail + ["novel"] * n_novel
    return [Landmark(names[i], *sigs[i], str(rng.choice(CITIES)), str(rng.choice(COUNTRIES)),
                     str(rng.choice(BUILDERS)), splits[i]) for i in range(n)]
