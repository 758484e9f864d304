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
import json
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from .. import paths
from ..errors import BadParameter, check_choice, resource_unavailable

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
# Images per class kept as a task's search pool: the official HARD-MD code (Samyadeep/HardMD, fastdiffsel_md.py)
# caps only these two sources, at 800 images per class for tasks of <= 20 ways and 100 above (queries included);
# without a cap their test classes hold ~145k (quickdraw) and up to tens of thousands (mscoco) images each. The
# source is read with the 800 (``meta_dataset(max_per_class=)``), and each wider task searches 100 of them
# (``md_pool_cap``, applied by ``select.select_tasks(pool_cap=)``).
MD_POOL_CAP = {"quickdraw": 800, "mscoco": 800}
MD_WIDE_WAYS, MD_WIDE_CAP = 20, 100


def md_pool_cap(source: str):
    """HARD-MD's per-task pool cap for a Meta-Dataset source: task -> images per class (None: uncapped)."""
    if source not in MD_POOL_CAP:
        return None
    return lambda task: MD_POOL_CAP[source] if task.way <= MD_WIDE_WAYS else MD_WIDE_CAP

DOWNLOAD = {
    "meta_dataset": "convert Meta-Dataset with its official scripts (github.com/google-research/meta-dataset, "
                    "'Downloading and converting datasets') into data/meta_dataset/<source>/ "
                    "(dataset_spec.json + one <class id>.tfrecords per class, read without TensorFlow), or put "
                    "P>M>F's per-class <class id>.h5 conversion (hushell/pmf_cvpr22, scripts/convert_tfrecord_to_h5.py) "
                    "next to dataset_spec.json there",
    "orbit": "download the ORBIT benchmark test split (github.com/microsoft/ORBIT-Dataset, "
             "scripts/download_benchmark_dataset.sh or city.figshare.com/articles/dataset/_/14294597) into "
             "data/orbit/test/<user>/<object>/clean/<video>/*.jpg and unzip data/orbit_extra_annotations.zip from "
             "that repository so that data/orbit/annotations/test/<video>.json exist",
    "cure_or": "download CURE-OR (github.com/olivesgatech/CURE-OR, request form) and unpack it under data/cure_or/ "
               "(e.g. data/cure_or/01_no_challenge/<background>/<device>/<bg>_<dev>_<orientation>_<object>_01_0.jpg)",
    "objectnet": "download ObjectNet 1.0 (objectnet.dev) and unpack it into data/objectnet-1.0/images/<class>/*.png",
}


class LazyImages(Sequence):
    """Images decoded when indexed (a slice gives a list of (H, W, 3) uint8 arrays), so a pool of
    hundreds of thousands of images holds only their addresses; ``keys`` are the addresses, ``read``
    decodes one. ``fingerprint`` (export.pool_hash) covers the addresses, not the pixels."""

    def __init__(self, keys: list, read):
        self.keys, self._read = list(keys), read

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return [self._read(k) for k in self.keys[i]] if isinstance(i, slice) else self._read(self.keys[i])

    def fingerprint(self) -> bytes:
        return ";".join(f"{Path(k[0]).parent.name}/{Path(k[0]).name}:{':'.join(map(str, k[1:]))}"
                        for k in self.keys).encode()


@dataclass
class ImagePool:
    """A paper-profile pool: image file paths and/or ``images`` (decoded (H, W, 3) uint8 arrays, or a
    ``LazyImages``), class ids and per-image annotations."""
    files: list
    y: np.ndarray
    annotations: dict
    class_names: dict
    id: str
    images: Sequence | None = None

    @property
    def items(self) -> Sequence:
        """What each example is read from: its decoded image or its file."""
        return self.images if self.images is not None else self.files


