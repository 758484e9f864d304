"""interplab.alignment (ch07: COMPALIGN, TEXTSPAN, Algorithm 5, ablation curves, token heat maps).

Synthetic data with planted structure (spec section 6, acceptance checks 6-9), plus a tiny random
timm ViT for the parts that read a real decomposition.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interplab import alignment as al
from interplab.decomposition import decompose
from interplab.errors import BadParameter
from interplab.models import tiny_random


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].float()


def _planted(rank: int, K: int = 3, d: int = 8, n: int = 600, seed: int = 0):
    """Contributions (K, n, d) of rank ``rank`` each, and z_clip = normalise(sum_i c_i Q_i + b0), Q_i orthogonal.

    rank < d leaves each W_i undetermined off its component's span (P_i, (K, rank, d) orthonormal rows).
    """
    gen = torch.Generator().manual_seed(seed)
    Q = torch.stack([_orthogonal(d, gen) for _ in range(K)])
    P = torch.stack([_orthogonal(d, gen)[:rank] for _ in range(K)])
    scale = torch.tensor([1.0, 0.7, 0.5])[:K, None, None]
    C = torch.einsum("knr,krd->knd", torch.randn(K, n, rank, generator=gen) * scale, P)
    z_clip = F.normalize(torch.einsum("knd,kde->ne", C, Q) + 0.3 * torch.randn(d, generator=gen), dim=-1)
    return C, z_clip, Q, P


FIT = dict(lr=2e-2, batch_size=64, max_epochs=40, patience=50)


# ------------------------------------------------------------------ COMPALIGN (check 6)


def test_compalign_recovers_a_planted_orthogonal_map():
    C, z_clip, Q, _ = _planted(rank=8)
    align = al.fit_compalign(C, z_clip, lam=1.0, **FIT)
    val = align.history["val"]
    assert len(val) == len(align.history["train"]) and val[0] > 1.0 and min(val) < 1e-3 * val[0]  # loss decreases
    assert al.cosine_distance(align.predict(C), z_clip) < 1e-3
    assert (align.W - Q).norm(dim=(1, 2)).max() < 0.05          # the maps themselves, scale included
    assert al.orthogonality_error(align) < 0.01
    assert al.norm_rank_preservation(align) > 0.99
    F_C = align.transform(C)
    assert F_C.shape == (3, 600, 8)
    assert torch.allclose(F.normalize(F_C.sum(0), dim=-1), align.predict(C))
    assert not align.W.requires_grad  # fitted maps come back frozen, in eval mode


def test_orthogonality_regulariser_fixes_underdetermined_maps():
    """Rank-3 contributions in R^8: the data fix W_i on a 3-d span only. Both fits align perfectly and
    agree on the span; lam=1 completes each map to an isometry, lam=0 leaves the rest near its init."""
    C, z_clip, Q, P = _planted(rank=3)
    reg = al.fit_compalign(C, z_clip, lam=1.0, **FIT)
    free = al.fit_compalign(C, z_clip, lam=0.0, **FIT)
    for align in (reg, free):
        assert al.cosine_distance(align.predict(C), z_clip) < 1e-3
    assert (P @ reg.W - P @ Q).norm(dim=(1, 2)).max() < 0.05  # recovered where the data determine it
    assert al.orthogonality_error(reg) < 0.02
    assert al.orthogonality_error(free) > 0.5 and al.orthogonality_error(free, common_scale=True) > 0.5
    assert al.norm_rank_preservation(free) < al.norm_rank_preservation(reg) - 0.03
    # early stopping: the lam=0 fit reaches its floor and stops `patience` batches after its best
    assert len(free.history["val"]) - 1 - free.best_step == FIT["patience"]


def test_exact_scaled_orthogonal_maps_preserve_norm_ranks():
    """Theorem 2's sanity check: f_i = sqrt(k) Q_i keeps every norm order; one rescaled map breaks it."""
    gen = torch.Generator().manual_seed(1)
    W = torch.stack([_orthogonal(16, gen) for _ in range(5)]) * 2.0   # f_i^T f_i = 4 I
    assert al.norm_rank_preservation(W, n_pairs=10_000, seed=0) == 1.0
    assert al.orthogonality_error(W) == pytest.approx(3.0, abs=1e-5)   # ||4I - I||_F / sqrt(d)
    assert al.orthogonality_error(W, common_scale=True) < 1e-5
    W[0] *= 2.0                                                         # no longer a common scale
    assert al.norm_rank_preservation(W) < 0.95 and al.orthogonality_error(W, common_scale=True) > 0.5
    assert al.norm_rank_preservation(W, seed=3) == al.norm_rank_preservation(W, seed=3)  # seeded


