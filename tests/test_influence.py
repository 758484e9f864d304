"""Influence functions (Chapter 3): derivatives, solvers, estimators against retraining, errors."""
import pytest
import torch
from torch import nn

import interplab.influence as inf
from interplab import datasets
from interplab.errors import BadParameter, ResourceUnavailable
from interplab.models import classifiers

DT = torch.float64


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    yield
    torch.set_default_dtype(old)


def logistic(n=400, d=5, wd=1e-2, seed=0, separation=1.5):
    """Two-Gaussian logistic regression fitted to 1e-12, as an Optimum."""
    s = datasets.gaussian_classes(n, 200, d, separation, seed)
    torch.manual_seed(seed)
    obj = inf.Objective(classifiers.logistic_regression(d, 2), "logistic", wd)
    opt = inf.Optimum(obj, inf.fit(obj, torch.zeros(d + 1), s.X, s.y, method="newton", tol=1e-12).theta, s.X, s.y, None)
    return opt, s


def worst_test_point(opt, s):
    i = int(opt.test_losses(s.X_test, s.y_test).argmax())
    return s.X_test[i:i + 1], s.y_test[i:i + 1]


# -- derivatives ---------------------------------------------------------------------------
def test_hvp_and_hessian_match_autograd_hessian():
    torch.manual_seed(0)
    X, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    obj = inf.Objective(classifiers.mlp(4, 3, width=6, depth=2, activation="tanh"), "cross_entropy", 1e-3)
    theta = obj.params()
    H_ref = torch.autograd.functional.hessian(lambda t: obj.loss(t, X, y), theta)  # reverse-over-reverse, another path
    for _ in range(3):
        v = torch.randn(obj.dim)
        assert torch.linalg.norm(obj.hvp(theta, X, y, v) - H_ref @ v) <= 1e-8 * torch.linalg.norm(H_ref @ v)
    assert torch.allclose(obj.hessian(theta, X, y), H_ref, rtol=0, atol=1e-10 * float(H_ref.abs().max()))


def test_chunked_grad_and_hvp_equal_one_batch():
    torch.manual_seed(0)
    X, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    obj = inf.Objective(classifiers.mlp(4, 3, width=6, depth=2, activation="tanh"), "cross_entropy", 1e-3)
    theta, v, V = obj.params(), torch.randn(obj.dim), torch.randn(3, obj.dim)
    w = torch.rand(50)
    w[:16] = 0  # a chunk of removed points only
    close = lambda a, b: float((a - b).norm()) <= 1e-12 * float(b.norm())  # noqa: E731
    for ww in (None, w):
        for bs in (16, 7):  # 50 is no multiple of either: a short last chunk
            assert close(obj.grad(theta, X, y, ww, batch_size=bs), obj.grad(theta, X, y, ww))
            assert close(obj.hvp(theta, X, y, v, ww, batch_size=bs), obj.hvp(theta, X, y, v, ww))
            assert close(obj.hvps(theta, X, y, V, ww, batch_size=bs), obj.hvps(theta, X, y, V, ww))
    assert close(obj.hvp_fn(theta, X, y, batch_size=16)(V), obj.hvps(theta, X, y, V))
    H = obj.hessian(theta, X, y, w)
    assert close(obj.hessian(theta, X, y, w, batch_size=7), H)
    assert close(inf.Optimum(obj, theta, X, y, batch_size=16).hessian, obj.hessian(theta, X, y))


def test_sample_grads_include_decay_and_sum_to_zero_at_optimum():
    opt, _ = logistic()
    G = opt.grads
    assert G.shape == (opt.n, opt.obj.dim)
    assert float(G.sum(0).norm()) < 1e-9  # needs the decay inside every per-sample term (Eq. 3.13)
    w = torch.rand(opt.n)
    assert torch.allclose(opt.obj.grad(opt.theta, opt.X, opt.y, w), (w[:, None] * G).sum(0) / w.sum(), atol=1e-12)


def test_top_eigenvalue_lanczos_and_power():
    opt, _ = logistic(wd=0.1)
    H = opt.hessian
    top = float(torch.linalg.eigvalsh(H)[-1])
    hvp = lambda v: opt.obj.hvp(opt.theta, opt.X, opt.y, v)  # noqa: E731
    assert abs(inf.top_eigenvalue(hvp, opt.obj.dim) - top) < 1e-8 * top
    assert abs(inf.top_eigenvalue(hvp, opt.obj.dim, steps=300, method="power") - top) < 1e-4 * top