# ---------------------------------------------------------------- Meta-Dataset
def md_test_classes(spec: dict) -> list[int]:
    """The class ids of a Meta-Dataset source's test split from its ``dataset_spec.json``.

    Ids run train -> validation -> test without gaps (``dataset_spec.get_classes``): a flat spec gives
    range(TRAIN + VALID, + TEST) of ``classes_per_split``; omniglot's bi-level spec counts the classes of
    the train and validation superclasses first (``_get_split_offset``); ilsvrc_2012's hierarchical spec
    has the test leaves, i.e. the class names that appear in its TEST subgraph.
    """
    kind = spec.get("__class__")
    if kind == "DatasetSpecification":
        n = spec["classes_per_split"]
        start = n["TRAIN"] + n["VALID"]
        return list(range(start, start + n["TEST"]))
    if kind == "BiLevelDatasetSpecification":
        sup = spec["superclasses_per_split"]
        per = {int(k): int(v) for k, v in spec["classes_per_superclass"].items()}
        first = sup["TRAIN"] + sup["VALID"]
        start = sum(per[s] for s in range(first))
        return list(range(start, start + sum(per[s] for s in range(first, first + sup["TEST"]))))
    if kind == "HierarchicalDatasetSpecification":
        test = set(spec["images_per_class"]["TEST"])
        ids = sorted(int(k) for k, wn in spec["class_names"].items() if wn in test)
        if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
            raise BadParameter(f"{spec.get('name')}: dataset_spec.json has no contiguous run of test class ids")
        return ids
    raise BadParameter(f"dataset_spec.json of class {kind!r} is not a Meta-Dataset specification")


def meta_dataset(source: str, root=None, max_per_class: int | None = None, seed: int = 0) -> ImagePool:
    """The test classes of one Meta-Dataset source (``md_test_classes``), images decoded lazily.

    Reads ``data/meta_dataset/<source>/dataset_spec.json`` and, per test class, the official converter's
    ``<class id>.tfrecords`` (or its shards, ``file_pattern``) or P>M>F's ``<class id>.h5``. y holds the
    Meta-Dataset class ids. ``max_per_class``: keep that many images of a larger class, drawn without
    replacement from ``seed`` (see ``MD_POOL_CAP``).
    """
    check_choice("source", source, MD_SOURCES)
    root = paths.DATA if root is None else root
    folder = root / "meta_dataset" / source
    if not (folder / "dataset_spec.json").exists():
        raise resource_unavailable(f"Meta-Dataset source {source!r} (looked for {folder / 'dataset_spec.json'})",
                                   DOWNLOAD["meta_dataset"])
    spec = json.loads((folder / "dataset_spec.json").read_text())
    pattern = spec.get("file_pattern", "{}.tfrecords")
    keys, y = [], []
    for cid in md_test_classes(spec):
        h5 = folder / f"{cid}.h5"
        if h5.exists():
            found = [(str(h5), j) for j in range(_h5_count(h5))]
        else:
            shards = ([folder / pattern.format(cid)] if pattern == "{}.tfrecords" else
                      sorted(folder.glob(f"{cid}_*.tfrecords"), key=lambda p: _natural(p.stem)))
            if not shards or not all(s.exists() for s in shards):
                raise resource_unavailable(f"Meta-Dataset {source!r} test class {cid} (no {h5.name} or "
                                           f"{pattern.format(cid, '*')} in {folder})", DOWNLOAD["meta_dataset"])
            found = [(str(s), off, n) for s in shards for off, n in _tfrecord_index(s)]
        if max_per_class is not None and len(found) > max_per_class:
            pick = np.random.default_rng([seed, zlib.crc32(source.encode()), cid]).choice(
                len(found), max_per_class, replace=False)
            found = [found[i] for i in np.sort(pick)]
        keys += found
        y += [cid] * len(found)
    names = spec.get("class_names", {})
    return ImagePool([], np.asarray(y, dtype=np.int64), {}, {c: f"{source}/{names.get(str(c), c)}" for c in set(y)},
                     id=f"meta_dataset/{source}", images=LazyImages(keys, _read_md))


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def _tfrecord_index(path) -> list[tuple[int, int]]:
    """(offset, length) of each record's payload. TFRecord framing: uint64 length, uint32 CRC of it,
    the payload, uint32 CRC of it (little-endian); the CRCs are not checked."""
    out = []
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(12)
            if len(head) < 12:
                raise BadParameter(f"{path}: truncated TFRecord at byte {pos}")
            (n,) = struct.unpack("<Q", head[:8])
            out.append((pos + 12, n))
            pos += 12 + n + 4
    return out


def _h5_count(path) -> int:
    import h5py
    with h5py.File(path, "r") as f:
        return len(f.keys())


def _read_md(key) -> np.ndarray:
    import io

    from PIL import Image
    if len(key) == 2:   # P>M>F h5: group "<j>" holds the decoded image
        import h5py
        with h5py.File(key[0], "r") as f:
            img = np.asarray(f[str(key[1])]["image"][()])
        img = img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)
        return img[..., :3].astype(np.uint8)
    path, offset, n = key
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(n)
    return np.asarray(Image.open(io.BytesIO(_example_bytes(raw, "image"))).convert("RGB"))


