"""FastDiffSel vs greedy search: time per task as the search pool grows (Sec. 4.3, Fig 4.2).

Both methods get the same 5-way 5-shot query sets and the same precomputed features
(Gaussian class clusters, d = 64, so pools of any size exist), and each task is selected
alone under the clock, the fastest of ``--repeats`` runs. Greedy search runs to a local
optimum (at most 10 rounds). The query loss of the selected support sets is reported too,
so that speed is never bought with worse tasks unnoticed. FastDiffSel runs in three settings:
``fds_1`` the dissertation's (one step, alpha = 200, l1 ball), ``fds_l1_10`` ten l1-ball steps
(alpha = 1, the notebook's setting before the capped simplex) and ``fds`` the notebook's setting
(capped simplex, ``--steps`` steps, best iterate, ``--restarts`` restarts, alpha = 1).

    OMP_NUM_THREADS=1 python benchmarks/bench_fastdiffsel.py
writes benchmarks/results/bench_fastdiffsel.json and prints a table.
"""
import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from interplab.fewshot import select as S, tasks as T  # noqa: E402
from timing import results_path  # noqa: E402  (benchmarks/timing.py, on sys.path when run as a script)

OUT = results_path("bench_fastdiffsel.json")


def clusters(per_class: int, n_classes: int = 10, d: int = 64, seed: int = 0):
    """Features (n, d) of Gaussian classes close enough that random 5-way 5-shot tasks are ~85 % accurate."""
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    x = g.normal(0, 0.4, (n_classes, d))[y] + g.normal(0, 0.9, (len(y), d))
    return torch.tensor(x, dtype=torch.float32), y


def run(pools, n_tasks, repeats, way=5, shot=5, query=10, steps=5, restarts=8, seed=0):
    rows = []
    settings = [("fds_1", "fastdiffsel", dict(steps=1, alpha=200.0, relax="l1")),
                ("fds_l1_10", "fastdiffsel", dict(steps=10, alpha=1.0, relax="l1", best_iterate=False)),
                ("fds", "fastdiffsel", dict(steps=steps, alpha=1.0, restarts=restarts)),
                ("greedy", "greedy", dict(rounds=10))]
    for pool in pools:
        feats, y = clusters(pool + query, seed=seed)
        tasks = T.sample_tasks(T.FixedSampler(way, shot, query), y, n_tasks, seed=seed)
        row = {"pool_per_class": pool, "pool": pool * way, "tasks": n_tasks}
        for name, method, kw in settings:
            picked, secs = S.select_timed(tasks, feats, y, method, repeats=repeats, **kw)
            row[f"{name}_ms"] = 1e3 * float(secs.mean())
            row[f"{name}_loss"] = float(S.support_loss(picked, feats, y).mean())
        row["random_loss"] = float(S.support_loss(tasks, feats, y).mean())
        for name, *_ in settings[:-1]:
            row[f"ratio{name[3:]}"] = row["greedy_ms"] / row[f"{name}_ms"]
        rows.append(row)
        print(f"pool {pool:5d}/class: ms fds-1 {row['fds_1_ms']:6.2f}  fds-l1-10 {row['fds_l1_10_ms']:6.2f}  "
              f"fds {row['fds_ms']:6.2f}  greedy {row['greedy_ms']:8.2f}  ratio {row['ratio_1']:6.1f}x / "
              f"{row['ratio_l1_10']:5.1f}x / {row['ratio']:5.1f}x  loss random {row['random_loss']:.0f} "
              f"fds-1 {row['fds_1_loss']:.0f} fds-l1-10 {row['fds_l1_10_loss']:.0f} fds {row['fds_loss']:.0f} "
              f"greedy {row['greedy_loss']:.0f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, nargs="+", default=[20, 50, 100, 200, 500, 1000])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=8)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args.pools, args.tasks, args.repeats, steps=args.steps, restarts=args.restarts)
    OUT.write_text(json.dumps({
        "benchmark": "fastdiffsel_vs_greedy", "task": "5-way 5-shot, 10 queries per class, d=64",
        "settings": {"fds_1": "1 step, alpha 200, l1 ball (dissertation)", "fds_l1_10": "10 steps, alpha 1, l1 ball",
                     "fds": f"{args.steps} steps x {args.restarts} restarts, alpha 1, capped simplex, best iterate"},
        "device": f"cpu ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}",
        "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=1))
    print(f"wrote {OUT} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
