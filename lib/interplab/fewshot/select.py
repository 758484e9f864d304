"""Selecting difficult support sets: FastDiffSel (Algorithm 1, Eqs. 4.1-4.3) and greedy search.

Both receive the query set Q, the search pool P = D' - Q of the task's N classes, frozen
features f(x) and the shots k_j, and return the support set that (approximately) maximises
the ProtoNet query loss

    L(w) = sum_{(x, y) in Q} -log softmax_j(-||f(x) - c_j||^2)[y],   c_j = sum_i w_j^i f(x_j^i) / sum_i w_j^i

(Eq. 4.1, binary w with ||w_j||_0 <= k_j), or with ``cosine_scale`` s the loss of P>M>F's cosine
classifier (logits s cos(f(x), c_j): the dissertation's base model's own head). FastDiffSel relaxes
it: positive random w, ``steps`` gradient ascent steps of size ``alpha`` each followed by a
per-class projection, then the k_j largest weights. The dissertation uses one step with alpha = 200 (appendix 11.3) and projects
onto the l1 ball {||w_j||_1 <= k_j} (Eq. 4.2, solved through its dual Eq. 4.3 / 11.1-11.6:
soft-thresholding at the multiplier lambda_j found by sorting): ``relax="l1"``. The default
``relax="box"`` also relaxes Eq. 4.1's w in {0, 1} to 0 <= w <= 1 (with sum_i w_j^i = k_j), the
same dual with an upper clip; with one step both select exactly the dissertation's support set,
with several the capped simplex keeps the iterates means of k_j examples (see ``fastdiffsel``).
``restarts`` runs several random initialisations at once and keeps the support set with the
largest query loss, and ``best_iterate`` rounds the best iterate rather than the last. The
gradient is computed in closed form (``loss_and_grad``; equal to autograd, tested) because a
per-task timing on a CPU otherwise measures autograd's overhead, not the algorithm.

Pools are padded to (T, N, P): pool_x (T, N, P, d), pool_m (T, N, P) valid, shots (T, N) with
0 for padded class slots; q_x (T, Q, d), q_y (T, Q), q_m (T, Q). ``select_tasks(chunk=...)`` bounds T.
"""
import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .learners import NEG, proto_logits
from .tasks import Task, search_pool


def _sort_desc(x: torch.Tensor, indices: bool = False):
    """x sorted descending along the last dim (values, or (values, indices)). On the CPU through
    numpy: its SIMD sorts are 4-50x faster than torch's on the short rows here, where torch's sort
    alone took most of a FastDiffSel selection (a handicap in the per-task timing vs greedy)."""
    if x.device.type != "cpu":
        out = x.sort(-1, descending=True)
        return (out.values, out.indices) if indices else out.values
    neg = -x.detach().numpy()
    if not indices:
        return torch.from_numpy(-np.sort(neg, -1))
    idx = np.argsort(neg, -1)
    return torch.from_numpy(-np.take_along_axis(neg, idx, -1)), torch.from_numpy(idx)


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
    u = _sort_desc(a)
    css = u.cumsum(-1)
    j = torch.arange(1, a.shape[-1] + 1, dtype=v.dtype, device=v.device)
    cand = (css - radius.unsqueeze(-1)) / j
    rho = ((u > cand).to(v.dtype) * j).argmax(-1, keepdim=True)  # last index where the test holds
    # inside the ball every u_i > cand_i, so rho is the last index and cand <= 0: clamping gives 0
    lam = torch.gather(cand, -1, rho).squeeze(-1).clamp_min(0)
    w = torch.sign(v) * (a - lam.unsqueeze(-1)).clamp_min(0)
    return w, lam


