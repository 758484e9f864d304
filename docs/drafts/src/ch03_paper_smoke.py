"""Run notebooks/ch03_influence_functions.ipynb's paper profile end to end offline (development check, not a
result): a fake MNIST of noise digits in torchvision's raw IDX files (300 training, 60 test images), the two small
architectures of Table 3.1 and short training; for §3.10.4 a fake ImageNet folder (2 classes of noise JPEGs) and
torchvision's ResNet-50 with random weights.

    OMP_NUM_THREADS=2 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch03_paper_smoke.py

Slow on a CPU: on 2026-12-05 it ran Figs 3.1-3.4 through the paper branch (MNIST from torchvision's files) without an
error in 25 min and was stopped in Fig 3.5's exact-Hessian studies; the appendix MLP's group refits dominate.
``--from-fig35`` runs the setup cells and then only Fig 3.5, Table 3.1, §3.10.4 and Table 11.1 (the fake MNIST then
has the 5500 training images of the small-CNN study). With the exact path for the small CNN (2506 parameters, float64
L-BFGS on 5500 images) that ran 45 min on one thread inside the first cell's fits (2026-12-05, stopped);
``--budget-path`` sets ``exact_max_params`` to 1000 and one weight decay (0.01), so every net takes the paper's path for
large nets (minibatch Adam, CG on Hessian-vector products, budgeted SGD refits). The overrides keep the paper's code
paths at smoke size: fewer points than the text's 40 / 100, short no-decay budgets, small gradient / HVP chunks and
refit batches so that the chunked paths run.
"""
import sys
import struct
import tempfile
from pathlib import Path

import numpy as np

from interplab import datasets, imagenet
from interplab.models import classifiers
from smoke import run_notebook

NOTEBOOK = Path(__file__).parents[3] / "notebooks" / "ch03_influence_functions.ipynb"


def idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (big-endian dims after a 0x08 ubyte magic), as MNIST ships."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n_train: int = 300) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", 60)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(y):      # a class-dependent bar, so the models have something to learn
            x[i, 4 + 2 * c: 6 + 2 * c, 4:24] = 120
        y = np.where(rng.random(n) < 0.2, rng.integers(0, 10, n), y)   # and some test points to get wrong
        idx(raw / f"{prefix}-images-idx3-ubyte", x)
        idx(raw / f"{prefix}-labels-idx1-ubyte", y)


def fake_imagenet(root: Path) -> None:
    """Two classes of noise JPEGs in ImageNet's folder layout (4 training and 2 validation images each)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = root / "imagenet"
    folder.mkdir()
    (folder / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    for split, n in (("train", 4), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            (folder / split / wnid).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / split / wnid / f"{i}.JPEG")


def main():
    fig35 = "--from-fig35" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        fake_mnist(Path(tmp), 6000 if fig35 else 300)
        datasets.TORCHVISION_ROOT = Path(tmp)
        fake_imagenet(Path(tmp))
        imagenet.ROOT = Path(tmp)
        random_resnet50 = classifiers.imagenet_resnet50
        classifiers.imagenet_resnet50 = lambda: random_resnet50(pretrained=False)   # no torchvision weights offline
        run_notebook(NOTEBOOK, dict(profile="paper", device="cpu", paper_models=["small_cnn", "lenet"],
                                    train_steps=50, retrain_steps=10, n_groups=6, fig32_groups=4, nn_groups=2,
                                    iris_seeds=1, iris_depths=[1, 2], iris_widths=[8], imagenet_val=4, n_candidates=2,
                                    imagenet_epochs=1.0, imagenet_batch=4, lissa_depth=2, lissa_batch=2, lissa_scale=1e7,
                                    top_k=4, fig35_k=3, nodecay_iters=20, nodecay_retrain=10, grad_batch=16, refit_rows=2,
                                    **(dict(exact_max_params=1000, cnn_wd=0.01, wd_sweep=[0.01]) if "--budget-path" in sys.argv
                                       else dict(wd_sweep=[0.001, 0.01]))),
                     cells=[1, 2, 17, 18, 19, 22, 24, 26, 28] if fig35 else None)


if __name__ == "__main__":
    main()
