"""Influence of removing training points on the parameters and on a test loss.

Notation (Chapter 3): n training points, per-sample gradients g_i (decay included, so they sum
to zero at theta*), H = (1/n) sum_i Hess l_i, a group U of k points, p = k / n,
H_U = (1/k) sum_{i in U} Hess l_i, and g_t the gradient of the test loss.

Up-weighting U by eps while down-weighting the rest by p eps / (1 - p) (Eq. 3.7) moves the
optimum by theta_U^eps - theta* = eps theta1 + eps^2 theta2 + O(eps^3) with

    theta1 = -(1 / (1 - p)) (1 / n) H^-1 sum_{i in U} g_i                       (Eq. 3.12)
    theta2 = (p / (1 - p)) (I - H^-1 H_U) theta1                                (Eq. 3.15)

(matching orders in the stationarity condition Eq. 3.10: order eps gives
H theta1 = -(1/(1-p)) (1/n) sum_U g_i; order eps^2 gives
H theta2 = (p/(1-p)) H theta1 - (1/(1-p)) (k/n) H_U theta1, third derivatives dropped).
Removing U is eps = -1, so

    first order:  d_theta = -theta1
    second order: d_theta = -theta1 + theta2     (Eq. 3.16 is written for eps = +1)

and the test-loss change is g_t^T d_theta. A single point is the group k = 1:
d_theta = H^-1 g_i / (n - 1), Koh & Liang's -I(z, z_t) / n up to n vs n - 1.

``solve`` arguments are callables rows (m, P) -> rows (H + damping I)^-1 b, e.g. a
``solvers.CholeskySolver`` or a wrapped CG; they are shared by every group and test point.
"""
from typing import Callable

import torch
from torch.func import jvp, vmap

from ..errors import BadParameter
from .objective import Objective


def group_mask(groups, n: int) -> torch.Tensor:
    """Validate groups and return them as a (m, n) boolean mask.

    groups: a (m, n) boolean mask or a list of index sequences into the n training points.
    Raises ``BadParameter`` for empty groups, indices out of range, repeated indices, or a
    group holding every point (p = 1, where 1 / (1 - p) is undefined).
    """
    if isinstance(groups, torch.Tensor) and groups.dtype == torch.bool:
        if groups.dim() != 2 or groups.shape[1] != n:
            raise BadParameter(f"group mask has shape {tuple(groups.shape)}; expected (m, {n})")
        mask = groups
    else:
        mask = torch.zeros(len(groups), n, dtype=torch.bool)
        for j, idx in enumerate(groups):
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise BadParameter(f"group {j} has index {int(idx.max()) if int(idx.max()) >= n else int(idx.min())} "
                                   f"outside the training set [0, {n})")
            if len(torch.unique(idx)) != len(idx):
                raise BadParameter(f"group {j} repeats an index; groups are sets of training points")
            mask[j, idx] = True
    sizes = mask.sum(1)
    if len(mask) == 0 or bool((sizes == 0).any()):
        raise BadParameter("an empty group has no influence; every group needs at least one training point")
    if bool((sizes == n).any()):
        raise BadParameter("a group holds the whole training set (p = 1); removal leaves nothing to fit")
    return mask


# -- single points ----------------------------------------------------------------------
def individual_influence(G: torch.Tensor, s_test: torch.Tensor) -> torch.Tensor:
    """I(z_i, z_t) = -g_t^T H^-1 g_i (Eq. 3.21) for every training point.

    G: (n, P) per-sample gradients; s_test: (P,) = H^-1 g_t (one solve shared by all points).
    Returns (n,): the derivative of the test loss when z_i is up-weighted.
    """
    return -(G @ s_test)


