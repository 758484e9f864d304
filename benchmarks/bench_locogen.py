"""LocoGen's window search batched into one sampling loop against a loop over windows, and
LocoEdit's solve time at each model family's projection sizes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_locogen.py [--repeats 3] [--steps 10]

Search: one prompt pair of the zoo's ``t2i`` (M = 10 cross-attention layers), every window of
m = 1, 2, 3 (27 windows) plus the clean and the all-layer rows:

- batched: ``conditioning.sample_windows``: the 29 rows in one sampling loop (58 UNet rows per
  step with CFG), each row's windows altered by one set of hooks;
- loop: one sampling loop per row (the release's way: one image per window), same noise.

Both give the same images (max abs difference reported). Times are the best of ``--repeats``
(wall and this thread's CPU time).

Many pairs (``--pairs`` P, Chapter 5 part II's case: every probe pair of a concept), each on its own
seed's noise draw, for the full search (29 rows per pair) and for a verification of one window (3 rows
per pair):

- pairs: ``conditioning.sample_window_pairs``: as many pairs per sampling loop as 128 rows hold;
- one pair per loop: ``sample_windows`` for each pair in turn (what the chapter did before).

Edit: ``editing.locoedit`` on random weights of the real shapes, 4 keys (the release's four
templates), lambda = 0.01: the to_k and to_v of every layer of the window the dissertation
reports: SD-v1.x style (layers 8-9: 1280 x 768), SD-v2.1 (8-10: 1280 x 1024), SD-XL style
(45-47: 1280 x 2048). IF is left out: its widths are not written here (they are read from the
hub config at load time). Writes benchmarks/results/bench_locogen.json and prints a table.
"""
import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from interplab import anatomy, conditioning, editing  # noqa: E402
from interplab.toyworld import SHAPES  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402

EDIT_SIZES = {"sd-v1 style (l=8, m=2)": (2, 1280, 768), "sd-v2.1 (l=8, m=3)": (3, 1280, 1024),
              "sd-xl style (l=45, m=3)": (3, 1280, 2048)}


def search(pipe, steps: int, repeats: int) -> dict:
    M = anatomy.n_xattn(pipe.unet)
    windows = [w for m in (1, 2, 3) for w in conditioning.adjacent_windows(M, m)]
    cond, alt = pipe.encode(["a red star in the style of kel varo"]), pipe.encode(["a red star in the style of painting"])
    noise = pipe.draw_noise(1, 0)

    def batched():
        return conditioning.sample_windows(pipe, cond, alt, windows, seed=0, steps=steps)

    def loop():
        rows = [pipe.sample(cond, seed=0, noise=noise, steps=steps)]
        for layers in [list(range(M))] + windows:
            with conditioning.altered_cross_attention(pipe.unet, {i: [0] for i in layers}, alt):
                rows.append(pipe.sample(cond, seed=0, noise=noise, steps=steps))
        return torch.cat(rows)

    with torch.inference_mode():
        a, wall_b, cpu_b = best_of(batched, repeats)
        b, wall_l, cpu_l = best_of(loop, repeats)
    return dict(windows=len(windows), rows=len(a), steps=steps, batched_wall_s=wall_b, batched_cpu_s=cpu_b,
                loop_wall_s=wall_l, loop_cpu_s=cpu_l, speedup_wall=wall_l / wall_b, speedup_cpu=cpu_l / cpu_b,
                max_abs_diff=float((a - b).abs().max()))


def pairs_search(pipe, steps: int, repeats: int, n_pairs: int, windows: list) -> dict:
    subjects = [f"a red {SHAPES[p % len(SHAPES)]}" for p in range(n_pairs)]
    conds = pipe.encode([f"{s} in the style of kel varo" for s in subjects])
    alts = pipe.encode([f"{s} in the style of painting" for s in subjects])
    seeds = list(range(n_pairs))

    def pairs():
        return conditioning.sample_window_pairs(pipe, conds, alts, windows, seeds, steps=steps)

    def one_by_one():
        return torch.stack([conditioning.sample_windows(pipe, conds[p:p + 1], alts[p:p + 1], windows, seed=seeds[p],
                                                        steps=steps) for p in range(n_pairs)])

    with torch.inference_mode():
        a, wall_p, cpu_p = best_of(pairs, repeats)
        b, wall_o, cpu_o = best_of(one_by_one, repeats)
    return dict(pairs=n_pairs, windows=len(windows), rows=n_pairs * (2 + len(windows)), steps=steps,
                pairs_wall_s=wall_p, pairs_cpu_s=cpu_p, one_by_one_wall_s=wall_o, one_by_one_cpu_s=cpu_o,
                speedup_wall=wall_o / wall_p, speedup_cpu=cpu_o / cpu_p, max_abs_diff=float((a - b).abs().max()))


def edit_times(repeats: int) -> dict:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, (m, inner, d) in EDIT_SIZES.items():
        model = nn.Module()
        for i in range(m):
            layer = nn.Module()
            layer.to_k, layer.to_v = nn.Linear(d, inner, bias=False), nn.Linear(d, inner, bias=False)
            model.add_module(f"x{i}", layer)
        keys, targets = torch.randn(4, d, generator=gen), torch.randn(4, d, generator=gen)
        edits, wall, cpu = best_of(lambda: editing.locoedit(model, [f"x{i}" for i in range(m)], keys, targets), repeats)
        out[name] = dict(layers=m, weight=f"{inner} x {d}", matrices=len(edits), wall_s=wall, cpu_s=cpu,
                         max_residual=max(e.residual for e in edits))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=8)
    args = ap.parse_args()
    from interplab.models import load
    pipe = load("t2i")
    every = [w for m in (1, 2, 3) for w in conditioning.adjacent_windows(anatomy.n_xattn(pipe.unet), m)]
    result = dict(machine=machine(), search=search(pipe, args.steps, args.repeats),
                  pairs={"search": pairs_search(pipe, args.steps, args.repeats, args.pairs, every),
                         "verification": pairs_search(pipe, args.steps, args.repeats, args.pairs, [[4, 5]])},
                  edit=edit_times(args.repeats))
    out = results_path("bench_locogen.json")
    out.write_text(json.dumps(result, indent=2))
    s = result["search"]
    print(f"window search, {s['windows']} windows + 2 rows, {s['steps']} steps: batched {s['batched_wall_s']:.2f} s "
          f"(cpu {s['batched_cpu_s']:.2f}), loop {s['loop_wall_s']:.2f} s (cpu {s['loop_cpu_s']:.2f}): "
          f"{s['speedup_wall']:.1f}x wall, {s['speedup_cpu']:.1f}x cpu; max |diff| {s['max_abs_diff']:.1e}")
    for case, p in result["pairs"].items():
        print(f"{case} over {p['pairs']} pairs, {p['windows']} window(s) ({p['rows']} rows): sample_window_pairs "
              f"{p['pairs_wall_s']:.2f} s (cpu {p['pairs_cpu_s']:.2f}), one pair per loop {p['one_by_one_wall_s']:.2f} s "
              f"(cpu {p['one_by_one_cpu_s']:.2f}): {p['speedup_wall']:.1f}x wall, {p['speedup_cpu']:.1f}x cpu; "
              f"max |diff| {p['max_abs_diff']:.1e}")
    for name, e in result["edit"].items():
        print(f"LocoEdit {name}: {e['matrices']} matrices {e['weight']}: {1000 * e['wall_s']:.1f} ms "
              f"(residual {e['max_residual']:.1e})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