def test_orthogonality_penalty_forms():
    gen = torch.Generator().manual_seed(2)
    Q = torch.stack([_orthogonal(6, gen) for _ in range(4)])
    for reg in al.REGULARISERS:
        assert float(al.orthogonality_penalty(Q, reg)) == pytest.approx(0, abs=1e-5)
    # 2Q: W^T W - I = 3I. ref: d_clip * mean over (i, a, b) = 6 * (6 diagonal 9s / 36 entries) = 9
    assert float(al.orthogonality_penalty(2 * Q, "ref")) == pytest.approx(9.0)
    assert float(al.orthogonality_penalty(2 * Q, "dissertation")) == pytest.approx(4 * 3 * math.sqrt(6))
    C, z_clip, _, _ = _planted(rank=8)
    align = al.fit_compalign(C, z_clip, lam=1.0, reg="dissertation", **{**FIT, "max_epochs": 15})
    assert al.cosine_distance(align.predict(C), z_clip) < 0.1 and al.orthogonality_error(align) < 0.05


def test_one_map_baseline_is_a_single_shared_map():
    C, z_clip, _, _ = _planted(rank=8, K=3)
    one = al.fit_one_map(C.sum(0), z_clip, **FIT)
    assert one.W.shape == (1, 8, 8)
    assert torch.allclose(one.predict(C), one.predict(C.sum(0)[None]), atol=1e-6)
    F_C = one.transform(C)                                               # the same map on every component
    assert torch.allclose(F_C[1] - one.b / 3, C[1] @ one.W[0], atol=1e-6)
    # the one map can only be exact when all Q_i agree; here they differ
    assert al.cosine_distance(one.predict(C), z_clip) > 0.05
    with pytest.raises(BadParameter, match="norm-rank preservation compares two different components"):
        al.norm_rank_preservation(one)
    again = al.fit_one_map(C.sum(0), z_clip, **FIT)
    assert torch.equal(again.W, one.W) and again.history == one.history       # seeded, deterministic
    ref_style = al.fit_one_map(C.sum(0), z_clip, val_fraction=0.0, max_epochs=3)  # [ref impl] monitoring
    assert ref_style.history["val"] == [] and len(ref_style.history["train"]) == 3 * math.ceil(600 / 32)