def project_box(v: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, kmax: int | None = None):
    """Euclidean projection of each row of v (..., P) onto the capped simplex
    {w : 0 <= w_i <= 1, sum_i w_i = k} (...,): the convex hull of the binary vectors with exactly
    k ones, i.e. the tightest convex relaxation of Eq. 4.1's constraints (w in {0, 1}, k_j shots).

    Eq. 4.3's dual with the box added: one multiplier lambda for the sum, and the Lagrangian's
    minimiser is w(lambda) = clip(v - lambda, 0, 1) (Eq. 11.4's soft-thresholding, clipped at 1);
    lambda* is the root of s(lambda) = sum_i clip(v_i - lambda, 0, 1) = k (Eq. 11.6's analogue),
    found exactly by sorting (``_box_root_few_ones`` for k <= 16, else ``_box_root_breakpoints``).
    Masked entries count as absent and stay 0; a row with k = 0 is all 0; k must not exceed a
    row's entries. kmax: max(k) if known (saves a device sync per call).
    Returns (w (..., P), lambda (...,)).
    """
    k = torch.as_tensor(k, dtype=v.dtype, device=v.device).expand(v.shape[:-1])
    if mask is not None:
        v = v.masked_fill(~mask, -torch.inf)                                   # absent: sorts last
    kk = kmax if kmax is not None else int(k.max()) if k.numel() else 0
    if kk == 0:
        lam = torch.full_like(k, torch.inf)
    else:
        lam = _box_root_few_ones(v, k, kk) if kk <= 16 else _box_root_breakpoints(v, k)
    return (v - lam.unsqueeze(-1)).clamp(0, 1), lam


def _box_root_few_ones(v, k, kk):
    """lambda* of ``project_box`` for k <= kk small, in closed form after one values-only sort:
    with u = v sorted descending and a of its largest entries held at 1, the rest is Eq. 11.6
    itself with radius k - a, whose root is the classic lambda_a = max_{b > a} (u_{a+1} + ... + u_b
    - (k - a)) / (b - a) (Duchi et al.); and lambda* = min_{a < k} lambda_a, because
    s(lambda) = min_a [a + sum_{i > a} (u_i - lambda)_+] (each bracket bounds s from above, and
    a = #{u_i >= lambda + 1} attains it). A (K, B) grid per row, B = P, or for long rows the most
    entries above u_k - 1 in any row: no lambda_a peaks beyond them, as lambda* >= u_k - 1 (the k
    largest at 1). k = 0 gives lambda = inf."""
    u = _sort_desc(v)
    n = v.shape[-1]
    if n > 128:
        uk = u.gather(-1, (k.long() - 1).clamp_min(0).unsqueeze(-1))
        n = max(int((u > uk - 1).sum(-1).max()), kk)
    a, inv_gap, below = _ones_grid(kk, n, v.dtype, v.device)
    cs = F.pad(u[..., :n].cumsum(-1), (1, 0))                                  # cs_b = u_1 + ... + u_b
    num = cs[..., None, 1:] - (cs[..., :kk] + k.unsqueeze(-1) - a).unsqueeze(-1)      # (..., K, B)
    lam_a = (num * inv_gap + below).amax(-1)                                   # (..., K)
    return lam_a.masked_fill(a >= k.unsqueeze(-1), torch.inf).amin(-1)


@functools.lru_cache(maxsize=64)
def _ones_grid(kk, n, dtype, device):
    """Constants of ``_box_root_few_ones``: a = 0..K-1, 1 / (b - a) and -inf where b <= a, (K, B)."""
    a = torch.arange(kk, dtype=dtype, device=device)
    gap = torch.arange(1, n + 1, dtype=dtype, device=device) - a[:, None]
    return a, 1 / gap.clamp_min(1), torch.zeros_like(gap).masked_fill(gap <= 0, -torch.inf)


