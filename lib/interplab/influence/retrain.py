"""Ground truth: refit the model to convergence with some training points removed.

Influence functions predict the minimiser of a reweighted objective, so the truth they are
judged against is that minimiser, reached to a tight gradient-norm tolerance from a warm start
at theta* (anything looser measures optimiser noise, not influence; see section 3.10.4).

- ``train``: fit a model from scratch (L-BFGS, then a second-order polish to ``tol``) and
  return an ``Optimum``: theta*, its Hessian, a Cholesky solver and per-sample gradients.
- ``fit``: one full-batch fit from theta0, "lbfgs" (torch.optim.LBFGS, strong-Wolfe) or any
  ``retrain`` method.
- ``retrain``: many reweighted fits at once, vectorised over the weight vectors with vmap:
    "newton"     exact per-fit Hessians, Levenberg-Marquardt damping; few, costly iterations
    "newton-cg"  Newton steps by CG on each fit's HVPs, preconditioned by H(theta*); convex fits
                 with large removals (leave-group-out on logistic regression)
    "bfgs"       dense BFGS started from H(theta*)^-1; one gradient per iteration, for P up to
                 a few thousand (leave-one-out on neural nets)
    "chord"      d = -H(theta*)^-1 grad every iteration; tiny perturbations only
- ``retrain_without``: leave-one-out / leave-group-out as weights 1 - mask.
- ``loss_changes``: the measured effect l_t(theta_-U) - l_t(theta*).
- ``sgd`` / ``adam``: fixed budgets of first-order steps, for models with no minimiser (no weight
  decay on separable data) or on purpose unconverged (section 3.10.4), as the dissertation retrains.
- ``loo_study`` / ``group_study``: predictions next to the retrained truth, for the notebook.
"""
import time
from dataclasses import dataclass, field

import torch
from torch.func import grad, grad_and_value, vmap

from ..errors import check_choice
from .functions import group_effects, group_effects_full, group_mask, loo_effects
from .objective import Objective
from .solvers import CholeskySolver, NotPositiveDefinite, conjugate_gradient, lissa

METHODS = ("newton", "newton-cg", "bfgs", "chord")
ARMIJO = 1e-4
ROUNDOFF = 1e-13  # relative slack in the line search: near the optimum the decrease is below float64 resolution


@dataclass
class FitResult:
    theta: torch.Tensor      # (P,) or (m, P)
    grad_norm: torch.Tensor  # () or (m,)
    iterations: int
    converged: torch.Tensor  # bool, () or (m,)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


# -- one fit -----------------------------------------------------------------------------
def fit(obj: Objective, theta0, X, y, w=None, method: str = "lbfgs", tol: float = 1e-10,
        max_iter: int = 5000, hessian=None, damping: float = 0.0) -> FitResult:
    """Minimise obj.loss(theta, X, y, w) from theta0 (P,) until ||grad|| <= tol or max_iter."""
    check_choice("method", method, ("lbfgs",) + METHODS)
    if method == "lbfgs":
        return _lbfgs(obj, theta0, X, y, w, tol, max_iter)
    out = retrain(obj, theta0, X, y, None if w is None else w[None], method=method, tol=tol, max_iter=max_iter,
                  hessian=hessian, damping=damping)
    return FitResult(out.theta[0], out.grad_norm[0], out.iterations, out.converged[0])


def _lbfgs(obj, theta0, X, y, w, tol, max_iter, chunk: int = 50):
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=chunk, history_size=50, tolerance_grad=0.0,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = obj.loss(theta, X, y, w)
        loss.backward()
        return loss

    iters, gnorm = 0, float("inf")
    while iters < max_iter:
        before = theta.detach().clone()
        opt.step(closure)
        iters = opt.state[theta]["n_iter"]
        gnorm = float(obj.grad(theta.detach(), X, y, w).norm())
        stuck = bool((theta.detach() == before).all())  # line search found no decrease: float64 floor
        if gnorm <= tol or stuck or not bool(torch.isfinite(theta).all()):
            break
    return FitResult(theta.detach(), torch.tensor(gnorm), iters, torch.tensor(gnorm <= tol))


