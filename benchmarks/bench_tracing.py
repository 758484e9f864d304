"""Batched corrupt-and-restore (``interplab.tracing``) against a one-forward-per-restoration loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tracing.py [--repeats 3] [--batch-size 32]

Both sides score the same restorations of the same corrupted prompt on the same model:

- batched: ``tracing.trace_grid`` (one pass for [clean, corrupted] caching the clean sites, then
  ceil(R / batch_size) passes of corrupted rows, each row restoring its own (layers, position)).
- loop: what a user writes with ``interplab.hooks`` alone: trace the clean sites (1 pass), score
  the corrupted prompt (1 pass, noise via ``hooks.add``), then one pass per restoration with
  ``hooks.replace`` of the cached clean values at that cell and the same noise added.

Cases: (a) the text tower of a tiny CLIP built like ``interplab.zoo.clip`` (6 layers x 64 wide,
random weights), a prompt padded with EOS to 16 tokens, Gaussian noise (ROME's 3 sigma) on the
subject "red striped"; metric: cosine of the pooled output to the clean pooled output; full
(6 layers x 16 positions) grids of MLP and of attention outputs. (b) a random Llama (6 layers x 32
wide, ``interplab.models.tiny_random``), 16 random tokens, noise on tokens 2-4; metric: probability
of the clean top-1 next token; MLP grids with windows of 1 and 3 layers. Scores must agree
(allclose; they are usually bit-identical). Times are the best of ``--repeats`` runs of each side,
under ``torch.inference_mode``, as wall clock and as CPU time of the thread (the fairer measure on a
shared machine, see ``best_of``); the load average at the end is recorded.
Writes benchmarks/results/bench_tracing.json and prints a table.
"""
import argparse
import json
import os
import time
from contextlib import ExitStack

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from interplab import hooks, tracing  # noqa: E402
from interplab import toyworld as tw  # noqa: E402
from interplab.models import tiny_random  # noqa: E402
from interplab.zoo import clip  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402  (benchmarks/timing.py, on sys.path when run as a script)

OUT = results_path("bench_tracing.json")
SEQ = 16
PROMPT = "a red striped circle and a blue square"


def loop_scores(model, run, ids, noise, restorations, metric):
    """Clean, corrupted and (R,) restored scores, one forward pass per restoration, with hooks only."""
    paths = sorted({(site.path, site.at) for r in restorations for site, _ in r})
    with ExitStack() as stack:
        traces = [stack.enter_context(hooks.trace(model, path, at=at)) for path, at in paths]
        clean_score = metric(run(ids))
    clean = {path: t[path] for (path, _), t in zip(paths, traces)}
    positions = list(noise.positions)
    width = hooks.get_module(model, noise.path).weight.shape[1]
    delta = noise.draw(width)                    # (p, d): the engine's draw, so the runs are paired
    with hooks.add(model, {noise.path: delta}, positions=positions):
        corrupted_score = metric(run(ids))
    scores = []
    for restoration in restorations:
        with ExitStack() as stack:
            for site, pos in restoration:
                pos = [pos] if isinstance(pos, int) else pos
                stack.enter_context(hooks.replace(model, {site.path: clean[site.path][:, pos]}, at=site.at,
                                                  positions=pos))
            # entered last = runs first on a shared site, so a restoration overwrites the noise
            stack.enter_context(hooks.add(model, {noise.path: delta}, positions=positions))
            scores.append(metric(run(ids)))
    return clean_score[0], corrupted_score[0], torch.cat(scores)


