"""Chapter 4 library: tasks, learners, FastDiffSel, greedy search, export, paper loaders."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interplab.errors import BadParameter, ResourceUnavailable
from interplab.fewshot import data, export, learners as L, select as S, tasks as T


def gaussian_world(seed=0, n_cls=8, per=30, d=16, spread=0.8):
    """Labelled Gaussian clusters: features (n, d) float32 and labels (n,)."""
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_cls), per)
    x = g.normal(0, 1.0, (n_cls, d))[y] + g.normal(0, spread, (len(y), d))
    return torch.tensor(x, dtype=torch.float32), y


@pytest.fixture(scope="module")
def pool():
    return data.make_pool("novel", "mixed", seed=0, per_class=40)


# ------------------------------------------------------------------------------ data
def test_pool_is_deterministic_and_split(pool):
    again = data.make_pool("novel", "mixed", seed=0, per_class=40)
    assert np.array_equal(pool.x, again.x) and np.array_equal(pool.y, again.y)
    assert pool.x.shape == (len(pool.y), 1, 8, 16) and 0 <= pool.x.min() and pool.x.max() <= 1
    base, novel = data.class_split(0)
    assert not set(base) & set(novel) and len(base) + len(novel) == 100
    assert set(np.unique(pool.y)) == set(novel)
    assert {"view", *data.ISSUES} <= set(pool.annotations)
    assert 0.05 < pool.annotations["blur"].mean() < 0.3            # mixed regime: 15 % each
    assert not np.array_equal(pool.x, data.make_pool("novel", "mixed", seed=1, per_class=40).x)


def test_pool_rebuilds_from_id(pool):
    assert export.pool_hash(data.load(pool.id)) == export.pool_hash(pool)


def test_nuisance_annotations_change_pixels():
    clean = data.make_pool("novel", "clean", seed=0, per_class=10)
    view = data.make_pool("novel", "viewpoint", seed=0, per_class=10)
    assert (clean.annotations["view"] == 0).all() and (view.annotations["view"] > 0).any()
    with pytest.raises(BadParameter, match="regime"):
        data.make_pool("novel", "fog")


# ------------------------------------------------------------------------------ tasks
def test_samplers_respect_constraints(pool):
    for sampler in (T.FixedSampler(5, 5, 10), T.MetaDatasetSampler(max_way=20, max_support=200)):
        for task in T.sample_tasks(sampler, pool.y, 20, seed=0):
            assert T.check_task(task, pool.y) == []
    md = T.sample_tasks(T.MetaDatasetSampler(max_way=20), pool.y, 40, seed=1)
    assert len({t.way for t in md}) > 3 and all(5 <= t.way <= 20 for t in md)
    assert any(len(set(t.shots)) > 1 for t in md)                    # imbalanced shots
    assert all(t.n_query == 10 for t in md)                           # min(10, 40 // 2)


def test_query_filter_and_pool_exclude_queries(pool):
    front = pool.annotations["view"] == 0
    for task in T.sample_tasks(T.FixedSampler(5, 5, 10), pool.y, 10, seed=2, query_from=front):
        assert front[list(task.query)].all()
        for p in T.search_pool(task, pool.y):
            assert not np.isin(p, task.query).any()


def test_capped_search_pool_is_a_fixed_subset_per_task(pool):
    task = T.sample_tasks(T.FixedSampler(5, 5, 10), pool.y, 1, seed=3)[0]
    full = T.search_pool(task, pool.y)
    capped = T.search_pool(task, pool.y, cap=25)                      # 25 - 10 queries = 15 per class
    assert [len(p) for p in full] == [30] * 5 and [len(p) for p in capped] == [15] * 5
    assert all(np.isin(c, f).all() and np.all(np.diff(c) > 0) for c, f in zip(capped, full))
    assert all(np.array_equal(a, b) for a, b in zip(capped, T.search_pool(task, pool.y, cap=25)))  # same task, same pool
    other = T.search_pool(task, pool.y, cap=25, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(capped, other))
    assert [len(p) for p in T.search_pool(task, pool.y, cap=12)] == [5] * 5       # never fewer than the shots
    assert all(np.array_equal(a, b) for a, b in zip(full, T.search_pool(task, pool.y, cap=1000)))


def test_md_pool_cap_follows_hard_md_release():
    narrow, wide = T.Task(tuple(range(20)), (1,) * 20, (), ()), T.Task(tuple(range(21)), (1,) * 21, (), ())
    cap = data.md_pool_cap("quickdraw")
    assert cap(narrow) == 800 and cap(wide) == 100
    assert data.md_pool_cap("mscoco")(wide) == 100 and data.md_pool_cap("aircraft") is None


def test_select_tasks_searches_only_the_capped_pool():
    x, y = gaussian_world(n_cls=6, per=40)
    tasks = T.sample_tasks(T.FixedSampler(3, 2, 5), y, 4, seed=0)
    rule = lambda task: 15                                            # noqa: E731  (10 per class after 5 queries)
    picked, _ = S.select_tasks(tasks, x, y, "fastdiffsel", pool_cap=rule)
    for task, new in zip(tasks, picked):
        inside = np.concatenate(T.search_pool(task, y, cap=15))
        assert np.isin(new.support, inside).all() and T.check_task(new, y) == []
    wide, _ = S.select_tasks(tasks, x, y, "fastdiffsel")
    loss = S.support_loss(picked, x, y, pool_cap=rule)
    assert torch.allclose(loss, S.support_loss(picked, x, y)) and loss.shape == (4,)
    assert any(a.support != b.support for a, b in zip(picked, wide))


def test_check_task_catches_violations(pool):
    task = T.sample_tasks(T.FixedSampler(5, 2, 3), pool.y, 1, seed=0)[0]
    leaked = task.with_support(task.support[:-1] + (task.query[0],))
    assert any("query" in p for p in T.check_task(leaked, pool.y))
    short = task.with_support(task.support[:-1])
    assert any("expected 2" in p for p in T.check_task(short, pool.y))


# ------------------------------------------------------------------------------ projection
def bisection_projection(v, radius, iters=200):
    """Independent solver: root of sum_i (|v_i| - lambda)_+ = radius by bisection (Eq. 11.6)."""
    a = np.abs(v)
    if a.sum() <= radius:
        return v.copy(), 0.0
    lo, hi = 0.0, a.max()
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(a - mid, 0).sum() > radius else (lo, mid)
    lam = (lo + hi) / 2
    return np.sign(v) * np.maximum(a - lam, 0), lam


def test_l1_projection_kkt_and_bisection():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 30, generator=g, dtype=torch.float64) * torch.rand(50, 1, generator=g, dtype=torch.float64) * 3
    radius = torch.rand(50, generator=g, dtype=torch.float64) * 10 + 0.1
    w, lam = S.project_l1(v, radius)
    for i in range(50):
        ref, ref_lam = bisection_projection(v[i].numpy(), radius[i].item())
        np.testing.assert_allclose(w[i].numpy(), ref, atol=1e-9)
        assert abs(lam[i].item() - ref_lam) < 1e-9
        wi, vi, li = w[i], v[i], lam[i]
        assert wi.abs().sum() <= radius[i] + 1e-9                                    # feasible
        on = wi != 0
        torch.testing.assert_close(wi[on], vi[on] - torch.sign(vi[on]) * li)         # stationarity
        assert (vi[~on].abs() <= li + 1e-12).all()                                   # subgradient
        if li > 0:
            assert abs(wi.abs().sum() - radius[i]) < 1e-9                           # complementary slackness
        # no feasible point is closer than the projection
        probe = torch.randn(200, 30, dtype=torch.float64)
        probe = probe / probe.abs().sum(1, keepdim=True) * radius[i] * torch.rand(200, 1, dtype=torch.float64)
        assert ((probe - vi).norm(dim=1) >= (wi - vi).norm() - 1e-9).all()


def test_l1_projection_idempotent_and_masked():
    v = torch.tensor([[0.2, -0.3, 0.1, 0.0], [3.0, 1.0, -2.0, 5.0]])
    w, lam = S.project_l1(v, torch.tensor([1.0, 2.0]))
    assert torch.equal(w[0], v[0]) and lam[0] == 0                                  # already inside
    w2, _ = S.project_l1(w, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(w2, w)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    wm, _ = S.project_l1(v, torch.tensor([1.0, 2.0]), mask)
    assert (wm[1, 2:] == 0).all() and abs(wm[1].abs().sum() - 2) < 1e-6


def bisection_box(v, k, iters=200):
    """Independent solver: root of sum_i clip(v_i - lambda, 0, 1) = k by bisection."""
    lo, hi = v.min() - 1, v.max()
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.clip(v - mid, 0, 1).sum() > k else (lo, mid)
    return np.clip(v - (lo + hi) / 2, 0, 1)


@pytest.mark.parametrize("root", ["few_ones", "breakpoints"])
def test_box_projection_exact_both_roots(root):
    g = np.random.default_rng(0)
    for trial in range(300):
        n = int(g.integers(2, 40))
        v = g.normal(size=n) * g.uniform(0.01, 5) * (1000 if trial % 7 == 0 else 1)
        v = v.round() if trial % 3 == 0 else v                                  # ties, v_i - 1 == v_j
        k = int(g.integers(1, n + 1))
        vt, kt = torch.tensor(v)[None], torch.tensor([float(k)], dtype=torch.float64)
        lam = S._box_root_few_ones(vt, kt, k) if root == "few_ones" else S._box_root_breakpoints(vt, kt)
        w = (vt - lam[:, None]).clamp(0, 1)[0].numpy()
        np.testing.assert_allclose(w, bisection_box(v, k), atol=1e-8)
        assert abs(w.sum() - k) < 1e-8 and w.min() >= 0 and w.max() <= 1
        free = (w > 0) & (w < 1)                                                 # KKT: one multiplier
        np.testing.assert_allclose(v[free] - w[free], lam.item(), atol=1e-8)
        assert (v[w == 0] <= lam.item() + 1e-8).all() and (v[w == 1] >= lam.item() + 1 - 1e-8).all()


def test_box_projection_long_rows_truncated_grid():
    """Rows over 128 entries use only the entries above u_k - 1; still exact, at every spread."""
    g = torch.Generator().manual_seed(3)
    for scale in (0.05, 1.0, 100.0):
        v = torch.randn(2, 6, 300, generator=g, dtype=torch.float64) * scale
        mask = torch.rand(2, 6, 300, generator=g) > 0.1
        k = torch.randint(1, 12, (2, 6), generator=g).to(torch.float64)
        w, _ = S.project_box(v, k, mask)
        vm = v.masked_fill(~mask, -torch.inf)
        ref = (vm - S._box_root_breakpoints(vm, k).unsqueeze(-1)).clamp(0, 1)
        torch.testing.assert_close(w, ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(w.sum(-1), k)


def test_box_projection_masks_batches_and_is_idempotent():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 4, 30, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(3, 4, 30, generator=g) > 0.3
    mask[0, 0] = False                                                         # a padded class slot
    k = torch.randint(1, 8, (3, 4), generator=g).to(torch.float64)
    k[0, 0] = 0
    k[1, 1] = 20                                                               # > 16: the breakpoint root
    w, _ = S.project_box(v, k, mask)
    assert not w.isnan().any() and (w[~mask] == 0).all() and (w[0, 0] == 0).all()
    torch.testing.assert_close(w.sum(-1), k)
    for i, j in [(1, 1), (2, 3)]:
        ref = bisection_box(v[i, j][mask[i, j]].numpy(), k[i, j].item())
        np.testing.assert_allclose(w[i, j][mask[i, j]].numpy(), ref, atol=1e-8)
    torch.testing.assert_close(S.project_box(w, k, mask)[0], w)                # already feasible
    vertex = torch.zeros(1, 6, dtype=torch.float64)
    vertex[0, [1, 4]] = 1
    torch.testing.assert_close(S.project_box(vertex, torch.tensor([2.0], dtype=torch.float64))[0], vertex)
    assert (S.project_box(v, torch.zeros(3, 4, dtype=torch.float64), mask)[0] == 0).all()


def test_top_k_breaks_ties_deterministically():
    w_bar = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 1.0]]])
    w_hat = torch.tensor([[[0.1, 0.3, 0.3, -1.0, 2.0]]])
    chosen = S.top_k(w_bar, w_hat, torch.ones(1, 1, 5, dtype=torch.bool), torch.tensor([[3]]))
    assert chosen[0, 0].tolist() == [False, True, True, False, True]                 # 4, then 1 and 2


# ------------------------------------------------------------------------------ selection
def test_closed_form_gradient_equals_autograd():
    f, y = gaussian_world(1)
    tasks = T.sample_tasks(T.MetaDatasetSampler(max_way=8, max_support=60), y, 3, seed=0)
    *inp, _ = S.pool_tensors(tasks, f, y)
    pool_x, pool_m = inp[0], inp[1]
    w = torch.rand(pool_m.shape) * pool_m
    wr = w.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(S.query_loss(wr, pool_x, pool_m, *inp[3:]).sum(), wr)
    loss, g = S.loss_and_grad(w, pool_x, pool_m, *inp[3:])
    torch.testing.assert_close(loss, S.query_loss(w, pool_x, pool_m, *inp[3:]))
    torch.testing.assert_close(g, g_auto, atol=1e-5, rtol=1e-4)


def test_cosine_classifier_gradient_equals_autograd_and_pmf_head():
    f, y = gaussian_world(2)
    tasks = T.sample_tasks(T.MetaDatasetSampler(max_way=8, max_support=60), y, 3, seed=1)
    *inp, _ = S.pool_tensors(tasks, f, y)
    pool_m = inp[1]
    w = torch.rand(pool_m.shape, dtype=torch.float64) * pool_m
    inp64 = [t.double() if t.is_floating_point() else t for t in inp]
    wr = w.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(S.query_loss(wr, inp64[0], pool_m, *inp64[3:], cosine_scale=12.5).sum(), wr)
    loss, g = S.loss_and_grad(w, inp64[0], pool_m, *inp64[3:], cosine_scale=12.5)
    torch.testing.assert_close(loss, S.query_loss(w, inp64[0], pool_m, *inp64[3:], cosine_scale=12.5))
    torch.testing.assert_close(g, g_auto)
    assert not torch.allclose(loss, S.query_loss(w, inp64[0], pool_m, *inp64[3:]))   # not the Euclidean loss
    # P>M>F's head: scale * (cos + bias) on the class means; the bias leaves the softmax unchanged
    b = T.collate(tasks, f, y)
    protos = L.prototypes(b.s_x, b.s_y, b.s_m, b.c_m.shape[1])
    head = 12.5 * (F.normalize(b.q_x, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2) + 0.3)
    ours = L.ProtoNet(cosine_scale=12.5).logits(b)
    ok = b.c_m.unsqueeze(1).expand_as(ours)
    torch.testing.assert_close(ours.log_softmax(-1)[ok], head.masked_fill(~ok, -1e9).log_softmax(-1)[ok])
    for method in ("fastdiffsel", "greedy"):
        picked, _ = S.select_tasks(tasks, f, y, method, cosine_scale=12.5)
        assert all(T.check_task(t, y) == [] for t in picked)


def test_objective_is_monotone_over_ascent_steps():
    f, y = gaussian_world(0)
    tasks = T.sample_tasks(T.FixedSampler(5, 5, 5), y, 4, seed=0)
    *inp, _ = S.pool_tensors(tasks, f, y)
    up = np.array(S.fastdiffsel(*inp, alpha=0.01, steps=30, seed=0, track=True).trace)
    down = np.array(S.fastdiffsel(*inp, alpha=0.01, steps=30, seed=0, maximize=False, track=True).trace)
    # trace[0] is the random init, outside the l1 ball; from the first projected iterate on,
    # projected gradient steps this small must move the objective one way only
    assert np.all(np.diff(up[1:]) >= -1e-4) and up[-1] > 3 * up[0]
    assert np.all(np.diff(down[1:]) <= 1e-4) and down[-1] < down[0] / 3


def test_fast_rounding_equals_top_k_of_projected_weights():
    """FastDiffSel rounds by w_hat alone: every projection is non-decreasing in w_hat per row."""
    g = torch.Generator().manual_seed(2)
    w_hat = torch.randn(4, 5, 3, 30, generator=g).round(decimals=1)            # many exact ties
    mask = torch.rand(4, 5, 1, 30, generator=g) > 0.2
    shots = torch.randint(1, 9, (4, 5, 1), generator=g)
    shots[0, 4] = 0
    k = shots.float()
    for w_bar in (S.project_box(w_hat, k, mask)[0], S.project_l1(w_hat.clamp_min(0), k, mask)[0],
                  S.project_l1(w_hat, k, mask)[0]):
        m = mask.expand_as(w_hat)
        assert torch.equal(S._largest(w_hat, mask, shots), S.top_k(w_bar, w_hat, m, shots.expand(4, 5, 3)))


def test_box_and_l1_select_the_same_in_one_step_and_restarts_help():
    f, y = gaussian_world(5, n_cls=10, per=40, spread=1.2)
    tasks = T.sample_tasks(T.FixedSampler(5, 5, 10), y, 12, seed=0)
    *inp, _ = S.pool_tensors(tasks, f, y)
    one = [S.fastdiffsel(*inp, alpha=200.0, steps=1, relax=r).chosen for r in ("l1", "box")]
    assert torch.equal(*one)                                                    # the dissertation's step
    loss = {r: S.query_loss(S.fastdiffsel(*inp, alpha=1.0, steps=5, restarts=r).chosen.float(), *inp[:2], *inp[3:])
            for r in (1, 8)}
    assert loss[8].mean() > loss[1].mean()


def test_best_iterate_never_loses_objective():
    """best_iterate rounds the projected iterate with the largest L, so L(weights) >= the last's."""
    f, y = gaussian_world(6, n_cls=10, per=40, spread=1.2)
    tasks = T.sample_tasks(T.FixedSampler(5, 5, 10), y, 12, seed=1)
    *inp, _ = S.pool_tensors(tasks, f, y)
    for sign in (True, False):
        sel = {b: S.fastdiffsel(*inp, alpha=10.0, steps=6, maximize=sign, best_iterate=b) for b in (True, False)}
        lb, ll = (S.query_loss(sel[b].weights, *inp[:2], *inp[3:]) for b in (True, False))
        assert ((lb - ll) * (1 if sign else -1) >= -1e-3).all() and not torch.equal(lb, ll)


