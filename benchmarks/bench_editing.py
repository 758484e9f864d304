"""Closed-form weight edits: ``editing.solve_update`` (float64 solves) against the explicit inverse.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_editing.py [--repeats 3] [--large-direct]

The edit W_new = argmin ||K W^T - V||^2 + lam ||W - W0||^2 three ways, all in float64 from
float32 inputs and cast back to float32 (what ``solve_update`` does):

- direct:   ``solve_update(method="direct")``, one d_in x d_in solve (LU), no inverse;
- woodbury: ``solve_update(method="woodbury")``, one n x n solve (what "auto" picks when n < d_in);
- explicit: W_new = (lam W + V^T K) @ inv(lam I + K^T K), the textbook form.

Sizes: Stable Diffusion's CLIP-L text encoder out_proj (768 x 768) with 291 keys (DIFF-QUICKFIX,
4 prompt pairs) and 730 keys (10 concepts); LLaVA-7B's MLP down_proj (4096 x 11008) with 50 and
500 keys. Synthetic data, seeded: W ~ N(0, 1/d_in), keys K ~ N(0, 1), values V = K W^T + N(0, s^2)
with s the std of K W^T; lam = 0.01 (``--lam``). Times are the best of ``--repeats`` runs (wall
clock; CPU time of the thread in the JSON), ``--large-repeats`` at the LLaVA size. Agreement: max
abs difference of each method's W_new from the explicit one, absolute and relative to max |W_new|.

At d_in = 11008 the direct solve and the explicit inverse factor an 11008 x 11008 float64 matrix
(~1 GB, a few GB in all), which takes many minutes on one CPU thread; they are skipped unless
``--large-direct`` (then run once) and reported with a lower-bound time estimate (flop count /
this machine's measured float64 GEMM rate, per wall and per CPU second). Woodbury there is
checked instead against the normal equations W_new (lam I + K^T K) = lam W + V^T K, in float64,
on a sample of output rows (rows of the edit are independent, so a row subset is solved exactly
as in the full problem).
Writes benchmarks/results/bench_editing.json and prints a table.
"""
import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from interplab.editing import solve_update  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402  (benchmarks/timing.py, on sys.path when run as a script)

OUT = results_path("bench_editing.json")
CASES = [("CLIP-L out_proj (SD text encoder)", 768, 768, (291, 730)),
         ("LLaVA-7B down_proj", 4096, 11008, (50, 500))]
LARGE = 4096      # d_in above this: direct and explicit are skipped unless --large-direct
CHECK_ROWS = 64   # output rows for the normal-equation check


def explicit_inverse(W, K, V, lam):
    """(lam W + V^T K) @ inv(lam I + K^T K) in float64, returned in W's dtype."""
    W64, K64, V64 = (x.to(torch.float64) for x in (W, K, V))
    A = K64.T @ K64 + lam * torch.eye(W.shape[1], dtype=torch.float64)
    return ((lam * W64 + V64.T @ K64) @ torch.linalg.inv(A)).to(W.dtype)


def gemm_gflops(size=1024, repeats=3):
    """Best float64 GEMM rates of this thread, GFLOP/s: (per wall second, per CPU second)."""
    a = torch.randn(size, size, dtype=torch.float64)
    a @ a
    _, wall, cpu = best_of(lambda: a @ a, repeats)
    return 2 * size ** 3 / wall / 1e9, 2 * size ** 3 / cpu / 1e9


def flops(method, d_out, d_in, n):
    """Float64 flop counts (dense kernels as called; LU 2/3 d^3, inverse from LU 4/3 d^3 more)."""
    rhs = 2 * d_out * n * d_in                                                   # V^T K (or K W^T)
    if method == "explicit":
        return 2 * n * d_in ** 2 + 2 * d_in ** 3 + rhs + 2 * d_out * d_in ** 2
    if method == "direct":
        return 2 * n * d_in ** 2 + rhs + 2 / 3 * d_in ** 3 + 2 * d_in ** 2 * d_out
    return 2 * n ** 2 * d_in + 2 / 3 * n ** 3 + 2 * n ** 2 * d_in + 2 * rhs      # woodbury


