"""Selecting difficult support sets: FastDiffSel (Algorithm 1, Eqs. 4.1-4.3) and greedy search.

Both receive the query set Q, the search pool P = D' - Q of the task's N classes, frozen
features f(x) and the shots k_j, and return the support set that (approximately) maximises
the ProtoNet query loss

    L(w) = sum_{(x, y) in Q} -log softmax_j(-||f(x) - c_j||^2)[y],   c_j = sum_i w_j^i f(x_j^i) / sum_i w_j^i

(Eq. 4.1, binary w with ||w_j||_0 <= k_j). FastDiffSel relaxes it: positive random w, ``steps``
gradient ascent steps of size ``alpha`` each followed by the per-class projection onto the
l1 ball {||w_j||_1 <= k_j} (Eq. 4.2, solved through its dual Eq. 4.3 / 11.1-11.6:
soft-thresholding at the multiplier lambda_j found by sorting), then the k_j largest weights.
The dissertation uses one step with alpha = 200 (appendix 11.3); ``steps`` exposes more, and
``nonneg`` (default) keeps w >= 0 between steps (identical selections for one step). The
gradient is computed in closed form (``loss_and_grad``; equal to autograd, tested) because a
per-task timing on a CPU otherwise measures autograd's overhead, not the algorithm.

Pools are padded to (T, N, P): pool_x (T, N, P, d), pool_m (T, N, P) valid, shots (T, N) with
0 for padded class slots; q_x (T, Q, d), q_y (T, Q), q_m (T, Q).
"""
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .learners import NEG, sqdist
from .tasks import Task, search_pool


# ------------------------------------------------------------------------------ projection
def project_l1(v: torch.Tensor, radius: torch.Tensor, mask: torch.Tensor | None = None):
    """Euclidean projection of each row of v (..., P) onto {w : ||w||_1 <= radius} (...,).

    Dual (Eq. 11.1): w(lambda) = sign(v) max(|v| - lambda, 0) (Eq. 11.4) and lambda* >= 0 is
    the root of sum_i (|v_i| - lambda)_+ = radius (Eq. 11.6), 0 when v is already inside.
    The root is exact: with u = |v| sorted descending, lambda* = (sum_{i<=rho} u_i - radius) / rho
    for the largest rho with u_rho > (sum_{i<=rho} u_i - radius) / rho (Duchi et al. 2008).
    Masked entries count as 0 and stay 0. Returns (w (..., P), lambda (...,)).
    """
    a = v.abs() if mask is None else v.abs() * mask
    radius = torch.as_tensor(radius, dtype=v.dtype).expand(a.shape[:-1])
    u = a.sort(-1, descending=True).values
    css = u.cumsum(-1)
    j = torch.arange(1, a.shape[-1] + 1, dtype=v.dtype)
    cand = (css - radius.unsqueeze(-1)) / j
    rho = ((u > cand).to(v.dtype) * j).argmax(-1, keepdim=True)  # last index where the test holds
    # inside the ball every u_i > cand_i, so rho is the last index and cand <= 0: clamping gives 0
    lam = torch.gather(cand, -1, rho).squeeze(-1).clamp_min(0)
    w = torch.sign(v) * (a - lam.unsqueeze(-1)).clamp_min(0)
    return w, lam


# ------------------------------------------------------------------------------ objective
def _protos(w, pool_x, pool_m):
    """Weighted prototypes (T, N, d) and their normalisers (T, N); an empty slot gets 0 / 1."""
    w = w * pool_m
    denom = w.sum(-1)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    return (w.unsqueeze(-2) @ pool_x).squeeze(-2) / denom.unsqueeze(-1), denom


def query_loss(w, pool_x, pool_m, q_x, q_y, q_m) -> torch.Tensor:
    """Eq. 4.1 per task (T,): summed ProtoNet cross-entropy of Q against the w-weighted prototypes."""
    protos, _ = _protos(w, pool_x, pool_m)
    logits = (-sqdist(q_x, protos)).masked_fill(~pool_m.any(-1).unsqueeze(1), NEG)
    ce = F.cross_entropy(logits.transpose(1, 2), q_y, reduction="none")
    return (ce * q_m).sum(-1)