def _box_root_breakpoints(v, k):
    """lambda* of ``project_box`` for any k: s is linear between its 2P breakpoints (v_i - 1, where
    v_i reaches 1, and v_i, where it leaves 0), so one sort of them with running counts and sums
    gives s at every breakpoint, and lambda* interpolates the segment where s crosses k. The
    sums run from the top, where the root is, so absent entries (-inf, sorted last) never enter
    them before it; k = 0 or no entry gives 0 / 0, i.e. lambda = inf."""
    n = v.shape[-1]
    k = k.unsqueeze(-1)
    lam, idx = _sort_desc(torch.cat([v, v - 1], -1), indices=True)
    up = idx >= n                                                              # a v_i - 1 breakpoint
    val = lam + up                                                             # the v_i of each breakpoint
    ones = up.cumsum(-1)                                                       # #{v_i >= lam + 1}
    s_up = (val * up).cumsum(-1)
    t = torch.arange(1, 2 * n + 1, device=v.device)                            # t - ones = #{v_i >= lam}
    s = ones + (val.cumsum(-1) - 2 * s_up) - lam * (t - 2 * ones)
    j = (s < k).sum(-1, keepdim=True).clamp(1, 2 * n - 1)                      # s rises along the sort
    ij = torch.cat([j - 1, j], -1)
    (l0, l1), (s0, s1) = lam.gather(-1, ij).unbind(-1), s.gather(-1, ij).unbind(-1)
    return (l1 + (s1 - k.squeeze(-1)) * (l0 - l1) / (s1 - s0)).nan_to_num(nan=torch.inf)


# ------------------------------------------------------------------------------ objective
def _protos(w, pool_x, pool_m):
    """Weighted prototypes (T, N, d) and their normalisers (T, N); an empty slot gets 0 / 1."""
    w = w * pool_m
    denom = w.sum(-1)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    return (w.unsqueeze(-2) @ pool_x).squeeze(-2) / denom.unsqueeze(-1), denom


def query_loss(w, pool_x, pool_m, q_x, q_y, q_m, cosine_scale: float | None = None) -> torch.Tensor:
    """Eq. 4.1 per task (T,): summed ProtoNet cross-entropy of Q against the w-weighted prototypes."""
    protos, _ = _protos(w, pool_x, pool_m)
    logits = proto_logits(q_x, protos, cosine_scale).masked_fill(~pool_m.any(-1).unsqueeze(1), NEG)
    ce = F.cross_entropy(logits.transpose(1, 2), q_y, reduction="none")
    return (ce * q_m).sum(-1)


def loss_and_grad(w, pool_x, pool_m, q_x, q_y, q_m, ctx=None, grad: bool = True, cosine_scale: float | None = None):
    """(L, dL/dw) in closed form; equals autograd on ``query_loss`` (tested), at a fraction of its
    overhead, which is what a per-task timing on a CPU measures. w is (T, N, P), giving L (T,) and
    dL/dw (T, N, P), or (T, N, R, P) for R restarts of the same tasks, giving (T, R) and
    (T, N, R, P) (every product is then one batched matmul over (T, N) that shares the pool and
    query tensors, never copied R times). grad=False: L only.

    With E = q_m (softmax - onehot) (T, Q, N) and logit_qj = -||q - c_j||^2:
    dL/dc_j = sum_q E_qj 2 (q - c_j);  dL/dw_i = (x_i - c_j) . dL/dc_j / sum_i w_j^i  for i in P_j.
    With ``cosine_scale`` s, logit_qj = s q^ . c^_j (unit vectors): dL/dc^_j = s sum_q E_qj q^ and
    dL/dc_j = (I - c^_j c^_j^T) dL/dc^_j / ||c_j||. ``ctx`` caches what does not depend on w (see
    ``_context``, built for the same ``cosine_scale``) across ascent steps.
    """
    single = w.dim() == pool_m.dim()
    if single:
        w = w.unsqueeze(2)
    t, n, r, _ = w.shape
    neg_target, tsum, bias, m, q2 = ctx or _context(pool_m, q_x, q_y, q_m, cosine_scale)
    w = w * m                                                                            # (T, N, R, P)
    denom = w.sum(-1, keepdim=True).clamp_min(1e-30)                                     # 0 / 0 -> 0: absent class
    protos = (w @ pool_x) / denom                                                        # (T, N, R, d)
    if cosine_scale is None:
        # -||q - c||^2 without ||q||^2, which shifts each query's logits equally (softmax-invariant)
        logits = ((protos.view(t, n * r, -1) @ q2.transpose(1, 2)).view(t, n, r, -1)
                  - protos.pow(2).sum(-1, keepdim=True) + bias)                          # (T, N, R, Q)
    else:   # q2 holds s q^: s cos(q, c)
        norm = protos.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = protos / norm
        logits = (unit.view(t, n * r, -1) @ q2.transpose(1, 2)).view(t, n, r, -1) + bias
    logp = logits.log_softmax(1)
    loss = (logp * neg_target).sum((1, 3))                                               # (T, R)
    if not grad:
        return loss.squeeze(1) if single else loss
    err = torch.addcmul(neg_target, logp.exp(), tsum)                                    # q_m (softmax - onehot)
    if cosine_scale is None:
        g_c = torch.addcmul((err.view(t, n * r, -1) @ q2).view(t, n, r, -1), err.sum(-1, keepdim=True), protos,
                            value=-2)                                                    # dL/dc (T, N, R, d)
    else:
        g_u = (err.view(t, n * r, -1) @ q2).view(t, n, r, -1)                            # dL/dc^
        g_c = (g_u - unit * (unit * g_u).sum(-1, keepdim=True)) / norm
    g_w = (g_c @ pool_x.transpose(-1, -2) - (protos * g_c).sum(-1, keepdim=True)) * (m / denom)
    return (loss.squeeze(1), g_w.squeeze(2)) if single else (loss, g_w)