@pytest.mark.parametrize("method,kw", [("fastdiffsel", dict(steps=1)), ("fastdiffsel", dict(steps=10)),
                                       ("fastdiffsel", dict(steps=5, alpha=1.0, restarts=4)),
                                       ("fastdiffsel", dict(steps=5, relax="l1", restarts=3)),
                                       ("greedy", dict(rounds=3))])
def test_selected_support_sets_satisfy_constraints(pool, method, kw):
    feats = torch.as_tensor(pool.x.reshape(len(pool.y), -1))
    for sampler in (T.FixedSampler(5, 5, 10), T.MetaDatasetSampler(max_way=12, max_support=150)):
        tasks = T.sample_tasks(sampler, pool.y, 6, seed=3)
        picked, _ = S.select_tasks(tasks, feats, pool.y, method, **kw)
        for before, after in zip(tasks, picked):
            assert T.check_task(after, pool.y) == []
            assert after.query == before.query and after.classes == before.classes and after.shots == before.shots
            assert not set(after.support) & set(before.query)


def test_selection_makes_tasks_harder_and_easier():
    f, y = gaussian_world(2, n_cls=10, per=40, spread=1.2)
    tasks = T.sample_tasks(T.FixedSampler(5, 5, 10), y, 30, seed=0)
    picked = {"random": tasks,
              "hard": S.select_tasks(tasks, f, y, "fastdiffsel", steps=10)[0],
              "greedy": S.select_tasks(tasks, f, y, "greedy")[0],
              "easy": S.select_tasks(tasks, f, y, "fastdiffsel", steps=10, alpha=0.01, maximize=False)[0]}
    loss = {k: S.support_loss(v, f, y).mean().item() for k, v in picked.items()}
    acc = {k: L.accuracy(L.ProtoNet(), T.collate(v, f, y)).mean() for k, v in picked.items()}
    assert loss["easy"] < loss["random"] / 2 and loss["hard"] > 2 * loss["random"] and loss["greedy"] > 2 * loss["random"]
    assert acc["hard"] < acc["random"] - 10 and acc["greedy"] < acc["random"] - 10 and acc["easy"] > acc["random"]


