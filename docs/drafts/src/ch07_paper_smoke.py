"""Run notebooks/ch07_rep_decompose.ipynb's paper profile end to end offline (development check, not a result):
the real architectures with random weights (vit_encoders.build), a fake ImageNet / Waterbirds tree of noise
JPEGs in the released layouts, and hashed random unit vectors for the open_clip text towers (1000 class names x 80
templates through ViT-L/14's text tower take too long on a CPU).

    OMP_NUM_THREADS=2 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch07_paper_smoke.py
"""
import csv
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from interplab import imagenet
from interplab.models import vit_encoders
from smoke import run_notebook

NOTEBOOK = Path(__file__).parents[3] / "notebooks" / "ch07_rep_decompose.ipynb"


def noise_jpeg(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)


def fake_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(1000)]
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}, alias\n" for i, w in enumerate(wnids)))
    for split, per in (("train", 2), ("val", 2)):
        for w in wnids[:12]:
            for j in range(per):
                noise_jpeg(root / "imagenet" / split / w / f"{w}_{j}.JPEG", rng)
    for name, n in (("corr-0.9", 20), ("uncorr", 12)):
        rows = []
        for i in range(n):
            y, place = i % 2, (i // 2) % 2
            rows.append(dict(img_filename=f"img_{i}.jpg", y=y, place=place))
            noise_jpeg(root / "waterbirds" / name / f"img_{i}.jpg", rng)
        with open(root / "waterbirds" / name / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["img_filename", "y", "place"])
            writer.writeheader()
            writer.writerows(rows)


def hashed_text(model, tokenizer, phrases, templates=("{}",)) -> torch.Tensor:
    d = model.text_projection.shape[1]
    seeds = [int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) for p in phrases]
    return F.normalize(torch.stack([torch.randn(d, generator=torch.Generator().manual_seed(s)) for s in seeds]), dim=-1)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        fake_data(Path(tmp))
        imagenet.ROOT = Path(tmp)
        imagenet.text_embeddings = hashed_text
        vit_encoders.load = lambda name, device="cpu", **kw: vit_encoders.build(name, **kw).to(device)
        run_notebook(NOTEBOOK, dict(profile="paper", models=["deit", "dino", "dinov2", "swin", "maxvit", "clip"],
                                    n_train=16, n_images=12, n_ablation=12, n_heatmap=2, n_segment=2, lambdas=[1.0],
                                    n_head_train=8, n_retrieval=12, dinov2_size=224, device="cpu"))


if __name__ == "__main__":
    main()