def _context(pool_m, q_x, q_y, q_m, cosine_scale: float | None = None):
    """w-independent pieces: minus the masked one-hot targets (T, N, 1, Q), their per-query sum
    (T, 1, 1, Q) (= q_m), the absent-class bias (T, N, 1, 1), the pool mask (T, N, 1, P) and 2 q_x
    (with ``cosine_scale`` s: s q_x / ||q_x||)."""
    dt = q_x.dtype
    target = ((q_y.unsqueeze(1) == torch.arange(pool_m.shape[1], device=q_y.device)[:, None])
              & q_m.unsqueeze(1)).to(dt).unsqueeze(2)
    bias = (~pool_m.any(-1)).to(dt)[:, :, None, None] * NEG
    q2 = 2 * q_x if cosine_scale is None else cosine_scale * F.normalize(q_x, dim=-1)
    return -target, q_m.to(dt)[:, None, None], bias, pool_m.unsqueeze(2).to(dt), q2


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


def _largest(w_hat, pool_m, shots) -> torch.Tensor:
    """``top_k(project(w_hat), w_hat, ...)`` for every projection here, without its two stable
    sorts: each projection is a non-decreasing map of w_hat within a row (soft-thresholding,
    clipping), so ranking by w_bar, then w_hat, then pool position is ranking by w_hat, then
    position (tested). Boolean like w_hat: per row the shots largest, ties to the lower position."""
    s = w_hat.masked_fill(~pool_m, -torch.inf)
    k = shots.expand(s.shape[:-1]).unsqueeze(-1)
    kth = _sort_desc(s).gather(-1, (k - 1).clamp_min(0))
    above, tie = s > kth, s == kth
    need = k - above.sum(-1, keepdim=True)
    return (above | (tie & (tie.cumsum(-1) <= need))) & pool_m & (k > 0)


# ------------------------------------------------------------------------------ FastDiffSel
@dataclass
class Selection:
    chosen: torch.Tensor        # (T, N, P) bool: the selected support set
    weights: torch.Tensor       # (T, N, P) the projected weights w_bar it was rounded from
    trace: list                 # summed query loss L(w) before each step (+ after the last if track)
    seconds: float