# -- solvers -------------------------------------------------------------------------------
def test_cg_and_lissa_match_exact_solve():
    opt, s = logistic(wd=0.1)  # well conditioned: kappa ~ 10
    b = opt.test_grad(*worst_test_point(opt, s))
    exact = inf.CholeskySolver(opt.hessian, damping=0.01)(b)
    hvp = lambda V: opt.obj.hvps(opt.theta, opt.X, opt.y, V)  # noqa: E731
    cg = inf.conjugate_gradient(hvp, b, damping=0.01, tol=1e-12)
    assert cg.converged and inf.relative_error(cg.x, exact) < 1e-4
    lam = float(torch.linalg.eigvalsh(opt.hessian)[-1])
    mb = lambda idx, V: opt.obj.hvps(opt.theta, opt.X[idx], opt.y[idx], V)  # noqa: E731
    x = inf.lissa(mb, b, opt.n, damping=0.01, scale=1.2 * lam, depth=400, repeats=1)
    assert inf.relative_error(x, exact) < 1e-4
    noisy = inf.lissa(mb, b, opt.n, damping=0.01, scale=2 * lam, depth=300, repeats=4, batch_size=100,
                      generator=torch.Generator().manual_seed(0))
    assert inf.relative_error(noisy, exact) < 0.1  # minibatch noise: close, not exact


def test_lissa_divergence_names_the_fix():
    opt, s = logistic(wd=0.1)
    b = opt.test_grad(*worst_test_point(opt, s))
    lam = float(torch.linalg.eigvalsh(opt.hessian)[-1])
    mb = lambda idx, V: opt.obj.hvps(opt.theta, opt.X[idx], opt.y[idx], V)  # noqa: E731
    with pytest.raises(inf.LissaDiverged, match="raise scale"):
        inf.lissa(mb, b, opt.n, scale=0.3 * lam, depth=500)


def test_cholesky_on_indefinite_matrix_names_damping():
    with pytest.raises(inf.NotPositiveDefinite, match="raise damping"):
        inf.CholeskySolver(torch.diag(torch.tensor([1.0, -0.5])))
    assert torch.allclose(inf.CholeskySolver(torch.diag(torch.tensor([1.0, -0.5])), damping=1.0)(torch.ones(2)),
                          torch.tensor([0.5, 2.0]))


# -- estimators against retraining ---------------------------------------------------------
def test_individual_influence_tracks_leave_one_out():
    opt, s = logistic(n=300, wd=1e-2)
    xt, yt = worst_test_point(opt, s)
    pred = inf.loo_effects(opt.grads, opt.solver()(opt.test_grad(xt, yt)))
    idx = pred.abs().argsort(descending=True)[:40]
    fit = opt.retrain_without([[int(i)] for i in idx], method="newton", tol=1e-11)
    assert fit.all_converged
    truth = inf.loss_changes(opt.obj, opt.theta, fit.theta, xt, yt)[:, 0]
    assert inf.pearson(pred[idx], truth) >= 0.95
    # Eq. 3.21: the up-weighting influence is minus (n - 1) times the removal effect
    assert torch.allclose(inf.individual_influence(opt.grads, opt.solver()(opt.test_grad(xt, yt))),
                          -(opt.n - 1) * pred)