def test_linear_head_learns_an_unstandardised_separable_task():
    """Table 7.3's head (spec 2.10): Adam on z as the model gives it, deterministic, usable on inference tensors."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        z = torch.randn(400, 16, generator=gen) * torch.linspace(0.1, 5.0, 16)  # scales differ, as in a real z
    w = torch.randn(16, generator=gen)
    y = (z @ w > 0).long()
    head = al.fit_linear_head(z, y, 2)
    assert head.weight.shape == (2, 16) and not head.weight.requires_grad
    assert (head(z).argmax(1) == y).float().mean() > 0.9
    assert torch.equal(al.fit_linear_head(z, y, 2).weight, head.weight)                # seeded
    assert not torch.equal(al.fit_linear_head(z, y, 2, seed=1).weight, head.weight)
    with pytest.raises(BadParameter, match=r"labels in \[0, 2\)"):
        al.fit_linear_head(z, y + 1, 2)


# ------------------------------------------------------------------ TEXTSPAN (check 8)


def test_text_span_recovers_planted_directions_in_order():
    gen = torch.Generator().manual_seed(3)
    basis = _orthogonal(16, gen)
    t0, t1, t2, r = basis[:4]
    coeff = torch.randn(400, 3, generator=gen) * torch.tensor([3.0, 2.0, 1.0])
    C = coeff @ torch.stack([t0, t1, t2]) + 0.05 * torch.randn(400, 16, generator=gen) + 5 * basis[5]
    decoy = F.normalize(t0 + 0.2 * r, dim=0)  # almost t0: only the removal step stops it coming second
    T = torch.stack([F.normalize(torch.randn(16, generator=gen), dim=0), t2, decoy, t1, t0,
                     F.normalize(torch.randn(16, generator=gen), dim=0)])
    assert (C @ decoy).std() > (C @ t1).std()          # without removal the decoy would be picked second
    assert al.text_span(C, T, 3).tolist() == [4, 3, 1]
    # rank=r projects T on the top right singular vectors of the *uncentred* C (Gandelsman's code):
    # the offset 5 * basis[5] takes one of them, so rank 3 loses t2 and rank 4 keeps it
    assert al.text_span(C, T, 3, rank=4).tolist() == [4, 3, 1]
    assert al.text_span(C, T, 3, rank=3).tolist()[:2] == [4, 3] and al.text_span(C, T, 3, rank=3)[2] != 1
    assert sorted(al.text_span(C, T, 6).tolist()) == list(range(6))   # every text at most once


def test_match_rate():
    assert al.match_rate([[1, 2, 3], [4, 5, 6]], [[3, 2, 9], [7, 8, 9]]) == pytest.approx((2 / 3 + 0) / 2)


# ------------------------------------------------------------------ Algorithm 5 (check 7)


def _feature_world(seed: int = 4):
    """K=5 noise components in R^12; component 2 also carries a 3-d feature subspace U."""
    gen = torch.Generator().manual_seed(seed)
    basis = _orthogonal(12, gen)
    U = basis[:3]
    C = torch.randn(5, 500, 12, generator=gen)
    C[2] += 2.0 * torch.randn(500, 3, generator=gen) @ U
    B = torch.randn(3, 3, generator=gen) @ U                         # instantiations spanning U
    return C, B, gen


def test_component_scores_rank_the_planted_component_first():
    C, B, gen = _feature_world()
    scores = al.component_scores(C, C.sum(0), B)
    assert scores.shape == (5,) and int(scores.argmax()) == 2
    assert scores[2] > 0.6 and (scores[[0, 1, 3, 4]] < 0.5).all()
    assert torch.allclose(al.component_scores(C, None, B), scores)     # Z defaults to the sum
    z_ref = C.sum(0) + 0.3 * torch.randn(500, 12, generator=gen)
    gt = al.gt_scores(C, z_ref, B)
    assert int(gt.argmax()) == 2 and int(al.gt_scores(C, z_ref, B, similarity="cosine").argmax()) == 2
    assert float(al.gt_scores(C[:1], C[0], B)) == pytest.approx(1.0)   # a component that is the reference


def test_component_scores_invariance_to_the_feature_basis():
    C, B, gen = _feature_world()
    Z = C.sum(0)
    base = al.component_scores(C, Z, B)
    scaled = torch.diag(torch.tensor([2.0, -0.5, 3.0])) @ B              # row scaling, any sign
    triangular = torch.tensor([[1.0, 0, 0], [0.7, -2.0, 0], [-1.5, 0.4, 0.5]]) @ B  # Gram-Schmidt keeps the basis
    for other in (scaled, triangular):
        assert torch.allclose(al.component_scores(C, Z, other), base, atol=1e-5)
    # a general re-basing of the same span: QR (Algorithm 5 as printed) picks another basis, "pca" does not
    mixed = torch.randn(3, 3, generator=gen) @ B
    assert (al.component_scores(C, Z, mixed) - base).abs().max() > 1e-3
    pca = al.component_scores(C, Z, B, basis="pca")
    for other in (scaled, triangular, mixed):
        assert torch.allclose(al.component_scores(C, Z, other, basis="pca"), pca, atol=1e-5)
    assert int(pca.argmax()) == 2
    with pytest.raises(BadParameter, match="linearly dependent"):
        al.component_scores(C, Z, torch.cat([B, B[:1] * 2]))


def test_ordering_spearman_tables():
    scores = np.array([[0.9, 0.1, 0.3], [0.3, 0.3, 0.1], [0.1, 0.8, 0.3]])   # (K=3 components, P=3 features)
    gt = np.array([[0.8, 0.0, 0.1], [0.5, 0.4, 0.1], [0.2, 0.9, 0.3]])
    comp = al.component_ordering_spearman(scores, gt)
    # last feature: ranks (2.5, 1, 2.5) vs (1.5, 1.5, 3): ties get average ranks
    assert np.allclose(comp, [1.0, 1.0, 0.5])
    feat = al.feature_ordering_spearman(scores, gt)
    assert np.allclose(feat, [1.0, math.sqrt(3) / 2, 1.0])                # component 1: (2.5, 2.5, 1) vs (3, 2, 1)
    assert np.allclose(al.feature_ordering_spearman(torch.tensor(scores), torch.tensor(gt)), feat)
    assert np.isnan(al.component_ordering_spearman(np.ones((3, 2)), gt[:, :2])).all()  # constant scores
    with pytest.raises(BadParameter, match=r"scores \(3, 3\) and gt \(3, 2\)"):
        al.component_ordering_spearman(scores, gt[:, :2])


def test_table_11_4_row_means_are_table_7_2_component_ordering():
    """Check 9 (data): the dissertation's per-feature values average to its component-ordering column."""
    table_11_4 = {"DeiT": [0.679, 0.563, 0.774, 0.596, 0.818, 0.597, 0.764],
                  "DINO": [0.663, 0.657, 0.781, 0.742, 0.833, 0.680, 0.706],
                  "DINOv2": [0.751, 0.614, 0.875, 0.714, 0.857, 0.597, 0.510],
                  "SWIN": [0.795, 0.720, 0.904, 0.780, 0.912, 0.760, 0.739],
                  "MaxViT": [0.872, 0.832, 0.911, 0.828, 0.901, 0.803, 0.797]}
    table_7_2 = {"DeiT": 0.684, "DINO": 0.723, "DINOv2": 0.703, "SWIN": 0.801, "MaxViT": 0.849}
    for model, row in table_11_4.items():
        assert np.mean(row) == pytest.approx(table_7_2[model], abs=1e-3)


