"""Reading a decomposed representation through CLIP text (Chapter 7: COMPALIGN, TEXTSPAN, Algorithm 5).

    C = contrib.stack(names)                          # (K, N, d) from interplab.decomposition
    align = fit_compalign(C, z_clip, lam=1.0)         # K maps f_i into CLIP space, W (K, d, d_clip)
    F_C = align.transform(C)                          # (K, N, d_clip) aligned contributions f_i(c_i)
    cosine_distance(align.predict(C), z_clip)         # alignment quality (Table 7.1)
    orthogonality_error(align), norm_rank_preservation(align)   # Theorem 2's conditions (spec H4)
    text_span(F_C[i], T, 5)                           # top texts of component i (TEXTSPAN)
    component_scores(F_C, F_C.sum(0), B)              # Algorithm 5: score of each component for a feature
    ablation_curve(contrib, backward_order(contrib), classify, labels)  # Fig. 7.2
    token_heatmap(contrib, layer, head, y, weight=align.W[i])           # Fig. 7.5
    fit_linear_head(z, y, 2)                          # Table 7.3's head on z, the release's recipe

Conventions (spec ch07 sections 2.3-2.9). Contributions are (K, N, d) stacks, component first;
CLIP-space vectors are d_clip wide; maps act on row vectors, f_i(c) = c @ W_i + b / K, so the
regulariser's Gram matrix is W_i^T W_i (d_clip, d_clip) as in the reference implementation
(for the square maps Theorem 2 needs, d = d_clip, this is the same as f_i^T f_i). Metrics return
Python floats or numpy arrays; maps, scores and heat maps are float32 tensors on the input's
device (``text_span`` indices are a CPU LongTensor).
Shape errors are ``BadParameter`` and name the shapes.
"""
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .decomposition import Contributions, ablate
from .errors import BadParameter, check_choice
from .influence.metrics import spearman

INIT_STD = 0.02                         # [ref impl] initialisation of every W_i
REGULARISERS = ("ref", "dissertation")
BASES = ("qr", "pca")


def _shape(x) -> tuple:
    return tuple(x.shape)


def _check_dims(name: str, x: torch.Tensor, dims: int, layout: str) -> None:
    if not torch.is_tensor(x) or x.dim() != dims:
        got = _shape(x) if torch.is_tensor(x) else type(x).__name__
        raise BadParameter(f"{name} must be a {dims}-d tensor {layout}; got {got}")


def _check_rows(a_name: str, a: torch.Tensor, a_dim: int, b_name: str, b: torch.Tensor, b_dim: int,
                what: str) -> None:
    if a.shape[a_dim] != b.shape[b_dim]:
        raise BadParameter(f"{a_name} {_shape(a)} and {b_name} {_shape(b)} disagree on {what} "
                           f"({a.shape[a_dim]} vs {b.shape[b_dim]})")


# ===================================================================== COMPALIGN (spec 2.3)


class CompAlign(nn.Module):
    """K linear maps into CLIP space: f_i(c) = c @ W[i] + b / K, prediction = normalise(sum_i f_i(c_i)).

    W (K, d, d_clip), initialised N(0, 0.02^2); b (d_clip,), one bias shared by the components and
    split evenly over them (so the sum carries b once). K = 1 is the one-map baseline (Moayeri et
    al.): its single map is applied to every component given, and predict(C) = normalise(z W + b).
    ``history`` holds the training curve ({"train": [...], "val": [...]}, one entry per batch) and
    ``best_step`` the batch whose parameters were kept.
    """

    def __init__(self, n_components: int, d: int, d_clip: int, generator: torch.Generator = None):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_components, d, d_clip, generator=generator) * INIT_STD)
        self.b = nn.Parameter(torch.zeros(d_clip))
        self.history = {"train": [], "val": []}
        self.best_step = None

    def transform(self, contribs: torch.Tensor) -> torch.Tensor:
        """(K, N, d) -> (K, N, d_clip): each component through its own map, f_i(c_i)."""
        _check_dims("contribs", contribs, 3, "(K, N, d)")
        K, d, d_clip = self.W.shape
        if (K != 1 and contribs.shape[0] != K) or contribs.shape[2] != d:
            raise BadParameter(f"contribs {_shape(contribs)} do not fit maps W {_shape(self.W)}: "
                               f"need (K={K}, N, d={d})" + (" or any K for a one-map model" if K == 1 else ""))
        W = self.W.expand(len(contribs), -1, -1)
        return torch.einsum("knd,kde->kne", contribs.to(W.dtype), W) + self.b / len(contribs)

    def predict(self, contribs: torch.Tensor) -> torch.Tensor:
        """(K, N, d) -> (N, d_clip): the L2-normalised sum of the aligned contributions."""
        return F.normalize(self.transform(contribs).sum(0), dim=-1)

    forward = predict

    def loss(self, contribs: torch.Tensor, z_clip: torch.Tensor, lam: float = 1.0, reg: str = "ref"):
        """Scalar: mean(1 - cos(predict(contribs), z_clip)) + lam * orthogonality_penalty(W, reg)."""
        align = 1 - F.cosine_similarity(self.predict(contribs), z_clip.to(self.W.dtype), dim=-1).mean()
        return align if lam == 0 else align + lam * orthogonality_penalty(self.W, reg)


