"""The training objective as a function of one flat parameter vector.

Influence functions differentiate the empirical risk with respect to the parameters and the
sample weights; both are easiest on a flat vector ``theta`` of shape (P,). ``Objective``
wraps any ``nn.Module`` with ``torch.func.functional_call`` so that

    loss(theta, X, y, w) = sum_i w_i l_i(theta) / sum_i w_i,
    l_i(theta) = loss_fn(f(x_i; theta), y_i) + (weight_decay / 2) ||theta||^2.

Weight decay sits inside every per-sample term: reweighting samples (Eq. 3.7) then keeps the
regulariser at full strength, sum_i g_i = 0 at the optimum as the derivation of Eq. 3.13 needs,
and the Hessian of any subset H_U includes the decay. The model's buffers (BatchNorm running
statistics) are held fixed, so models with BatchNorm must be in eval mode.

``grad``, ``hvp`` and ``hvps`` take ``batch_size``: the same sums accumulated over chunks of the
data, so that a network whose activations for the whole set would not fit holds one chunk's.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..errors import BadParameter, check_choice


def _cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _logistic(out, y):
    # binary labels in {0, 1} against one logit per sample
    return F.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype), reduction="none")


def _squared(out, y):
    return 0.5 * (out.reshape(y.shape) - y).pow(2).reshape(len(y), -1).sum(1)


LOSSES = {"cross_entropy": _cross_entropy, "logistic": _logistic, "squared": _squared}


class Objective:
    """Weighted empirical risk of ``model`` as a function of a flat parameter vector.

    model: any nn.Module (its parameters define the layout of theta; buffers stay fixed).
    loss: "cross_entropy" (y: (N,) long), "logistic" (y: (N,) in {0,1}, one logit) or
        "squared" (y shaped like the output), or a callable (out, y) -> (N,) per-sample loss.
    weight_decay: wd in (wd/2)||theta||^2, added to every per-sample loss.
    """

    def __init__(self, model: nn.Module, loss="cross_entropy", weight_decay: float = 0.0):
        if isinstance(loss, str):
            check_choice("loss", loss, tuple(LOSSES))
            loss = LOSSES[loss]
        if weight_decay < 0:
            raise BadParameter(f"weight_decay={weight_decay} must be >= 0")
        self.model, self.loss_fn, self.weight_decay = model, loss, float(weight_decay)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.buffers = dict(model.named_buffers())

    @property
    def dim(self) -> int:
        """P, the number of parameters."""
        return sum(self.sizes)

    # -- layout ------------------------------------------------------------------------
    def params(self) -> torch.Tensor:
        """The model's current parameters as a detached flat copy, (P,)."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters() if p.requires_grad]).clone()

    def unflatten(self, theta: torch.Tensor) -> dict:
        """(P,) -> {name: tensor shaped like the parameter} (views, so gradients flow)."""
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def load(self, theta: torch.Tensor) -> nn.Module:
        """Write ``theta`` (P,) into the module in place; returns the module."""
        with torch.no_grad():
            for p, t in zip((p for p in self.model.parameters() if p.requires_grad), theta.split(self.sizes)):
                p.copy_(t.view_as(p))
        return self.model

    # -- values ------------------------------------------------------------------------
    def outputs(self, theta, X) -> torch.Tensor:
        """Model outputs f(X; theta), (N, C)."""
        return functional_call(self.model, (self.unflatten(theta), self.buffers), (X,), tie_weights=False)

    def data_losses(self, theta, X, y) -> torch.Tensor:
        """Per-sample losses without the decay term, (N,): what a test point is judged by."""
        return self.loss_fn(self.outputs(theta, X), y)

    def sample_losses(self, theta, X, y) -> torch.Tensor:
        """Per-sample training losses l_i(theta) including the decay term, (N,)."""
        return self.data_losses(theta, X, y) + 0.5 * self.weight_decay * theta.pow(2).sum()

    def loss(self, theta, X, y, w=None) -> torch.Tensor:
        """Weighted mean of the per-sample losses, (); ``w`` (N,) defaults to all ones."""
        losses = self.sample_losses(theta, X, y)
        if w is None:
            return losses.mean()
        return (w * losses).sum() / w.sum()

    # -- derivatives -------------------------------------------------------------------
    def _summed(self, theta, X, y, w=None) -> torch.Tensor:
        """sum_i w_i l_i(theta): the numerator of ``loss`` on a chunk of the data."""
        losses = self.sample_losses(theta, X, y)
        return losses.sum() if w is None else (w * losses).sum()

    def _chunked(self, f, X, y, w, batch_size):
        """sum over chunks of f(X_c, y_c, w_c), divided by the whole set's total weight."""
        total = len(X) if w is None else w.sum()
        out = 0
        for i in range(0, len(X), batch_size):
            out = out + f(X[i:i + batch_size], y[i:i + batch_size], None if w is None else w[i:i + batch_size])
        return out / total

    def grad(self, theta, X, y, w=None, batch_size: int | None = None) -> torch.Tensor:
        """Gradient of ``loss``, (P,); batch_size: accumulated over chunks of that many samples."""
        if batch_size is None or len(X) <= batch_size:
            return grad(self.loss)(theta, X, y, w)
        return self._chunked(lambda Xc, yc, wc: grad(self._summed)(theta, Xc, yc, wc), X, y, w, batch_size)

    def sample_grads(self, theta, X, y, chunk_size: int | None = 256) -> torch.Tensor:
        """Per-sample gradients g_i = grad l_i(theta) (decay included), (N, P)."""
        def one(x, t):
            return grad(lambda th: self.sample_losses(th, x[None], t[None])[0])(theta)
        return vmap(one, chunk_size=chunk_size)(X, y)

    def directional_grads(self, theta, X, y, v, batch_size: int | None = None) -> torch.Tensor:
        """g_i^T v for every sample, (N,): one forward-mode pass, no (N, P) matrix of gradients.

        This is all first-order influence needs (v = H^-1 g_test), so it scales to networks
        whose per-sample gradients would not fit in memory; batch_size bounds activations.
        """
        f = lambda th, Xb, yb: jvp(lambda t: self.sample_losses(t, Xb, yb), (th,), (v,))[1]  # noqa: E731
        if batch_size is None:
            return f(theta, X, y)
        return torch.cat([f(theta, X[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(X), batch_size)])

    def test_grad(self, theta, X, y) -> torch.Tensor:
        """Gradient of the summed test losses (no decay term), (P,); X, y usually one point."""
        return grad(lambda th: self.data_losses(th, X, y).sum())(theta)

    def test_hvp(self, theta, X, y, v) -> torch.Tensor:
        """Hessian of the summed test losses (no decay term) times v, (P,)."""
        return jvp(lambda th: self.test_grad(th, X, y), (theta,), (v,))[1]

    def hvp(self, theta, X, y, v, w=None, batch_size: int | None = None) -> torch.Tensor:
        """Hessian-vector product H v as forward-over-reverse (jvp of grad), (P,) -> (P,);
        batch_size: accumulated over chunks of that many samples."""
        if batch_size is None or len(X) <= batch_size:
            return jvp(lambda th: self.grad(th, X, y, w), (theta,), (v,))[1]
        return self._chunked(lambda Xc, yc, wc: jvp(lambda th: grad(self._summed)(th, Xc, yc, wc), (theta,), (v,))[1],
                             X, y, w, batch_size)

    def hvps(self, theta, X, y, V, w=None, chunk_size: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Many products at once: V (m, P) -> (m, P), the rows being H v_j. chunk_size: rows of V per
        vmapped batch; batch_size: samples per chunk of the data (see ``hvp``)."""
        if len(V) == 1:  # vmap's overhead dominates a single small product
            return self.hvp(theta, X, y, V[0], w, batch_size)[None]
        return vmap(lambda v: self.hvp(theta, X, y, v, w, batch_size), chunk_size=chunk_size)(V)

    def hessian(self, theta, X, y, w=None, chunk_size: int | None = 32, batch_size: int | None = None) -> torch.Tensor:
        """The exact Hessian (P, P), one HVP per basis vector, symmetrised against round-off.

        chunk_size: basis vectors per vmapped batch; 16-64 is fastest on one CPU thread (larger
        batches fall out of cache), None does all P at once. batch_size: samples per chunk of the
        data (see ``hvp``): chunk_size x batch_size samples' activations are held at once.
        """
        eye = torch.eye(self.dim, dtype=theta.dtype, device=theta.device)
        H = self.hvps(theta, X, y, eye, w, chunk_size=chunk_size, batch_size=batch_size)
        return 0.5 * (H + H.T)

    def hvp_fn(self, theta, X, y, w=None, batch_size: int | None = None) -> Callable:
        """``v -> H v`` at fixed (theta, X, y, w), batched over rows: (P,) or (m, P)."""
        def apply(V):
            return (self.hvp(theta, X, y, V, w, batch_size) if V.dim() == 1
                    else self.hvps(theta, X, y, V, w, batch_size=batch_size))
        return apply


def top_eigenvalue(hvp: Callable, dim: int, steps: int = 30, method: str = "lanczos",
                   generator: torch.Generator | None = None, dtype=torch.float64, device=None) -> float:
    """Largest eigenvalue of a symmetric operator given only ``hvp`` (P,) -> (P,).

    Lanczos (default) returns the largest algebraic Ritz value after ``steps`` iterations with
    full re-orthogonalisation (stable for the few dozen steps we need); "power" runs power
    iteration, which finds the largest |eigenvalue| instead and converges more slowly.
    """
    check_choice("method", method, ("lanczos", "power"))
    v = torch.randn(dim, generator=generator, dtype=dtype, device=device)
    v = v / v.norm()
    if method == "power":
        lam = 0.0
        for _ in range(steps):
            w = hvp(v)
            lam = float(v @ w)
            v = w / w.norm()
        return lam
    return _lanczos_max(hvp, v, min(steps, dim))


def _lanczos_max(hvp, v, steps) -> float:
    Q, alphas, betas = [v], [], []
    for j in range(steps):
        w = hvp(Q[-1])
        alphas.append(float(Q[-1] @ w))
        basis = torch.stack(Q)
        w = w - basis.T @ (basis @ w)  # full re-orthogonalisation: two passes keep Q orthonormal
        w = w - basis.T @ (basis @ w)
        beta = float(w.norm())
        if beta < 1e-12 * max(1.0, abs(alphas[-1])) or j == steps - 1:
            break
        betas.append(beta)
        Q.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T)[-1])