def compare(name, model, run, ids, noise, metric, kind, window_size, repeats, batch_size):
    sites = tracing.layer_sites(model, kind)
    n_layers, T = len(sites), ids.shape[1]
    restorations = [[(sites[j], pos) for j in tracing.window(layer, window_size, n_layers)]
                    for layer in range(n_layers) for pos in range(T)]
    with torch.inference_mode():
        res, t_batched, c_batched = best_of(lambda: tracing.trace_grid(model, run, ids, noise, metric, kind=kind,
                                                            window_size=window_size, batch_size=batch_size),
                                 repeats)
        (clean, corrupted, looped), t_loop, c_loop = best_of(
            lambda: loop_scores(model, run, ids, noise, restorations, metric), repeats)
    batched = res.restored.reshape(-1)
    assert torch.allclose(batched, looped, rtol=1e-5, atol=1e-6), (name, (batched - looped).abs().max())
    assert torch.allclose(res.clean, clean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(res.corrupted, corrupted, rtol=1e-5, atol=1e-6)
    R = len(restorations)
    row = {"case": name, "grid": f"{n_layers} layers x {T} positions", "kind": kind, "window": window_size,
           "restorations": R, "batched_passes": 1 + -(-R // batch_size), "loop_passes": R + 2,
           "batched_s": t_batched, "loop_s": t_loop, "ratio": t_loop / t_batched,
           "batched_cpu_s": c_batched, "loop_cpu_s": c_loop, "ratio_cpu": c_loop / c_batched,
           "max_abs_diff": float((batched - looped).abs().max()),
           "bit_identical": bool(torch.equal(batched, looped)),
           "clean": float(res.clean), "corrupted": float(res.corrupted),
           "max_restored": float(batched.max())}
    print(f"{name:>12} {kind:>4} w{window_size}: R {R:3d}  batched {t_batched:7.3f} s ({row['batched_passes']} passes)"
          f"  loop {t_loop:7.3f} s ({row['loop_passes']} passes)  {row['ratio']:5.1f}x wall, "
          f"{row['ratio_cpu']:5.1f}x CPU  "
          f"max |diff| {row['max_abs_diff']:.1e}", flush=True)
    return row


def clip_text_cases(repeats, batch_size):
    tok = tw.clip_tokenizer(clip.MAX_LENGTH)
    torch.manual_seed(0)
    text = clip.CLIPModel(clip.config(len(tok), tok.eos_token_id)).eval().text_model
    ids = tw.encode(tok, [PROMPT])[0][:, :SEQ]       # EOS-padded to 24; the first 16 tokens keep the EOS
    assert int(ids[0, -1]) == tok.eos_token_id
    subject = tracing.subject_positions(tok, ids[0], "red striped")
    emb = text.embeddings.token_embedding
    noise = tracing.Noise("embeddings.token_embedding", subject, tracing.noise_scale(emb, ids[0, subject]))

    def run(batch):
        return text(input_ids=batch).pooler_output

    with torch.inference_mode():
        ref = run(ids)

    def metric(pooled):                               # (k, 64) -> (k,)
        return F.cosine_similarity(pooled, ref, dim=-1)

    return [compare("CLIP text", text, run, ids, noise, metric, kind, 1, repeats, batch_size)
            for kind in ("mlp", "attn")]


def llama_cases(repeats, batch_size):
    model = tiny_random.llama(n_layer=6)
    ids = torch.randint(3, tiny_random.VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    subject = [2, 3, 4]
    emb = model.model.embed_tokens
    noise = tracing.Noise("model.embed_tokens", subject, tracing.noise_scale(emb, ids[0, subject]))

    def run(batch):
        return model(input_ids=batch).logits[:, -1]

    with torch.inference_mode():
        answer = int(run(ids).argmax())

    def metric(logits):                               # (k, V) -> (k,)
        return logits.softmax(-1)[:, answer]

    return [compare("tiny Llama", model, run, ids, noise, metric, "mlp", w, repeats, batch_size) for w in (1, 3)]


def table(rows, floatfmt=".3g"):
    import pandas as pd
    cols = ["case", "kind", "window", "restorations", "batched_passes", "loop_passes", "batched_s", "loop_s",
            "ratio", "batched_cpu_s", "loop_cpu_s", "ratio_cpu", "max_abs_diff"]
    return pd.DataFrame(rows)[cols].to_markdown(index=False, floatfmt=floatfmt)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest counts")
    parser.add_argument("--batch-size", type=int, default=32, help="restorations per batched pass")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = clip_text_cases(args.repeats, args.batch_size) + llama_cases(args.repeats, args.batch_size)
    print("\n" + table(rows))
    OUT.write_text(json.dumps({
        "benchmark": "batched corrupt-and-restore vs one forward per restoration",
        "machine": machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "timing": "best of repeats, inference_mode; *_s wall clock, *_cpu_s CPU time of the thread",
        "load_average": os.getloadavg(),
        "models": {"CLIP text": "interplab.zoo.clip config, text tower, random weights (6 layers x 64); "
                                f"{PROMPT!r} padded to {SEQ} tokens; noise 3 sigma on 'red striped'; "
                                "metric cos(pooled, clean pooled)",
                   "tiny Llama": f"tiny_random.llama(n_layer=6) (d=32); {SEQ} random tokens; noise 3 sigma "
                                 "on tokens 2-4; metric p(clean top-1 next token)"},
        "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {OUT} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