def problem(d_out, d_in, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    K = torch.randn(n, d_in, generator=g)
    KW = K @ W.T
    V = KW + KW.std() * torch.randn(n, d_out, generator=g)
    return W, K, V


def normal_equation_residual(W, K, V, lam, rows):
    """||W_new (lam I + K^T K) - (lam W + V^T K)|| / ||lam W + V^T K|| on ``rows``, float64 throughout."""
    Ws, Vs, K64 = W[rows].double(), V[:, rows].double(), K.double()
    new = solve_update(Ws, K64, Vs, lam, method="woodbury")     # float64 in, float64 out
    rhs = lam * Ws + Vs.T @ K64
    res = lam * new + (new @ K64.T) @ K64 - rhs
    return float(res.norm() / rhs.norm()), new


def run_case(name, d_out, d_in, n, lam, repeats, large_direct, rate):
    W, K, V = problem(d_out, d_in, n)
    large = d_in > LARGE
    row = {"case": name, "d_out": d_out, "d_in": d_in, "n_keys": n, "repeats": repeats}
    methods = {"woodbury": lambda: solve_update(W, K, V, lam, method="woodbury"),
               "direct": lambda: solve_update(W, K, V, lam, method="direct"),
               "explicit": lambda: explicit_inverse(W, K, V, lam)}
    results = {}
    for method, fn in methods.items():
        row[f"{method}_gflop"] = flops(method, d_out, d_in, n) / 1e9
        if large and method != "woodbury" and not large_direct:
            row[f"{method}_s"] = None
            row[f"{method}_est_s"] = row[f"{method}_gflop"] / rate[0]
            row[f"{method}_est_cpu_s"] = row[f"{method}_gflop"] / rate[1]
            row[f"{method}_skipped"] = (f"factors a {d_in} x {d_in} float64 matrix ({d_in ** 2 * 8 / 2 ** 30:.1f} GiB "
                                        f"each copy): >= {row[f'{method}_est_s']:.0f} s wall at this thread's "
                                        f"{rate[0]:.1f} GFLOP/s float64 GEMM rate (>= "
                                        f"{row[f'{method}_est_cpu_s']:.0f} s CPU at {rate[1]:.1f} GFLOP/s per CPU "
                                        f"second); run with --large-direct")
            continue
        reps = 1 if large and method != "woodbury" else repeats
        results[method], row[f"{method}_s"], row[f"{method}_cpu_s"] = best_of(fn, reps)
        print(f"  {name} n={n}: {method:8s} {row[f'{method}_s']:8.3f} s ({row[f'{method}_cpu_s']:.3f} s CPU)",
              flush=True)
    if "explicit" in results:
        ref = results["explicit"]
        scale = float(ref.abs().max())
        for method in ("direct", "woodbury"):
            if method in results:
                diff = float((results[method] - ref).abs().max())
                row[f"{method}_vs_explicit_max_abs"] = diff
                row[f"{method}_vs_explicit_rel"] = diff / scale
                row[f"ratio_explicit/{method}"] = row["explicit_s"] / row[f"{method}_s"]
                assert diff <= 1e-6 * scale, (name, n, method, diff, scale)
    if "direct" in results:
        row["ratio_direct/woodbury"] = row["direct_s"] / row["woodbury_s"]
    rows = torch.randperm(d_out, generator=torch.Generator().manual_seed(1))[:CHECK_ROWS]
    resid, exact_rows = normal_equation_residual(W, K, V, lam, rows)
    row["woodbury_normal_eq_rel_residual"] = resid
    row["woodbury_vs_float64_rows_rel"] = float((results["woodbury"][rows].double() - exact_rows).abs().max()
                                                / exact_rows.abs().max())
    assert resid < 1e-8 and row["woodbury_vs_float64_rows_rel"] < 1e-6, row
    return row


def table(rows):
    import pandas as pd

    def g(r, key, f=".3g"):
        return format(r[key], f) if r.get(key) is not None else "-"

    def secs(r, method):
        if r[f"{method}_s"] is not None:
            return g(r, f"{method}_s")
        return f"skipped (>= {r[f'{method}_est_s']:.0f} s; {r[f'{method}_est_cpu_s']:.0f} s CPU)"
    return pd.DataFrame([{
        "case": r["case"], "W": f"{r['d_out']} x {r['d_in']}", "keys": r["n_keys"],
        "woodbury s": secs(r, "woodbury"), "woodbury CPU s": g(r, "woodbury_cpu_s"),
        "direct s": secs(r, "direct"), "explicit s": secs(r, "explicit"),
        "explicit/direct": g(r, "ratio_explicit/direct"), "explicit/woodbury": g(r, "ratio_explicit/woodbury"),
        "max|direct-expl|": g(r, "direct_vs_explicit_max_abs", ".2g"),
        "max|wood-expl|": g(r, "woodbury_vs_explicit_max_abs", ".2g"),
        "rel (direct, wood)": f"{g(r, 'direct_vs_explicit_rel', '.2g')}, {g(r, 'woodbury_vs_explicit_rel', '.2g')}",
        "normal-eq resid": g(r, "woodbury_normal_eq_rel_residual", ".2g")} for r in rows]).to_markdown(index=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest counts")
    parser.add_argument("--large-repeats", type=int, default=1, help="timed Woodbury runs at the LLaVA size")
    parser.add_argument("--lam", type=float, default=0.01)
    parser.add_argument("--large-direct", action="store_true",
                        help="also run direct and explicit once at d_in = 11008 (many minutes on one thread)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rate = gemm_gflops()
    print(f"float64 GEMM: {rate[0]:.1f} GFLOP/s per wall second, {rate[1]:.1f} per CPU second", flush=True)
    rows = [run_case(name, d_out, d_in, n, args.lam, args.large_repeats if d_in > LARGE else args.repeats,
                     args.large_direct, rate)
            for name, d_out, d_in, keys in CASES for n in keys]
    print("\n" + table(rows))
    OUT.write_text(json.dumps({
        "benchmark": "solve_update (direct / Woodbury float64 solves) vs explicit inverse",
        "machine": machine(),
        "torch": torch.__version__, "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "float64_gemm_gflops": {"per_wall_s": rate[0], "per_cpu_s": rate[1]}, "lam": args.lam,
        "dtype": "float32 in/out, float64 inside",
        "timing": "best of repeats; *_s wall clock, *_cpu_s CPU time of the thread",
        "data": "W ~ N(0, 1/d_in), K ~ N(0, 1), V = K W^T + N(0, std(K W^T)^2); seed 0",
        "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1), "rows": rows},
        indent=1) + "\n")
    print(f"\nwrote {OUT} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
