"""ImageNet-1k and Waterbirds as Chapter 7's paper profile reads them (data/paper/ch07/), each
model's own input pipeline, and the chapter's text facts (feature instantiations, spec 2.6-2.10).

    classes()                       ImageNet's 1000 (wnid, name) in label order (LOC_synset_mapping.txt)
    clip_classnames(), clip_templates()   CLIP's zero-shot class names and 80 prompt templates (open_clip's)
    files(split, n, seed)           n (path, label) of imagenet/<split>/<wnid>/*.JPEG, a seeded sample
    waterbirds(name)                paths, bird labels (1 = waterbird) and groups of a Waterbirds archive
    input_config(model)             (size, crop_pct, mean, std) the model was trained with
    load(items, size, crop_pct)     [0, 1] images (N, 3, size, size) of files or arrays: short side resized, centre crop
    normalise(model)                [0, 1] images -> what the model reads
    text_embeddings(model, tok, phrases, templates)   open_clip text, template-averaged, unit norm

Layout under ``root`` (default data/paper/ch07):

    imagenet/LOC_synset_mapping.txt                 ("n01440764 tench, Tinca tinca" per line, label order)
    imagenet/{train,val}/<wnid>/<image>.JPEG        (val sorted into wnid folders, as torchvision's ImageNet)
    waterbirds/<corr-0.9|uncorr>/metadata.csv       (img_filename, y, place per row; Sagawa et al.'s columns)
    waterbirds/<corr-0.9|uncorr>/<img_filename>

Every reader raises ResourceUnavailable naming what to put where when its files are absent.
"""
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import paths
from .errors import check_choice, resource_unavailable
from .models.clip_students import read_image

ROOT = paths.DATA / "paper" / "ch07"
DOWNLOAD = {
    "imagenet": "copy ImageNet-1k (image-net.org; LOC_synset_mapping.txt and train/ val/ sorted into wnid folders) there",
    "waterbirds": "copy the cleaned Waterbirds archives corr-0.9 and uncorr of the chapter's release "
                  "(SriramB-98/vit-decompose), each a folder with metadata.csv and its images, there",
}
WATERBIRDS = ("corr-0.9", "uncorr")
# Algorithm 5's features and their instantiations (the release's lists, spec 2.6); fabric serves Fig 7.4 only
FEATURES = {
    "colour": [f"{c} color" for c in ("blue", "green", "red", "yellow", "black", "white")],
    "texture": [f"{t} texture" for t in ("rough", "smooth", "furry", "sleek", "slimy", "spiky", "glossy")],
    "animal": ["cat", "dog", "camel", "elephant", "giraffe", "zebra", "cheetah"],
    "person": ["face", "head", "man", "woman", "human", "arms", "legs"],
    "location": ["beach", "forest", "desert", "sea", "city", "sky", "marsh"],
    "pattern": [f"{p} pattern" for p in ("spotted", "striped", "polka dot", "plain", "checkered")],
    "shape": ["triangular shape", "rectangular shape", "circular shape", "octagon"],
    "fabric": ["linen", "velvet", "cotton", "silk", "chiffon"],
}
TABLE_7_2_FEATURES = ("colour", "texture", "animal", "person", "location", "pattern", "shape")
# Table 7.3's spurious (background) and core (bird) instantiations (spec 2.10)
SPURIOUS = ("water", "ocean", "lake", "sky", "land", "forest", "trees", "bamboo", "leaves")
CORE = ("bird", "finch", "hummingbird", "crow", "sparrow", "swan", "albatross", "pelican")
# Fig 7.4: components per feature (the release's k; 3 where it sets none)
GAP_K = {"deit": {}, "dino": {"colour": 2, "pattern": 5, "fabric": 4},
         "dinov2": {"colour": 1, "pattern": 1, "fabric": 4},
         "swin": {"colour": 3, "pattern": 12, "fabric": 9, "texture": 9, "person": 5, "location": 9, "shape": 8},
         "maxvit": {"colour": 12, "pattern": 8, "fabric": 9, "texture": 9, "person": 9, "location": 9, "shape": 3},
         "clip": {"fabric": 4}}


def _folder(name: str, root) -> Path:
    folder = Path(root or ROOT) / name
    if not folder.is_dir():
        raise resource_unavailable(f"{name} (looked for {folder})", DOWNLOAD[name])
    return folder


def classes(root=None) -> list:
    """ImageNet's 1000 (wnid, name) in label order; the name is the synset's first lemma."""
    path = _folder("imagenet", root) / "LOC_synset_mapping.txt"
    if not path.exists():
        raise resource_unavailable(f"imagenet file {path}", DOWNLOAD["imagenet"])
    rows = [line.split(" ", 1) for line in path.read_text().splitlines() if line.strip()]
    return [(wnid, name.split(",")[0].strip()) for wnid, name in rows]