def test_alpha_grid_search_picks_the_extreme_loss():
    f, y = gaussian_world(4)
    tasks = T.sample_tasks(T.FixedSampler(5, 5, 5), y, 8, seed=1)
    best, table = S.tune_alpha(tasks, f, y, alphas=(0.01, 1.0, 200.0), steps=3)
    assert best == table.loc[table["loss"].idxmax(), "alpha"] and len(table) == 3


# ------------------------------------------------------------------------------ learners
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # sklearn NearestCentroid, 1-shot classes
def test_protonet_and_1nn_match_sklearn(pool):
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
    feats = torch.as_tensor(pool.x.reshape(len(pool.y), -1), dtype=torch.float64)
    tasks = T.sample_tasks(T.MetaDatasetSampler(max_way=15, max_support=120), pool.y, 25, seed=4)
    batch = T.collate(tasks, feats, pool.y)
    for ours, ref in [(L.ProtoNet(), NearestCentroid()), (L.NearestNeighbour(), KNeighborsClassifier(1))]:
        mine = L.accuracy(ours, batch)
        theirs = []
        for t in tasks:
            s, q = list(t.support), list(t.query)
            theirs.append(100 * (ref.fit(feats[s].numpy(), pool.y[s]).predict(feats[q].numpy()) == pool.y[q]).mean())
        assert abs(mine.mean() - np.mean(theirs)) < 0.5, type(ours).__name__
        assert np.mean(np.abs(mine - theirs) < 1e-3) > 0.9                          # per task, ties aside


