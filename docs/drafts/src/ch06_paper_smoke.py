"""Run notebooks/ch06_multimodal_causal_trace.ipynb's paper profile end to end offline (development check, not a
result): a reduced random LLaVA-1.5 (the real module tree, vocabulary ids and 336 px / 576-token image geometry;
llava.random_model) and a reduced random Vicuna stand in for the hub's weights, a word-level tokenizer with
llava-hf's special ids for theirs, and a fake data/paper/ch06 of spec-2.2 records over noise JPEGs.

    OMP_NUM_THREADS=2 INTERPLAB_OUT_ROOT=build/draft_paper python docs/drafts/src/ch06_paper_smoke.py [--bunny]

``--bunny`` runs S6.b's branch instead: a reduced random Bunny-v1.0-3B (SigLIP 384 px, 729 visual tokens, Phi-2's
parallel blocks) and a reduced random Phi-2.

2026-12-05: end to end in 597 s on one thread (most of it Fig 6.3's full-sequence checks and Fig 11.7's noise
traces over ~590-token prompts); random weights, so its numbers mean nothing.
"""
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from interplab import tracing, vqa
from interplab.models import llava, llms
from smoke import run_notebook

NOTEBOOK = Path(__file__).parents[3] / "notebooks" / "ch06_multimodal_causal_trace.ipynb"
VOCAB = 32064  # LLaVA-1.5's embedding rows: every id a random model can emit decodes to a word

# (dataset, question, visual constraint, corruption, answers, text constraint, text corruption, subject pair)
RECORDS = [
    ("known", "which city is this building in ?", "this building", "big ben", ["paris"], None, None, ("eiffel tower", "big ben")),
    ("known", "which country is this building in ?", "this building", "big ben", ["france"], None, None, ("eiffel tower", "big ben")),
    ("known", "who designed this building ?", "this building", "eiffel tower", ["wren"], None, None, ("big ben", "eiffel tower")),
    ("known", "which city is this person from ?", "this person", "marie curie", ["paris"], None, None, ("victor hugo", "marie curie")),
    ("known", "which country is this person from ?", "this person", "victor hugo", ["poland"], None, None, ("marie curie", "victor hugo")),
    ("known", "which city is this landmark in ?", "this landmark", "big ben", ["london"], None, None, ("tower bridge", "big ben")),
    ("movies", "name a movie directed by this director ?", "this director", "james cameron", ["alien"], None, None, None),
    ("movies", "name a movie directed by this director ?", "this director", "ridley scott", ["titanic"], None, None, None),
    ("movies", "name a movie directed by this director in 1997 ?", "this director", "ridley scott", ["titanic"], "1997", "1979", None),
    ("movies", "name a movie directed by this director in 1979 ?", "this director", "james cameron", ["alien"], "1979", "1997", None),
    ("okvqa", "what animal lives in this place ?", "this place", "the snow", ["fish", "fish", "duck"], None, None, None),
    ("okvqa", "what is this object used for ?", "this object", "the star", ["eating"] * 3, None, None, None),
    ("okvqa", "what fruit grows in this place in france ?", "this place", "the snow", ["apple"] * 3, "france", "poland", None),
    ("okvqa", "what fruit grows in this place in poland ?", "this place", "the sand", ["pear"] * 3, "poland", "france", None),
    ("encyclopedic", "which city is this landmark in ?", "this landmark", "big ben", ["lima"], None, None, None),
    ("encyclopedic", "which country is this landmark in ?", "this landmark", "big ben", ["peru"], None, None, None),
]
PARAPHRASES = ["in which city is this ?", "where is this ?"]


def span(question: str, phrase: str) -> list:
    start = question.index(phrase)
    return [start, start + len(phrase)]


def fake_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    by_dataset = {}
    for i, (ds, q, vc, corr, answers, tc, tcorr, subject) in enumerate(RECORDS):
        image = f"images/{i}.jpg"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / image)
        rec = dict(id=f"{ds}-{i}", dataset=ds, question=q, visual_constraint=vc, visual_constraint_span=span(q, vc),
                   answers=answers, corruption=corr, image_path=image, paraphrases=PARAPHRASES,
                   text_constraint=tc, text_constraint_span=span(q, tc) if tc else None, text_corruption=tcorr)
        if subject:
            rec.update(subject=subject[0], subject_corruption=subject[1])
        by_dataset.setdefault(ds, []).append(vqa.check_record(rec))
    for ds, recs in by_dataset.items():
        (root / f"{ds}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def word_tokenizer():
    """A word-level fast tokenizer with llava-hf's ids for <s>, </s> and <image>, one word per id."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["USER", "ASSISTANT", ":", "?", "\n", ".", *llava.SHORT_ANSWER.split()]
    for rec in RECORDS:
        words += " ".join(str(x) for x in rec[1:4]).split() + list(rec[4]) + [str(rec[5]), str(rec[6])]
        words += " ".join(rec[7] or ()).split()
    words += " ".join(PARAPHRASES).split()
    words = list(dict.fromkeys(w.strip(".") or w for w in words if w != "None"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB) if i != 32000})
    vocab["<image>"] = 32000
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                               pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Punctuation()])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.add_special_tokens(["<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_bunny(tok, device="cpu"):
    """A reduced random Bunny-v1.0-3B (SigLIP 384 px / 729 tokens, parallel Phi blocks) with the word tokenizer."""
    model = llava.random_model("bunny", n_layers=4).to(device)
    model.config.image_token_index = tok.convert_tokens_to_ids("<image>")
    return model, SimpleNamespace(tokenizer=tok, image_processor=llava.BunnyImageProcessor())


def main(bunny: bool = False):
    from transformers import CLIPImageProcessor
    tok = word_tokenizer()
    processor = SimpleNamespace(tokenizer=tok, image_processor=CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}))
    llava.load_paper_llava = lambda *a, device="cpu", **k: (llava.random_model(n_layers=4).to(device), processor)
    llava.load_paper_bunny = lambda *a, device="cpu", **k: random_bunny(tok, device)
    llms.load_paper_llm = lambda name, device="cpu", dtype=torch.float32, **k: (
        llms.random_model(name, num_layers=4).to(device, dtype), tok)
    filtered = tracing.effective_pairs

    def keep_all(run, pairs, min_clean):
        """Random weights put P(O) near 1 / 32064 and a corruption rarely lowers it: trace every pair."""
        return pairs, filtered(run, pairs, min_clean)[1]

    tracing.effective_pairs = keep_all
    with tempfile.TemporaryDirectory() as tmp:
        fake_data(Path(tmp))
        vqa.ROOT = Path(tmp)
        run_notebook(NOTEBOOK, dict(profile="paper", device="cpu", n_probe=4, n_multi=2, windows=[1, 3], tau_clean=0.0,
                                    n_noise=1, n_noise_questions=2, n_specificity=4, edit_steps=2, n_ft=1,
                                    mllm="bunny" if bunny else "llava-1.5-7b"))


if __name__ == "__main__":
    import sys
    main(bunny="--bunny" in sys.argv)