# -- many fits at once -------------------------------------------------------------------
def retrain(obj: Objective, theta_star, X, y, weights, method: str = "bfgs", tol: float = 1e-10,
            max_iter: int = 200, hessian=None, damping: float = 0.0) -> FitResult:
    """Fit every weighting in ``weights`` (m, n) from theta_star (P,); returns thetas (m, P).

    hessian: (P, P) for "newton-cg", "bfgs", "chord" (default: computed at theta_star with unit
    weights), made positive definite with ``damping`` plus, if needed, the least extra damping.
    weights None means one fit with unit weights. See the module docstring for the methods.
    """
    check_choice("method", method, METHODS)
    W = (torch.ones(1, len(X), dtype=theta_star.dtype, device=X.device) if weights is None
         else weights.to(theta_star.dtype).to(X.device))
    Theta = theta_star.detach().expand(len(W), -1).clone()
    if method == "newton":
        return _descend(obj, Theta, X, y, W, _NewtonStep(obj, X, y, len(W)), tol, max_iter)
    H = obj.hessian(theta_star, X, y) if hessian is None else hessian
    shared = positive_definite_solver(H, damping)
    if method == "bfgs":
        bfgs = _BFGSStep(shared, len(W), Theta.shape[1], Theta.dtype, Theta.device)
        return _descend(obj, Theta, X, y, W, bfgs, tol, max_iter)
    if method == "chord":
        return _descend(obj, Theta, X, y, W, lambda live, Th, Wl, Gl: -shared(Gl), tol, max_iter)
    return _descend(obj, Theta, X, y, W, _NewtonCGStep(obj, X, y, shared), tol, max_iter)


def _descend(obj, Theta, X, y, W, step, tol, max_iter) -> FitResult:
    """Shared loop: direction from ``step``, Armijo backtracking per row, stop rows at tol."""
    grad_value_b = vmap(grad_and_value(obj.loss), in_dims=(0, None, None, 0))
    Gr, F = grad_value_b(Theta, X, y, W)
    gnorm = Gr.norm(dim=1)
    it = 0
    for it in range(1, max_iter + 1):
        live = (gnorm > tol).nonzero().squeeze(1)
        if len(live) == 0:
            it -= 1
            break
        Th, Wl, Gl = Theta[live], W[live], Gr[live]
        D = step(live, Th, Wl, Gl)
        new, t, f, Gnew = _line_search(lambda T, rows: grad_value_b(T, X, y, Wl[rows]), Th, D, Gl, F[live])
        if hasattr(step, "update"):
            step.update(live, t, new - Th, Gnew - Gl)
        Theta[live], Gr[live], F[live] = new, Gnew, f
        gnorm = Gr.norm(dim=1)
    return FitResult(Theta, gnorm, it, gnorm <= tol)


class _NewtonStep:
    """(H_j + mu_j s_j I) d = -g_j with each fit's exact Hessian; mu_j adapts like
    Levenberg-Marquardt: quartered after a full step, quadrupled after a cut one."""

    def __init__(self, obj, X, y, m):
        self.hess = vmap(lambda th, w: obj.hessian(th, X, y, w, chunk_size=None))
        self.mu = torch.zeros(m, dtype=X.dtype, device=X.device)

    def __call__(self, live, Th, Wl, Gl):
        Hs = self.hess(Th, Wl)
        eye = torch.eye(Hs.shape[-1], dtype=Hs.dtype, device=Hs.device)
        scale = Hs.diagonal(dim1=1, dim2=2).abs().mean(1).clamp_min(1e-12)
        mu = self.mu[live].clone()
        D = -Gl.clone()  # curvature beyond repair falls back to steepest descent
        todo = torch.arange(len(Hs), device=Hs.device)
        for _ in range(40):
            L, info = torch.linalg.cholesky_ex(Hs[todo] + (mu[todo] * scale[todo])[:, None, None] * eye)
            ok = info == 0
            D[todo[ok]] = -torch.cholesky_solve(Gl[todo[ok]][..., None], L[ok])[..., 0]
            todo = todo[~ok]
            if len(todo) == 0:
                break
            mu[todo] = (mu[todo] * 10).clamp_min(1e-10)
        self.mu[live] = mu
        return D

    def update(self, live, t, S, Y):
        mu = self.mu[live]
        mu = torch.where(t == 1, mu / 4, torch.maximum(4 * mu, torch.full_like(mu, 1e-6)))
        self.mu[live] = torch.where(mu < 1e-10, torch.zeros_like(mu), mu)


