"""Answer scoring of visual question answering (Chapter 6's specificity and correctness labels).

    normalize("Two Dogs!")          -> "2 dogs"
    vqa_accuracy("two", ten_answers) VQA accuracy (Agrawal et al.): mean over the 10 leave-one-out
                                     subsets of 9 annotators of min(1, #matches / 3)
    contains_answer(text, golds)    Movies / Known style: the normalised generation contains a gold answer
    score(record, generation)       the record's dataset's measure: VQA accuracy (OK-VQA) or containment
    check_record / read_records / paper_records   Chapter 6's constraint records (spec 2.2), both profiles
    ConstraintRecord                a checked record with the attribute names of the toy world's records
                                    (``toyworld.facts.Record``), so one notebook reads both profiles
"""
import json
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from . import paths
from .errors import BadParameter, check_choice, resource_unavailable

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize(answer: str) -> str:
    """Lower case, punctuation removed (a decimal point kept), articles dropped, number words as digits."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]", " ", answer.lower())
    return " ".join(_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 in VQA / OK-VQA).

    With n answers: the mean over the n subsets of n - 1 annotators of min(1, matches / 3); with
    fewer than 2 answers it is min(1, matches / 3) over them.
    """
    pred = normalize(prediction)
    gold = [normalize(a) for a in answers]
    if len(gold) < 2:
        return min(1.0, sum(g == pred for g in gold) / 3)
    subsets = list(combinations(range(len(gold)), len(gold) - 1))
    return sum(min(1.0, sum(gold[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


def contains_answer(generation: str, answers) -> bool:
    """True when the normalised generation contains any normalised gold answer as whole words."""
    text = f" {normalize(generation)} "
    return any(f" {normalize(a)} " in text for a in answers if normalize(a))


# ---------------------------------------------------------------- Chapter 6's constraint records (spec 2.2)

RECORD_FIELDS = {"id": str, "dataset": str, "question": str, "visual_constraint": str,
                 "visual_constraint_span": list, "answers": list, "corruption": str}
OPTIONAL_FIELDS = {"image_path": str, "image_spec": dict, "text_constraint": (str, type(None)),
                   "text_constraint_span": (list, type(None)), "text_corruption": (str, type(None)),
                   "paraphrases": list, "split": str,
                   # the entity the visual constraint refers to, and another one of the same token count: the
                   # text-only LLM's question names it (Fig 6.1's Vicuna trace corrupts the name)
                   "subject": str, "subject_corruption": str}
ROOT = paths.DATA / "paper" / "ch06"   # the paper profile's record files and images
PAPER_DATASETS = {"okvqa": "OK-VQA val (COCO val2014 images), visual constraints annotated",
                  "known": "ROME's known_1000 with the subject replaced by a visual constraint + one image per subject",
                  "movies": "WikiMovies-derived director questions of Yuksekgonul et al. (2023) with director images",
                  "encyclopedic": "Encyclopedic-VQA's Google-Landmarks-v2 subset (rare landmarks)"}


def check_record(record: dict, where: str = "record") -> dict:
    """The record if it follows spec 2.2's schema, else BadParameter naming the field: the constraint span must
    cut the constraint out of the question, and a textual constraint needs its corruption."""
    for name, kind in {**RECORD_FIELDS, **OPTIONAL_FIELDS}.items():
        if name in RECORD_FIELDS and name not in record:
            raise BadParameter(f"{where}: missing field {name!r} (required: {', '.join(RECORD_FIELDS)})")
        if name in record and not isinstance(record[name], kind):
            raise BadParameter(f"{where}: field {name!r} should be {kind}, got {type(record[name]).__name__}")
    if "image_path" not in record and "image_spec" not in record:
        raise BadParameter(f"{where}: needs image_path or image_spec")
    for span, text in (("visual_constraint_span", "visual_constraint"), ("text_constraint_span", "text_constraint")):
        if record.get(span) is not None:
            start, end = record[span]
            if record["question"][start:end] != record[text]:
                raise BadParameter(f"{where}: {span} {record[span]} cuts {record['question'][start:end]!r} out of the "
                                   f"question, not {record[text]!r}")
    if record.get("text_constraint") and not record.get("text_corruption"):
        raise BadParameter(f"{where}: a textual constraint needs text_corruption")
    if bool(record.get("subject")) != bool(record.get("subject_corruption")):
        raise BadParameter(f"{where}: subject and subject_corruption come together (the text-only LLM's question "
                           "names the subject and its trace corrupts it)")
    return record


def score(record, generation: str) -> float:
    """How right a generated answer is: VQA accuracy against OK-VQA's annotators, else 1.0 when the
    generation contains a gold answer (Movies, Known, Encyclopedic-VQA; spec 2.8)."""
    dataset, answers = (record["dataset"], record["answers"]) if isinstance(record, dict) else \
        (record.dataset, record.answers)
    if dataset.startswith("okvqa"):
        return vqa_accuracy(generation, answers)
    return float(contains_answer(generation, answers))


def swap_spans(question: str, swaps) -> str:
    """``question`` with each (start, end, text) replacing its character span (spans must not overlap)."""
    for start, end, text in sorted(swaps, reverse=True):
        question = question[:start] + text + question[end:]
    return question


@dataclass(frozen=True)
class ConstraintRecord:
    """A spec-2.2 record under the attribute names of ``toyworld.facts.Record`` (``constraint``,
    ``entity``, ``corrupted()``, ``named()``); ``raw`` is the checked JSON object, ``image_path`` absolute."""
    raw: dict

    @classmethod
    def from_json(cls, record: dict, root=None) -> "ConstraintRecord":
        record = dict(check_record(record, str(record.get("id", "record"))))
        if root is not None and "image_path" in record:
            record["image_path"] = str(Path(root) / record["image_path"])
        return cls(record)

    def __getattr__(self, name):
        aliases = {"constraint": "visual_constraint", "entity": "subject"}
        raw = self.__dict__["raw"]
        key = aliases.get(name, name)
        if key in raw or key in OPTIONAL_FIELDS:
            return raw.get(key)
        raise AttributeError(name)

    @property
    def relation(self) -> str:
        """The question with its visual constraint cut out: what is asked about the entity."""
        start, end = self.raw["visual_constraint_span"]
        return self.raw["question"][:start] + "_" + self.raw["question"][end:]

    def corrupted(self) -> "ConstraintRecord":
        """The record whose question has the corruption(s) in place of its constraint(s)."""
        swaps = [(*self.raw["visual_constraint_span"], self.raw["corruption"])]
        if self.raw.get("text_constraint_span"):
            swaps.append((*self.raw["text_constraint_span"], self.raw["text_corruption"]))
        return ConstraintRecord({**self.raw, "question": swap_spans(self.raw["question"], swaps)})

    def named(self) -> dict:
        """The text-only LLM's question as a record: the subject in place of the visual constraint, the
        subject's corruption as its corruption (BadParameter without ``subject`` / ``subject_corruption``)."""
        if not (self.raw.get("subject") and self.raw.get("subject_corruption")):
            raise BadParameter(f"record {self.raw['id']!r} has no subject / subject_corruption for the text-only LLM")
        start, end = self.raw["visual_constraint_span"]
        question = swap_spans(self.raw["question"], [(start, end, self.raw["subject"])])
        return {**self.raw, "question": question, "visual_constraint": self.raw["subject"],
                "visual_constraint_span": [start, start + len(self.raw["subject"])],
                "corruption": self.raw["subject_corruption"], "text_constraint": None, "text_constraint_span": None}


def read_records(path) -> list:
    """Chapter 6's probe records from a JSONL file (one record a line), each checked by ``check_record``."""
    path = Path(path)
    return [check_record(json.loads(line), f"{path.name}:{i + 1}")
            for i, line in enumerate(path.read_text().splitlines()) if line.strip()]


def paper_records(dataset: str, root=None) -> list:
    """The paper profile's records of ``dataset`` from data/paper/ch06/DATASET.jsonl (images relative to that
    folder); ResourceUnavailable says what to put there when the file is absent."""
    check_choice("dataset", dataset, tuple(PAPER_DATASETS))
    path = Path(root or ROOT) / f"{dataset}.jsonl"
    if not path.exists():
        raise resource_unavailable(f"Chapter 6 dataset {dataset!r} ({PAPER_DATASETS[dataset]})",
                                   f"write its records as {path} (one JSON object a line, fields of spec 2.2: "
                                   f"{', '.join(RECORD_FIELDS)}, image_path) with the images beside it")
    return read_records(path)


def probe_records(dataset: str, n: int = None, seed: int = 0, root=None) -> list:
    """``ConstraintRecord``s of a paper dataset: "okvqa", "known", "movies", "encyclopedic", or "okvqa_multi" /
    "movies_multi" (the records of okvqa / movies with a textual constraint; the plain names keep those without).
    ``n`` None: all of them in file order; else a seeded random subset of n, kept in file order."""
    import numpy as np
    multi = dataset.endswith("_multi")
    base = dataset.removesuffix("_multi")
    root = root or ROOT
    recs = [r for r in paper_records(base, root) if bool(r.get("text_constraint")) == multi]
    if not recs:
        raise BadParameter(f"{base}.jsonl has no {'multi' if multi else 'single'}-constraint records")
    if n is not None and n < len(recs):
        keep = np.sort(np.random.default_rng([seed, 6]).choice(len(recs), n, replace=False))
        recs = [recs[i] for i in keep]
    return [ConstraintRecord.from_json(r, root) for r in recs]
