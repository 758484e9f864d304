"""Influence where the training set does not fit in memory (§3.10.4: ResNet-50 on ImageNet).

The data are read by index, ``sample(idx) -> (X, y)`` for a LongTensor of training indices, so an
image folder serves as well as a tensor; nothing holds more than one minibatch.

    loo_effects_streamed(obj, theta, sample, n, s_test)   predicted leave-one-out change of the test loss
                                                          for every training point, (n,)
    minibatch_hvp(obj, theta, sample)                     the ``minibatch_hvp(idx, V)`` that ``lissa`` reads
    sgd_sampled(obj, theta0, sample, n, removed, steps)   heavy-ball SGD from theta*, one parameter row per
                                                          removal (an empty removal: the drift of retraining)
"""
import torch
from tqdm.auto import tqdm

from .objective import Objective


def loo_effects_streamed(obj: Objective, theta: torch.Tensor, sample, n: int, s_test: torch.Tensor,
                         batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """g_i^T s_test / (n - 1) for every training point i < n, read in order in batches: (n,)."""
    out = []
    for i in tqdm(range(0, n, batch_size), desc="influence over the training set", disable=not progress, leave=False):
        X, y = sample(torch.arange(i, min(n, i + batch_size)))
        out.append(obj.directional_grads(theta, X, y, s_test))
    return torch.cat(out) / (n - 1)


def minibatch_hvp(obj: Objective, theta: torch.Tensor, sample):
    """(idx, V (m, P)) -> H_B V (m, P) on the training points ``idx`` that ``sample`` loads (for ``lissa``)."""
    def hvp(idx, V):
        X, y = sample(idx.cpu())
        return obj.hvps(theta, X, y, V)
    return hvp


def sgd_sampled(obj: Objective, theta0: torch.Tensor, sample, n: int, removed, steps: int, lr: float = 0.02,
                momentum: float = 0.9, batch_size: int = 256, generator: torch.Generator | None = None,
                progress: bool = True) -> torch.Tensor:
    """``steps`` of heavy-ball SGD from theta0 for every removal at once: (len(removed), P).

    removed: one list of training indices per row (``[]`` keeps every point). Every row reads the same
    minibatch, drawn afresh each step, with the removed points weighted 0: ``retrain.sgd`` with the data
    read by index (same draws from the same generator), one row at a time so that a ResNet-50's
    activations are held for one row only.
    """
    Theta = theta0.detach().expand(len(removed), -1).clone()
    velocity = torch.zeros_like(Theta)
    removed = [torch.as_tensor(list(r), dtype=torch.long) for r in removed]
    for _ in tqdm(range(steps), desc=f"retraining {len(removed)} rows", disable=not progress, leave=False):
        idx = torch.randint(n, (batch_size,), generator=generator)
        X, y = sample(idx)
        for r, rem in enumerate(removed):
            w = (~torch.isin(idx, rem)).to(Theta.dtype).to(X.device) + 1e-12  # + tiny: a batch of removed points
            velocity[r] = momentum * velocity[r] + obj.grad(Theta[r], X, y, w)
            Theta[r] = Theta[r] - lr * velocity[r]
    return Theta
