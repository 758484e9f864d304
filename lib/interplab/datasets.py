"""Datasets of the tiny and paper profiles, as float64 tensors with seeded splits.

Tiny (no download): generated Gaussians (Fig 3.1 and the optimal-group appendix), and
scikit-learn's bundled Iris and 8x8 digits. Paper: MNIST and CIFAR-10 through torchvision with
``download=False``; when the files are absent the error says what to fetch and where.

Every loader returns a ``Split``: X (N, ...) float64, y (N,) long, X_test, y_test, standardised
with statistics of the training part only.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import paths
from .errors import check_choice, resource_unavailable

DTYPE = torch.float64


@dataclass
class Split:
    X: torch.Tensor       # (n, ...) training inputs
    y: torch.Tensor       # (n,) long labels
    X_test: torch.Tensor  # (m, ...)
    y_test: torch.Tensor  # (m,)
    name: str

    @property
    def n(self) -> int:
        return len(self.X)

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y, self.y_test]).max()) + 1


def _tensor(a, dtype=DTYPE):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _split(X, y, n_train, seed, name, n_test=None, per_feature=True) -> Split:
    """Shuffle with ``seed``, take n_train for training and (up to n_test of) the rest for testing,
    and standardise with training statistics: per feature (constant features keep std 1), or
    with one global mean and std when ``per_feature`` is False."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    tr, te = order[:n_train], order[n_train:]
    te = te[:n_test] if n_test else te
    axis = 0 if per_feature else None
    mean, std = X[tr].mean(axis), X[tr].std(axis)
    std = np.where(std == 0, 1.0, std)
    X = (X - mean) / std
    return Split(_tensor(X[tr]), _tensor(y[tr], torch.long), _tensor(X[te]), _tensor(y[te], torch.long), name)


def gaussian_classes(n_train: int = 10_000, n_test: int = 1_000, d: int = 5, separation: float = 1.0,
                     seed: int = 0) -> Split:
    """Two Gaussian classes in d dimensions (Fig 3.1): x ~ N(+-(separation / 2) u, I), u a random unit vector.

    The Bayes error is Phi(-separation / 2) (31 % at 1.0): plenty of misclassified test points
    to choose from. Standardised afterwards like every split.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, 2, n)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    X = rng.standard_normal((n, d)) + np.outer(y - 0.5, direction) * separation
    return _split(X, y, n_train, seed, "gaussian_classes")


def gaussian_blobs(n_train: int = 20_000, n_test: int = 1_000, d: int = 5, centers: int = 4,
                   cluster_std: float = 1.5, seed: int = 0) -> Split:
    """Isotropic Gaussian blobs (the optimal-group-selection appendix: 20,000 points, 4 blobs, 5 features)."""
    from sklearn.datasets import make_blobs

    X, y = make_blobs(n_train + n_test, n_features=d, centers=centers, cluster_std=cluster_std, random_state=seed)
    return _split(X, y, n_train, seed, "gaussian_blobs")


def iris(n_train: int = 120, seed: int = 0) -> Split:
    """scikit-learn's bundled Iris: 150 points, 4 features, 3 classes."""
    from sklearn.datasets import load_iris

    data = load_iris()
    return _split(data.data, data.target, n_train, seed, "iris")


def digits(n_train: int = 1000, seed: int = 0, image: bool = False, n_test: int | None = None) -> Split:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), the tiny MNIST.

    image=False: (N, 64) with each pixel standardised (for linear models); image=True:
    (N, 1, 8, 8) scaled by one global mean and std so the spatial structure survives (for CNNs).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    X, y = data.data.astype(np.float64), data.target
    s = _split(X, y, n_train, seed, "digits", n_test, per_feature=not image)
    if image:
        s.X, s.X_test = s.X.view(-1, 1, 8, 8), s.X_test.view(-1, 1, 8, 8)
    return s


# -- paper profile ----------------------------------------------------------------------
TORCHVISION_ROOT = paths.DATA / "torchvision"


def torchvision_dataset(name: str, root=None, seed: int = 0, n_train: int | None = None,
                        n_test: int | None = None) -> Split:
    """MNIST or CIFAR-10 from ``data/torchvision`` (never downloaded here), standardised per channel.

    n_train: take a seeded subset (e.g. 10 % of MNIST for the small-CNN study); None = all.
    """
    check_choice("name", name, ("mnist", "cifar10"))
    import torchvision

    root = Path(root or TORCHVISION_ROOT)
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as e:
        raise resource_unavailable(
            f"{name} ({cls.__name__})",
            f"download it once with torchvision.datasets.{cls.__name__}('{root}', download=True) "
            f"on a machine with internet and copy {root} here") from e
    X, Xt = (np.asarray(d.data, dtype=np.float64) / 255.0 for d in (train, test))
    y, yt = np.asarray(train.targets), np.asarray(test.targets)
    X, Xt = (a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2) for a in (X, Xt))
    axes = (0, 2, 3)
    mean, std = X.mean(axes, keepdims=True), X.std(axes, keepdims=True)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(X))[:n_train] if n_train else np.arange(len(X))
    te = rng.permutation(len(Xt))[:n_test] if n_test else np.arange(len(Xt))
    return Split(_tensor((X[tr] - mean) / std), _tensor(y[tr], torch.long), _tensor((Xt[te] - mean) / std),
                 _tensor(yt[te], torch.long), name)
