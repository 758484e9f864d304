"""Human studies as files: export image pairs for raters, read their verdicts back (never simulated).

    sheet = export(out_dir, originals, edited, prompts, attributes, question, raters=5)
    ... raters fill one copy of human_study.csv each (yes / no per pair) ...
    result = read([filled_1.csv, ...])      # per-pair majority, the verification rate, rater agreement

Chapter 5 part II's §5.8.2 (132 pairs, 5 raters, "is the attribute removed / changed?": 92.58 %) is
the model: each pair is one PNG (original left, edited right, the prompt and question above).
"""
import csv
from pathlib import Path

import numpy as np
import torch

from .errors import BadParameter

COLUMNS = ("pair_id", "image", "attribute", "prompt", "question", "verdict")
YES, NO = "yes", "no"


def export(out_dir, originals: torch.Tensor, edited: torch.Tensor, prompts, attributes, question: str) -> Path:
    """Write pair_<i>.png (original | edited) for N pairs of [0, 1] images (N, 3, H, W) (or lists of
    (3, H, W), whose sizes may differ between pairs) and the blank template human_study.csv (one row
    per pair; a rater writes yes or no in ``verdict``). Returns the CSV."""
    import matplotlib.pyplot as plt
    prompts, attributes = list(prompts), list(attributes)
    if not len(originals) == len(edited) == len(prompts) == len(attributes):
        raise BadParameter(f"{len(originals)} originals, {len(edited)} edited, {len(prompts)} prompts and "
                           f"{len(attributes)} attributes must be as many")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (a, b) in enumerate(zip(originals, edited)):
        q = question.format(attribute=attributes[i], prompt=prompts[i])
        fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
        for ax, img, title in zip(axes, (a, b), ("original", "edited")):
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).float().cpu().numpy())
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{prompts[i]}\n{q}", fontsize=9)
        name = f"pair_{i:03d}.png"
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        rows.append(dict(pair_id=i, image=name, attribute=attributes[i], prompt=prompts[i], question=q, verdict=""))
    path = out / "human_study.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


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