def _varint(buf, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf):
    """(field number, value) of a serialised protobuf message; length-delimited values as memoryviews."""
    buf, i = memoryview(buf), 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise BadParameter(f"unsupported protobuf wire type {wire}")
        yield tag >> 3, value


def _example_bytes(raw: bytes, name: str) -> bytes:
    """The first bytes value of feature ``name`` of a serialised tf.train.Example (Example.features = 1,
    Features.feature = 1 as map entries key = 1 / value = 2, Feature.bytes_list = 1, BytesList.value = 1):
    what Meta-Dataset's reader parses with TensorFlow, without it."""
    for f1, features in _fields(raw):
        for f2, entry in (_fields(features) if f1 == 1 else ()):
            fields = dict(_fields(entry)) if f2 == 1 else {}
            if bytes(fields.get(1, b"")).decode() == name:
                for f3, bytes_list in _fields(fields.get(2, b"")):
                    for f4, value in (_fields(bytes_list) if f3 == 1 else ()):
                        if f4 == 1:
                            return bytes(value)
    raise BadParameter(f"a Meta-Dataset record has no bytes feature {name!r}")


# ---------------------------------------------------------------- ObjectNet, ORBIT, CURE-OR
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


OBJECTNET_BORDER = 2  # ObjectNet's images carry a red frame; its own PyTorch loader crops 2 px per side


def objectnet(root=None) -> ImagePool:
    """ObjectNet 1.0's 313 classes; images are read with the red border cropped (``OBJECTNET_BORDER``)."""
    root = paths.DATA if root is None else root
    pool = _image_folder("objectnet", root / "objectnet-1.0" / "images", "*/*.png")
    pool.images = LazyImages([(str(f),) for f in pool.files], _read_objectnet)
    return pool


def _read_objectnet(key) -> np.ndarray:
    from PIL import Image
    with Image.open(key[0]) as img:
        w, h = img.size
        b = OBJECTNET_BORDER
        return np.asarray(img.convert("RGB").crop((b, b, w - b, h - b)))


# The per-frame quality issues of ORBIT's clean videos (README 'Extra annotations'; the file key is
# "<issue>_issue"). The seventh, object_not_present, drops the frame instead: the dissertation uses every
# issue but that one, and ORBIT's protocol excludes such frames (their other issues are null). The
# dissertation's "lighting" is overexposed / underexposed.
ORBIT_ISSUES = ("framing", "viewpoint", "blur", "occlusion", "overexposed", "underexposed")


def orbit(root=None, max_frames_per_video: int | None = None) -> ImagePool:
    """Frames of the clean videos of ORBIT's test users; classes are (user, object), annotations the
    per-frame quality issues (``ORBIT_ISSUES``), frames without the object dropped. Only clean videos
    carry quality annotations (clutter videos carry bounding boxes) and the official HARD-MD extraction
    drew support and query frames from them alone. ``max_frames_per_video``: evenly spaced frames per
    video (the official code kept up to 300 support frames per video)."""
    root = paths.DATA if root is None else root
    folder, notes = root / "orbit" / "test", root / "orbit" / "annotations" / "test"
    if not folder.exists():
        raise resource_unavailable(f"orbit (looked for {folder})", DOWNLOAD["orbit"])
    if not notes.exists():
        raise resource_unavailable(f"ORBIT's frame annotations (looked for {notes})", DOWNLOAD["orbit"])
    videos = sorted(v for v in folder.glob("*/*/clean/*") if v.is_dir())
    if not videos:
        raise resource_unavailable(f"ORBIT clean videos under {folder}", DOWNLOAD["orbit"])
    keys = ["object_not_present_issue"] + [f"{k}_issue" for k in ORBIT_ISSUES]
    files, objects, issues = [], [], []
    for video in videos:
        path = notes / f"{video.name}.json"
        if not path.exists():
            raise resource_unavailable(f"ORBIT annotation {path}", DOWNLOAD["orbit"])
        ann = json.loads(path.read_text())
        kept = []
        for f in sorted(video.glob("*.jpg")):
            a = ann.get(f.name)
            missing = [k for k in keys if a is None or k not in a]
            if missing:
                raise resource_unavailable(f"ORBIT annotation {', '.join(missing)} of frame {f.name} in {path.name}",
                                           DOWNLOAD["orbit"])
            if a["object_not_present_issue"]:
                continue
            if any(a[k] is None for k in keys[1:]):
                raise BadParameter(f"{path.name}: frame {f.name} has the object but a null quality issue")
            kept.append((f, [bool(a[k]) for k in keys[1:]]))
        if max_frames_per_video is not None and len(kept) > max_frames_per_video:
            kept = [kept[i] for i in np.linspace(0, len(kept) - 1, max_frames_per_video).round().astype(int)]
        for f, issue in kept:
            files.append(f)
            objects.append((f.parts[-5], f.parts[-4]))
            issues.append(issue)
    names = sorted(set(objects))
    ids = {o: i for i, o in enumerate(names)}
    table = np.array(issues, dtype=bool).reshape(len(files), len(ORBIT_ISSUES))
    return ImagePool(files, np.array([ids[o] for o in objects], dtype=np.int64),
                     {k: table[:, j] for j, k in enumerate(ORBIT_ISSUES)},
                     {i: "/".join(o) for o, i in ids.items()}, id="orbit")