# ------------------------------------------------------------------ a decomposed tiny ViT


@pytest.fixture(scope="module")
def vit():
    """tiny random timm ViT (depth 2, d=192, 4x4 patches + CLS), 40 images decomposed with tokens."""
    model = tiny_random.timm_vit()
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, decompose(model, x, tokens=True)


def test_ablation_curve_endpoints(vit):
    model, c = vit
    classify = lambda z: model.head(z).argmax(1)
    with torch.no_grad():
        labels = classify(c.z)
    labels[:5] = (labels[:5] + 1) % 10                                  # unablated accuracy 35/40
    order = al.backward_order(c)
    assert order == ["layer[1].mlp", "layer[1].attn", "layer[0].mlp", "layer[0].attn"]
    curve = al.ablation_curve(c, order, classify, labels)
    assert curve.shape == (5,) and curve[0] == 35 / 40                   # k = 0: exactly unablated
    everything = al.ablation_curve(c, c.names("layer"), classify, labels)  # + embed and bias
    with torch.no_grad():
        mean_pred = classify(c.z.mean(0, keepdim=True)).expand(40)
    assert everything[-1] == float((mean_pred == labels).double().mean())
    assert np.array_equal(al.ablation_curve(c, order, classify, labels, reference=c), curve)
    with pytest.raises(BadParameter, match=r"labels \(39,\) must be \(N,\) with N=40"):
        al.ablation_curve(c, order, classify, labels[:39])


