"""RepDecompose's cost relative to one forward pass, as the number of images grows (issue 7).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decompose.py [--repeats 3] [--paper-n 1 4 16]

For each model: the wall and CPU seconds of ``model``'s own forward pass (to its representation z, in the same
batches of 64 images as decompose) and
of ``decomposition.decompose`` over the chapter's range (heads, MLPs, embed and constants; tokens=True
also splits every head over its input tokens), for batches of N images, and their ratio. Models: the
zoo's DeiT-toy and Swin-toy (32 px) and the paper architectures with random weights at 224 px (DeiT-B/16,
Swin-B, MaxViT-S, open_clip ViT-B/16): the same FLOPs as the released checkpoints. Writes
benchmarks/results/bench_decompose.json and prints a table.
"""
import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from interplab import decomposition as D  # noqa: E402
from interplab.models import vit_encoders  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402

OUT = results_path("bench_decompose.json")


def case(name, model, side, start, ns, repeats, tokens):
    rows = []
    forward = lambda x: D.representation(model, x)  # noqa: E731  (the model's own forward, batches of 64)
    for n in ns:
        x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            _, f_wall, f_cpu = best_of(lambda: forward(x), repeats)
        for tok in (False, True) if tokens else (False,):
            c, d_wall, d_cpu = best_of(lambda: D.decompose(model, x, start=start, tokens=tok), repeats)
            err = float((c.total() - c.z).abs().max())
            rows.append(dict(model=name, n=n, tokens=tok, forward_s=round(f_wall, 4), decompose_s=round(d_wall, 4),
                             forward_cpu_s=round(f_cpu, 4), decompose_cpu_s=round(d_cpu, 4),
                             ratio=round(d_wall / f_wall, 2), cpu_ratio=round(d_cpu / f_cpu, 2), max_sum_error=err))
            print(f"{name:14s} N={n:5d} tokens={tok!s:5s} forward {f_wall:8.3f} s  decompose {d_wall:8.3f} s  "
                  f"ratio {d_wall / f_wall:6.2f} (CPU {d_cpu / f_cpu:6.2f})  |sum - z| {err:.1e}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--toy-n", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--paper-n", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    from interplab.models import load as load_zoo
    rows = []
    for name, zoo_name in (("DeiT-toy", "vit"), ("Swin-toy", "swin")):
        rows += case(name, load_zoo(zoo_name), 32, -3, args.toy_n, args.repeats, tokens=True)
    for name, start in (("deit", -5), ("swin", -6), ("maxvit", -12), ("clip", -5)):
        rows += case(name, vit_encoders.build(name), 224, start, args.paper_n, args.repeats, tokens=name == "deit")
    OUT.write_text(json.dumps(dict(machine=machine(), repeats=args.repeats, rows=rows), indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