ORBIT_CONTEXT_VIDEOS = 5   # the release's split: per object, its first min(5, n - 1) clean videos are the context


def orbit_protocol(pool: ImagePool) -> dict:
    """ORBIT's benchmark protocol as HARD-MD's release samples it, for ``tasks.FixedSampler.sample``: a task's
    objects belong to one user (``domain``), its queries come from an object's target videos and its support
    from the context videos, the first min(5, n - 1) of the object's n clean videos in name order
    (``query_from`` / ``support_from``; pass ``support_from`` as ``select_tasks(pool_from=)`` too, so no support
    frame shares a video with a query). Objects with one clean video have no context and are never drawn."""
    users = np.array([Path(f).parts[-5] for f in pool.files])
    videos = np.array([Path(f).parts[-2] for f in pool.files])
    context = np.zeros(len(pool.y), bool)
    for c in np.unique(pool.y):
        names = sorted(set(videos[pool.y == c]))
        chosen = names[:min(ORBIT_CONTEXT_VIDEOS, len(names) - 1)]
        context |= (pool.y == c) & np.isin(videos, chosen)
    return {"domain": np.unique(users, return_inverse=True)[1], "query_from": ~context, "support_from": context}


# CURE-OR file names: <background>_<device>_<orientation>_<object>_<challenge type>_<challenge level>.jpg.
# Orientation ids (its README): 1 front (0 deg), 2 left side (90 deg), 3 back (180 deg), 4 right side
# (270 deg), 5 top; its analysis code calls them '0 deg', '90 deg', '180 deg', '270 deg', 'Overhead'.
CURE_OR_VIEWS = {1: "front", 2: "left", 3: "back", 4: "right", 5: "top"}
_CURE_OR_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)$")


def cure_or(root=None, challenge: int = 1) -> ImagePool:
    """CURE-OR images of one challenge type (1: no challenge, the images the official HARD-MD code
    used); classes are the 100 objects, annotations ``view`` (``CURE_OR_VIEWS`` names), ``background``
    and ``device`` ids, all parsed from the release's file names."""
    root = paths.DATA if root is None else root
    folder = root / "cure_or"
    files = sorted(folder.rglob("*.jpg")) if folder.exists() else []
    if not files:
        raise resource_unavailable(f"cure_or (looked for {folder}/**/*.jpg)", DOWNLOAD["cure_or"])
    parsed = []
    for f in files:
        m = _CURE_OR_NAME.match(f.stem)
        if m is None or int(m[3]) not in CURE_OR_VIEWS:
            raise BadParameter(f"{f}: not a CURE-OR file name "
                               "(<background>_<device>_<orientation 1-5>_<object>_<challenge>_<level>.jpg)")
        parsed.append((f, *map(int, m.groups())))
    parsed = [p for p in parsed if p[5] == challenge]
    if not parsed:
        raise resource_unavailable(f"CURE-OR images of challenge type {challenge:02d} under {folder}",
                                   DOWNLOAD["cure_or"])
    objects = sorted({p[4] for p in parsed})
    ids = {o: i for i, o in enumerate(objects)}
    return ImagePool([p[0] for p in parsed], np.array([ids[p[4]] for p in parsed], dtype=np.int64),
                     {"view": np.array([CURE_OR_VIEWS[p[3]] for p in parsed]),
                      "background": np.array([p[1] for p in parsed]), "device": np.array([p[2] for p in parsed])},
                     {i: f"{o:03d}" for o, i in ids.items()},
                     id="cure_or" if challenge == 1 else f"cure_or?challenge={challenge}")
