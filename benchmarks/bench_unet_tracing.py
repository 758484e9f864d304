"""UNet causal tracing (Chapter 5): one batched sampling loop against one sampling loop per layer.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_unet_tracing.py [--repeats 2] [--steps 10]

Both sides restore each of the zoo text-to-image UNet's 44 traced layers (``anatomy.items(unet,
"layer")``: every resnet and every transformer block's attn1 / attn2 / ff) in the corrupted
caption's sample, at every DDIM step, in both CFG halves, with the same noise draw:

- batched: ``tracing.trace_unet_layers``: one loop over [clean, corrupted, restored x 44] (46
  samples, 92 UNet rows per call);
- loop: what one writes per intervention: for each layer one sampling loop of [clean, restored]
  (the clean trajectory supplies the layer's activations at the same step; nothing is cached
  across loops), plus one for the corrupted sample.

Architecture of ``interplab.zoo.t2i`` with random weights (the FLOPs of the shipped model) and its
frozen text tower's shape; the restored images must agree (allclose). Times: best of ``--repeats``,
wall clock and CPU time of the thread. Writes benchmarks/results/bench_unet_tracing.json.
"""
import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from interplab import anatomy, tracing  # noqa: E402
from interplab import toyworld as tw  # noqa: E402
from interplab.zoo import clip, t2i  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402

OUT = results_path("bench_unet_tracing.json")


def pipeline():
    torch.manual_seed(0)
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    text = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval().text_model
    return t2i.untrained(text, tok)


def looped(pipe, clean, corrupted, layers, seed, steps):
    noise = pipe.draw_noise(1, seed)
    corrupted_image = pipe.sample(corrupted, seed=seed, noise=noise, steps=steps)
    out = []
    for layer in layers:
        with tracing.restore_from_row(pipe.unet, {layer: [1]}, src=0, cfg=True):
            out.append(pipe.sample(torch.cat([clean, corrupted]), seed=seed, noise=noise, steps=steps)[1])
    return corrupted_image, torch.stack(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sample (the chapter's sampler: 10)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    pipe = pipeline()
    caption = "a red striped circle in the style of kel varo"
    ids, _ = tw.encode(pipe.tokenizer, [caption])
    subject = tracing.subject_positions(pipe.tokenizer, ids[0], "kel varo")
    noise = tracing.Noise("embeddings.token_embedding", subject,
                          tracing.noise_scale(pipe.text_model.embeddings.token_embedding, ids[0, subject]))
    clean, corrupted = tracing.trace_text_states(pipe.text_model, ids, noise)[:, None]
    layers = anatomy.items(pipe.unet, "layer")
    with torch.inference_mode():
        batched, t_b, c_b = best_of(lambda: tracing.trace_unet_layers(pipe, clean, corrupted, layers, steps=args.steps,
                                                                      batch_size=len(layers)), args.repeats)
        (corr, loop), t_l, c_l = best_of(lambda: looped(pipe, clean, corrupted, layers, 0, args.steps), args.repeats)
    diff = float((batched[2:] - loop).abs().max())
    assert diff < 1e-4 and float((batched[1] - corr[0]).abs().max()) < 1e-4, diff
    row = {"layers": len(layers), "steps": args.steps, "batched_samples": len(layers) + 2,
           "loop_samples": 2 * len(layers) + 1, "batched_s": t_b, "loop_s": t_l, "ratio": t_l / t_b,
           "batched_cpu_s": c_b, "loop_cpu_s": c_l, "ratio_cpu": c_l / c_b, "max_abs_diff": diff,
           "per_image_ms": 1000 * t_b / (len(layers) + 2)}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, indent=1))
    OUT.write_text(json.dumps({"benchmark": "UNet causal tracing: batched vs one sampling loop per layer",
                               "machine": machine(), "torch": torch.__version__, "repeats": args.repeats,
                               "model": "interplab.zoo.t2i architecture, random weights; caption "
                                        f"{caption!r}, noise 3 sigma on 'kel varo'",
                               "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1),
                               **row}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