class _BFGSStep:
    """Dense BFGS per fit, the inverse-Hessian estimate starting at (H(theta*) + damping I)^-1.

    The start is the influence function's own curvature, so the first step is the Newton step of
    the unperturbed problem and the updates only learn how the curvature drifts on the way. An
    update is skipped where the curvature condition s^T y > 0 fails (a non-convex stretch).
    """

    def __init__(self, shared, m, P, dtype, device):
        start = shared(torch.eye(P, dtype=dtype, device=device))
        self.Binv = start.expand(m, P, P).clone()

    def __call__(self, live, Th, Wl, Gl):
        return -(self.Binv[live] @ Gl[..., None])[..., 0]

    def update(self, live, t, S, Y):
        sy = (S * Y).sum(1)
        ok = sy > 1e-12 * S.norm(dim=1) * Y.norm(dim=1)
        if not bool(ok.any()):
            return
        rows, s, y, rho = live[ok], S[ok], Y[ok], 1.0 / sy[ok]
        B = self.Binv[rows]
        By = (B @ y[..., None])[..., 0]
        yBy = (y * By).sum(1)
        # (I - rho s y^T) B (I - rho y s^T) + rho s s^T, expanded (B symmetric)
        self.Binv[rows] = (B - rho[:, None, None] * (s[:, :, None] * By[:, None, :] + By[:, :, None] * s[:, None, :])
                           + (rho ** 2 * yBy + rho)[:, None, None] * s[:, :, None] * s[:, None, :])


class _NewtonCGStep:
    """Inexact Newton: CG on each fit's own HVPs, preconditioned by the shared factor, to a relative
    residual ~ sqrt(||g||) (superlinear convergence without solving each step exactly)."""

    def __init__(self, obj, X, y, shared):
        self.hvp = vmap(lambda th, w, v: obj.hvp(th, X, y, v, w))
        self.shared = shared

    def __call__(self, live, Th, Wl, Gl):
        forcing = float(Gl.norm(dim=1).max().sqrt().clamp(max=0.1))
        try:
            return conjugate_gradient(lambda V: self.hvp(Th, Wl, V), -Gl, tol=forcing, maxiter=200,
                                      precondition=self.shared).x
        except NotPositiveDefinite:
            return -self.shared(Gl)  # negative curvature on the way: a preconditioned gradient step


def positive_definite_solver(H, damping: float = 0.0) -> CholeskySolver:
    """A Cholesky solver for H + damping I, adding the least extra damping (powers of ten times
    mean |diag H|) that makes an indefinite H positive definite."""
    scale = float(H.diagonal().abs().mean()) or 1.0
    for extra in [0.0] + [scale * 10.0 ** e for e in range(-10, 3)]:
        try:
            return CholeskySolver(H, damping + extra)
        except NotPositiveDefinite:
            continue
    raise NotPositiveDefinite("no damping up to 100 x mean |diag H| makes H positive definite; is H finite?")