def test_linear_head_learns_and_tasks_are_independent():
    f, y = gaussian_world(3, spread=0.5)
    tasks = T.sample_tasks(T.MetaDatasetSampler(max_way=8, max_support=80), y, 6, seed=0)
    head = L.LinearHead(steps=60)
    together = L.accuracy(head, T.collate(tasks, f, y))
    alone = np.concatenate([L.accuracy(head, T.collate([t], f, y)) for t in tasks])
    assert together.mean() > 90
    np.testing.assert_allclose(together, alone, atol=1e-3)


def test_mean_ci():
    m, ci = L.mean_ci([50.0, 60.0, 70.0])
    assert m == 60.0 and abs(ci - 1.96 * 10 / np.sqrt(3)) < 1e-9


# ------------------------------------------------------------------------------ export
def test_export_round_trip_reproduces_accuracy(tmp_path, pool):
    feats = torch.as_tensor(pool.x.reshape(len(pool.y), -1))
    tasks = T.sample_tasks(T.MetaDatasetSampler(max_way=10, max_support=100), pool.y, 8, seed=5)
    hard, _ = S.select_tasks(tasks, feats, pool.y, "fastdiffsel", steps=3)
    acc = L.accuracy(L.ProtoNet(), T.collate(hard, feats, pool.y))
    path = export.save_tasks(tmp_path / "hard.json", hard, pool, {"method": "fastdiffsel", "steps": 3},
                             {"pixels/proto": acc})
    loaded, doc, rebuilt = export.load_tasks(path)                                   # pool rebuilt from its id
    assert loaded == hard and doc["version"] == export.VERSION
    again = L.accuracy(L.ProtoNet(), T.collate(loaded, torch.as_tensor(rebuilt.x.reshape(len(rebuilt.y), -1)),
                                               rebuilt.y))
    np.testing.assert_allclose(again, [r["accuracy"]["pixels/proto"] for r in doc["tasks"]], atol=1e-3)