def clip_classnames() -> tuple:
    """The 1000 class names in label (sorted wnid) order as CLIP's ImageNet zero-shot evaluations word them
    (OpenAI's list, shipped by open_clip): "crane bird" / "construction crane" where first lemmas repeat.
    Its two deliberate repeats ("missile" 657 / 744, "sunglasses" 836 / 837) stay, as every CLIP eval keeps them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return tuple(IMAGENET_CLASSNAMES)


def clip_templates() -> tuple:
    """OpenAI's 80 ImageNet prompt templates (open_clip's) as format strings, "a bad photo of a {}." ...
    (the release averages 79 of them)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def files(split: str, n: int | None = None, seed: int = 0, root=None) -> tuple:
    """(paths, labels (n,) long) of n images of ImageNet ``split`` ("train" / "val"), a sample drawn
    with ``seed`` (None: all, in folder order)."""
    check_choice("split", split, ("train", "val"))
    folder = _folder("imagenet", root) / split
    if not folder.is_dir():
        raise resource_unavailable(f"imagenet/{split} (looked for {folder})", DOWNLOAD["imagenet"])
    label = {wnid: i for i, (wnid, _) in enumerate(classes(root))}
    items = [(p, label[d.name]) for d in sorted(folder.iterdir()) if d.name in label for p in sorted(d.iterdir())]
    if n is not None and n < len(items):
        items = [items[i] for i in sorted(np.random.default_rng(seed).choice(len(items), n, replace=False))]
    return [p for p, _ in items], torch.tensor([y for _, y in items])


def waterbirds(name: str, root=None) -> tuple:
    """(paths, y (n,) 1 = waterbird, group (n,) = 2 y + place with place 1 = water) of archive ``name``."""
    check_choice("waterbirds archive", name, WATERBIRDS)
    folder = _folder("waterbirds", root) / name
    meta = folder / "metadata.csv"
    if not meta.exists():
        raise resource_unavailable(f"waterbirds file {meta}", DOWNLOAD["waterbirds"])
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    y = torch.tensor([int(r["y"]) for r in rows])
    place = torch.tensor([int(r["place"]) for r in rows])
    return [folder / r["img_filename"] for r in rows], y, 2 * y + place


def input_config(model) -> tuple:
    """(size, crop_pct, mean, std) of a timm model (its pretrained_cfg) or an open_clip model / visual
    tower (its preprocess_cfg: shortest side to size, centre crop)."""
    visual = getattr(model, "visual", model)
    if hasattr(visual, "preprocess_cfg"):
        cfg = visual.preprocess_cfg
        return int(cfg["size"][0]), 1.0, tuple(cfg["mean"]), tuple(cfg["std"])
    cfg = model.pretrained_cfg
    size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else cfg["input_size"][-1]
    return int(size), float(cfg.get("crop_pct", 1.0)), tuple(cfg["mean"]), tuple(cfg["std"])


def load(images, size: int = 224, crop_pct: float = 1.0, interpolation: str = "bicubic") -> torch.Tensor:
    """[0, 1] RGB images (N, 3, size, size) of image files or decoded (H, W, 3) uint8 arrays, as the
    model's released evaluation transform makes them (``clip_students.read_image``: short side to
    floor(size / crop_pct) by PIL's bicubic, centre crop)."""
    from PIL import Image
    return torch.stack([read_image(Image.fromarray(np.asarray(item)) if isinstance(item, np.ndarray) else item,
                                   size, crop_pct, interpolation) for item in images])


def normalise(model):
    """A function mapping [0, 1] images (N, 3, H, W) to what ``model`` reads, on its device."""
    _, _, mean, std = input_config(model)
    device = next(model.parameters()).device
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (mean, std))
    return lambda x: (x.to(device) - mean) / std


@torch.inference_mode()
def text_embeddings(model, tokenizer, phrases, templates=("{}",), batch_size: int = 512) -> torch.Tensor:
    """(n, d) unit-norm open_clip text embeddings of ``phrases``, each the normalised mean over the
    templates of the normalised template embeddings (CLIP's prompt ensembling); every phrase x template
    runs in batches of ``batch_size``."""
    device = next(model.parameters()).device
    texts = [t.format(p) for p in phrases for t in templates]
    e = torch.cat([F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(), dim=-1)
                   for i in range(0, len(texts), batch_size)])
    return F.normalize(e.view(len(phrases), len(templates), -1).mean(1), dim=-1).cpu()