def loss_and_grad(w, pool_x, pool_m, q_x, q_y, q_m, ctx=None):
    """(L (T,), dL/dw (T, N, P)) in closed form; equals autograd on ``query_loss`` (tested), at a
    fraction of its overhead, which is what a per-task timing on a CPU measures.

    With E = q_m (softmax - onehot) (T, Q, N) and logit_qj = -||q - c_j||^2:
    dL/dc_j = sum_q E_qj 2 (q - c_j);  dL/dw_i = (x_i - c_j) . dL/dc_j / sum_i w_j^i  for i in P_j.
    ``ctx`` caches what does not depend on w (see ``_context``) across ascent steps.
    """
    target, bias = ctx or _context(pool_m, q_x, q_y, q_m)
    protos, denom = _protos(w, pool_x, pool_m)
    # -||q - c||^2 without ||q||^2, which shifts each query's logits equally (softmax-invariant)
    logits = 2 * q_x @ protos.transpose(1, 2) - protos.pow(2).sum(-1).unsqueeze(1) + bias  # (T, Q, N)
    logp = logits.log_softmax(-1)
    loss = -(logp * target).sum((1, 2))
    err = logp.exp() * target.sum(-1, keepdim=True) - target                            # (T, Q, N)
    g_c = 2 * (err.transpose(1, 2) @ q_x - err.sum(1).unsqueeze(-1) * protos)          # (T, N, d)
    g_w = (pool_x @ g_c.unsqueeze(-1)).squeeze(-1) - (protos * g_c).sum(-1, keepdim=True)
    return loss, g_w * pool_m / denom.unsqueeze(-1)


def _context(pool_m, q_x, q_y, q_m):
    """w-independent pieces: masked one-hot targets (T, Q, N), absent-class bias (T, 1, N)."""
    n = pool_m.shape[1]
    target = F.one_hot(q_y, n).to(q_x.dtype) * q_m.unsqueeze(-1)
    bias = torch.zeros(pool_m.shape[0], 1, n, dtype=q_x.dtype).masked_fill(~pool_m.any(-1).unsqueeze(1), NEG)
    return target, bias


# ------------------------------------------------------------------------------ rounding
def top_k(w_bar, w_hat, pool_m, shots) -> torch.Tensor:
    """Boolean (T, N, P): per class the k_j largest w_bar. Ties (soft-thresholding zeroes many
    weights) break by the pre-projection w_hat, then by the lower pool position."""
    lowest = torch.finfo(w_bar.dtype).min
    w_bar, w_hat = w_bar.masked_fill(~pool_m, lowest), w_hat.masked_fill(~pool_m, lowest)
    by_hat = torch.sort(w_hat, dim=-1, descending=True, stable=True).indices
    second = torch.sort(torch.gather(w_bar, -1, by_hat), dim=-1, descending=True, stable=True).indices
    order = torch.gather(by_hat, -1, second)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return (rank < shots.unsqueeze(-1)) & pool_m


# ------------------------------------------------------------------------------ FastDiffSel
@dataclass
class Selection:
    chosen: torch.Tensor        # (T, N, P) bool: the selected support set
    weights: torch.Tensor       # (T, N, P) the final projected weights w_bar
    trace: list                 # summed query loss L(w) before each step (+ after the last if track)
    seconds: float