def ridge(n=400, d=4, wd=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    y = X @ torch.randn(d, generator=g) + 0.5 * torch.randn(n, generator=g)
    obj = inf.Objective(nn.Linear(d, 1), "squared", wd)
    theta = inf.fit(obj, torch.zeros(d + 1), X, y, method="newton", tol=1e-13).theta
    return obj, theta, X, y


def ridge_closed_form(X, y, keep, wd):
    """Minimiser of mean_{keep} (1/2)(x^T w + b - y)^2 + (wd/2)(|w|^2 + b^2), layout (w, b)."""
    A = torch.cat([X[keep], torch.ones(int(keep.sum()), 1)], 1)
    return torch.linalg.solve(A.T @ A / len(A) + wd * torch.eye(A.shape[1]), A.T @ y[keep] / len(A))


def test_ridge_second_order_is_much_closer_for_coherent_groups():
    obj, theta, X, y = ridge()
    n = len(X)
    assert torch.allclose(ridge_closed_form(X, y, torch.ones(n, dtype=torch.bool), obj.weight_decay), theta, atol=1e-10)
    anchor_order = (X - X[0]).norm(dim=1).argsort()  # coherent: the k nearest points to one anchor
    solve = inf.CholeskySolver(obj.hessian(theta, X, y))
    rel1, rel2 = [], []
    for p in (0.02, 0.04, 0.08):
        group = anchor_order[: int(p * n)]
        keep = torch.ones(n, dtype=torch.bool)
        keep[group] = False
        truth = ridge_closed_form(X, y, keep, obj.weight_decay) - theta
        first, second = inf.group_param_changes(obj, theta, X, y, [group], solve)
        rel1.append(inf.relative_error(first[0], truth))
        rel2.append(inf.relative_error(second[0], truth))
        assert rel2[-1] < 0.25 * rel1[-1]  # much smaller
    # both agree to first order in p: the first-order error shrinks like p, the second like p^2
    assert rel1[0] < rel1[1] < rel1[2] < 0.5 and rel2[0] < rel2[1] < rel2[2]
    assert rel2[2] / rel2[0] > 1.5 * rel1[2] / rel1[0]


def test_second_order_beats_first_on_large_random_groups():
    opt, s = logistic(n=1000, wd=1e-3, separation=1.0)
    xt, yt = worst_test_point(opt, s)
    g = torch.Generator().manual_seed(1)
    for p in (0.4, 0.6):
        groups = [torch.randperm(opt.n, generator=g)[: int(p * opt.n)] for _ in range(30)]
        first, second = inf.group_effects(opt.obj, opt.theta, opt.X, opt.y, groups, opt.test_grad(xt, yt),
                                          opt.solver(), G=opt.grads)
        fit = opt.retrain_without(groups, method="newton", tol=1e-11)
        assert fit.all_converged
        truth = inf.loss_changes(opt.obj, opt.theta, fit.theta, xt, yt)[:, 0]
        assert inf.pearson(second, truth) > inf.pearson(first, truth)
        full = inf.group_effects_full(opt.obj, opt.theta, opt.X, opt.y, groups, xt, yt, opt.solver(), G=opt.grads)
        assert inf.mean_abs_error(full, truth) < inf.mean_abs_error(second, truth)


def test_group_effects_equal_param_changes_dotted_with_test_gradient():
    opt, s = logistic()
    gt = opt.test_grad(*worst_test_point(opt, s))
    groups = [[0, 5, 9], list(range(50, 150))]
    first, second = inf.group_effects(opt.obj, opt.theta, opt.X, opt.y, groups, gt, opt.solver())
    d1, d2 = inf.group_param_changes(opt.obj, opt.theta, opt.X, opt.y, groups, opt.solver())
    assert torch.allclose(first, d1 @ gt) and torch.allclose(second, d2 @ gt)


@pytest.mark.parametrize("method", ["newton", "newton-cg", "bfgs", "chord"])
def test_retraining_converges_below_tolerance(method):
    opt, _ = logistic(n=300)
    fit = opt.retrain_without([[3], list(range(40)), list(range(100, 250))], method=method, tol=1e-10,
                              max_iter=500)
    assert fit.all_converged and float(fit.grad_norm.max()) <= 1e-10
    exact = opt.retrain_without([[3], list(range(40)), list(range(100, 250))], method="newton", tol=1e-12)
    assert torch.allclose(fit.theta, exact.theta, atol=1e-8)


def test_train_reaches_tolerance_on_a_small_net():
    s = datasets.iris(seed=0)
    torch.manual_seed(0)
    opt = inf.train(inf.Objective(classifiers.mlp(4, 3, 5, 1, "tanh"), "cross_entropy", 1e-2), s.X, s.y, tol=1e-10)
    assert bool(opt.fit.converged) and float(opt.obj.grad(opt.theta, s.X, s.y).norm()) <= 1e-10


def test_select_group_second_order_at_least_as_good_as_first_in_its_own_objective():
    opt, s = logistic(n=300)
    xt, yt = worst_test_point(opt, s)
    gt = opt.test_grad(xt, yt)
    picks = {o: inf.select_group(opt.obj, opt.theta, opt.X, opt.y, gt, 60, opt.solver(), G=opt.grads, order=o)
             for o in (1, 2)}
    second = {o: float(inf.group_effects(opt.obj, opt.theta, opt.X, opt.y, [p], gt, opt.solver(), G=opt.grads)[1][0])
              for o, p in picks.items()}
    assert len(picks[2]) == 60 and second[2] >= second[1] - 1e-12
    w = inf.project_capped_simplex(torch.randn(50) * 3, 7.0)
    assert abs(float(w.sum()) - 7.0) < 1e-9 and float(w.min()) >= 0 and float(w.max()) <= 1


# -- errors --------------------------------------------------------------------------------
def test_bad_groups_are_clear_errors():
    opt, s = logistic()
    gt = opt.test_grad(*worst_test_point(opt, s))
    run = lambda groups: inf.group_effects(opt.obj, opt.theta, opt.X, opt.y, groups, gt, opt.solver())  # noqa: E731
    with pytest.raises(BadParameter, match="outside the training set"):
        run([[0, opt.n]])
    with pytest.raises(BadParameter, match="empty group"):
        run([[1, 2], []])
    with pytest.raises(BadParameter, match="repeats an index"):
        run([[1, 1]])
    with pytest.raises(BadParameter, match="whole training set"):
        run([list(range(opt.n))])


def test_absent_torchvision_data_says_what_to_download(tmp_path):
    with pytest.raises(ResourceUnavailable, match=r"MNIST.*download=True.*copy"):
        datasets.torchvision_dataset("mnist", root=tmp_path)
    with pytest.raises(ResourceUnavailable, match="CIFAR10"):
        datasets.torchvision_dataset("cifar10", root=tmp_path)


def test_directional_grads_equal_sample_grads_times_vector():
    opt, _ = logistic(n=100)
    v = torch.randn(opt.obj.dim)
    expected = opt.grads @ v
    assert torch.allclose(opt.obj.directional_grads(opt.theta, opt.X, opt.y, v), expected, atol=1e-12)
    assert torch.allclose(opt.obj.directional_grads(opt.theta, opt.X, opt.y, v, batch_size=32), expected, atol=1e-12)


# -- streaming (§3.10.4's ImageNet study): data read by index ----------------------------------
def test_streamed_influence_lissa_and_sgd_equal_the_in_memory_ones():
    from interplab.influence import streaming
    opt, s = logistic(n=150)
    xt, yt = worst_test_point(opt, s)
    loads = []

    def sample(idx):
        loads.append(len(idx))
        return opt.X[idx], opt.y[idx]
    g = opt.obj.test_grad(opt.theta, xt, yt)
    s_test = opt.solver()(g)
    streamed = streaming.loo_effects_streamed(opt.obj, opt.theta, sample, opt.n, s_test, batch_size=64, progress=False)
    assert torch.allclose(streamed, inf.loo_effects(opt.grads, s_test), atol=1e-12)
    assert max(loads) == 64                                               # never more than one batch in memory
    mb = lambda idx, V: opt.obj.hvps(opt.theta, opt.X[idx], opt.y[idx], V)  # noqa: E731
    kw = dict(damping=0.01, scale=10.0, depth=50, repeats=2, batch_size=20)
    streamed_lissa = inf.lissa(streaming.minibatch_hvp(opt.obj, opt.theta, sample), g, opt.n,
                               generator=torch.Generator().manual_seed(1), **kw)
    assert torch.allclose(streamed_lissa, inf.lissa(mb, g, opt.n, generator=torch.Generator().manual_seed(1), **kw),
                          atol=1e-12)                                    # the same minibatches, the same estimate
    removed = [[3], [5, 7], []]
    W = torch.ones(3, opt.n)
    W[0, 3] = W[1, 5] = W[1, 7] = 0
    kw = dict(steps=40, lr=0.05, batch_size=32)
    ref = inf.sgd(opt.obj, opt.theta, opt.X, opt.y, W, generator=torch.Generator().manual_seed(4), **kw)
    got = streaming.sgd_sampled(opt.obj, opt.theta, sample, opt.n, removed, generator=torch.Generator().manual_seed(4),
                                progress=False, **kw)
    assert torch.allclose(got, ref, atol=1e-10) and not torch.allclose(got[0], got[2])


def test_adam_train_mode_updates_batchnorm_statistics_and_ends_in_eval():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    obj = inf.Objective(model.eval(), "cross_entropy", 1e-3)
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    theta0, stats0 = obj.params(), model[1].running_mean.clone()
    theta = inf.adam_train_mode(obj, theta0, X, y, steps=30, lr=1e-2, batch_size=16,
                                generator=torch.Generator().manual_seed(0))
    assert not model.training and not torch.equal(model[1].running_mean, stats0)   # statistics followed the batches
    assert float(obj.loss(theta, X, y)) < float(obj.loss(theta0, X, y))
