"""Few-shot learners on frozen features, batched over padded tasks (see ``tasks.Batch``).

    ProtoNet           class means, softmax over negative squared distances (Snell et al. 2017)
    LinearHead         a linear classifier fine-tuned on the support set (Chen et al. 2019 baseline)
    NearestNeighbour   1-NN on squared Euclidean distance

Each has ``logits(batch) -> (T, Q, N)`` with absent class slots at -inf-like values;
``accuracy(learner, batch)`` gives the per-task query accuracy (T,); ``evaluate`` runs every
(extractor, learner) pair over a task list and ``summarise`` reduces it to mean +- 95 % CI.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

NEG = -1e9  # logit of a padded class slot: never predicted, never NaN


def sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., n, d), (..., m, d) -> (..., n, m) squared Euclidean distances."""
    return (a.pow(2).sum(-1, keepdim=True) - 2 * a @ b.transpose(-1, -2) + b.pow(2).sum(-1).unsqueeze(-2)).clamp_min(0)


def prototypes(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means. x (T, S, d), y (T, S), m (T, S) -> (T, N, d)."""
    onehot = F.one_hot(y, n_way).to(x.dtype) * m.unsqueeze(-1)   # (T, S, N)
    return onehot.transpose(1, 2) @ x / onehot.sum(1).clamp_min(1).unsqueeze(-1)


def _mask(logits: torch.Tensor, c_m: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~c_m.unsqueeze(1), NEG)


def proto_logits(q: torch.Tensor, protos: torch.Tensor, cosine_scale: float | None = None) -> torch.Tensor:
    """(..., Q, d), (..., N, d) -> (..., Q, N): -||q - c||^2 (Snell et al.), or with ``cosine_scale`` s
    P>M>F's cosine classifier s (cos(q, c) + b), whose learned b shifts every class alike and is dropped."""
    if cosine_scale is None:
        return -sqdist(q, protos)
    return cosine_scale * F.normalize(q, dim=-1) @ F.normalize(protos, dim=-1).transpose(-1, -2)


class ProtoNet:
    """Class means; squared Euclidean logits, or P>M>F's cosine classifier (``cosine_scale``)."""
    name = "proto"

    def __init__(self, cosine_scale: float | None = None):
        self.cosine_scale = cosine_scale

    def logits(self, b) -> torch.Tensor:
        protos = prototypes(b.s_x, b.s_y, b.s_m, b.c_m.shape[1])
        return _mask(proto_logits(b.q_x, protos, self.cosine_scale), b.c_m)


class NearestNeighbour:
    name = "1-nn"

    def logits(self, b) -> torch.Tensor:
        d = sqdist(b.q_x, b.s_x).masked_fill(~b.s_m.unsqueeze(1), math.inf)      # (T, Q, S)
        nearest = d.argmin(-1)                                                    # (T, Q)
        pred = torch.gather(b.s_y, 1, nearest)
        return _mask(F.one_hot(pred, b.c_m.shape[1]).float(), b.c_m)


class LinearHead:
    """Fine-tune a zero-initialised linear head (T, N, d) on L2-normalised support features
    with Adam; tasks are independent because Adam is per-coordinate and the loss is a sum."""
    name = "linear"

    def __init__(self, steps: int = 100, lr: float = 0.1, weight_decay: float = 1e-3, scale: float = 10.0):
        self.steps, self.lr, self.wd, self.scale = steps, lr, weight_decay, scale

    def logits(self, b) -> torch.Tensor:
        s_x, q_x = F.normalize(b.s_x, dim=-1), F.normalize(b.q_x, dim=-1)
        T, N, d = b.c_m.shape[0], b.c_m.shape[1], s_x.shape[-1]
        w = torch.zeros(T, N, d, requires_grad=True)
        bias = torch.zeros(T, 1, N, requires_grad=True)
        opt = torch.optim.Adam([w, bias], lr=self.lr, weight_decay=self.wd)
        weight = b.s_m.float() / b.s_m.sum(1, keepdim=True)                   # mean over each task's support
        with torch.enable_grad():
            for _ in range(self.steps):
                out = _mask(self.scale * s_x @ w.transpose(1, 2) + bias, b.c_m)
                loss = (F.cross_entropy(out.transpose(1, 2), b.s_y, reduction="none") * weight).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return _mask(self.scale * q_x @ w.transpose(1, 2) + bias, b.c_m)


LEARNERS = {"proto": ProtoNet, "linear": LinearHead, "1-nn": NearestNeighbour}


@torch.no_grad()
def accuracy(learner, b) -> np.ndarray:
    """Per-task query accuracy (T,) in percent."""
    hit = (learner.logits(b).argmax(-1) == b.q_y) & b.q_m
    return (100.0 * hit.sum(1) / b.q_m.sum(1)).numpy()


def mean_ci(acc) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (normal approximation, as in MD)."""
    acc = np.asarray(acc, dtype=float)
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else 0.0


def evaluate(tasks, features: dict, y: np.ndarray, learners=("proto", "linear", "1-nn"), chunk: int = 100,
             cosine: dict | None = None):
    """Accuracy of every (extractor, learner) on every task.

    features: extractor name -> (n, d) frozen features of the pool. Returns a DataFrame with
    columns extractor, learner, task, accuracy (percent). Tasks go in chunks to bound padding.
    cosine: extractor name -> the scale of its own cosine ProtoNet head (P>M>F's), used for "proto".
    """
    import pandas as pd
    from .tasks import collate
    rows = []
    for name, feats in features.items():
        batches = [collate(tasks[i:i + chunk], feats, y) for i in range(0, len(tasks), chunk)]
        for ln in learners:
            learner = ProtoNet((cosine or {}).get(name)) if ln == "proto" else LEARNERS[ln]()
            acc = np.concatenate([accuracy(learner, b) for b in batches])
            rows += [dict(extractor=name, learner=ln, task=i, accuracy=float(a)) for i, a in enumerate(acc)]
    return pd.DataFrame(rows)


def summarise(df, by=("extractor", "learner")):
    """Mean accuracy and 95 % CI half-width (columns mean, ci95, n) per group of an ``evaluate`` frame."""
    import pandas as pd
    rows = []
    for key, g in df.groupby(list(by), sort=False):
        m, ci = mean_ci(g["accuracy"])
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), mean=m, ci95=ci, n=len(g)))
    return pd.DataFrame(rows)