def fastdiffsel(pool_x, pool_m, shots, q_x, q_y, q_m, alpha: float = 200.0, steps: int = 1,
                maximize: bool = True, seed: int = 0, nonneg: bool = True, track: bool = False) -> Selection:
    """Algorithm 1, batched over tasks (they are independent: the loss is a sum over tasks).

    steps: ascent + projection rounds (1 in the dissertation). nonneg: keep w >= 0, i.e. project
    onto {w >= 0, ||w_j||_1 <= k_j}, the relaxation of w in {0, 1}; with one step from a positive
    init it selects exactly what the signed l1 ball selects (soft-thresholding keeps the order),
    and with more steps it stops sum_i w_j^i from crossing 0, where the weighted prototype
    explodes. maximize=False descends instead: the 'easy' tasks of Fig 4.5. track: record L(w)
    after the last projection too (costs one more forward).
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(pool_m.shape, generator=g, dtype=pool_x.dtype) * pool_m   # positive random init
    sign = 1.0 if maximize else -1.0
    radius = shots.to(pool_x.dtype)
    trace = []
    ctx = _context(pool_m, q_x, q_y, q_m)
    for _ in range(steps):
        loss, grad = loss_and_grad(w, pool_x, pool_m, q_x, q_y, q_m, ctx)
        trace.append(loss)
        w_hat = (w + sign * alpha * grad) * pool_m
        w, _ = project_l1(w_hat.clamp_min(0) if nonneg else w_hat, radius, pool_m)
    if track:
        trace.append(query_loss(w, pool_x, pool_m, q_x, q_y, q_m))
    chosen = top_k(w, w_hat, pool_m, shots)
    seconds = time.perf_counter() - t0
    return Selection(chosen, w, [float(l.sum()) for l in trace], seconds)


# ------------------------------------------------------------------------------ greedy
def greedy(pool_x, pool_m, shots, q_x, q_y, q_m, rounds: int = 10, maximize: bool = True, seed: int = 0):
    """Greedy search (the baseline of Sec. 4.4), one task at a time: start from a random support
    set; in each round visit every support slot and swap in the pool example of the same class
    that most increases the query loss; stop when a round changes nothing (a local optimum) or
    after ``rounds``. Candidates of a slot are scored together (only that class's prototype
    moves), the fastest honest form of the O(N k d r) search. Returns a ``Selection`` whose
    ``trace`` holds, per task, the query loss at the start and after every round."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    chosen = torch.zeros_like(pool_m)
    trace = []
    for t in range(pool_m.shape[0]):
        c, tr = _greedy_one(pool_x[t], pool_m[t], shots[t], q_x[t][q_m[t]], q_y[t][q_m[t]], rounds,
                            1.0 if maximize else -1.0, rng)
        chosen[t], trace = c, trace + [tr]
    return Selection(chosen, chosen.to(pool_x.dtype), trace, time.perf_counter() - t0)


def _greedy_one(px, pm, shots, qx, qy, rounds, sign, rng):
    n_way = int((shots > 0).sum())
    sel = [list(rng.choice(int(pm[j].sum()), size=int(shots[j]), replace=False)) for j in range(n_way)]
    protos = torch.stack([px[j, sel[j]].mean(0) for j in range(n_way)])
    dist = sqdist(qx, protos)                                                     # (Q, N)
    trace = [_ce(-dist, qy).item()]
    for _ in range(rounds):
        changed = False
        for j in range(n_way):
            cand = px[j, : int(pm[j].sum())]                                      # (P_j, d)
            for slot in range(int(shots[j])):
                # prototype of class j if slot held each candidate: (P_j, d)
                moved = protos[j] + (cand - px[j, sel[j][slot]]) / shots[j]
                cols = sqdist(qx, moved)                                          # (Q, P_j)
                logits = (-dist).unsqueeze(0).repeat(len(cand), 1, 1)            # (P_j, Q, N)
                logits[:, :, j] = -cols.T
                score = sign * F.cross_entropy(logits.transpose(1, 2), qy.expand(len(cand), -1),
                                               reduction="none").sum(-1)
                score[[i for s, i in enumerate(sel[j]) if s != slot]] = -torch.inf  # no duplicates
                best = int(score.argmax())
                if best != sel[j][slot]:
                    sel[j][slot], changed = best, True
                    protos[j] = moved[best]
                    dist[:, j] = cols[:, best]
        trace.append(_ce(-dist, qy).item())
        if not changed:
            break
    chosen = torch.zeros_like(pm)
    for j in range(n_way):
        chosen[j, sel[j]] = True
    return chosen, trace


def _ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


