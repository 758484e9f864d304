"""Chapter 8's paper QA datasets, read from local JSONL files under data/paper/ch08/ (no hub access here).

Every example becomes a ``QAExample``: question, context, gold answers and the gold sentences, as indices
into ``attribution.split_sentences(context)`` (the sentences ATTNATTRIB and its baselines rank), so every
attribution method is scored against the same segmentation.

    nq_swap(n, seed, substituted)   NQ-Swap 1 (original context) / NQ-Swap 2 (substituted answer)
    natural_questions(n, seed)      NQ with a short answer: context = the long-answer paragraph
    hotpotqa(n, seed)               HotpotQA distractor, single-hop subset: context = the two gold paragraphs
    long_answers(name, n, seed)     CNN-DailyMail articles / NQ-Long, for Rel-Score (Figs 11.8, 11.9)

A missing file raises ResourceUnavailable naming the hub dataset and the fields to export.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import paths
from .attribution import normalize_answer, split_sentences
from .errors import BadParameter, resource_unavailable

ROOT = paths.DATA / "paper" / "ch08"
SOURCES = {
    "nq_swap": ("pminervini/NQ-Swap", "question, org_context, org_answer, sub_context, sub_answer (answers: lists "
                "of strings, as on the hub, or strings)"),
    "natural_questions": ("google-research-datasets/natural_questions (short-answer subset)",
                          "question, context (the long-answer paragraph as text), answers (short answers)"),
    "hotpotqa": ("hotpotqa/hotpot_qa, config distractor, validation",
                 "question, answer, context {title, sentences}, supporting_facts {title, sent_id} (the hub's layout; "
                 "the original [[title, sentences]] / [[title, sent_id]] lists also read)"),
    "cnn_dailymail": ("abisee/cnn_dailymail 3.0.0", "article, highlights"),
    "nq_long": ("Natural Questions long answers", "question, context, answer (the long answer's sentences)"),
}
SUMMARY_QUESTION = "Summarise the article in three sentences copied from it."


@dataclass(frozen=True)
class QAExample:
    """One extractive-QA example; ``gold`` indexes ``sentences`` (the context's ``split_sentences``)."""
    question: str
    context: str
    answers: tuple
    gold: tuple
    id: str = ""

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def sentences(self) -> list:
        return [self.context[a:b] for a, b in split_sentences(self.context)]


def read(name: str, n: int = None, seed: int = 0, root=None) -> list:
    """Rows of data/paper/ch08/NAME.jsonl: all (n None) or a seeded subset of n in file order."""
    if name not in SOURCES:
        raise BadParameter(f"unknown Chapter 8 dataset {name!r}; one of {', '.join(SOURCES)}")
    path = Path(root or ROOT) / f"{name}.jsonl"
    if not path.exists():
        hub, fields = SOURCES[name]
        raise resource_unavailable(f"Chapter 8 dataset {name!r} ({hub})",
                                   f"export it to {path}, one JSON object a line with the fields {fields}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n is not None and n < len(rows):
        rows = [rows[i] for i in np.sort(np.random.default_rng([seed, 8]).choice(len(rows), n, replace=False))]
    return rows


def gold_sentences(context: str, answers) -> tuple:
    """Indices of the context's sentences that contain a gold answer (SQuAD-normalised, whole words)."""
    golds = [f" {normalize_answer(a)} " for a in answers if normalize_answer(a)]
    return tuple(i for i, (a, b) in enumerate(split_sentences(context))
                 if any(g in f" {normalize_answer(context[a:b])} " for g in golds))


def _example(question, context, answers, row_id, gold=None):
    answers = tuple(answers)
    gold = gold_sentences(context, answers) if gold is None else gold
    return QAExample(question.strip(), context.strip(), answers, gold, str(row_id)) if gold else None


def _kept(examples) -> list:
    """Examples whose answer is found in a sentence of the context (the gold attribution exists)."""
    return [e for e in examples if e is not None]


def _answers(value) -> list:
    """A gold answer field as a list of strings: the hub's NQ-Swap stores lists (["Leo Tolstoy"]), a hand export
    may store one string."""
    return [value] if isinstance(value, str) else [str(a) for a in value]


def nq_swap(n: int = None, seed: int = 0, substituted: bool = False, root=None) -> list:
    """NQ-Swap 1 (the original context and answer) or NQ-Swap 2 (the substituted context and answer).
    ``org_answer`` / ``sub_answer`` may be a string or a list of strings (the hub's layout: every string is a
    gold answer)."""
    key = "sub" if substituted else "org"
    return _kept(_example(r["question"], r[f"{key}_context"], _answers(r[f"{key}_answer"]), r.get("id", i))
                 for i, r in enumerate(read("nq_swap", n, seed, root)))


def natural_questions(n: int = None, seed: int = 0, root=None) -> list:
    """NQ with short answers; the gold sentence is the long-answer paragraph's sentence holding one."""
    return _kept(_example(r["question"], r["context"], r["answers"], r.get("id", i))
                 for i, r in enumerate(read("natural_questions", n, seed, root)))


def _paragraphs(context) -> list:
    """[(title, sentences)] from the hub's {title, sentences} or the original [[title, sentences]]."""
    if isinstance(context, dict):
        return list(zip(context["title"], context["sentences"]))
    return [(t, s) for t, s in context]


def _supporting(facts) -> list:
    if isinstance(facts, dict):
        return list(zip(facts["title"], facts["sent_id"]))
    return [(t, i) for t, i in facts]


def hotpotqa(n: int = None, seed: int = 0, root=None) -> list:
    """HotpotQA's single-hop subset (the dissertation's rule is not given; spec 4: keep a question whose answer
    occurs verbatim in a supporting sentence). Context = the gold paragraphs (Vicuna's 2048 tokens); gold =
    every supporting-fact sentence (spec 2.7 / 4: sentence F1 against the supporting facts), as the
    ``split_sentences`` sentences that overlap one (a supporting fact the splitter cuts in two gives two)."""
    out = []
    for i, r in enumerate(read("hotpotqa", n, seed, root)):
        support = _supporting(r["supporting_facts"])
        paragraphs = [(t, s) for t, s in _paragraphs(r["context"]) if t in {t for t, _ in support}]
        text, support_chars, has_answer = "", [], False
        for title, sentences in paragraphs:
            for j, sentence in enumerate(sentences):
                sentence = sentence.strip()
                if not sentence:
                    continue
                start = len(text) + (1 if text else 0)
                text = f"{text} {sentence}" if text else sentence
                if (title, j) in support:
                    support_chars.append((start, len(text)))
                    has_answer |= f" {normalize_answer(r['answer'])} " in f" {normalize_answer(sentence)} "
        spans = split_sentences(text)
        gold = tuple(k for k, (a, b) in enumerate(spans) if any(a < e and s < b for s, e in support_chars))
        keep = has_answer and gold
        out.append(_example(r["question"], text, [r["answer"]], r.get("id", r.get("_id", i)), gold) if keep else None)
    return _kept(out)


def truncated(example: QAExample, context: str) -> QAExample:
    """``example`` with its context cut to ``context``, a prefix of it (``llms.fit_context`` cuts a context that
    overflows the model's window from its end). Gold sentences kept whole keep their indices; one cut off (or cut
    short) leaves the gold set, so the example may end with no gold attribution (it then scores 0)."""
    if not example.context.startswith(context):
        raise BadParameter("truncated() takes a prefix of the example's context")
    old, new = split_sentences(example.context), split_sentences(context)
    gold = tuple(g for g in example.gold if g < len(new) and new[g] == old[g])
    return QAExample(example.question, context, example.answers, gold, example.id)


def long_answers(name: str, n: int = None, seed: int = 0, root=None) -> list:
    """Long-answer sets for Rel-Score: "cnn_dailymail" (the article, an extractive-summary question; gold =
    the sentences sharing most words with each highlight) or "nq_long" (gold = sentences of the long answer)."""
    if name not in ("cnn_dailymail", "nq_long"):
        raise BadParameter(f"long_answers reads cnn_dailymail or nq_long, not {name!r}")
    out = []
    for i, r in enumerate(read(name, n, seed, root)):
        if name == "nq_long":
            out.append(_example(r["question"], r["context"], [r["answer"]], r.get("id", i)) or
                       QAExample(r["question"].strip(), r["context"].strip(), (r["answer"],), (), str(r.get("id", i))))
            continue
        article = r["article"].strip()
        sentences = [set(normalize_answer(article[a:b]).split()) for a, b in split_sentences(article)]
        gold = []
        for highlight in r["highlights"].split("\n"):
            words = set(normalize_answer(highlight).split())
            if words and sentences:
                gold.append(int(np.argmax([len(words & s) / len(words) for s in sentences])))
        out.append(QAExample(SUMMARY_QUESTION, article, (r["highlights"],), tuple(sorted(set(gold))), str(r.get("id", i))))
    return out
