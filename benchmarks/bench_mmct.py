"""MultimodalCausalTrace batched against a per-(position, layer) forward loop, and MULTEDIT's solve
against an explicit inverse at LLaVA-1.5-7B's MLP size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mmct.py [--repeats 3] [--batch-size 64] [--no-inverse]

Trace: one ToyKnown question of the zoo's ``vlm`` (8 LM layers, 80 tokens, 64 of them visual), the
visual constraint replaced by another landmark's name; every question position plus the joint
image row, MLP and attention outputs, windows 1 and 3:

- batched: ``tracing.trace_grid`` (one pass for [clean, corrupted], then ceil(R / batch_size) passes);
- loop: one clean pass caching every layer's output, then one forward pass per (position, layer)
  restoring it with ``hooks.replace``: what a user writes with hooks alone;
- batched + cached prefix (how the notebook runs): ``tracing.cached_prefix`` runs the image and chat
  prefix once and every restored row only the question tokens (the image row, whose effect is 0 by
  causality, cannot be restored this way and is left out of this column).

Scores must agree (allclose). Edit: a rank-one MULTEDIT of ``down_proj`` (d = 4096, d_ff = 11008, random
weights): ``editing.solve_update`` (Woodbury: a 1 x 1 system), the direct d_ff x d_ff solve, and the
explicit inverse (lam I + K^T K)^{-1} the closed form is often written with (float64 throughout).
Writes benchmarks/results/bench_mmct.json and prints a table.
"""
import argparse
import json
import os
from contextlib import ExitStack

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from interplab import hooks, tracing  # noqa: E402
from interplab.models import load as load_zoo  # noqa: E402
from interplab.toyworld import facts as tf  # noqa: E402
from interplab.zoo import vlm  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402

OUT = results_path("bench_mmct.json")


def loop_scores(model, run, pair, sites, cells, metric):
    """(R,) scores: one forward pass of the corrupted input per cell (layers, positions)."""
    with hooks.trace(model, [s.path for s in sites]) as clean:
        run(pair.clean)
    scores = []
    for layers, pos in cells:
        pos = [pos] if isinstance(pos, int) else pos
        with ExitStack() as stack:
            for j in layers:
                path = sites[j].path
                stack.enter_context(hooks.replace(model, {path: clean[path][:, pos]}, positions=pos))
            scores.append(metric(run(pair.corrupted)))
    return torch.cat(scores)


def trace_case(model, pair, kind, window_size, repeats, batch_size):
    run = lambda b: model(inputs_embeds=b["inputs_embeds"]).logits  # noqa: E731
    metric = tracing.answer_probability(pair.last, pair.answer)
    positions = [vlm.IMAGE_POSITIONS] + list(range(vlm.QUESTION_START, pair.last + 1))
    sites = tracing.layer_sites(model, kind, tower="language_model")
    L = len(sites)
    cells = [(list(tracing.window(layer, window_size, L)), pos) for layer in range(L) for pos in positions]
    with torch.inference_mode():
        res, t_b, c_b = best_of(lambda: tracing.trace_grid(model, run, pair.clean, pair.corrupted, metric, kind,
                                                           positions, window_size, tower="language_model",
                                                           batch_size=batch_size), repeats)
        looped, t_l, c_l = best_of(lambda: loop_scores(model, run, pair, sites, cells, metric), repeats)
        start = vlm.QUESTION_START

        def with_prefix():  # the notebook's way: the image + chat prefix run once, its keys / values reused
            suffix, suffix_run = tracing.cached_prefix(model, pair, start)
            return tracing.trace_grid(model, suffix_run, suffix.clean, suffix.corrupted,
                                      tracing.answer_probability(suffix.last, suffix.answer), kind,
                                      [p - start for p in positions[1:]], window_size, tower="language_model",
                                      batch_size=batch_size)
        pre, t_p, c_p = best_of(with_prefix, repeats)
    batched = res.restored.reshape(-1)
    assert torch.allclose(batched, looped, rtol=1e-5, atol=1e-6), (batched - looped).abs().max()
    assert torch.allclose(pre.restored, res.restored[:, 1:], rtol=1e-5, atol=1e-6)
    row = dict(kind=kind, window=window_size, restorations=len(cells), batched_s=t_b, loop_s=t_l, ratio=t_l / t_b,
               batched_cpu_s=c_b, loop_cpu_s=c_l, ratio_cpu=c_l / c_b, max_abs_diff=float((batched - looped).abs().max()),
               batched_prefix_s=t_p, ratio_prefix=t_l / t_p, ratio_prefix_cpu=c_l / c_p)
    print(f"trace {kind:>4} w{window_size}: R {len(cells):3d}  batched {t_b:6.3f} s  loop {t_l:6.3f} s  "
          f"{row['ratio']:5.1f}x wall  {row['ratio_cpu']:5.1f}x CPU  max |diff| {row['max_abs_diff']:.1e};  "
          f"batched + cached prefix {t_p:6.3f} s ({row['ratio_prefix']:5.1f}x wall, {row['ratio_prefix_cpu']:5.1f}x CPU;"
          f" without the image row)", flush=True)
    return row


def edit_case(inverse: bool, repeats: int, d: int = 4096, d_ff: int = 11008):
    from interplab import editing
    gen = torch.Generator().manual_seed(0)
    lam = 0.1
    W = torch.randn(d, d_ff, generator=gen) / d_ff ** 0.5
    k, z = torch.randn(1, d_ff, generator=gen), torch.randn(1, d, generator=gen)
    rows = {}
    new, rows["woodbury_s"], _ = best_of(lambda: editing.solve_update(W, k, z, lam, method="woodbury"), repeats)
    direct, rows["direct_s"], _ = best_of(lambda: editing.solve_update(W, k, z, lam, method="direct"), 1)
    rows["max_abs_diff_direct"] = float((new - direct).abs().max())
    if inverse:
        def explicit():
            W64, k64, z64 = W.double(), k.double(), z.double()
            A = k64.T @ k64 + lam * torch.eye(d_ff, dtype=torch.float64)
            return ((lam * W64 + z64.T @ k64) @ torch.linalg.inv(A)).float()
        inv, rows["inverse_s"], _ = best_of(explicit, 1)
        rows["max_abs_diff_inverse"] = float((new - inv).abs().max())
        rows["ratio_inverse_over_woodbury"] = rows["inverse_s"] / rows["woodbury_s"]
    rows["ratio_direct_over_woodbury"] = rows["direct_s"] / rows["woodbury_s"]
    print(f"edit at d = {d}, d_ff = {d_ff}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows.items()), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-inverse", action="store_true", help="skip the explicit 11008 x 11008 inverse (minutes)")
    parser.add_argument("--edit-dims", type=int, nargs=2, default=(4096, 11008), metavar=("D", "D_FF"),
                        help="the edited down-projection's shape (default LLaVA-7B's)")
    args = parser.parse_args()
    model, _, tok = load_zoo("vlm")
    world = tf.world()
    rec = tf.probe_records(world, "toy_known", 1, seed=0)[0]
    pair = vlm.prompt_pair(model, tok, rec, seed=0)
    rows = [trace_case(model, pair, kind, w, args.repeats, args.batch_size) for kind in ("mlp", "attn") for w in (1, 3)]
    result = {"machine": machine(), "trace": rows, "edit": edit_case(not args.no_inverse, args.repeats, *args.edit_dims)}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
