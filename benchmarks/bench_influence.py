"""Time the inverse-HVP solvers, group influence and the retraining engines (Chapter 3).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_influence.py [--quick]

1. (H + 0.01 I)^-1 g_test by exact Cholesky, CG and LiSSA as the parameter count grows
   (multinomial logistic regression and MLPs of growing width on the 8x8 digits): seconds and
   error relative to the exact solve. The exact time includes forming the Hessian.
2. Group influence (1st + 2nd order, one shared factor) against leave-group-out retraining.
3. Leave-one-out retraining: vmap-batched engines against a Python loop of L-BFGS fits.
Prints tables and writes benchmarks/results/bench_influence.json.
"""
import argparse
import json
import os
import platform
import time

import torch

import interplab.influence as inf
from interplab import datasets
from interplab.models import classifiers
from timing import results_path  # benchmarks/timing.py, on sys.path when run as a script

OUT = results_path("bench_influence.json")
DAMPING = 0.01


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def trained(model, split, wd=1e-3, tol=1e-8):
    torch.manual_seed(0)
    obj = inf.Objective(model, "cross_entropy", wd)
    return inf.train(obj, split.X, split.y, tol=tol, polish="newton-cg"), split


def solver_rows(quick):
    digits = datasets.digits(1000, seed=0)
    widths = [8, 32] if quick else [8, 16, 32, 64]
    cases = [("multinomial LR", classifiers.logistic_regression(64, 10))]
    cases += [(f"MLP width {w}", classifiers.mlp(64, 10, width=w, depth=1, activation="tanh")) for w in widths]
    rows = []
    for name, model in cases:
        opt, s = trained(model, digits)
        i = int(opt.test_losses(s.X_test, s.y_test).argmax())
        b = opt.test_grad(s.X_test[i:i + 1], s.y_test[i:i + 1])
        obj, th = opt.obj, opt.theta
        exact, t_exact = timed(lambda: inf.CholeskySolver(obj.hessian(th, s.X, s.y), DAMPING)(b))
        hvp = lambda V: obj.hvps(th, s.X, s.y, V)  # noqa: E731
        cg, t_cg = timed(lambda: inf.conjugate_gradient(hvp, b, damping=DAMPING, tol=1e-8))
        top, t_top = timed(lambda: inf.top_eigenvalue(lambda v: obj.hvp(th, s.X, s.y, v), obj.dim, steps=20))
        mb = lambda idx, V: obj.hvps(th, s.X[idx], s.y[idx], V)  # noqa: E731
        lis, t_lis = timed(lambda: inf.lissa(mb, b, s.n, damping=DAMPING, scale=1.5 * (top + DAMPING), depth=1000,
                                             repeats=2, batch_size=200, generator=torch.Generator().manual_seed(0)))
        rows.append({"model": name, "P": obj.dim, "exact_s": t_exact, "cg_s": t_cg, "cg_iters": cg.iterations,
                     "cg_rel_err": inf.relative_error(cg.x, exact), "lissa_s": t_lis + t_top,
                     "lissa_rel_err": inf.relative_error(lis, exact)})
    return rows


def group_rows(quick):
    rows = []
    m = 10 if quick else 20
    for name, split, wd, method in [("synthetic LR, n=10,000", datasets.gaussian_classes(10_000, 500), 1e-3, "newton"),
                                    ("digits multinomial LR, n=1,000", datasets.digits(1000), 1e-2, "newton-cg")]:
        torch.manual_seed(0)
        model = classifiers.logistic_regression(split.X.shape[1], split.n_classes)
        obj = inf.Objective(model, "logistic" if split.n_classes == 2 else "cross_entropy", wd)
        opt = inf.train(obj, split.X, split.y, tol=1e-11, polish="newton")
        i = int(opt.test_losses(split.X_test, split.y_test).argmax())
        gt = opt.test_grad(split.X_test[i:i + 1], split.y_test[i:i + 1])
        g = torch.Generator().manual_seed(0)
        groups = [torch.randperm(split.n, generator=g)[: int(0.3 * split.n)] for _ in range(m)]
        _, t_prep = timed(lambda: (opt.grads, opt.solver()))
        _, t_inf = timed(lambda: inf.group_effects(obj, opt.theta, split.X, split.y, groups, gt, opt.solver(), G=opt.grads))
        fit, t_re = timed(lambda: opt.retrain_without(groups, method=method, tol=1e-10))
        rows.append({"problem": name, "P": obj.dim, "groups": m, "influence_s": t_prep + t_inf, "retrain_s": t_re,
                     "retrain_method": method, "speedup": t_re / (t_prep + t_inf), "converged": fit.all_converged})
    return rows


def retrain_rows(quick):
    rows = []
    k = 8 if quick else 16
    cases = [("iris MLP 5x3 tanh", classifiers.mlp(4, 3, 5, 3, "tanh"), datasets.iris(seed=0), ("newton", "bfgs")),
             ("digits MLP 10x2 tanh", classifiers.mlp(64, 10, 10, 2, "tanh"), datasets.digits(300, seed=0), ("bfgs",))]
    for name, model, split, methods in cases:
        torch.manual_seed(0)
        opt = inf.train(inf.Objective(model, "cross_entropy", 1e-2), split.X, split.y, tol=1e-10)
        groups = [[i] for i in range(k)]
        _ = opt.hessian
        for method in methods:
            fit, t = timed(lambda: opt.retrain_without(groups, method=method, tol=1e-9, max_iter=500))
            rows.append({"problem": name, "P": opt.obj.dim, "retrains": k, "engine": f"vmap {method}", "seconds": t,
                         "converged": f"{int(fit.converged.sum())}/{k}"})
        def loop():
            out = []
            for i in range(k):
                w = torch.ones(opt.n)
                w[i] = 0
                out.append(inf.fit(opt.obj, opt.theta, opt.X, opt.y, w, method="lbfgs", tol=1e-9, max_iter=2000))
            return out
        fits, t = timed(loop)
        rows.append({"problem": name, "P": opt.obj.dim, "retrains": k, "engine": "loop of L-BFGS", "seconds": t,
                     "converged": f"{sum(bool(f.converged) for f in fits)}/{k}"})
    return rows


def table(rows, floatfmt=".3g"):
    import pandas as pd
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=floatfmt)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, for a smoke test")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)  # the models are built before ``trained`` seeds; LiSSA's scale depends on their training
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{torch.get_num_threads()} torch threads", "torch": torch.__version__,
               "damping": DAMPING}
    for key, fn in [("solvers", solver_rows), ("group_influence", group_rows), ("retraining", retrain_rows)]:
        results[key], t = timed(lambda: fn(args.quick))
        print(f"\n## {key} ({t:.0f} s)\n" + table(results[key]))
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