def fastdiffsel(pool_x, pool_m, shots, q_x, q_y, q_m, alpha: float = 200.0, steps: int = 1,
                maximize: bool = True, seed: int = 0, nonneg: bool = True, track: bool = False,
                relax: str = "box", restarts: int = 1, best_iterate: bool = True,
                cosine_scale: float | None = None) -> Selection:
    """Algorithm 1, batched over tasks (they are independent: the loss is a sum over tasks).

    The dissertation's algorithm is ``steps=1, relax="l1", restarts=1`` (appendix 11.3: one step,
    alpha = 200); the defaults select the same support sets. Where it leaves freedom (several
    steps, which it found unnecessary at its scale) the choices below are what extracts the
    hardest tasks in the tiny profile. Chapter 4's notebook (5-way 5-shot, 180 query sets, alpha
    grid-searched) measured FastDiffSel's accuracy minus greedy search's on seeds 0/1/2 at
    18.3/15.4/14.8 points for one step, 5.9/5.2/4.4 for ten l1 steps and 2.8/0.8/-0.6 for
    ``steps=5, restarts=8`` with the defaults, still 11-14x faster than greedy search:

    relax: the per-class feasible set of each projection. "l1": Eq. 4.2's ball ||w_j||_1 <= k_j
    (nonneg: with w >= 0, so sum_i w_j^i cannot cross 0, where the prototype explodes). "box":
    Eq. 4.1's w in {0, 1} relaxed too, to 0 <= w <= 1 with sum_i w_j^i = k_j (``project_box``).
    With one step both keep w_hat's order, so they select the same set. With more they differ:
    L depends on w_j only through the weighted mean c_j (it is scale-free), so on the l1 ball the
    iterates collapse onto about one example per class (one extreme example is the most
    adversarial prototype) and the other k_j - 1 are ranked by the last linearisation only; the
    capped simplex is the convex hull of the k_j-example support sets (its vertices), so its
    iterates stay means of k_j examples and the rounding is informed.
    best_iterate: projected ascent on this non-concave L does not settle, it cycles between
    vertices, so the iterate with the largest L(w_bar) along the way (computed anyway by the
    next step; one extra forward for the last) is rounded, not merely the last one.
    restarts: R random initialisations per task run as one batch (T, N, R, P); each is rounded
    and the support set with the largest query loss at binary w is returned. Single runs stop at
    very different local optima, and the best of a few beats any one of them by a wide margin.
    maximize=False descends instead: the 'easy' tasks of Fig 4.5. track: record L(w) after the
    last projection too. trace: L summed over tasks (averaged over restarts) before each step.
    cosine_scale: the base model's classifier is P>M>F's cosine head at this scale (module docstring).
    """
    from ..errors import check_choice
    check_choice("relax", relax, ("box", "l1"))
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    t, n, p = pool_m.shape
    m = pool_m.unsqueeze(2)                                                    # (T, N, 1, P)
    w = torch.rand((t, n, restarts, p), generator=g, dtype=pool_x.dtype).to(pool_x.device) * m
    sign = 1.0 if maximize else -1.0
    radius = shots.to(pool_x.dtype).unsqueeze(2)                               # (T, N, 1)
    kmax = int(shots.max()) if shots.numel() else 0
    trace, best = [], None
    ctx = _context(pool_m, q_x, q_y, q_m, cosine_scale)
    lg = functools.partial(loss_and_grad, ctx=ctx, cosine_scale=cosine_scale)
    w_hat = w
    for step in range(steps):
        loss, grad = lg(w, pool_x, pool_m, q_x, q_y, q_m)                    # L at the last projection
        trace.append(loss.mean(1))
        if best_iterate and step > 0:
            best = _keep(best, sign * loss, w, w_hat)
        w_hat = torch.add(w, grad, alpha=sign * alpha)
        if relax == "box":
            w, _ = project_box(w_hat, radius, m, kmax)
        else:
            w, _ = project_l1(w_hat.clamp_min(0) if nonneg else w_hat, radius, m)
    if track or (best_iterate and steps > 1):
        last = lg(w, pool_x, pool_m, q_x, q_y, q_m, grad=False)
        if track:
            trace.append(last.mean(1))
        if best_iterate and steps > 1:
            _, w, w_hat = _keep(best, sign * last, w, w_hat)
    chosen = _largest(w_hat, m, shots.unsqueeze(2))                            # (T, N, R, P)
    if restarts > 1:
        score = sign * lg(chosen.to(pool_x.dtype), pool_x, pool_m, q_x, q_y, q_m, grad=False)
        pick = score.argmax(1)[:, None, None, None].expand(t, n, 1, p)
        chosen, w = chosen.gather(2, pick), w.gather(2, pick)
    seconds = time.perf_counter() - t0
    return Selection(chosen.squeeze(2), w.squeeze(2), [float(l.sum()) for l in trace], seconds)