def orthogonality_penalty(W: torch.Tensor, reg: str = "ref") -> torch.Tensor:
    """Scalar regulariser of maps W (K, d, d_clip) towards W_i^T W_i = I.

    "ref" [ref impl]: d_clip * mean over (i, a, b) of (W_i^T W_i - I)_ab^2.
    "dissertation" (section 7.2): sum_i ||W_i^T W_i - I||_F (not squared).
    Report both whichever is trained: ``{r: orthogonality_penalty(align.W, r) for r in REGULARISERS}``.
    """
    check_choice("reg", reg, REGULARISERS)
    _check_dims("W", W, 3, "(K, d, d_clip)")
    dev = W.transpose(1, 2) @ W - torch.eye(W.shape[2], dtype=W.dtype, device=W.device)
    if reg == "ref":
        return W.shape[2] * dev.pow(2).mean()
    return torch.linalg.matrix_norm(dev).sum()


def fit_compalign(contribs: torch.Tensor, z_clip: torch.Tensor, lam: float = 1.0, reg: str = "ref",
                  lr: float = 3e-4, weight_decay: float = 1e-6, batch_size: int = 32, max_epochs: int = 2,
                  patience: int = 50, val_fraction: float = 0.1, seed: int = 0) -> CompAlign:
    """Fit COMPALIGN maps from contributions (K, N, d) to CLIP image embeddings z_clip (N, d_clip).

    Loss: mean(1 - cos(normalise(sum_i f_i(c_i)), z_clip)) + lam * penalty (``orthogonality_penalty``;
    lam=0 is Table 7.1's "COMPALIGN (lambda = 0)" baseline). Adam(lr, weight_decay), shuffled batches.
    Early stopping: a random ``val_fraction`` of the images is held out; after every batch the
    held-out loss is computed, and training stops once ``patience`` consecutive batches fail to
    improve its running minimum (or after ``max_epochs``); the best parameters are restored. With
    val_fraction=0 the training batch loss is monitored instead and the last parameters are kept
    ([ref impl]). Defaults are the reference implementation's (batch 32, lr 3e-4, wd 1e-6, <= 2
    epochs); the tiny profile uses lr=1e-3, batch_size=256, max_epochs=30. Deterministic per seed.
    """
    _check_dims("contribs", contribs, 3, "(K, N, d)")
    return _fit(CompAlign(contribs.shape[0], contribs.shape[2], _clip_width(z_clip),
                          torch.Generator().manual_seed(seed)),
                contribs, z_clip, lam, reg, lr, weight_decay, batch_size, max_epochs, patience, val_fraction, seed)


def fit_one_map(z: torch.Tensor, z_clip: torch.Tensor, **kwargs) -> CompAlign:
    """The one-map baseline: a single linear map (and bias) from z (N, d) to z_clip (N, d_clip).

    Same loss without regulariser; ``kwargs`` as ``fit_compalign`` (lam and reg are not accepted).
    Returns a K = 1 ``CompAlign``: predict(z[None]) and, equally, predict(contribs) for any stack
    summing to z; transform(contribs) applies the one map to every component.
    """
    _check_dims("z", z, 2, "(N, d)")
    if {"lam", "reg"} & kwargs.keys():
        raise BadParameter("fit_one_map has no regulariser; use fit_compalign for lam / reg")
    return fit_compalign(z[None], z_clip, lam=0.0, **kwargs)


def _clip_width(z_clip) -> int:
    _check_dims("z_clip", z_clip, 2, "(N, d_clip)")
    return z_clip.shape[1]