def loo_effects(G: torch.Tensor, s_test: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Predicted change of the test loss when each row's point is removed: g_i^T s_test / (n - 1).

    G: (m, P) per-sample gradients (all n training points unless ``n`` is given); s_test: (P,).
    """
    return (G @ s_test) / ((len(G) if n is None else n) - 1)


def loo_param_changes(g_removed: torch.Tensor, solve: Callable, n: int) -> torch.Tensor:
    """Predicted parameter change H^-1 g_i / (n - 1) for removing each point, (m, P).

    g_removed: (m, P) gradients of the points removed one at a time; n: training-set size.
    """
    return solve(g_removed) / (n - 1)


# -- groups -----------------------------------------------------------------------------
def _theta1(G, mask, solve):
    """theta1 of Eq. 3.12 for every group: (m, P), plus p (m,)."""
    n = len(G)
    maskf = mask.to(G.dtype)
    p = maskf.sum(1) / n
    summed = maskf @ G                                    # (m, P): sum_{i in U} g_i
    return -solve(summed) / ((1 - p) * n)[:, None], p


def _group_hvps(obj, theta, X, y, mask, V):
    """Rows H_U v for each group U and row v of V: (m, P). H_U averages over U (decay included)."""
    W = mask.to(V.dtype)
    return vmap(lambda w, v: obj.hvp(theta, X, y, v, w))(W, V)


def group_param_changes(obj: Objective, theta, X, y, groups, solve: Callable, G=None):
    """Predicted parameter change when each group is removed, first and second order.

    Returns (first, second), each (m, P): first = -theta1, second = -theta1 + theta2.
    G: (n, P) per-sample gradients at theta (computed if None).
    """
    G = obj.sample_grads(theta, X, y) if G is None else G
    mask = group_mask(groups, len(G)).to(G.device)
    t1, p = _theta1(G, mask, solve)
    t2 = (p / (1 - p))[:, None] * (t1 - solve(_group_hvps(obj, theta, X, y, mask, t1)))
    return -t1, -t1 + t2


def group_effects(obj: Objective, theta, X, y, groups, g_test, solve: Callable, G=None, order: int = 2):
    """Predicted change of one test loss when each group is removed, first and second order.

    g_test: (P,) test-loss gradient. Returns (first, second), each (m,); second is None when
    order == 1. One solve s = H^-1 g_t serves every group's first-order term (no per-group
    solve); the second-order term needs theta1 per group (one batched solve) and, through
    g_t^T H^-1 H_U theta1 = s^T H_U theta1, no second one.
    """
    if order not in (1, 2):
        raise BadParameter(f"order={order}; group influence is implemented to order 1 or 2")
    G = obj.sample_grads(theta, X, y) if G is None else G
    mask = group_mask(groups, len(G)).to(G.device)
    n = len(G)
    p = mask.sum(1).to(G.dtype) / n
    s = solve(g_test)
    first = (mask.to(G.dtype) @ (G @ s)) / ((1 - p) * n)  # g_t^T (-theta1)
    if order == 1:
        return first, None
    t1, _ = _theta1(G, mask, solve)
    curv = (_group_hvps(obj, theta, X, y, mask, t1) @ s)  # s^T H_U theta1
    second = first + (p / (1 - p)) * (t1 @ g_test - curv)
    return first, second


def group_effects_full(obj: Objective, theta, X, y, groups, x_test, y_test, solve: Callable, G=None):
    """Complete second-order prediction of the test-loss change on removing each group, (m,).

    Not in the dissertation: Theorem 1 drops the third-derivative term of the eps^2 equation
    and Eq. 3.16 the curvature of the test loss, although both are of the same order as
    theta2. Keeping them,

        theta2_full = theta2 - (1/2) H^-1 T[theta1, theta1]
        d_loss      = g_t^T (-theta1 + theta2_full) + (1/2) theta1^T H_t theta1,

    where T[v, v] = d/dt H(theta + t v) v is one forward-mode pass over an HVP per group, and
    g_t^T H^-1 T[v, v] = s^T T[v, v] again needs no extra solve.
    x_test, y_test: one test point, batch of 1 (its loss without the decay term).
    """
    G = obj.sample_grads(theta, X, y) if G is None else G
    mask = group_mask(groups, len(G)).to(G.device)
    g_test = obj.test_grad(theta, x_test, y_test)
    _, second = group_effects(obj, theta, X, y, mask, g_test, solve, G=G)
    t1, _ = _theta1(G, mask, solve)
    s = solve(g_test)
    third = vmap(lambda v: jvp(lambda th: obj.hvp(th, X, y, v), (theta,), (v,))[1])(t1)
    test_curv = (vmap(lambda v: obj.test_hvp(theta, x_test, y_test, v))(t1) * t1).sum(1)
    return second - 0.5 * (third @ s) + 0.5 * test_curv


# -- choosing a group -------------------------------------------------------------------
def select_group(obj: Objective, theta, X, y, g_test, k: int, solve: Callable, G=None, order: int = 2,
                 steps: int = 100, lr: float | None = None) -> torch.Tensor:
    """The k training points whose joint removal most increases the test loss (appendix 11.1).

    Order 1 is linear in the group indicator, so its optimum is the top-k of g_i^T H^-1 g_t.
    Order 2 relaxes the indicator to weights w in [0, 1]^n with sum w = k, runs projected
    gradient ascent on the second-order effect from the first-order choice, and rounds to the
    top-k weights. Returns (k,) sorted indices.
    """
    G = obj.sample_grads(theta, X, y) if G is None else G
    n = len(G)
    if not 0 < k < n:
        raise BadParameter(f"k={k} must satisfy 0 < k < n={n}")
    s = solve(g_test)
    scores = G @ s
    start = torch.topk(scores, k).indices
    if order == 1:
        return start.sort().values
    p = k / n
    w = torch.zeros(n, dtype=G.dtype, device=G.device)
    w[start] = 1.0

    def effect(w):
        t1 = -solve((w @ G)[None])[0] / ((1 - p) * n)
        curv = obj.hvp(theta, X, y, t1, w) @ s
        return -(t1 @ g_test) + (p / (1 - p)) * (t1 @ g_test - curv)

    lr = lr or float(k) / float(torch.autograd.functional.jacobian(effect, w).norm())
    for _ in range(steps):
        w = w.detach().requires_grad_(True)
        (step,) = torch.autograd.grad(effect(w), w)
        w = project_capped_simplex(w.detach() + lr * step, k)
    return torch.topk(w, k).indices.sort().values


def project_capped_simplex(v: torch.Tensor, k: float, iters: int = 60) -> torch.Tensor:
    """Euclidean projection of v (n,) onto {w : 0 <= w <= 1, sum w = k}, by bisection on the shift."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((v - mid).clamp(0, 1).sum()) > k:
            lo = mid
        else:
            hi = mid
    return (v - 0.5 * (lo + hi)).clamp(0, 1)
