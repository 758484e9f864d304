"""Few-shot pools: tiny digit-pair worlds with annotated nuisances, and the paper datasets' loaders.

tiny: scikit-learn's bundled digits (1797 images, 8x8) become 100 two-digit classes ("37" is
a 3 left of a 7, an 8x16 image), enough classes for variable-way tasks. Each image carries
annotations that play the role of CURE-OR's viewpoint and ORBIT's quality issues:

    view       "front" (upright), "side" (each digit turned 90 deg), "back" (turned 180 deg)
    blur, noise, low_contrast, occlusion, framing    one bool each

A *regime* (the analogue of a Meta-Dataset sub-dataset) fixes how often each nuisance
appears. Classes are split into base (train the extractor) and novel (tasks); the digit
images behind base and novel classes are disjoint halves, so no novel pixel is ever seen
in training. Everything is deterministic from ``seed``.

paper: ``meta_dataset``, ``orbit``, ``cure_or``, ``objectnet`` find the real datasets under
``data/`` and raise ``ResourceUnavailable`` naming what to download when they are absent.
"""
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from .. import paths
from ..errors import check_choice, resource_unavailable

VIEWS = ("front", "side", "back")
ISSUES = ("blur", "noise", "low_contrast", "occlusion", "framing")
N_BASE = 64  # of 100 pair classes; 36 novel, as mini-ImageNet's 64 train / 36 held out

# regime -> (P(front, side, back), P(issue) for each issue in ISSUES)
REGIMES = {
    "clean":        ((1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, 0.0)),
    "viewpoint":    ((0.5, 0.3, 0.2), (0.0, 0.0, 0.0, 0.0, 0.0)),
    "blur":         ((1.0, 0.0, 0.0), (0.4, 0.0, 0.0, 0.0, 0.0)),
    "noise":        ((1.0, 0.0, 0.0), (0.0, 0.4, 0.0, 0.0, 0.0)),
    "low_contrast": ((1.0, 0.0, 0.0), (0.0, 0.0, 0.4, 0.0, 0.0)),
    "occlusion":    ((1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.4, 0.0)),
    "framing":      ((1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, 0.4)),
    "quality":      ((1.0, 0.0, 0.0), (0.2, 0.2, 0.2, 0.2, 0.2)),
    "mixed":        ((0.6, 0.25, 0.15), (0.15, 0.15, 0.15, 0.15, 0.15)),
}


@dataclass
class Pool:
    """A labelled image pool.

    x: (n, 1, 8, 16) float32 in [0, 1]; y: (n,) int64 class ids; annotations: name -> (n,) array
    ("view" holds indices into VIEWS, each issue a bool); class_names: id -> "37".
    ``id`` names the pool so that an exported task file can rebuild it (see ``load``).
    """
    x: np.ndarray
    y: np.ndarray
    annotations: dict
    class_names: dict
    id: str
    spec: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.y)

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.y)