def _fit(model: CompAlign, contribs, z_clip, lam, reg, lr, weight_decay, batch_size, max_epochs, patience,
         val_fraction, seed) -> CompAlign:
    _check_rows("contribs", contribs, 1, "z_clip", z_clip, 0, "the number of images N")
    check_choice("reg", reg, REGULARISERS)
    if not 0 <= val_fraction < 1 or batch_size < 1 or patience < 1 or max_epochs < 1:
        raise BadParameter(f"need 0 <= val_fraction < 1, batch_size, patience, max_epochs >= 1; got "
                           f"{val_fraction}, {batch_size}, {patience}, {max_epochs}")
    gen = torch.Generator().manual_seed(seed + 1)
    model = model.to(contribs.device)
    contribs, target = contribs.float(), F.normalize(z_clip.float().to(contribs.device), dim=-1)
    order = torch.randperm(contribs.shape[1], generator=gen).to(contribs.device)
    n_val = int(round(val_fraction * len(order)))
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise BadParameter(f"no training images left: N={len(order)}, val_fraction={val_fraction}")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, stale = math.inf, None, 0
    for step, idx in enumerate(_batches(train, batch_size, max_epochs, gen)):
        loss = model.loss(contribs[:, idx], target[idx], lam, reg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.history["train"].append(monitored := loss.item())
        if n_val:
            with torch.no_grad():
                monitored = model.loss(contribs[:, val], target[val], lam, reg).item()
            model.history["val"].append(monitored)
        if monitored < best:
            best, stale, model.best_step = monitored, 0, step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if n_val else None
        else:
            stale += 1
        if stale >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval().requires_grad_(False)


def _batches(train: torch.Tensor, batch_size: int, max_epochs: int, gen: torch.Generator):
    """Index batches of ``train`` (n,), reshuffled every epoch."""
    for _ in range(max_epochs):
        perm = train[torch.randperm(len(train), generator=gen).to(train.device)]
        yield from perm.split(batch_size)


def fit_linear_head(z: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int = 10, lr: float = 1e-3,
                    weight_decay: float = 1e-6, batch_size: int = 64, seed: int = 0) -> nn.Linear:
    """A linear head (with bias) on features z (N, d) for labels y (N,): cross-entropy, Adam(lr, weight_decay),
    ``epochs`` passes of shuffled batches, on z's device; zero-initialised, deterministic per seed.

    Defaults: the release's Waterbirds head of Table 7.3 (spec 2.10: 10 epochs, Adam 1e-3, wd 1e-6; it
    states no batch size). z is used as the model produces it (no standardisation).
    """
    _check_dims("z", z, 2, "(N, d)")
    y = torch.as_tensor(y).long().to(z.device)
    if y.shape != z.shape[:1] or len(y) == 0 or y.min() < 0 or y.max() >= n_classes:
        raise BadParameter(f"y {_shape(y)} must be (N={len(z)},) labels in [0, {n_classes})")
    x = z.detach().float().clone()          # a plain tensor even if z came out of inference mode
    head = nn.Linear(x.shape[1], n_classes).to(x.device)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for idx in _batches(torch.arange(len(x), device=x.device), batch_size, epochs, gen):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval().requires_grad_(False)


# ----------------------------------------------------------------- metrics


def cosine_distance(pred: torch.Tensor, z_clip: torch.Tensor) -> float:
    """Mean over images of 1 - cos(pred_n, z_clip_n); pred, z_clip (N, d_clip)."""
    _check_dims("pred", pred, 2, "(N, d_clip)")
    _check_dims("z_clip", z_clip, 2, "(N, d_clip)")
    if pred.shape != z_clip.shape:
        raise BadParameter(f"pred {_shape(pred)} and z_clip {_shape(z_clip)} must have the same shape")
    return float(1 - F.cosine_similarity(pred.float(), z_clip.float().to(pred.device), dim=-1).mean())


def _maps(maps) -> torch.Tensor:
    """The (K, d, d_clip) weights of a CompAlign or a weight tensor, detached, float64 on the CPU."""
    W = maps.W if isinstance(maps, CompAlign) else maps
    _check_dims("maps", W, 3, "(K, d, d_clip) (or a CompAlign)")
    return W.detach().double().cpu()


def orthogonality_error(maps, common_scale: bool = False) -> float:
    """max_i ||G_i - I||_F / sqrt(m) of maps (CompAlign or W (K, d, d_clip)): spec 5.3 H4.

    G_i is the Gram matrix on the smaller side, W_i^T W_i if d >= d_clip else W_i W_i^T (size
    m = min(d, d_clip); both agree for square maps), so 0 means every f_i is an isometry (or, for
    d > d_clip, a co-isometry). H4 uses the raw maps (the "ref" regulariser fixes the scale k = 1).
    common_scale=True first divides all maps by sqrt(k), k = mean_i tr(G_i) / m (least squares), to
    test Theorem 2's weaker condition f_i^T f_i = k I.
    """
    W = _maps(maps)
    G = W.transpose(1, 2) @ W if W.shape[1] >= W.shape[2] else W @ W.transpose(1, 2)
    m = G.shape[-1]
    if common_scale:
        G = G / (G.diagonal(dim1=1, dim2=2).sum(-1).mean() / m)
    return float(torch.linalg.matrix_norm(G - torch.eye(m, dtype=G.dtype)).max() / math.sqrt(m))


def norm_rank_preservation(maps, n_pairs: int = 10_000, seed: int = 0) -> float:
    """Fraction of random pairs whose norm order the maps keep (Theorem 2's conditions; spec 5.3 H4).

    For each pair: u, v = a * g / ||g|| (g Gaussian in R^d, log a ~ U[log 0.1, log 10], independent),
    components i != j uniform; counts (||u|| <= ||v||) == (||u W_i|| <= ||v W_j||). Linear parts only
    (no bias). maps: CompAlign or W (K, d, d_clip) with K >= 2. Exactly 1.0 for maps that are a
    common multiple of orthogonal maps. Computed in float64, seeded.
    """
    W = _maps(maps)
    K, d, _ = W.shape
    if K < 2:
        raise BadParameter(f"norm-rank preservation compares two different components (i != j); "
                           f"maps {_shape(W)} have K={K}")
    gen = torch.Generator().manual_seed(seed)

    def vectors():
        g = torch.randn(n_pairs, d, generator=gen, dtype=torch.float64)
        a = torch.empty(n_pairs, dtype=torch.float64).uniform_(math.log(0.1), math.log(10), generator=gen).exp()
        return a[:, None] * g / g.norm(dim=1, keepdim=True)

    u, v = vectors(), vectors()
    i = torch.randint(K, (n_pairs,), generator=gen)
    j = (i + torch.randint(1, K, (n_pairs,), generator=gen)) % K
    fu, fv = _mapped_norms(u, W, i), _mapped_norms(v, W, j)
    return float(((u.norm(dim=1) <= v.norm(dim=1)) == (fu <= fv)).double().mean())


def _mapped_norms(x: torch.Tensor, W: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """(n,): ||x_n W_{which_n}||, one component at a time."""
    out = torch.empty(len(x), dtype=x.dtype)
    for k in range(len(W)):
        rows = which == k
        out[rows] = (x[rows] @ W[k]).norm(dim=1)
    return out


# ===================================================================== TEXTSPAN (spec 2.4)


@torch.no_grad()
def text_span(C: torch.Tensor, T: torch.Tensor, k: int, rank: Optional[int] = None) -> torch.Tensor:
    """Indices (k,) of the rows of T that greedily explain the variance of C (Gandelsman et al.).

    C (N, d): one component's contributions over N images (aligned to the text space);
    T (m, d): text embeddings. C is centred over images; then k times: pick t* = argmax_t
    std_n(C t^T), and remove the t* direction from C and from every row of T
    (x <- x - (x t*/||t*||^2) t*). rank=r first projects T onto the top-r right singular vectors
    of the uncentred C, as Gandelsman's code does. Computed in float64; an already chosen text is
    never chosen again (its removed direction leaves it zero).
    """
    _check_dims("C", C, 2, "(N, d)")
    _check_dims("T", T, 2, "(m, d)")
    _check_rows("C", C, 1, "T", T, 1, "the embedding width d")
    if not 1 <= k <= len(T):
        raise BadParameter(f"k={k} must be between 1 and the number of texts {len(T)}")
    C, T = C.detach().double().cpu(), T.detach().double().cpu()
    if rank is not None:
        vh = torch.linalg.svd(C, full_matrices=False).Vh[:rank]  # (r, d)
        T = T @ vh.T @ vh
    C = C - C.mean(0)
    chosen = []
    for _ in range(k):
        spread = (C @ T.T).std(0)
        spread[chosen] = -math.inf
        t = int(spread.argmax())
        chosen.append(t)
        direction = T[t]
        sq = direction @ direction
        if sq > 0:
            C = C - torch.outer(C @ direction / sq, direction)
            T = T - torch.outer(T @ direction / sq, direction)
    return torch.tensor(chosen)


def match_rate(a, b) -> float:
    """Mean over components of |a_i intersect b_i| / k; a, b (K, k) index lists (Table 7.1)."""
    a, b = [list(map(int, r)) for r in a], [list(map(int, r)) for r in b]
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise BadParameter(f"a and b must both be (K, k) lists; got lengths {len(a)} and {len(b)}")
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


# ===================================================================== Algorithm 5 (spec 2.6)


def _pearson_columns(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(..., n, k), (..., n, k) -> (..., k): Pearson correlation of each column pair over n (0 if constant)."""
    x, y = x - x.mean(-2, keepdim=True), y - y.mean(-2, keepdim=True)
    denom = (x.pow(2).sum(-2) * y.pow(2).sum(-2)).sqrt()
    cov = (x * y).sum(-2)
    return torch.where(denom > 0, cov / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(cov))


def feature_basis(B: torch.Tensor, Z: Optional[torch.Tensor] = None, basis: str = "qr") -> torch.Tensor:
    """(k, d_clip) orthonormal rows spanning the rows of B (k, d_clip).

    "qr": Algorithm 5's orthogonalise(B), the QR factor of B^T (Gram-Schmidt of the rows in order).
    "pca": the same span rotated to the principal axes of Z (N, d_clip) projected onto it, a basis
    that depends on the span only, not on how B spans it. Raises if the rows are dependent.
    """
    check_choice("basis", basis, BASES)
    _check_dims("B", B, 2, "(k, d_clip)")
    if len(B) > B.shape[1]:
        raise BadParameter(f"B {_shape(B)} has more rows than dimensions; its rows cannot be independent")
    q, r = torch.linalg.qr(B.double().T)                                   # (d_clip, k), (k, k)
    diag = r.diagonal().abs()
    if (diag <= 1e-10 * diag.max()).any():
        raise BadParameter(f"the rows of B {_shape(B)} are linearly dependent; give independent instantiations")
    if basis == "pca":
        if Z is None:
            raise BadParameter("basis='pca' needs Z")
        s = Z.double() @ q
        _, vecs = torch.linalg.eigh(torch.cov(s.T).reshape(q.shape[1], q.shape[1]))
        q = q @ vecs.flip(-1)                                            # largest variance first
    return q.T


@torch.no_grad()
def component_scores(C: torch.Tensor, Z: Optional[torch.Tensor], B: torch.Tensor, basis: str = "qr") -> torch.Tensor:
    """Algorithm 5 (COMPATTRIBUTE) for every component: scores (K,).

    C (K, N, d_clip): aligned contributions f_i(c_i); Z (N, d_clip): sum_i f_i(c_i) (None: C.sum(0));
    B (k, d_clip): text embeddings of the feature's instantiations. With B's rows orthonormalised
    (``feature_basis``), s_Z = Z B^T and s_C = C_i B^T (N, k); the score is the mean over the k
    columns of Pearson(s_Z[:, j], s_C[:, j]) over images. Invariant to scaling the rows of B (any
    sign) and, with "qr", to adding to a row multiples of earlier rows; a general re-basing of the
    same span changes the QR basis and hence the score: basis="pca" is invariant to any re-basing.
    A column along which a component is constant correlates 0.
    """
    _check_dims("C", C, 3, "(K, N, d_clip)")
    Z = C.sum(0) if Z is None else Z
    _check_dims("Z", Z, 2, "(N, d_clip)")
    _check_rows("C", C, 1, "Z", Z, 0, "the number of images N")
    _check_rows("C", C, 2, "Z", Z, 1, "the CLIP width d_clip")
    _check_rows("C", C, 2, "B", B, 1, "the CLIP width d_clip")
    q = feature_basis(B.to(C.device), Z, basis).T                           # (d_clip, k)
    s_z, s_c = Z.double() @ q, C.double() @ q                               # (N, k), (K, N, k)
    return _pearson_columns(s_z.expand_as(s_c), s_c).mean(-1).float()


@torch.no_grad()
def gt_scores(C: torch.Tensor, z_ref: torch.Tensor, Y: torch.Tensor, similarity: str = "dot") -> torch.Tensor:
    """The ground-truth proxy of Table 7.2: (K,) = mean over texts s of Pearson_n(<C_i, y_s>, <z_ref, y_s>).

    C (K, N, d_clip): aligned contributions; z_ref (N, d_clip): the reference CLIP image embeddings;
    Y (s, d_clip): text embeddings of the instantiations ([ref impl]: the first 4). similarity "dot"
    [ref impl] or "cosine" (section 7.4.1's text).
    """
    check_choice("similarity", similarity, ("dot", "cosine"))
    _check_dims("C", C, 3, "(K, N, d_clip)")
    _check_dims("z_ref", z_ref, 2, "(N, d_clip)")
    _check_dims("Y", Y, 2, "(s, d_clip)")
    _check_rows("C", C, 1, "z_ref", z_ref, 0, "the number of images N")
    _check_rows("C", C, 2, "z_ref", z_ref, 1, "the CLIP width d_clip")
    _check_rows("C", C, 2, "Y", Y, 1, "the CLIP width d_clip")
    C, z_ref, Y = C.double(), z_ref.double().to(C.device), Y.double().to(C.device)
    if similarity == "cosine":
        C, z_ref, Y = F.normalize(C, dim=-1), F.normalize(z_ref, dim=-1), F.normalize(Y, dim=-1)
    s_c, s_z = C @ Y.T, z_ref @ Y.T                                          # (K, N, s), (N, s)
    return _pearson_columns(s_z.expand_as(s_c), s_c).mean(-1).float()


def _score_table(x) -> np.ndarray:
    return np.array(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float64)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman (average ranks for ties) of each row pair of two (R, n) tables; nan where one is constant."""
    return np.array([spearman(x, y) for x, y in zip(a, b)])


def _check_tables(scores, gt) -> tuple:
    scores, gt = _score_table(scores), _score_table(gt)
    if scores.ndim != 2 or scores.shape != gt.shape:
        raise BadParameter(f"scores {scores.shape} and gt {gt.shape} must both be (K components, P features)")
    return scores, gt


def component_ordering_spearman(scores, gt) -> np.ndarray:
    """(P,): per feature, Spearman over components of scores[:, p] vs gt[:, p]; scores, gt (K, P).

    Table 11.4's rows; their mean is Table 7.2's "component ordering". Average ranks for ties
    (scipy); nan for a constant column.
    """
    scores, gt = _check_tables(scores, gt)
    return _spearman_rows(scores.T, gt.T)


def feature_ordering_spearman(scores, gt) -> np.ndarray:
    """(K,): per component, Spearman over features of scores[i] vs gt[i]; scores, gt (K, P).

    Their mean is Table 7.2's "feature ordering". Average ranks for ties; nan for a constant row.
    """
    return _spearman_rows(*_check_tables(scores, gt))


# ===================================================================== ablation (spec 2.5)


def backward_order(contrib: Contributions) -> list:
    """Sublayer names from the output backwards: [layer[L].mlp, layer[L].attn, layer[L-1].mlp, ...]."""
    return contrib.names("layer")[-2:0:-1]


@torch.no_grad()
def ablation_curve(contrib: Contributions, order: list, classify: Callable, labels,
                   reference: Contributions = None) -> np.ndarray:
    """Accuracies (len(order) + 1,): entry k mean-ablates the first k components of ``order``.

    z_k = z + (ablate(contrib, order[:k], "mean", reference) - contrib.total()): the direct
    contributions of order[:k] are replaced by their mean over ``reference`` (default: the same
    images), everything else keeps its value and nothing downstream is recomputed (spec 2.5).
    Anchoring on z makes k = 0 exactly the unablated accuracy. classify: (N, d) -> (N,) predicted
    labels (e.g. ``lambda z: head(z).argmax(1)``); labels (N,). Order: ``backward_order(contrib)``
    for Fig. 7.2; names may be any ``Contributions.names`` entries or groups.
    """
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != (len(contrib.z),):
        raise BadParameter(f"labels {_shape(labels)} must be (N,) with N={len(contrib.z)} images")
    total = contrib.total()
    out = []
    for k in range(len(order) + 1):
        z_k = contrib.z + (ablate(contrib, list(order[:k]), mode="mean", reference=reference) - total)
        pred = torch.as_tensor(classify(z_k)).cpu()
        if pred.shape != labels.shape:
            raise BadParameter(f"classify returned {_shape(pred)}; it must map (N, d) to (N,) labels")
        out.append(float((pred == labels).double().mean()))
    return np.array(out)


# ===================================================================== token heat maps (spec 2.9)


def _grid(n_tokens: int, grid) -> tuple:
    """(gh, gw) of a block's token sequence: given, or square after dropping a CLS token (ViT) or none (Swin)."""
    if grid is not None:
        gh, gw = grid
        if not 0 < gh * gw <= n_tokens:
            raise BadParameter(f"grid {tuple(grid)} needs {gh * gw} patch tokens; the layer has {n_tokens} tokens")
        return gh, gw
    for prefix in (0, 1):
        side = math.isqrt(n_tokens - prefix)
        if side * side == n_tokens - prefix:
            return side, side
    raise BadParameter(f"cannot infer a square patch grid from {n_tokens} tokens; pass grid=(gh, gw)")


@torch.no_grad()
def token_heatmap(contrib: Contributions, layer: int, head: int, direction: torch.Tensor,
                  grid: Optional[tuple] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, gh, gw): heat(t) = <c_{layer,head,t} W, y> for the patch tokens t of one head (Fig. 7.5).

    contrib: decomposed with tokens=True; layer: forward index (negative from the end; the
    figures' reverse index L{k} is layer -1 - k); direction y: (d_clip,) with weight W (d, d_clip),
    the linear part of the head's COMPALIGN map (e.g. ``align.W[names.index(name)]``, no bias), or
    (d,) in model space without weight. The prefix tokens (CLS, registers) are dropped: the last
    gh * gw tokens are the patches in row-major order (Swin: the stage grid, already un-windowed
    and un-shifted). grid: (gh, gw); default square, after dropping one CLS token if there is one.
    """
    if contrib.tokens is None:
        raise BadParameter("token_heatmap needs decompose(..., tokens=True)")
    row = contrib.row(layer)
    if not 0 <= head < contrib.n_heads[row]:
        raise BadParameter(f"head {head} is out of range: layer[{contrib.layers[row]}] has heads "
                           f"0..{contrib.n_heads[row] - 1}")
    d = contrib.tokens.shape[-1]
    if weight is None:
        if direction.shape != (d,):
            raise BadParameter(f"direction {_shape(direction)} must be (d={d},) without weight, or pass "
                               "weight (d, d_clip) for a CLIP-space direction")
        w = direction.float()
    else:
        if weight.dim() != 2 or weight.shape[0] != d or direction.shape != weight.shape[1:]:
            raise BadParameter(f"weight {_shape(weight)} and direction {_shape(direction)} must be "
                               f"(d={d}, d_clip) and (d_clip,)")
        w = weight.detach().float() @ direction.float()
    n_tokens = contrib.n_tokens[row]
    gh, gw = _grid(n_tokens, grid)
    patches = contrib.tokens[:, row, head, n_tokens - gh * gw:n_tokens]    # (N, gh * gw, d)
    return (patches @ w.to(patches.device)).view(-1, gh, gw)


def mask_auroc(heat: torch.Tensor, masks, average: str = "image") -> float:
    """AUROC of heat maps (N, gh, gw), bilinearly upsampled, as scores for object masks (N, H, W).

    average "image": mean over images of each image's pixel AUROC (images whose mask is all
    object or all background are skipped); "pooled": one AUROC over all pixels of all images.
    """
    from sklearn.metrics import roc_auc_score

    check_choice("average", average, ("image", "pooled"))
    masks = torch.as_tensor(masks)
    _check_dims("heat", heat, 3, "(N, gh, gw)")
    _check_dims("masks", masks, 3, "(N, H, W)")
    _check_rows("heat", heat, 0, "masks", masks, 0, "the number of images N")
    up = F.interpolate(heat[:, None].detach().float().cpu(), size=tuple(masks.shape[1:]), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    truth = masks.cpu().numpy().astype(bool)
    if average == "pooled":
        return float(roc_auc_score(truth.ravel(), up.ravel()))
    scores = [roc_auc_score(t.ravel(), s.ravel()) for t, s in zip(truth, up) if 0 < t.sum() < t.size]
    if not scores:
        raise BadParameter("every mask is all object or all background; AUROC is undefined")
    return float(np.mean(scores))


# ===================================================================== retrieval (spec 2.7, 2.8)


def gap_components(scores, feature: int, k: int) -> torch.Tensor:
    """Indices (k,) of the components most specific to one feature (Fig. 7.4's selection).

    scores (K, P): Algorithm 5 scores of K components for P features; the gap of component i is
    scores[i, feature] - max over the other features of scores[i, p']; the k largest gaps win.
    """
    s = torch.as_tensor(_score_table(scores))
    if s.dim() != 2 or not 0 <= feature < s.shape[1] or s.shape[1] < 2:
        raise BadParameter(f"scores {_shape(s)} must be (K, P >= 2) and feature an index below P; got {feature}")
    if not 1 <= k <= len(s):
        raise BadParameter(f"k={k} must be between 1 and the number of components {len(s)}")
    others = torch.cat([s[:, :feature], s[:, feature + 1:]], 1).max(1).values
    return (s[:, feature] - others).topk(k).indices


@torch.no_grad()
def text_retrieval(C: torch.Tensor, groups: list, direction: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Top-k images (G, k) per group of components by cos(sum_{i in group} C_i(x), direction) (Fig. 7.3).

    C (K, N, d_clip): aligned contributions; groups: G lists of component indices (the figure: three
    consecutive components in score order); direction (d_clip,): a text embedding. Cosine, as §7.4 states: a
    dot product would favour images whose summed contribution is merely large.
    """
    _check_dims("C", C, 3, "(K, N, d_clip)")
    if direction.shape != C.shape[2:]:
        raise BadParameter(f"direction {_shape(direction)} must be (d_clip={C.shape[2]},)")
    scores = torch.stack([F.normalize(C[list(g)].sum(0), dim=-1) @ direction.to(C) for g in groups])   # (G, N)
    return scores.topk(k, dim=1).indices


@torch.no_grad()
def image_retrieval(C: torch.Tensor, components, reference, k: int = 10) -> torch.Tensor:
    """Top-k images most similar to image ``reference`` in the chosen components (Fig. 7.4).

    C (K, N, d): contributions in model space (alignment only chooses ``components``); similarity
    cos(sum_{i in components} C_i(x), same for x_ref); the reference itself is excluded.
    reference: one image index -> (k,), or R indices -> (R, k), all in one matrix product.
    """
    _check_dims("C", C, 3, "(K, N, d)")
    refs = torch.as_tensor(reference).view(-1)
    if len(refs) == 0 or refs.min() < 0 or refs.max() >= C.shape[1]:
        raise BadParameter(f"reference={reference} must be image indices below N={C.shape[1]}")
    part = F.normalize(C[list(torch.as_tensor(components).view(-1).tolist())].sum(0), dim=-1)   # (N, d)
    sim = part[refs] @ part.T                                                                    # (R, N)
    sim[torch.arange(len(refs)), refs] = -math.inf
    top = sim.topk(k, dim=1).indices
    return top[0] if torch.as_tensor(reference).dim() == 0 else top


def retrieval_agreement(C: torch.Tensor, components, references, labels, k: int = 10) -> float:
    """Share of the k images retrieved per reference (``image_retrieval``) whose label equals the reference's.

    C (K, N, d); references (R,) image indices; labels (N,) one value per image (e.g. its shape).
    """
    labels = np.asarray(labels)
    if len(labels) != C.shape[1]:
        raise BadParameter(f"labels has {len(labels)} entries for N={C.shape[1]} images")
    refs = np.asarray(references).reshape(-1)
    got = image_retrieval(C, components, torch.as_tensor(refs), k=k).numpy()                   # (R, k)
    return float((labels[got] == labels[refs, None]).mean())


def label_chosen_components(C: torch.Tensor, labels, references, k: int, candidates=None) -> torch.Tensor:
    """Indices (<= k,) of components chosen greedily *with the labels*: each step adds the candidate whose
    sum with those chosen retrieves images sharing ``labels`` best over ``references``; stops when none helps.

    A yardstick for ``gap_components`` on a toy world whose labels are known (greedy, so close to the best
    choice rather than proven to be it): if these do not retrieve by a feature, a score-based choice among the same
    components will hardly do better, and the model, not the scoring, is the limit. Measure it on references other
    than the ones it was chosen on. C (K, N, d); labels (N,); references (R,).
    """
    pool = list(range(len(C)) if candidates is None else torch.as_tensor(candidates).view(-1).tolist())
    if not 1 <= k <= len(pool):
        raise BadParameter(f"k={k} must be between 1 and the number of candidates {len(pool)}")
    chosen, best = [], -1.0
    for _ in range(k):
        score, i = max((retrieval_agreement(C, chosen + [i], references, labels), i) for i in pool if i not in chosen)
        if score <= best:
            break
        chosen, best = chosen + [i], score
    return torch.tensor(chosen)


@torch.no_grad()
def class_token_map(contrib: Contributions, weights: torch.Tensor, grid: Optional[tuple] = None) -> torch.Tensor:
    """(N, gh, gw): every decomposed head's direct contribution through each patch token, read along
    one direction per image and summed over layers and heads (zero-shot segmentation, spec E7.1).

    weights (N, d): e.g. the rows of the classifier for each image's target class, so the map is
    the token decomposition of that class logit (without the constant terms).
    """
    if contrib.tokens is None:
        raise BadParameter("class_token_map needs decompose(..., tokens=True)")
    if weights.shape != (len(contrib.z), contrib.tokens.shape[-1]):
        raise BadParameter(f"weights {_shape(weights)} must be (N={len(contrib.z)}, d={contrib.tokens.shape[-1]})")
    n_tokens = contrib.n_tokens[-1]
    if any(t != n_tokens for t in contrib.n_tokens):
        raise BadParameter(f"layers have different token counts {contrib.n_tokens}; map one stage at a time")
    gh, gw = _grid(n_tokens, grid)
    patches = contrib.tokens[:, :, :, n_tokens - gh * gw:n_tokens].sum((1, 2))     # (N, gh * gw, d)
    return torch.einsum("ntd,nd->nt", patches, weights.to(patches)).view(-1, gh, gw)