def test_token_heatmap_sums_to_the_heads_direct_contribution(vit):
    _, c = vit
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(192, generator=gen)
    layer, head = 1, 2
    heat = al.token_heatmap(c, layer, head, y)
    assert heat.shape == (40, 4, 4) and heat.abs().max() > 0
    cls = c.tokens[:, layer, head, 0] @ y
    assert torch.allclose(heat.sum((1, 2)) + cls, c.heads[:, layer, head] @ y, atol=1e-4)
    assert torch.equal(al.token_heatmap(c, -1, head, y), heat)          # negative = from the end
    # a CLIP-space direction through the head's map W (d, d_clip), bias excluded
    W, y_clip = torch.randn(192, 16, generator=gen), torch.randn(16, generator=gen)
    heat_clip = al.token_heatmap(c, layer, head, y_clip, weight=W)
    assert torch.allclose(heat_clip, al.token_heatmap(c, layer, head, W @ y_clip), atol=1e-4)
    assert torch.allclose(heat_clip.sum((1, 2)) + (c.tokens[:, layer, head, 0] @ W) @ y_clip,
                          (c.heads[:, layer, head] @ W) @ y_clip, atol=1e-3)
    assert al.token_heatmap(c, layer, head, y, grid=(2, 8)).shape == (40, 2, 8)
    with pytest.raises(BadParameter, match=r"grid \(5, 5\) needs 25 patch tokens; the layer has 17"):
        al.token_heatmap(c, layer, head, y, grid=(5, 5))
    with pytest.raises(BadParameter, match=r"direction \(16,\) must be \(d=192,\)"):
        al.token_heatmap(c, layer, head, y_clip)
    with pytest.raises(BadParameter, match="heads 0..2"):
        al.token_heatmap(c, layer, 3, y)
    with pytest.raises(BadParameter, match="tokens=True"):
        al.token_heatmap(decompose(vit[0], torch.zeros(1, 3, 32, 32)), layer, head, y)


def test_mask_auroc():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True                                             # object in the top-left quadrant
    heat = torch.zeros(3, 4, 4)
    heat[:, :2, :2] = 1.0
    assert al.mask_auroc(heat, masks) == pytest.approx(1.0)
    assert al.mask_auroc(-heat, masks) == pytest.approx(0.0)
    assert al.mask_auroc(torch.zeros(3, 4, 4), masks) == pytest.approx(0.5)
    assert al.mask_auroc(heat, masks, average="pooled") == pytest.approx(1.0)
    masks[0] = False                                                    # no object: skipped per image
    assert al.mask_auroc(heat, masks) == pytest.approx(1.0)
    with pytest.raises(BadParameter, match=r"heat \(2, 4, 4\) and masks \(3, 8, 8\) disagree"):
        al.mask_auroc(heat[:2], masks)


def test_class_token_map_is_the_logit_through_patch_tokens(vit):
    model, c = vit
    w = model.head.weight.detach()[torch.arange(40) % 10]                    # (N, d): one class per image
    heat = al.class_token_map(c, w)
    assert heat.shape == (40, 4, 4)
    per_head = sum(al.token_heatmap(c, layer, h, w[0]) for layer in (0, 1) for h in range(3))
    assert torch.allclose(heat[0], per_head[0], atol=1e-4)
    with pytest.raises(BadParameter, match=r"weights \(40, 7\) must be \(N=40, d=192\)"):
        al.class_token_map(c, torch.zeros(40, 7))


# ------------------------------------------------------------------ retrieval (Figs 7.3, 7.4)


def test_gap_components_pick_the_feature_specific_ones():
    scores = np.array([[0.9, 0.8], [0.5, 0.0], [0.2, 0.9], [0.6, 0.1]])   # gaps for feature 0: .1 .5 -.7 .5
    assert sorted(al.gap_components(scores, 0, 2).tolist()) == [1, 3]
    assert al.gap_components(scores, 1, 1).tolist() == [2]
    with pytest.raises(BadParameter, match="k=5 must be between 1 and the number of components 4"):
        al.gap_components(scores, 0, 5)


def test_text_and_image_retrieval_follow_the_planted_component():
    gen = torch.Generator().manual_seed(3)
    C = torch.randn(3, 50, 4, generator=gen) * 0.1
    y = torch.tensor([1.0, 0, 0, 0])
    C[1, 7, 0] = 5.0                                                       # image 7 is extreme in component 1 only
    top = al.text_retrieval(C, [[0], [1, 2]], y, k=3)
    assert top.shape == (2, 3) and top[1, 0] == 7 and 7 not in top[0].tolist()
    C[0, 20] = torch.tensor([40.0, 40.0, 0, 0])                            # long but 45 degrees off y
    C[0, 21] = torch.tensor([0.5, 0.0, 0, 0])                              # short but along y
    assert al.text_retrieval(C, [[0]], y, k=1).tolist() == [[21]]          # cosine, not dot product (§7.4)
    C[2, 11] = C[2, 4]                                                      # images 4, 11 twins in component 2
    assert al.image_retrieval(C, [2], 4, k=1).tolist() == [11]
    assert 4 not in al.image_retrieval(C, [0, 1, 2], 4, k=49).tolist()    # the reference is never retrieved
    batched = al.image_retrieval(C, [2], [4, 11, 30], k=5)                 # (3, 5): one row per reference
    assert batched.shape == (3, 5) and batched[0, 0] == 11 and batched[1, 0] == 4
    for i, r in enumerate([4, 11, 30]):                                    # against cosine similarity written out
        sim = torch.nn.functional.cosine_similarity(C[2], C[2, r][None], dim=-1)
        sim[r] = -float("inf")
        assert torch.equal(batched[i], sim.topk(5).indices)
    with pytest.raises(BadParameter, match="must be image indices below N=50"):
        al.image_retrieval(C, [2], [3, 50])
    with pytest.raises(BadParameter, match=r"direction \(3,\) must be \(d_clip=4,\)"):
        al.text_retrieval(C, [[0]], torch.ones(3))