def test_export_rejects_unknown_versions_and_other_pools(tmp_path, pool):
    task = T.sample_tasks(T.FixedSampler(5, 1, 1), pool.y, 1, seed=0)
    path = export.save_tasks(tmp_path / "t.json", task, pool)
    doc = json.loads(path.read_text())
    (tmp_path / "future.json").write_text(json.dumps({**doc, "version": export.VERSION + 1}))
    with pytest.raises(BadParameter, match="upgrade"):
        export.load_tasks(tmp_path / "future.json", pool)
    other = data.make_pool("novel", "mixed", seed=0, per_class=41)
    with pytest.raises(BadParameter, match="differs"):
        export.load_tasks(path, other)


# ------------------------------------------------------------------------------ paper profile
@pytest.mark.parametrize("loader,args,needle", [
    (data.meta_dataset, ("omniglot",), "meta_dataset"),
    (data.orbit, (), "orbit"),
    (data.cure_or, (), "cure_or"),
    (data.objectnet, (), "objectnet"),
])
def test_paper_loaders_name_the_download(tmp_path, loader, args, needle):
    with pytest.raises(ResourceUnavailable) as err:
        loader(*args, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "download" in msg.lower() or "convert" in msg.lower()
    assert f"data/{needle}" in msg


def test_paper_backbone_offline_is_a_clear_error(monkeypatch):
    from interplab.models import extractors as E
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ResourceUnavailable, match="data/backbones/resnet18.pt"):
        E.load_backbone("resnet18")
    with pytest.raises(BadParameter):
        E.load_backbone("resnet9000")


