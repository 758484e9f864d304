"""Agreement between estimated and actual effects (section 3.10: Pearson and Spearman)."""
import numpy as np
import torch
from scipy import stats


def _np(x) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64).ravel()


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length vectors; nan if either is constant."""
    a, b = _np(a), _np(b)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a, b) -> float:
    """Spearman rank correlation (ties averaged); nan if either is constant."""
    a, b = _np(a), _np(b)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def mean_abs_error(estimate, truth) -> float:
    """Mean |estimate - truth|: how far the points lie from y = x."""
    return float(np.abs(_np(estimate) - _np(truth)).mean())


def relative_error(estimate, truth) -> float:
    """||estimate - truth|| / ||truth||."""
    e, t = _np(estimate), _np(truth)
    return float(np.linalg.norm(e - t) / max(np.linalg.norm(t), np.finfo(float).tiny))