def test_label_chosen_components_find_the_component_that_holds_the_label():
    gen = torch.Generator().manual_seed(4)
    labels = torch.arange(60) % 3                                          # three classes of 20 images
    C = torch.randn(4, 60, 6, generator=gen)                               # noise in every component ...
    C[2] += 8 * torch.nn.functional.one_hot(labels, 6).float()             # ... component 2 also holds the class
    refs = list(range(30))
    assert al.retrieval_agreement(C, [2], refs, labels.numpy()) == 1.0
    assert al.retrieval_agreement(C, [0], refs, labels.numpy()) < 0.6
    picked = al.label_chosen_components(C, labels.numpy(), refs, k=3)
    assert picked.tolist() == [2]                                          # adding noise never helps: it stops
    assert set(al.label_chosen_components(C, labels.numpy(), refs, k=2, candidates=[0, 1]).tolist()) <= {0, 1}
    with pytest.raises(BadParameter, match="k=5 must be between 1 and the number of candidates 4"):
        al.label_chosen_components(C, labels.numpy(), refs, k=5)
    with pytest.raises(BadParameter, match="labels has 59 entries for N=60"):
        al.retrieval_agreement(C, [2], refs, labels[:59].numpy())


# ------------------------------------------------------------------ bad input


def test_shape_errors_name_the_shapes():
    C = torch.zeros(3, 100, 8)
    with pytest.raises(BadParameter, match=r"contribs \(3, 100, 8\) and z_clip \(90, 8\) disagree on the number"):
        al.fit_compalign(C, torch.zeros(90, 8))
    with pytest.raises(BadParameter, match=r"contribs must be a 3-d tensor \(K, N, d\); got \(100, 8\)"):
        al.fit_compalign(C[0], torch.zeros(100, 8))
    align = al.CompAlign(3, 8, 4)
    with pytest.raises(BadParameter, match=r"contribs \(2, 100, 8\) do not fit maps W \(3, 8, 4\)"):
        align.transform(C[:2])
    with pytest.raises(BadParameter, match="reg='l2' is not valid"):
        al.fit_compalign(C, torch.zeros(100, 8), reg="l2")
    with pytest.raises(BadParameter, match=r"C \(100, 8\) and T \(5, 6\) disagree on the embedding width"):
        al.text_span(C[0], torch.zeros(5, 6), 2)
    with pytest.raises(BadParameter, match="k=6 must be between 1 and the number of texts 5"):
        al.text_span(C[0], torch.zeros(5, 8), 6)
    with pytest.raises(BadParameter, match=r"C \(3, 100, 8\) and Z \(99, 8\) disagree on the number of images"):
        al.component_scores(C, torch.zeros(99, 8), torch.eye(8)[:2])
    with pytest.raises(BadParameter, match=r"C \(3, 100, 8\) and B \(2, 7\) disagree on the CLIP width"):
        al.component_scores(C, None, torch.eye(7)[:2])
    with pytest.raises(BadParameter, match=r"C \(3, 100, 8\) and Y \(2, 6\) disagree"):
        al.gt_scores(C, torch.zeros(100, 8), torch.zeros(2, 6))
    with pytest.raises(BadParameter, match=r"pred \(100, 8\) and z_clip \(100, 4\)"):
        al.cosine_distance(C[0], torch.zeros(100, 4))
