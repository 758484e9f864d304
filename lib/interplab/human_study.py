"""Human studies as files: export image pairs for raters, read their verdicts back (never simulated).

    sheet = export(out_dir, originals, edited, prompts, attributes, question, raters=5)
    ... raters fill one copy of human_study.csv each (yes / no per pair) ...
    result = read([filled_1.csv, ...])      # per-pair majority, the verification rate, rater agreement

Chapter 5 part II's §5.8.2 (132 pairs, 5 raters, "is the attribute removed / changed?": 92.58 %) is
the model: each pair is one PNG (original left, edited right, the prompt and question above).

A preference study (Chapter 9, §9.2.6: SD v1.4 vs SD v1.4 + WiCLP, "which image matches the prompt
better?", 34.625 / 51.875 / 13.50 %) shows the two methods' images on sides drawn at random per pair;
raters answer left, right or tie, and the side key stays in a separate file:

    sheet = export_preference(out_dir, images_a, images_b, prompts, question, seed=0)
    shares = read_preference([filled_1.csv, ...], out_dir / "key.csv")   # {"a", "b", "tie"} over all votes
"""
import csv
from pathlib import Path

import numpy as np
import torch

from .errors import BadParameter

COLUMNS = ("pair_id", "image", "attribute", "prompt", "question", "verdict")
YES, NO = "yes", "no"


def _sheet(out: Path, i: int, left, right, titles, heading: str) -> str:
    """pair_<i>.png: two [0, 1] images (3, H, W) side by side under ``heading``; returns the file name."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
    for ax, img, title in zip(axes, (left, right), titles):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).float().cpu().numpy())
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(heading, fontsize=9)
    name = f"pair_{i:03d}.png"
    fig.savefig(out / name, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return name


def _write(path: Path, columns, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def export(out_dir, originals: torch.Tensor, edited: torch.Tensor, prompts, attributes, question: str) -> Path:
    """Write pair_<i>.png (original | edited) for N pairs of [0, 1] images (N, 3, H, W) (or lists of
    (3, H, W), whose sizes may differ between pairs) and the blank template human_study.csv (one row
    per pair; a rater writes yes or no in ``verdict``). Returns the CSV."""
    prompts, attributes = list(prompts), list(attributes)
    if not len(originals) == len(edited) == len(prompts) == len(attributes):
        raise BadParameter(f"{len(originals)} originals, {len(edited)} edited, {len(prompts)} prompts and "
                           f"{len(attributes)} attributes must be as many")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (a, b) in enumerate(zip(originals, edited)):
        q = question.format(attribute=attributes[i], prompt=prompts[i])
        name = _sheet(out, i, a, b, ("original", "edited"), f"{prompts[i]}\n{q}")
        rows.append(dict(pair_id=i, image=name, attribute=attributes[i], prompt=prompts[i], question=q, verdict=""))
    return _write(out / "human_study.csv", COLUMNS, rows)


def read(csv_paths) -> dict:
    """Verdicts of one filled copy per rater: ``rate`` = share of pairs a strict majority answered yes
    (a tie is no), ``per_pair`` (N,) yes-votes, ``agreement`` = mean share of raters siding with the
    pair's majority, ``raters``. Every copy must hold the same pairs and only yes / no."""
    votes = []
    for path in csv_paths:
        with open(path, newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["pair_id"]))
        answers = [r["verdict"].strip().lower() for r in rows]
        bad = [f"pair {r['pair_id']}: {a!r}" for r, a in zip(rows, answers) if a not in (YES, NO)]
        if bad:
            raise BadParameter(f"{path}: verdicts must be yes or no; {', '.join(bad[:5])}")
        votes.append([a == YES for a in answers])
    if not votes:
        raise BadParameter("no filled copies given")
    if len({len(v) for v in votes}) > 1:
        raise BadParameter("the filled copies hold different numbers of pairs")
    votes = np.array(votes)                      # (raters, pairs)
    yes = votes.sum(0)
    majority = yes * 2 > len(votes)
    agreement = np.where(majority, yes, len(votes) - yes) / len(votes)
    return {"rate": float(majority.mean()), "per_pair": yes, "agreement": float(agreement.mean()), "raters": len(votes)}


LEFT, RIGHT, TIE = "left", "right", "tie"


def export_preference(out_dir, images_a, images_b, prompts, question: str, seed: int = 0) -> Path:
    """Write pair_<i>.png with method A's and method B's image of one prompt on sides drawn at random,
    the blank template human_study.csv (a rater writes left, right or tie) and key.csv (which side A is
    on). images_a, images_b: N images (3, H, W) in [0, 1]. Returns the template."""
    prompts = list(prompts)
    if not len(images_a) == len(images_b) == len(prompts):
        raise BadParameter(f"{len(images_a)} images of A, {len(images_b)} of B and {len(prompts)} prompts must be as many")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a_left = np.random.default_rng(seed).random(len(prompts)) < 0.5
    rows, keys = [], []
    for i, (a, b) in enumerate(zip(images_a, images_b)):
        q = question.format(prompt=prompts[i])
        name = _sheet(out, i, *((a, b) if a_left[i] else (b, a)), (LEFT, RIGHT), f"{prompts[i]}\n{q}")
        rows.append(dict(pair_id=i, image=name, attribute="", prompt=prompts[i], question=q, verdict=""))
        keys.append(dict(pair_id=i, a_side=LEFT if a_left[i] else RIGHT))
    _write(out / "key.csv", ("pair_id", "a_side"), keys)
    return _write(out / "human_study.csv", COLUMNS, rows)


def read_preference(csv_paths, key_path) -> dict:
    """Shares of all votes (raters x pairs) for method A, method B and a tie, and ``raters``; sides are
    mapped back through ``key_path`` (written by ``export_preference``)."""
    with open(key_path, newline="") as f:
        a_side = {int(r["pair_id"]): r["a_side"] for r in csv.DictReader(f)}
    counts = {"a": 0, "b": 0, "tie": 0}
    raters = 0
    for path in csv_paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if {int(r["pair_id"]) for r in rows} != set(a_side):
            raise BadParameter(f"{path}: its pairs are not the key's")
        for r in rows:
            v = r["verdict"].strip().lower()
            if v not in (LEFT, RIGHT, TIE):
                raise BadParameter(f"{path}: pair {r['pair_id']}: verdict must be left, right or tie, got {v!r}")
            counts["tie" if v == TIE else "a" if v == a_side[int(r["pair_id"])] else "b"] += 1
        raters += 1
    if not raters:
        raise BadParameter("no filled copies given")
    total = sum(counts.values())
    return {k: n / total for k, n in counts.items()} | {"raters": raters}