# ------------------------------------------------------------------------------ tasks in, tasks out
def pool_tensors(tasks: list[Task], features: torch.Tensor, y: np.ndarray):
    """Padded selection inputs for ``tasks``: (pool_x, pool_m, shots, q_x, q_y, q_m, pool_idx)."""
    pools = [search_pool(t, y) for t in tasks]
    T, N, P = len(tasks), max(t.way for t in tasks), max(len(p) for ps in pools for p in ps)
    Q = max(len(t.query) for t in tasks)
    idx = torch.zeros(T, N, P, dtype=torch.long)
    pool_m = torch.zeros(T, N, P, dtype=torch.bool)
    shots = torch.zeros(T, N, dtype=torch.long)
    q_idx, q_y, q_m = (torch.zeros(T, Q, dtype=torch.long), torch.zeros(T, Q, dtype=torch.long),
                       torch.zeros(T, Q, dtype=torch.bool))
    for t, (task, ps) in enumerate(zip(tasks, pools)):
        for j, p in enumerate(ps):
            idx[t, j, :len(p)], pool_m[t, j, :len(p)] = torch.as_tensor(p), True
        shots[t, :task.way] = torch.as_tensor(task.shots)
        q = np.asarray(task.query)
        pos = {c: j for j, c in enumerate(task.classes)}
        q_idx[t, :len(q)], q_m[t, :len(q)] = torch.as_tensor(q), True
        q_y[t, :len(q)] = torch.as_tensor([pos[int(c)] for c in y[q]])
    return features[idx], pool_m, shots, features[q_idx], q_y, q_m, idx


def select_tasks(tasks: list[Task], features: torch.Tensor, y: np.ndarray, method: str = "fastdiffsel",
           **kw) -> tuple[list[Task], Selection]:
    """Replace each task's support set by the selected one (same classes, shots and query set)."""
    from ..errors import check_choice
    check_choice("method", method, ("fastdiffsel", "greedy"))
    *inputs, idx = pool_tensors(tasks, features, y)
    sel = (fastdiffsel if method == "fastdiffsel" else greedy)(*inputs, **kw)
    out = []
    for t, task in enumerate(tasks):
        support = [int(i) for j in range(task.way) for i in idx[t, j][sel.chosen[t, j]]]
        out.append(task.with_support(support))
    return out, sel


def select_timed(tasks: list[Task], features: torch.Tensor, y: np.ndarray, method: str = "fastdiffsel",
                 repeats: int = 1, **kw) -> tuple[list[Task], np.ndarray]:
    """Select each task alone and time it: (selected tasks, seconds per task (T,), the fastest of
    ``repeats`` runs). Features are precomputed and gathered outside the clock, for every method
    alike (Sec. 4.4's fair timing: same query sets, same device)."""
    from ..errors import check_choice
    check_choice("method", method, ("fastdiffsel", "greedy"))
    fn = fastdiffsel if method == "fastdiffsel" else greedy
    out, times = [], []
    for task in tasks:
        *inputs, idx = pool_tensors([task], features, y)
        runs = [fn(*inputs, **kw) for _ in range(repeats)]
        sel = runs[0]
        out.append(task.with_support([int(i) for j in range(task.way) for i in idx[0, j][sel.chosen[0, j]]]))
        times.append(min(r.seconds for r in runs))
    return out, np.array(times)


def support_loss(tasks: list[Task], features: torch.Tensor, y: np.ndarray) -> torch.Tensor:
    """Eq. 4.1's objective at the tasks' actual (binary) support sets: (T,) summed query loss."""
    pool_x, pool_m, _, q_x, q_y, q_m, idx = pool_tensors(tasks, features, y)
    chosen = torch.zeros_like(pool_m)
    for t, task in enumerate(tasks):
        chosen[t] = torch.as_tensor(np.isin(idx[t].numpy(), task.support)) & pool_m[t]
    return query_loss(chosen.to(pool_x.dtype), pool_x, pool_m, q_x, q_y, q_m)


ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 200.0, 500.0)  # the log grid of appendix 11.3 over [0.01, 500]


def tune_alpha(tasks: list[Task], features: torch.Tensor, y: np.ndarray, alphas=ALPHAS, maximize: bool = True,
               **kw):
    """Appendix 11.3's grid search: the alpha whose selected support sets have the largest
    (``maximize``) or smallest query loss on these (validation) query sets.
    Returns (best alpha, DataFrame alpha -> mean support loss)."""
    import pandas as pd
    rows = []
    for a in alphas:
        picked, _ = select_tasks(tasks, features, y, "fastdiffsel", alpha=a, maximize=maximize, **kw)
        rows.append(dict(alpha=a, loss=float(support_loss(picked, features, y).mean())))
    table = pd.DataFrame(rows)
    best = table.loc[table["loss"].idxmax() if maximize else table["loss"].idxmin(), "alpha"]
    return float(best), table
