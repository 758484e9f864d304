"""ATTNATTRIB's cost over plain greedy generation, and against the gradient baseline.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_attnattrib.py [--model qa_lm|smollm2] [--n 64] [--repeats 3]

ATTNATTRIB (``interplab.attribution.attn_attrib_batch``) reads one head's attention from the very
passes that decode the answer, so its cost over generation is the eager attention kernel with
``output_attentions`` plus the sentence bookkeeping. Three timings on the same prompts, greedy,
same ``max_new_tokens``, same batch size:

- generate (sdpa): ``greedy_generate`` with the model's fast attention (what a user runs anyway);
- generate (eager): the same in eager attention (the kernel ATTNATTRIB needs);
- ATTNATTRIB: answers + top-1 sentence;
- gradient baseline: one backward per answer token per prompt (``gradient_attrib``, spec 2.10).

Models: the zoo's ``qa_lm`` on NQ-tiny prompts (8-14 sentences) or SmolLM2-135M-Instruct on the
Chapter 8 probe contexts (``interplab.qa_probes``). Best of ``--repeats`` wall and thread-CPU times.
Writes benchmarks/results/bench_attnattrib_<model>.json and prints a table. Target (issue 8):
ATTNATTRIB within 10 % of generation time.
"""
import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from interplab import attribution as A  # noqa: E402
from timing import best_of, machine, results_path  # noqa: E402


def qa_lm_subject(n: int):
    from interplab import qaworld as qw
    from interplab.models import load
    model, tok = load("qa_lm")
    rng = np.random.default_rng(0)
    items = [qw.probe_item(qw.world(), rng, "ctx", held_out=True, n=(8, 14), value_distractors=2, answer_value=True)
             for _ in range(n)]
    return model, tok, [it.prompt for it in items], [it.ctx_span for it in items], 4


def smollm2_subject(n: int):
    from interplab import qa_probes
    from interplab.models import llms
    model, tok = llms.smollm2(verbose=False)
    items = qa_probes.load_probes()["D_copy"][:n]
    prompts = [llms.qa_prompt(tok, it["context"], it["question"], answer_prefix=qa_probes.ANSWER_PREFIX) for it in items]
    return model, tok, [p for p, _ in prompts], [s for _, s in prompts], 8


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("qa_lm", "smollm2"), default="qa_lm")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    model, tok, prompts, spans, max_new = {"qa_lm": qa_lm_subject, "smollm2": smollm2_subject}[args.model](args.n)
    bs, head = args.batch_size, _head(model)
    rows = {}
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        gen, *rows["generate (sdpa)"] = best_of(lambda: A.greedy_generate(model, tok, prompts, max_new, batch_size=bs), args.repeats)
        model.set_attn_implementation("eager")
        _, *rows["generate (eager)"] = best_of(lambda: A.greedy_generate(model, tok, prompts, max_new, batch_size=bs), args.repeats)
        res, *rows["ATTNATTRIB"] = best_of(lambda: A.attn_attrib_batch(model, tok, prompts, spans, head, max_new, batch_size=bs,
                                                                       progress=False), args.repeats)
    same = all(g.ids == r.answer_ids for g, r in zip(gen, res))
    _, *rows["gradient baseline"] = best_of(lambda: [A.gradient_attrib(model, tok, p, s, r.answer_ids or [tok.eos_token_id])
                                                     for p, s, r in zip(prompts, spans, res)], 1)
    base = rows["generate (sdpa)"][1]
    table = {k: {"wall_s": round(w, 3), "cpu_s": round(c, 3), "cpu_ratio_to_sdpa_generate": round(c / base, 3)}
             for k, (w, c) in rows.items()}
    out = {"model": args.model, "n_prompts": len(prompts), "max_new_tokens": max_new, "batch_size": bs, "head": list(head),
           "answers_identical_to_generation": same, "timings": table,
           "attnattrib_over_eager_generate": round(rows["ATTNATTRIB"][1] / rows["generate (eager)"][1], 3),
           "gradient_over_attnattrib": round(rows["gradient baseline"][1] / rows["ATTNATTRIB"][1], 2),
           "machine": machine(), "load_avg": os.getloadavg()}
    path = results_path(f"bench_attnattrib_{args.model}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    for k, v in table.items():
        print(f"{k:20s} wall {v['wall_s']:7.3f} s  cpu {v['cpu_s']:7.3f} s  x{v['cpu_ratio_to_sdpa_generate']:.2f}")
    print(f"ATTNATTRIB / eager generation: {out['attnattrib_over_eager_generate']}; gradient / ATTNATTRIB: "
          f"{out['gradient_over_attnattrib']}; answers identical: {same}")


def _head(model):
    """A head of the last layer: timing does not depend on which head is read."""
    return (model.config.num_hidden_layers - 1, 0)


if __name__ == "__main__":
    main()