def _line_search(grad_value_rows, Th, D, Gr, f0, shrink: float = 0.5, tries: int = 40):
    """Backtracking (Armijo) per row from the full step.

    grad_value_rows(T, rows) -> (gradients, losses) of those rows; f0: current losses (m,).
    Gradients come with the losses so an accepted full step (the common case) costs one pass.
    Returns the new rows, the step each took (0 where none was accepted), their losses and gradients.
    """
    m = len(Th)
    slope = (Gr * D).sum(1)
    D = torch.where((slope < 0)[:, None], D, -Gr)  # not a descent direction: use the gradient
    slope = torch.where(slope < 0, slope, -(Gr * Gr).sum(1))
    t = torch.ones(m, dtype=Th.dtype, device=Th.device)
    out, f_out, g_out = Th.clone(), f0.clone(), Gr.clone()
    todo = torch.arange(m, device=Th.device)
    for _ in range(tries):
        cand = Th[todo] + t[todo, None] * D[todo]
        g, f = grad_value_rows(cand, todo)
        ok = f <= f0[todo] + ARMIJO * t[todo] * slope[todo] + ROUNDOFF * f0[todo].abs()
        out[todo[ok]], f_out[todo[ok]], g_out[todo[ok]] = cand[ok], f[ok], g[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            break
        t[todo] *= shrink
    t[todo] = 0.0
    return out, t, f_out, g_out


# -- leave-out studies -------------------------------------------------------------------
def retrain_without(obj: Objective, theta_star, X, y, groups, **kwargs) -> FitResult:
    """Refit with each group removed (weights 1 - mask); a group may be a single index.

    groups: list of index sequences or (m, n) bool mask. kwargs go to ``retrain``.
    """
    mask = group_mask(groups, len(X)).to(X.device)
    return retrain(obj, theta_star, X, y, (~mask).to(theta_star.dtype), **kwargs)


def loss_changes(obj: Objective, theta_star, thetas, X_test, y_test) -> torch.Tensor:
    """Measured change of each test loss l_t(theta_j) - l_t(theta*) (no decay term): (m, T) for thetas (m, P)."""
    base = obj.data_losses(theta_star, X_test, y_test)
    after = vmap(lambda th: obj.data_losses(th, X_test, y_test))(thetas)
    return after - base


# -- a trained model and what influence needs from it ------------------------------------
@dataclass
class Optimum:
    """theta* of ``obj`` on (X, y) with what every influence computation reuses.

    hessian (P, P) and grads (n, P) are computed on first use (their cost lands in ``seconds``);
    ``solver(damping)`` factors H + damping I once per damping value.
    """
    obj: Objective
    theta: torch.Tensor
    X: torch.Tensor
    y: torch.Tensor
    fit: FitResult | None = None
    seconds: dict = field(default_factory=dict)  # how long the Hessian and the gradients took
    batch_size: int | None = None  # samples per chunk of the Hessian's HVPs (None: all at once; see Objective.hvp)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.X)

    @property
    def hessian(self) -> torch.Tensor:
        if "H" not in self._cache:
            t0 = time.perf_counter()
            self._cache["H"] = self.obj.hessian(self.theta, self.X, self.y, batch_size=self.batch_size)
            self.seconds["hessian"] = time.perf_counter() - t0
        return self._cache["H"]

    @property
    def grads(self) -> torch.Tensor:
        if "G" not in self._cache:
            t0 = time.perf_counter()
            self._cache["G"] = self.obj.sample_grads(self.theta, self.X, self.y)
            self.seconds["grads"] = time.perf_counter() - t0
        return self._cache["G"]

    def solver(self, damping: float = 0.0) -> CholeskySolver:
        key = ("solve", damping)
        if key not in self._cache:
            self._cache[key] = positive_definite_solver(self.hessian, damping)
        return self._cache[key]

    def test_grad(self, x_test, y_test) -> torch.Tensor:
        """Gradient of one test loss (x_test, y_test a batch of 1), (P,); no decay term in it."""
        return self.obj.test_grad(self.theta, x_test, y_test)

    def test_losses(self, X_test, y_test) -> torch.Tensor:
        """Test losses without the decay term, (T,)."""
        return self.obj.data_losses(self.theta, X_test, y_test)

    def retrain_without(self, groups, **kwargs) -> FitResult:
        kwargs.setdefault("hessian", self.hessian if kwargs.get("method", "bfgs") != "newton" else None)
        return retrain_without(self.obj, self.theta, self.X, self.y, groups, **kwargs)


def train(obj: Objective, X, y, theta0=None, tol: float = 1e-10, max_iter: int = 5000, polish: str = "bfgs",
          polish_iter: int = 500, lbfgs_tol: float = 1e-5, warmup: int = 0, warmup_lr: float = 1e-2) -> Optimum:
    """Fit from theta0 (default: the module's initial parameters) to ||grad|| <= tol.

    ``warmup`` full-batch Adam steps first (deep tanh nets start with a vanishing signal, and
    L-BFGS with weight decay then slides into the trivial minimum near theta = 0); L-BFGS does
    the bulk until lbfgs_tol; ``polish`` ("bfgs", "newton" or "newton-cg", all using the exact
    Hessian) reaches tol. Check ``.fit.converged``.
    """
    theta0 = obj.params() if theta0 is None else theta0
    if warmup:
        theta0 = adam(obj, theta0, X, y, steps=warmup, lr=warmup_lr)[0]
    coarse = _lbfgs(obj, theta0, X, y, None, max(tol, lbfgs_tol), max_iter)
    if not bool(torch.isfinite(coarse.theta).all()):
        raise FloatingPointError("training diverged to non-finite parameters; add weight decay")
    fine = fit(obj, coarse.theta, X, y, method=polish, tol=tol, max_iter=polish_iter)
    best = fine if fine.grad_norm <= coarse.grad_norm else coarse
    return Optimum(obj, best.theta, X, y, FitResult(best.theta, best.grad_norm, coarse.iterations + fine.iterations,
                                                     best.grad_norm <= tol))


# -- budgeted training: a fixed number of first-order steps --------------------------------
def sgd(obj: Objective, theta0, X, y, weights=None, steps: int = 100, lr: float = 0.02, momentum: float = 0.9,
        batch_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` of heavy-ball gradient descent for every weighting at once: (P,) or (m, P) -> (m, P).

    The dissertation's retraining ("from theta*, for a fraction of the training steps") where no
    minimiser exists (no weight decay on separable data) or on purpose unconverged (section
    3.10.4). The step is proportional to the gradient, so removing one point from a converged
    model moves it by about its influence (Adam's normalised steps would move it by ~lr).
    """
    Theta, W, grads = _budget(obj, theta0, X, y, weights, batch_size, generator)
    velocity = torch.zeros_like(Theta)
    for _ in range(steps):
        velocity = momentum * velocity + grads(Theta)
        Theta = Theta - lr * velocity
    return Theta


def adam(obj: Objective, theta0, X, y, weights=None, steps: int = 1000, lr: float = 1e-2, batch_size: int | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` Adam steps for every weighting at once: (P,) or (m, P) -> (m, P).

    The warm-up of ``train``, the early-stopped model of section 3.10.4, and the paper profile's
    training of networks too large for a second-order method (with minibatches).
    """
    Theta, W, grads = _budget(obj, theta0, X, y, weights, batch_size, generator)
    m1, m2 = torch.zeros_like(Theta), torch.zeros_like(Theta)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        Gr = grads(Theta)
        m1 = b1 * m1 + (1 - b1) * Gr
        m2 = b2 * m2 + (1 - b2) * Gr * Gr
        Theta = Theta - lr * (m1 / (1 - b1 ** t)) / ((m2 / (1 - b2 ** t)).sqrt() + eps)
    return Theta


def adam_train_mode(obj: Objective, theta0, X, y, steps: int, lr: float = 1e-3, batch_size: int = 128,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` minibatch Adam steps on one (P,) parameter vector with ``obj.model`` in train mode, as the
    published BatchNorm nets train: BatchNorm normalises by batch statistics and its running statistics follow
    them (``adam``'s vmapped gradients cannot update buffers). Returns theta (P,) and leaves the model in eval
    mode, whose loss is a sum over samples with those statistics frozen: what influence and retraining assume."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    obj.model.train()
    try:
        for _ in range(steps):
            idx = torch.randint(len(X), (batch_size,), generator=generator).to(X.device)
            opt.zero_grad()
            obj.loss(theta, X[idx], y[idx]).backward()  # functional_call updates the module's running statistics
            opt.step()
    finally:
        obj.model.eval()
    return theta.detach()


def _budget(obj, theta0, X, y, weights, batch_size, generator):
    """Rows of parameters (m, P), weights (m, n), and rows -> gradients on the full batch or a
    random minibatch (the same for every row, drawn afresh at each call)."""
    W = (torch.ones(1, len(X), dtype=theta0.dtype, device=X.device) if weights is None
         else weights.to(theta0.dtype).to(X.device))
    Theta = theta0.detach().expand(len(W), -1).clone() if theta0.dim() == 1 else theta0.detach().clone()
    grad_b = vmap(grad(obj.loss), in_dims=(0, None, None, 0))

    def grads(T):
        if batch_size is None:
            return grad_b(T, X, y, W)
        idx = torch.randint(len(X), (batch_size,), generator=generator).to(X.device)
        return grad_b(T, X[idx], y[idx], W[:, idx] + 1e-12)  # + tiny: a batch of removed points has sum w = 0
    return Theta, W, grads


# -- studies: estimates next to the truth ------------------------------------------------
def loo_study(opt: Optimum, x_test, y_test, k: int | None = None, idx=None, damping: float = 0.0,
              method: str = "bfgs", tol: float = 1e-9, max_iter: int = 300, lissa_kw: dict | None = None) -> dict:
    """Leave-one-out for the k most influential training points (by |predicted effect|), or ``idx``.

    Returns tensors over the chosen points: idx, pred (predicted test-loss change), truth
    (retrained), pred_norm / true_norm (||d_theta||, Fig 3.3a,b), converged, and lissa
    (the prediction with a LiSSA inverse-HVP, when lissa_kw gives its arguments).
    """
    solve = opt.solver(damping)
    g_t = opt.test_grad(x_test, y_test)
    s = solve(g_t)
    pred_all = loo_effects(opt.grads, s)  # (n,)
    if idx is None:
        idx = pred_all.abs().argsort(descending=True)[:k]
    idx = torch.as_tensor(idx, device=opt.X.device)
    fit = opt.retrain_without([[int(i)] for i in idx], method=method, tol=tol, max_iter=max_iter, damping=damping)
    out = {"idx": idx, "pred": pred_all[idx], "pred_all": pred_all,
           "truth": loss_changes(opt.obj, opt.theta, fit.theta, x_test, y_test)[:, 0],
           "pred_norm": (solve(opt.grads[idx]) / (opt.n - 1)).norm(dim=1),
           "true_norm": (fit.theta - opt.theta).norm(dim=1), "converged": fit.converged}
    if lissa_kw is not None:
        mb = lambda rows, V: opt.obj.hvps(opt.theta, opt.X[rows], opt.y[rows], V)  # noqa: E731
        out["lissa"] = loo_effects(opt.grads[idx], lissa(mb, g_t, opt.n, damping=damping, **lissa_kw), opt.n)
    return out


def group_study(opt: Optimum, groups, x_test, y_test, damping: float = 0.0, method: str = "newton-cg",
                tol: float = 1e-9, max_iter: int = 200) -> dict:
    """Group removal: predicted test-loss changes next to leave-group-out retraining.

    Returns tensors over the groups: first (Eq. 3.12 with 1/(1-p)), second (Theorem 1),
    full (with the dropped third-order terms, ``group_effects_full``), koh (first order without
    1/(1-p), Koh et al. 2019), truth, p and converged.
    """
    mask = group_mask(groups, opt.n).to(opt.X.device)
    solve = opt.solver(damping)
    g_t = opt.test_grad(x_test, y_test)
    first, second = group_effects(opt.obj, opt.theta, opt.X, opt.y, mask, g_t, solve, G=opt.grads)
    full = group_effects_full(opt.obj, opt.theta, opt.X, opt.y, mask, x_test, y_test, solve, G=opt.grads)
    p = mask.sum(1).to(first.dtype) / opt.n
    fit = opt.retrain_without(mask, method=method, tol=tol, max_iter=max_iter, damping=damping)
    return {"first": first, "second": second, "full": full, "koh": first * (1 - p), "p": p,
            "truth": loss_changes(opt.obj, opt.theta, fit.theta, x_test, y_test)[:, 0], "converged": fit.converged}
