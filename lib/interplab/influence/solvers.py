"""Inverse-Hessian-vector products: x = (H + damping I)^-1 b.

Three ways, in order of cost and exactness:

- ``CholeskySolver``: factor H + damping I once (never an explicit inverse) and reuse the
  factor for every right-hand side; exact, needs the (P, P) Hessian.
- ``conjugate_gradient``: Krylov solve using only Hessian-vector products; exact in exact
  arithmetic, needs H + damping I positive definite.
- ``lissa``: the stochastic recursion of Agarwal et al. used by Koh & Liang,
  v_j = b + (I - (H_B + damping I) / scale) v_{j-1} with a fresh minibatch Hessian H_B at each
  step and x ~ v_J / scale, averaged over repeats. Converges only when
  scale > lambda_max(H + damping I) / 2 (in practice: scale >= lambda_max).

Right-hand sides are rows: b is (P,) or (m, P) and the answer has the same shape.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BadParameter, InterplabError


class NotPositiveDefinite(InterplabError, ValueError):
    """H + damping I is not positive definite (non-convex model, or damping too small)."""


class LissaDiverged(InterplabError, ArithmeticError):
    """The LiSSA recursion blew up: scale is below lambda_max / 2 or H + damping I is indefinite."""


class CholeskySolver:
    """Exact solves with one Cholesky factor of H + damping I, shared by every right-hand side.

    H: (P, P) symmetric. Raises ``NotPositiveDefinite`` naming the fix (raise damping).
    """

    def __init__(self, H: torch.Tensor, damping: float = 0.0):
        A = H + damping * torch.eye(len(H), dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            lam_min = float(torch.linalg.eigvalsh(A)[0])
            raise NotPositiveDefinite(
                f"H + {damping:g} I is not positive definite (smallest eigenvalue {lam_min:.3g}); "
                f"raise damping above {max(-lam_min, 0) + abs(damping):.3g} or add weight decay")
        self.L, self.damping = L, damping

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        """(P,) or (m, P) -> same shape."""
        B = b.reshape(-1, len(self.L)).T
        return torch.cholesky_solve(B, self.L).T.reshape(b.shape)


@dataclass
class CGResult:
    x: torch.Tensor         # (P,) or (m, P)
    iterations: int
    residual: torch.Tensor  # relative residual ||b - A x|| / ||b|| per right-hand side
    converged: bool


def conjugate_gradient(hvp: Callable, b: torch.Tensor, damping: float = 0.0, tol: float = 1e-10,
                       maxiter: int | None = None, precondition: Callable | None = None,
                       negative_curvature: str = "raise") -> CGResult:
    """Solve (H + damping I) x = b by (preconditioned) conjugate gradients on HVPs.

    hvp: rows (m, P) -> rows H v; each right-hand side runs its own CG (same iteration count,
        independent step sizes), so a batch costs one batched HVP per iteration.
    tol: stop when every relative residual is below tol. maxiter defaults to 10 P.
    precondition: optional rows -> rows approximation of (H + damping I)^-1, positive definite.
    negative_curvature: "raise" (``NotPositiveDefinite``) or "stop" (return the iterate reached
        so far, as truncated-Newton methods do: the solve restricted to the Krylov space explored
        before the first direction of non-positive curvature; ``converged`` is then False).
    """
    one = b.dim() == 1
    B = b.reshape(1, -1) if one else b
    maxiter = maxiter or 10 * B.shape[1]
    apply = lambda V: hvp(V) + damping * V  # noqa: E731
    prec = precondition or (lambda V: V)
    bnorm = B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
    X = torch.zeros_like(B)
    R = B.clone()
    Z = prec(R)
    D = Z.clone()
    rz = (R * Z).sum(1)
    it = 0
    for it in range(1, maxiter + 1):
        AD = apply(D)
        curv = (D * AD).sum(1)
        live = R.norm(dim=1) / bnorm > tol
        if bool((curv[live] <= 0).any()):
            if negative_curvature == "stop":
                break
            raise NotPositiveDefinite(f"conjugate gradient met non-positive curvature at iteration {it}; "
                                      f"H + {damping:g} I is indefinite: raise damping or add weight decay")
        alpha = torch.where(live, rz / curv.where(live, torch.ones_like(curv)), torch.zeros_like(rz))
        X = X + alpha[:, None] * D
        R = R - alpha[:, None] * AD
        if bool((R.norm(dim=1) / bnorm <= tol).all()):
            break
        Z = prec(R)
        rz_new = (R * Z).sum(1)
        D = Z + (rz_new / rz.where(rz != 0, torch.ones_like(rz)))[:, None] * D
        rz = rz_new
    res = (B - apply(X)).norm(dim=1) / bnorm
    X = X[0] if one else X
    return CGResult(X, it, res, bool((res <= 10 * tol).all()))


def lissa(minibatch_hvp: Callable, b: torch.Tensor, n: int, damping: float = 0.0, scale: float = 10.0,
          depth: int = 1000, repeats: int = 4, batch_size: int | None = None,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """LiSSA estimate of (H + damping I)^-1 b, (P,) or (m, P).

    minibatch_hvp(idx, V): rows (m, P) -> rows H_B v on the training samples ``idx`` (LongTensor).
    n: training-set size to sample minibatches from; batch_size None = full batch (deterministic).
    depth: recursion steps per repeat; repeats: independent recursions averaged.
    Raises ``LissaDiverged`` (telling you to raise scale) as soon as the iterate grows faster than
    the contraction allows: for a convergent recursion ||v_j|| <= (j + 1) ||b|| (up to minibatch noise).
    """
    if scale <= 0 or depth < 1 or repeats < 1:
        raise BadParameter(f"lissa needs scale > 0, depth >= 1, repeats >= 1 (got {scale}, {depth}, {repeats})")
    one = b.dim() == 1
    B = b.reshape(1, -1) if one else b
    bnorm = B.norm(dim=1).max()
    total = torch.zeros_like(B)
    for r in range(repeats):
        V = B.clone()
        for j in range(1, depth + 1):
            idx = (torch.arange(n, device=b.device) if batch_size is None
                   else torch.randint(n, (batch_size,), generator=generator).to(b.device))
            V = B + V - (minibatch_hvp(idx, V) + damping * V) / scale
            vnorm = V.norm(dim=1).max()
            if not torch.isfinite(vnorm) or vnorm > 10 * (j + 1) * bnorm:
                raise LissaDiverged(
                    f"LiSSA diverged at step {j} of repeat {r} (||v|| = {float(vnorm):.3g}, "
                    f"||b|| = {float(bnorm):.3g}); raise scale (now {scale:g}) above the top Hessian eigenvalue, "
                    f"or raise damping (now {damping:g})")
        total += V / scale
    X = total / repeats
    return X[0] if one else X