def _keep(best, score, w, w_hat):
    """(score, w, w_hat) of the better iterate so far, per task and restart (score (T, R))."""
    if best is None:
        return score, w, w_hat
    old, bw, bh = best
    up = (score > old)[:, None, :, None]
    return torch.maximum(score, old), torch.where(up, w, bw), torch.where(up, w_hat, bh)


# ------------------------------------------------------------------------------ greedy
def greedy(pool_x, pool_m, shots, q_x, q_y, q_m, rounds: int = 10, maximize: bool = True, seed: int = 0,
           cosine_scale: float | None = None):
    """Greedy search (the baseline of Sec. 4.4), one task at a time: start from a random support
    set; in each round visit every support slot and swap in the pool example of the same class
    that most increases the query loss; stop when a round changes nothing (a local optimum) or
    after ``rounds``. Candidates of a slot are scored together (only that class's prototype
    moves), the fastest honest form of the O(N k d r) search. Returns a ``Selection`` whose
    ``trace`` holds, per task, the query loss at the start and after every round. cosine_scale: as in
    ``fastdiffsel``."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    chosen = torch.zeros_like(pool_m)
    trace = []
    for t in range(pool_m.shape[0]):
        c, tr = _greedy_one(pool_x[t], pool_m[t], shots[t], q_x[t][q_m[t]], q_y[t][q_m[t]], rounds,
                            1.0 if maximize else -1.0, rng, cosine_scale)
        chosen[t], trace = c, trace + [tr]
    return Selection(chosen, chosen.to(pool_x.dtype), trace, time.perf_counter() - t0)


def _greedy_one(px, pm, shots, qx, qy, rounds, sign, rng, cosine_scale=None):
    n_way = int((shots > 0).sum())
    sel = [list(rng.choice(int(pm[j].sum()), size=int(shots[j]), replace=False)) for j in range(n_way)]
    protos = torch.stack([px[j, sel[j]].mean(0) for j in range(n_way)])
    logit = proto_logits(qx, protos, cosine_scale)                                # (Q, N)
    trace = [_ce(logit, qy).item()]
    for _ in range(rounds):
        changed = False
        for j in range(n_way):
            cand = px[j, : int(pm[j].sum())]                                      # (P_j, d)
            for slot in range(int(shots[j])):
                # prototype of class j if slot held each candidate: (P_j, d)
                moved = protos[j] + (cand - px[j, sel[j][slot]]) / shots[j]
                cols = proto_logits(qx, moved, cosine_scale)                      # (Q, P_j)
                logits = logit.unsqueeze(0).repeat(len(cand), 1, 1)              # (P_j, Q, N)
                logits[:, :, j] = cols.T
                score = sign * F.cross_entropy(logits.transpose(1, 2), qy.expand(len(cand), -1),
                                               reduction="none").sum(-1)
                score[[i for s, i in enumerate(sel[j]) if s != slot]] = -torch.inf  # no duplicates
                best = int(score.argmax())
                if best != sel[j][slot]:
                    sel[j][slot], changed = best, True
                    protos[j] = moved[best]
                    logit[:, j] = cols[:, best]
        trace.append(_ce(logit, qy).item())
        if not changed:
            break
    chosen = torch.zeros_like(pm)
    for j in range(n_way):
        chosen[j, sel[j]] = True
    return chosen, trace


def _ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


# ------------------------------------------------------------------------------ tasks in, tasks out
def _cap(pool_cap, task):
    return pool_cap(task) if callable(pool_cap) else pool_cap


def pool_tensors(tasks: list[Task], features: torch.Tensor, y: np.ndarray, pool_cap=None, pool_from=None):
    """Padded selection inputs for ``tasks``: (pool_x, pool_m, shots, q_x, q_y, q_m, pool_idx).
    pool_cap: images per class a task searches (``search_pool``'s cap), an int or task -> int | None;
    pool_from (n,) bool: the examples a support may come from (``search_pool``'s allowed)."""
    pools = [search_pool(t, y, _cap(pool_cap, t), allowed=pool_from) for t in tasks]
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
                 chunk: int | None = None, pool_cap=None, pool_from=None, **kw) -> tuple[list[Task], Selection]:
    """Replace each task's support set by the selected one (same classes, shots and query set).

    chunk: select that many tasks per batch (each call draws its own initial weights from ``seed``);
    the padded inputs of a batch are (tasks, N, largest class pool, d), tens of GB for Meta-Dataset's
    50-way tasks over 1000-image classes. None: all in one batch, one ``Selection``; otherwise the
    ``Selection`` holds per-batch lists in ``chosen`` / ``weights`` and the summed time.
    pool_cap, pool_from: see ``pool_tensors`` (e.g. ``data.md_pool_cap(source)``, ``data.orbit_protocol``)."""
    from ..errors import check_choice
    check_choice("method", method, ("fastdiffsel", "greedy"))
    fn = fastdiffsel if method == "fastdiffsel" else greedy
    out, sels = [], []
    for start in range(0, len(tasks), chunk or max(len(tasks), 1)):
        part = tasks[start:start + (chunk or len(tasks))]
        *inputs, idx = pool_tensors(part, features, y, pool_cap, pool_from)
        sel = fn(*inputs, **kw)
        for t, task in enumerate(part):
            out.append(task.with_support([int(i) for j in range(task.way) for i in idx[t, j][sel.chosen[t, j]]]))
        sels.append(sel)
    if len(sels) == 1:
        return out, sels[0]
    return out, Selection([s.chosen for s in sels], [s.weights for s in sels], [s.trace for s in sels],
                          sum(s.seconds for s in sels))


def select_timed(tasks: list[Task], features: torch.Tensor, y: np.ndarray, method: str = "fastdiffsel",
                 repeats: int = 1, pool_cap=None, pool_from=None, **kw) -> tuple[list[Task], np.ndarray]:
    """Select each task alone and time it: (selected tasks, seconds per task (T,), the fastest of
    ``repeats`` runs). Features are precomputed and gathered outside the clock, for every method
    alike (Sec. 4.4's fair timing: same query sets, same device)."""
    from ..errors import check_choice
    check_choice("method", method, ("fastdiffsel", "greedy"))
    fn = fastdiffsel if method == "fastdiffsel" else greedy
    out, times = [], []
    for task in tasks:
        *inputs, idx = pool_tensors([task], features, y, pool_cap, pool_from)
        runs = [fn(*inputs, **kw) for _ in range(repeats)]
        sel = runs[0]
        out.append(task.with_support([int(i) for j in range(task.way) for i in idx[0, j][sel.chosen[0, j]]]))
        times.append(min(r.seconds for r in runs))
    return out, np.array(times)


def support_loss(tasks: list[Task], features: torch.Tensor, y: np.ndarray, chunk: int | None = None,
                 pool_cap=None, pool_from=None, cosine_scale: float | None = None) -> torch.Tensor:
    """Eq. 4.1's objective at the tasks' actual (binary) support sets: (T,) summed query loss
    (``chunk`` tasks padded together, ``pool_cap`` and ``pool_from`` as in ``select_tasks``)."""
    if chunk and len(tasks) > chunk:
        return torch.cat([support_loss(tasks[i:i + chunk], features, y, pool_cap=pool_cap, pool_from=pool_from,
                                       cosine_scale=cosine_scale) for i in range(0, len(tasks), chunk)])
    pool_x, pool_m, _, q_x, q_y, q_m, idx = pool_tensors(tasks, features, y, pool_cap, pool_from)
    chosen = torch.zeros_like(pool_m)
    for t, task in enumerate(tasks):
        chosen[t] = torch.as_tensor(np.isin(idx[t].numpy(), task.support)) & pool_m[t]
    return query_loss(chosen.to(pool_x.dtype), pool_x, pool_m, q_x, q_y, q_m, cosine_scale)


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
        loss = support_loss(picked, features, y, kw.get("chunk"), kw.get("pool_cap"), kw.get("pool_from"),
                            kw.get("cosine_scale"))
        rows.append(dict(alpha=a, loss=float(loss.mean())))
    table = pd.DataFrame(rows)
    best = table.loc[table["loss"].idxmax() if maximize else table["loss"].idxmin(), "alpha"]
    return float(best), table