def test_image_pools_embed_files_and_decoded_images_alike(tmp_path):
    import timm
    from PIL import Image

    from interplab.models import extractors as E
    gen = np.random.default_rng(0)
    arrays = [gen.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        (tmp_path / f"class{i}").mkdir()
        Image.fromarray(a).save(tmp_path / f"class{i}" / "0.png")
    by_file = data._image_folder("objectnet", tmp_path, "*/*.png")
    in_memory = data.ImagePool([], by_file.y, {}, by_file.class_names, "arrays", images=arrays)
    assert by_file.items == by_file.files and in_memory.items is arrays
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0)
    a, b = E.embed_images(model, by_file.items), E.embed_images(model, in_memory.items, batch=2)
    assert a.shape == (3, 512) and torch.allclose(a, b, atol=1e-5)   # PNG is lossless: the same pixels
    assert export.pool_hash(in_memory) != export.pool_hash(data.ImagePool([], by_file.y, {}, {}, "x", images=arrays[::-1]))
    assert export.pool_hash(by_file) == export.pool_hash(data._image_folder("objectnet", tmp_path, "*/*.png"))


# ------------------------------------------------------------------------------ paper loaders, real layouts
def _touch(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _orbit_tree(root):
    """Two test users in the benchmark's layout, annotations/test/<video>.json as in ORBIT's extra annotations."""
    notes = root / "orbit" / "annotations" / "test"
    videos = {}
    for user, obj in (("P100", "keys"), ("P100", "mug"), ("P200", "keys")):
        video = f"{user}--{obj}--clean--vid"
        ann = {}
        for j in range(4):
            frame = f"{video}-{j + 1:05d}.jpg"
            _touch(root / "orbit" / "test" / user / obj / "clean" / video / frame)
            absent = j == 3
            ann[frame] = {"object_not_present_issue": absent,
                          **{f"{k}_issue": None if absent else bool((j + i) % 2) for i, k in enumerate(data.ORBIT_ISSUES)}}
        notes.mkdir(parents=True, exist_ok=True)
        (notes / f"{video}.json").write_text(json.dumps(ann))
        videos[video] = ann
        clutter = f"{user}--{obj}--clutter--vid"   # bounding boxes only: not part of the pool
        _touch(root / "orbit" / "test" / user / obj / "clutter" / clutter / f"{clutter}-00001.jpg")
    return videos


def test_orbit_reads_the_released_annotation_format(tmp_path):
    videos = _orbit_tree(tmp_path)
    pool = data.orbit(root=tmp_path)
    assert "lighting" not in data.ORBIT_ISSUES and len(data.ORBIT_ISSUES) == 6
    assert len(pool.files) == 9 and all("clean" in f.parts for f in pool.files)        # absent-object frames dropped
    assert sorted(pool.class_names.values()) == ["P100/keys", "P100/mug", "P200/keys"]
    assert np.bincount(pool.y).tolist() == [3, 3, 3]
    for i, f in enumerate(pool.files):
        want = videos[f.parent.name][f.name]
        assert {k: bool(pool.annotations[k][i]) for k in data.ORBIT_ISSUES} == {k: want[f"{k}_issue"]
                                                                             for k in data.ORBIT_ISSUES}
    assert any(pool.annotations["blur"]) and not all(pool.annotations["blur"])
    assert len(data.orbit(root=tmp_path, max_frames_per_video=2).files) == 6


def _orbit_videos_tree(root, objects):
    """Clean videos of 3 frames each: objects = {(user, object): number of videos}."""
    notes = root / "orbit" / "annotations" / "test"
    notes.mkdir(parents=True, exist_ok=True)
    for (user, obj), n in objects.items():
        for v in range(n):
            video = f"{user}--{obj}--clean--v{v}"
            ann = {}
            for j in range(3):
                frame = f"{video}-{j + 1:05d}.jpg"
                _touch(root / "orbit" / "test" / user / obj / "clean" / video / frame)
                ann[frame] = {"object_not_present_issue": False, **{f"{k}_issue": False for k in data.ORBIT_ISSUES}}
            (notes / f"{video}.json").write_text(json.dumps(ann))


def test_orbit_protocol_splits_videos_and_keeps_tasks_within_a_user(tmp_path):
    objects = {**{("P1", f"o{i}"): 7 for i in range(5)}, ("P1", "single"): 1,
               **{("P2", f"o{i}"): 3 for i in range(4)}}            # P2 has only 4 objects: never a 5-way task
    _orbit_videos_tree(tmp_path, objects)
    pool = data.orbit(root=tmp_path)
    proto = data.orbit_protocol(pool)
    video = np.array([f.parent.name for f in pool.files])
    for c, name in pool.class_names.items():
        vids = sorted(set(video[pool.y == c]))
        context = sorted(set(video[(pool.y == c) & proto["support_from"]]))
        assert context == vids[:min(5, len(vids) - 1)]                    # the release's min(5, n - 1)
    assert not proto["support_from"][[f.parts[-4] == "single" for f in pool.files]].any()
    assert (proto["query_from"] == ~proto["support_from"]).all()
    user = np.array([f.parts[-5] for f in pool.files])
    tasks = T.sample_tasks(T.FixedSampler(5, 2, 3), pool.y, 10, seed=0, **proto)
    x = torch.randn(len(pool.y), 4, generator=torch.Generator().manual_seed(0))
    picked, _ = S.select_tasks(tasks, x, pool.y, "fastdiffsel", pool_from=proto["support_from"])
    for task in tasks + picked:
        assert T.check_task(task, pool.y) == []
        assert set(user[list(task.query)]) == {"P1"} and "single" not in {pool.class_names[c] for c in task.classes}
        assert proto["query_from"][list(task.query)].all() and proto["support_from"][list(task.support)].all()
        assert not set(video[list(task.support)]) & set(video[list(task.query)])
    with pytest.raises(BadParameter, match="no domain has 6 classes"):
        T.FixedSampler(6, 2, 3).sample(pool.y, np.random.default_rng(0), **proto)


def test_orbit_fails_loudly_on_missing_annotations(tmp_path):
    _orbit_tree(tmp_path)
    path = tmp_path / "orbit" / "annotations" / "test" / "P100--mug--clean--vid.json"
    ann = json.loads(path.read_text())
    del ann["P100--mug--clean--vid-00002.jpg"]["blur_issue"]
    path.write_text(json.dumps(ann))
    with pytest.raises(ResourceUnavailable, match="blur_issue of frame P100--mug--clean--vid-00002.jpg"):
        data.orbit(root=tmp_path)
    path.unlink()
    with pytest.raises(ResourceUnavailable, match="P100--mug--clean--vid.json"):
        data.orbit(root=tmp_path)


def test_cure_or_parses_release_file_names(tmp_path):
    folder = tmp_path / "cure_or" / "01_no_challenge" / "white" / "iPhone"
    for obj in (3, 12):
        for orientation in range(1, 6):
            _touch(folder / f"1_1_{orientation}_{obj:03d}_01_0.jpg")
    _touch(tmp_path / "cure_or" / "05_blur" / "white" / "iPhone" / "1_1_1_003_05_3.jpg")   # a challenge image
    pool = data.cure_or(root=tmp_path)
    assert len(pool.files) == 10 and pool.class_names == {0: "003", 1: "012"}
    for f, view, c in zip(pool.files, pool.annotations["view"], pool.y):
        _, _, orientation, obj, _, _ = f.stem.split("_")
        assert view == {"1": "front", "2": "left", "3": "back", "4": "right", "5": "top"}[orientation]
        assert pool.class_names[int(c)] == obj
    assert data.CURE_OR_VIEWS == {1: "front", 2: "left", 3: "back", 4: "right", 5: "top"}
    assert len(data.cure_or(root=tmp_path, challenge=5).files) == 1
    _touch(folder / "front_view.jpg")
    with pytest.raises(BadParameter, match="not a CURE-OR file name"):
        data.cure_or(root=tmp_path)


def test_objectnet_crops_the_red_border(tmp_path):
    from PIL import Image
    img = np.zeros((20, 24, 3), np.uint8)
    img[:2], img[-2:], img[:, :2], img[:, -2:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    (tmp_path / "objectnet-1.0" / "images" / "mug").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "objectnet-1.0" / "images" / "mug" / "0.png")
    pool = data.objectnet(root=tmp_path)
    x = pool.items[0]
    assert x.shape == (16, 20, 3) and x.max() == 0 and pool.items[0:1][0].shape == x.shape


def _example_class():
    """tf.train.Example built from its .proto definition with protobuf itself (TensorFlow is not installed)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="fake_example.proto", package="fake", syntax="proto3")
    fdp.message_type.add(name="BytesList").field.add(name="value", number=1, type=F.TYPE_BYTES, label=F.LABEL_REPEATED)
    fdp.message_type.add(name="Int64List").field.add(name="value", number=1, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for name, number, kind in (("bytes_list", 1, ".fake.BytesList"), ("int64_list", 3, ".fake.Int64List")):
        feature.field.add(name=name, number=number, type=F.TYPE_MESSAGE, type_name=kind, label=F.LABEL_OPTIONAL,
                          oneof_index=0)
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, type_name=".fake.Feature", label=F.LABEL_OPTIONAL)
    features.field.add(name="feature", number=1, type=F.TYPE_MESSAGE, type_name=".fake.Features.FeatureEntry",
                       label=F.LABEL_REPEATED)
    fdp.message_type.add(name="Example").field.add(name="features", number=1, type=F.TYPE_MESSAGE,
                                                   type_name=".fake.Features", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fake.Example"))


def _md_tree(root, n_train=2, n_valid=1, n_test=10, per_class=3):
    """A Meta-Dataset source as its converter writes it: dataset_spec.json + <class id>.tfrecords (PNG payloads
    whose pixels encode the class), test class ids 3..12 so that "10" sorts before "3" as text."""
    import io
    import struct

    from PIL import Image
    Example = _example_class()
    folder = root / "meta_dataset" / "aircraft"
    folder.mkdir(parents=True)
    total = n_train + n_valid + n_test
    spec = {"__class__": "DatasetSpecification", "name": "aircraft", "file_pattern": "{}.tfrecords",
            "classes_per_split": {"TRAIN": n_train, "VALID": n_valid, "TEST": n_test},
            "images_per_class": {str(c): per_class + c for c in range(total)},
            "class_names": {str(c): f"plane{c}" for c in range(total)}, "path": str(folder)}
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    for c in range(total):
        with open(folder / f"{c}.tfrecords", "wb") as f:
            for j in range(per_class + c):
                buf = io.BytesIO()
                Image.fromarray(np.full((5, 7, 3), [c, j, 7], np.uint8)).save(buf, format="PNG")
                ex = Example()
                ex.features.feature["label"].int64_list.value.append(c)
                ex.features.feature["image"].bytes_list.value.append(buf.getvalue())
                payload = ex.SerializeToString()
                f.write(struct.pack("<Q", len(payload)) + b"\0" * 4 + payload + b"\0" * 4)
    return folder


def test_meta_dataset_reads_test_classes_lazily_in_numeric_order(tmp_path):
    _md_tree(tmp_path)
    pool = data.meta_dataset("aircraft", root=tmp_path)
    assert isinstance(pool.images, data.LazyImages)
    assert np.unique(pool.y).tolist() == list(range(3, 13))                # test split only: train/valid skipped
    assert np.bincount(pool.y)[3:].tolist() == [3 + c for c in range(3, 13)]
    for i in (0, len(pool.y) // 2, len(pool.y) - 1):
        c, j = pool.items[i][0, 0, :2]
        assert c == pool.y[i] and pool.items[i].shape == (5, 7, 3)
        assert j == i - np.flatnonzero(pool.y == pool.y[i])[0]           # records in file order
    assert export.pool_hash(pool) == export.pool_hash(data.meta_dataset("aircraft", root=tmp_path))
    capped = data.meta_dataset("aircraft", root=tmp_path, max_per_class=4)
    assert np.bincount(capped.y)[3:].tolist() == [min(4, 3 + c) for c in range(3, 13)]
    first = [capped.items[i][0, 0, 1] for i in np.flatnonzero(capped.y == 12)]
    assert first == sorted(first) and len(set(first)) == 4
    (tmp_path / "meta_dataset" / "aircraft" / "7.tfrecords").unlink()
    with pytest.raises(ResourceUnavailable, match="test class 7"):
        data.meta_dataset("aircraft", root=tmp_path)


def test_meta_dataset_reads_pmf_h5_conversion(tmp_path):
    """P>M>F's convert_tfrecord_to_h5.py layout: one <class id>.h5 per class, group "<j>" per record holding the
    decoded "image" (RGB; 2-D for grayscale sources such as omniglot; PNGs with alpha keep 4 channels), "label", "id"."""
    import h5py
    folder = _md_tree(tmp_path, n_test=3)                  # test classes 3, 4, 5
    for c in (3, 4, 5):
        (folder / f"{c}.tfrecords").unlink()               # only the .h5 conversion is there
        with h5py.File(folder / f"{c}.h5", "w") as f:
            for j in range(2 + c):
                img = {3: np.full((6, 4, 3), [c, j, 1], np.uint8), 4: np.full((6, 4), c * 10 + j, np.uint8),
                       5: np.full((6, 4, 4), [c, j, 2, 255], np.uint8)}[c]
                grp = f.create_group(str(j))
                grp.create_dataset("image", data=img)
                grp.create_dataset("label", data=np.array(c))
                grp.create_dataset("id", data=np.array(j))
    pool = data.meta_dataset("aircraft", root=tmp_path)
    assert np.bincount(pool.y)[3:].tolist() == [5, 6, 7]
    images = [pool.items[i] for i in range(len(pool.y))]
    assert all(im.shape == (6, 4, 3) and im.dtype == np.uint8 for im in images)
    by_class = {c: [im for im, y in zip(images, pool.y) if y == c] for c in (3, 4, 5)}
    assert [im[0, 0].tolist() for im in by_class[3]] == [[3, j, 1] for j in range(5)]      # records in group order
    assert [im[0, 0].tolist() for im in by_class[4]] == [[40 + j] * 3 for j in range(6)]   # grey -> 3 equal channels
    assert [im[0, 0].tolist() for im in by_class[5]] == [[5, j, 2] for j in range(7)]      # alpha dropped


def test_md_test_classes_follow_meta_datasets_split_offsets():
    flat = {"__class__": "DatasetSpecification", "classes_per_split": {"TRAIN": 70, "VALID": 15, "TEST": 15}}
    assert data.md_test_classes(flat) == list(range(85, 100))
    bilevel = {"__class__": "BiLevelDatasetSpecification", "superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 2},
               "classes_per_superclass": {"0": 3, "1": 4, "2": 5, "3": 6, "4": 2}}
    assert data.md_test_classes(bilevel) == list(range(12, 20))
    hierarchical = {"__class__": "HierarchicalDatasetSpecification",
                    "class_names": {"0": "n01", "1": "n02", "2": "n03", "3": "n04"},
                    "images_per_class": {"TRAIN": {"n01": 5, "n02": 5, "root": 10}, "VALID": {"n03": 5},
                                         "TEST": {"n04": 5, "n99": 5}}}
    assert data.md_test_classes(hierarchical) == [3]


def test_select_tasks_in_chunks():
    feats, y = gaussian_world(n_cls=8, per=30)
    tasks = T.sample_tasks(T.MetaDatasetSampler(min_way=3, max_way=6, max_support=40, max_shot=8, max_query=5), y, 5, seed=3)
    whole, sel = S.select_tasks(tasks, feats, y)
    one, sel1 = S.select_tasks(tasks, feats, y, chunk=1)
    assert one == [S.select_tasks([t], feats, y)[0][0] for t in tasks]
    assert len(sel1.chosen) == 5 and torch.is_tensor(sel.chosen)
    pairs, _ = S.select_tasks(tasks, feats, y, chunk=2)
    assert all(not T.check_task(t, y) for t in whole + one + pairs)
    assert torch.allclose(S.support_loss(one, feats, y, chunk=2), S.support_loss(one, feats, y), rtol=1e-5)
