"""TIFA (Hu et al. 2023): a text-to-image model's faithfulness as a VQA model's accuracy on questions
about each prompt (§9.2.6 reports that WiCLP's gains hold on it; the dissertation gives no numbers).

    read(root, n)                      TIFA v1.0's texts, each with its generated questions
    toy_questions(phrases)             the same kinds of question for a toy-world prompt (tiny)
    answer_toy(oracle, images, index, qs)   the attribute oracle answers them
    answer_vqa(vqa, images, index, qs)      a BLIP VQA model answers them by ranking the choices (paper)
    score(images, texts, answer)       TIFA score per image: the fraction of its questions answered right

A question is a dict {"question", "choices", "answer", "element_type"}; toy questions also carry
"about" = {"shape": ..., "attribute": None or the asked head} for the oracle.
"""
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from . import paths
from .errors import resource_unavailable

ROOT = paths.DATA / "paper" / "ch09" / "tifa"
FILE = "tifa_v1.0_question_answers.json"
DOWNLOAD = ("copy tifa_v1.0/tifa_v1.0_question_answers.json of the TIFA release (Yushi-Hu/tifa) there: a JSON list of "
            "{id, caption, question, choices, answer, answer_type, element}")


def read(root=None, n: int | None = None) -> list:
    """TIFA v1.0's texts in file order: [{"id", "caption", "questions": [question, ...]}], the first n."""
    path = Path(root or ROOT) / FILE
    if not path.exists():
        raise resource_unavailable(f"TIFA v1.0 question file {path}", DOWNLOAD)
    texts = OrderedDict()
    for row in json.loads(path.read_text()):
        text = texts.setdefault(row["id"], {"id": row["id"], "caption": row["caption"], "questions": []})
        text["questions"].append({"question": row["question"], "choices": list(row["choices"]),
                                  "answer": row["answer"], "element_type": row.get("answer_type", "")})
    return list(texts.values())[:n]


def toy_questions(phrases: list) -> list:
    """TIFA's question kinds for a toy prompt given as phrases [{"shape": s, attribute: v}, ...]: per phrase
    "is there a <s>?" (yes / no) and, per attribute named, "what <attribute> is the <s>?" over every value
    the oracle's head knows."""
    from .zoo.oracle import HEADS
    out = []
    for phrase in phrases:
        s = phrase["shape"]
        out.append({"question": f"is there a {s}?", "choices": ["yes", "no"], "answer": "yes",
                    "element_type": "object", "about": {"shape": s, "attribute": None}})
        for k, v in phrase.items():
            if k != "shape":
                out.append({"question": f"what {k} is the {s}?", "choices": list(HEADS[k]), "answer": v,
                            "element_type": k, "about": {"shape": s, "attribute": k}})
    return out


@torch.no_grad()
def answer_toy(oracle, images: torch.Tensor, index, questions: list) -> list:
    """The oracle's answer to each question (M) about image index[m] of images (N, 3, H, W), each image read
    once: "is there" is yes when some slot's P(shape) > 0.5; an attribute is read, among the choices, at the
    slot where the shape is likeliest."""
    from .zoo.oracle import HEADS, predict
    probs = predict(oracle, images)
    out = []
    for i, q in zip(torch.as_tensor(index).tolist(), questions):
        p_shape = probs["shape"][i, :, HEADS["shape"].index(q["about"]["shape"])]
        k = q["about"]["attribute"]
        if k is None:
            out.append("yes" if float(p_shape.max()) > 0.5 else "no")
            continue
        at = probs[k][i, int(p_shape.argmax())]
        out.append(max(q["choices"], key=lambda c: float(at[HEADS[k].index(c)])))
    return out


def answer_vqa(vqa, images: torch.Tensor, index, questions: list, batch_size: int = 64) -> list:
    """A ``compositional.BlipVqa``'s answer to each question (M) about image index[m]: its likeliest choice
    (each image passes the vision tower once)."""
    logp = vqa.choice_logprob(images, [q["question"] for q in questions], [q["choices"] for q in questions],
                              image_index=index, batch_size=batch_size)
    return [q["choices"][int(lp.argmax())] for q, lp in zip(questions, logp)]


def score(images: torch.Tensor, texts: list, answer, per_text: int = 1) -> np.ndarray:
    """(N,) TIFA scores of N = len(texts) * per_text images (per_text consecutive images per text):
    the fraction of the text's questions that ``answer(images, index (M,), questions (M,)) -> M answers``
    gets right (question m is about images[index[m]]). texts: dicts with "questions" (``read``'s, or {"questions": toy_questions(...)})."""
    rows = [(j * per_text + r, q) for j, t in enumerate(texts) for r in range(per_text) for q in t["questions"]]
    if not rows:
        return np.zeros(len(images))
    given = answer(images, torch.tensor([i for i, _ in rows]), [q for _, q in rows])
    right, asked = np.zeros(len(images)), np.zeros(len(images))
    for (i, q), a in zip(rows, given):
        right[i] += a.strip().lower() == q["answer"].strip().lower()
        asked[i] += 1
    return right / np.maximum(asked, 1)