def class_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 100 pair classes split into (base, novel) ids, deterministic from ``seed``."""
    order = np.random.default_rng([seed, 1]).permutation(100)
    return np.sort(order[:N_BASE]), np.sort(order[N_BASE:])


def _digit_halves(seed: int):
    """Sklearn digit images split per digit into two disjoint halves: (images (n, 8, 8), labels) x 2."""
    from sklearn.datasets import load_digits
    d = load_digits()
    rng = np.random.default_rng([seed, 2])
    halves = ([], [])
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == digit))
        halves[0].append(idx[: len(idx) // 2])
        halves[1].append(idx[len(idx) // 2:])
    imgs = (d.images / 16.0).astype(np.float32)
    return [(imgs[np.concatenate(h)], d.target[np.concatenate(h)]) for h in halves]


def make_pool(split: str = "novel", regime: str = "mixed", seed: int = 0, per_class: int = 80) -> Pool:
    """Render ``per_class`` images for each class of ``split`` under ``regime`` nuisances."""
    check_choice("split", split, ("base", "novel"))
    check_choice("regime", regime, tuple(REGIMES))
    base, novel = class_split(seed)
    classes = base if split == "base" else novel
    imgs, digits = _digit_halves(seed)[0 if split == "base" else 1]
    by_digit = [np.flatnonzero(digits == d) for d in range(10)]
    # The regime enters the stream so sub-datasets differ, the split so base and novel differ.
    rng = np.random.default_rng([seed, 3, list(REGIMES).index(regime), split == "novel"])
    y = np.repeat(classes, per_class)
    left = np.array([rng.choice(by_digit[c // 10]) for c in y])
    right = np.array([rng.choice(by_digit[c % 10]) for c in y])
    p_view, p_issue = REGIMES[regime]
    ann = {"view": rng.choice(len(VIEWS), size=len(y), p=p_view)}
    for name, p in zip(ISSUES, p_issue):
        ann[name] = rng.random(len(y)) < p
    x = np.stack([_render(imgs[a], imgs[b], {k: v[i] for k, v in ann.items()}, rng)
                  for i, (a, b) in enumerate(zip(left, right))])
    spec = dict(split=split, regime=regime, seed=seed, per_class=per_class)
    return Pool(x[:, None], y.astype(np.int64), ann, {int(c): f"{c // 10}{c % 10}" for c in classes},
                id=f"digit-pairs/{regime}/{split}?seed={seed}&per_class={per_class}", spec=spec)


def _render(a: np.ndarray, b: np.ndarray, ann: dict, rng) -> np.ndarray:
    """Two 8x8 digits -> one 8x16 image with the annotated nuisances applied (order matters:
    geometry first, then optics, then the sensor)."""
    turns = int(ann["view"]) * (1 if rng.random() < 0.5 else -1)  # side = +-90 deg, back = 180 deg
    img = np.concatenate([np.rot90(a, turns), np.rot90(b, turns)], axis=1).copy()
    if ann["framing"]:  # the object slides out of frame by 2-3 pixels
        dy, dx = rng.integers(-2, 3), rng.choice([-3, 3])
        img = _shift(img, dy, dx)
    if ann["occlusion"]:  # a 5x5 block hides part of one digit
        r, c = rng.integers(0, 4), rng.integers(0, 12)
        img[r:r + 5, c:c + 5] = 0.0
    if ann["blur"]:
        img = gaussian_filter(img, sigma=1.0)
    if ann["low_contrast"]:
        img = 0.3 + 0.25 * img
    if ann["noise"]:
        img = img + rng.normal(0, 0.3, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(img)
    h, w = img.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h - max(dy, 0),
                                                                    max(-dx, 0):w - max(dx, 0)]
    return out


def load(pool_id: str) -> Pool:
    """Rebuild a pool from its ``id`` (as written by ``make_pool`` and stored in task files)."""
    from urllib.parse import parse_qs, urlparse
    u = urlparse(pool_id)
    if not pool_id.startswith("digit-pairs/"):
        raise resource_unavailable(f"pool {pool_id!r}", "only digit-pairs pools can be rebuilt from an id; "
                                   "load paper datasets with fewshot.data.meta_dataset/orbit/cure_or/objectnet")
    _, regime, split = u.path.split("/")
    q = {k: int(v[0]) for k, v in parse_qs(u.query).items()}
    return make_pool(split=split, regime=regime, seed=q["seed"], per_class=q["per_class"])


# ---------------------------------------------------------------------------- paper datasets
MD_SOURCES = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower",
              "traffic_sign", "mscoco")
MD_TEST_SOURCES = MD_SOURCES[1:]  # HARD-MD leaves ilsvrc_2012 out so extractors may be trained on it

DOWNLOAD = {
    "meta_dataset": "convert Meta-Dataset with its official scripts (github.com/google-research/meta-dataset, "
                    "'Downloading and converting datasets') into data/meta_dataset/<source>/ "
                    "(*.tfrecords + dataset_spec.json; needs `pip install tensorflow`) or into "
                    "data/meta_dataset_h5/<source>.h5 (images/labels arrays; needs `pip install h5py`)",
    "orbit": "download the ORBIT test split (city.ac.uk ORBIT dataset, 'test' videos + annotations) and unpack "
             "it into data/orbit/test/<user>/<object>/{clean,clutter}/<video>/*.jpg with "
             "data/orbit/annotations/<video>.json",
    "cure_or": "download CURE-OR (ghassanalregib CURE-OR release) and unpack it into "
               "data/cure_or/<background>/<device>/<object>/<image>.jpg with data/cure_or/annotations.csv",
    "objectnet": "download ObjectNet 1.0 (objectnet.dev) and unpack it into data/objectnet-1.0/images/<class>/*.png",
}


@dataclass
class ImagePool:
    """A paper-profile pool: image file paths (or, for Meta-Dataset, decoded images (H, W, 3) uint8 in
    ``images``), class ids and per-image annotations."""
    files: list
    y: np.ndarray
    annotations: dict
    class_names: dict
    id: str
    images: list | None = None

    @property
    def items(self) -> list:
        """What each example is read from: its decoded image or its file."""
        return self.images if self.images is not None else self.files


def meta_dataset(source: str, root=None) -> ImagePool:
    """The test classes of one Meta-Dataset source as an ``ImagePool`` of decoded images.

    Reads ``data/meta_dataset_h5/<source>.h5`` (datasets ``images`` (n, H, W, 3) uint8 and
    ``labels`` (n,)) or the official TFRecords under ``data/meta_dataset/<source>/``.
    """
    check_choice("source", source, MD_SOURCES)
    root = paths.DATA if root is None else root
    h5 = root / "meta_dataset_h5" / f"{source}.h5"
    rec = root / "meta_dataset" / source
    if h5.exists():
        try:
            import h5py
        except ImportError:
            raise resource_unavailable("h5py (to read Meta-Dataset .h5 files)", "run `pip install h5py`") from None
        with h5py.File(h5, "r") as f:
            images, labels = list(np.asarray(f["images"])), np.asarray(f["labels"])
    elif (rec / "dataset_spec.json").exists():
        images, labels = _md_tfrecords(rec)
    else:
        raise resource_unavailable(f"Meta-Dataset source {source!r} (looked for {h5} and {rec})",
                                   DOWNLOAD["meta_dataset"])
    return ImagePool([], labels, {}, {int(c): f"{source} class {c}" for c in np.unique(labels)},
                     id=f"meta_dataset/{source}", images=images)


def _md_tfrecords(folder):
    try:
        import tensorflow as tf
    except ImportError:
        raise resource_unavailable("tensorflow (to read Meta-Dataset TFRecords)",
                                   "run `pip install tensorflow` or convert the source to .h5") from None
    images, labels = [], []
    for label, rec in enumerate(sorted(folder.glob("*.tfrecords"))):  # one file per class
        for raw in tf.data.TFRecordDataset(str(rec)):
            ex = tf.io.parse_single_example(raw, {"image": tf.io.FixedLenFeature([], tf.string)})
            images.append(tf.io.decode_image(ex["image"], channels=3).numpy())
            labels.append(label)
    return images, np.asarray(labels)


def _image_folder(name: str, folder, pattern: str, annotate=None) -> ImagePool:
    if not folder.exists():
        raise resource_unavailable(f"{name} (looked for {folder})", DOWNLOAD[name])
    files = sorted(folder.glob(pattern))
    if not files:
        raise resource_unavailable(f"{name} images under {folder}", DOWNLOAD[name])
    names = sorted({f.relative_to(folder).parts[0] for f in files})
    ids = {n: i for i, n in enumerate(names)}
    y = np.array([ids[f.relative_to(folder).parts[0]] for f in files])
    return ImagePool(files, y, annotate(files) if annotate else {}, dict(enumerate(names)), id=name)


def objectnet(root=None) -> ImagePool:
    root = paths.DATA if root is None else root
    return _image_folder("objectnet", root / "objectnet-1.0" / "images", "*/*.png")


def orbit(root=None) -> ImagePool:
    """ORBIT test frames; classes are objects, annotations the per-frame quality issues."""
    root = paths.DATA if root is None else root
    folder = root / "orbit" / "test"
    if not folder.exists():
        raise resource_unavailable(f"orbit (looked for {folder})", DOWNLOAD["orbit"])
    files = sorted(folder.glob("*/*/*/*/*.jpg"))
    objects = sorted({(f.parts[-5], f.parts[-4]) for f in files})
    ids = {o: i for i, o in enumerate(objects)}
    y = np.array([ids[(f.parts[-5], f.parts[-4])] for f in files])
    return ImagePool(files, y, _orbit_annotations(root / "orbit" / "annotations", files),
                     {i: "/".join(o) for o, i in ids.items()}, id="orbit")


ORBIT_ISSUES = ("blur", "framing", "lighting", "occlusion", "viewpoint", "overexposed", "underexposed")


def _orbit_annotations(folder, files) -> dict:
    import json
    ann = {k: np.zeros(len(files), bool) for k in ORBIT_ISSUES}
    cache = {}
    for i, f in enumerate(files):
        video = f.parent.name
        if video not in cache:
            p = folder / f"{video}.json"
            cache[video] = json.loads(p.read_text()) if p.exists() else {}
        for k in cache[video].get(f.name, {}).get("issues", []):
            if k in ann:
                ann[k][i] = True
    return ann


def cure_or(root=None) -> ImagePool:
    """CURE-OR images; classes are the 100 objects, annotations the viewpoint (front/back/side/top/bottom)."""
    root = paths.DATA if root is None else root
    folder = root / "cure_or"
    csv = folder / "annotations.csv"
    if not csv.exists():
        raise resource_unavailable(f"cure_or (looked for {csv})", DOWNLOAD["cure_or"])
    import pandas as pd
    table = pd.read_csv(csv)  # columns: file, object, viewpoint
    files = [folder / f for f in table["file"]]
    objects = sorted(table["object"].unique())
    ids = {o: i for i, o in enumerate(objects)}
    return ImagePool(files, table["object"].map(ids).to_numpy(), {"view": table["viewpoint"].to_numpy()},
                     dict(enumerate(objects)), id="cure_or")
