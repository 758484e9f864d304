"""Run notebooks/ch04_hard_md.ipynb's paper profile end to end offline (development check, not a result): fake
Meta-Dataset sources (decoded noise images; the TFRecord reader is tested in tests/test_fewshot.py), ORBIT / CURE-OR /
ObjectNet trees of noise JPEGs in the layouts `fewshot.data` reads, and one small random ResNet-18 at 32 px in
place of each of the 13 backbones and of the P>M>F selector (their architectures are tested in
tests/test_extractors_paper.py).

    OMP_NUM_THREADS=2 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch04_paper_smoke.py
"""
import json
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from interplab import imagenet
from interplab.fewshot import data
from interplab.models import extractors as E
from smoke import run_notebook

NOTEBOOK = Path(__file__).parents[3] / "notebooks" / "ch04_hard_md.ipynb"
CLASSES, PER_CLASS = 6, 20
rng = np.random.default_rng(0)


def noise(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def fake_orbit_video(root: Path, user: str, obj: str, video: str, frames: int) -> None:
    notes = root / "orbit" / "annotations" / "test"
    notes.mkdir(parents=True, exist_ok=True)
    ann = {}
    for j in range(frames + 1):   # one frame without the object, which the loader drops
        frame = f"{video}-{j + 1:05d}.jpg"
        noise(root / "orbit" / "test" / user / obj / "clean" / video / frame)
        absent = j == frames
        ann[frame] = {"object_not_present_issue": absent,
                      **{f"{k}_issue": None if absent else (j + i) % 3 == 0 for i, k in enumerate(data.ORBIT_ISSUES)}}
    (notes / f"{video}.json").write_text(json.dumps(ann))


def fake_tree(root: Path) -> None:
    for c in range(CLASSES):
        for j in range(PER_CLASS):
            noise(root / "objectnet-1.0" / "images" / f"class{c}" / f"{j}.png")
        for v in range(3):   # one user's objects, three clean videos each: two context videos, one target video
            fake_orbit_video(root, "P0", f"object{c}", f"P0--object{c}--clean--v{v}", 12)
        for j in range(5 * PER_CLASS // 2):   # orientations 1-5 in turn: 20 front or back views per object (Fig 4.5)
            bg, device, orientation = j // 5 % 5 + 1, j // 25 + 1, j % 5 + 1
            noise(root / "cure_or" / "01_no_challenge" / f"bg{bg}" / f"dev{device}" /
                  f"{bg}_{device}_{orientation}_{c + 1:03d}_01_0.jpg")
    fake_orbit_video(root, "P1", "lone", "P1--lone--clean--v0", 12)   # a user with one object: never in a task


def fake_meta_dataset(source, root=None, max_per_class=None, seed=0):
    y = np.repeat(np.arange(CLASSES), PER_CLASS)
    images = [rng.integers(0, 256, (36, 36, 3), dtype=np.uint8) for _ in y]
    return data.ImagePool([], y, {}, {c: f"{source} class {c}" for c in range(CLASSES)}, f"meta_dataset/{source}", images)


def small_backbone(name, device="cpu"):
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    if name in E.SELECTORS:   # the selector's cosine head, as the P>M>F checkpoint brings it
        model.register_buffer("cosine_scale", torch.tensor(12.0))
    return model.to(device)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        fake_tree(Path(tmp))
        for name in ("orbit", "cure_or", "objectnet"):
            setattr(data, name, partial(getattr(data, name), root=Path(tmp)))
        data.meta_dataset = fake_meta_dataset
        E.load_backbone = small_backbone
        assert imagenet.input_config(small_backbone("x"))[0] == 32
        run_notebook(NOTEBOOK, dict(profile="paper", n_md_tasks=2, n_hard_md_tasks=2, n_fixed_tasks=2, n_stress_tasks=2,
                                    n_property_tasks=3, steps=1, restarts=1, greedy_rounds=1, timing_repeats=1,
                                    device="cpu"))


if __name__ == "__main__":
    main()
