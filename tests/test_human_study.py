"""interplab.human_study: pairs go out as files, verdicts come back from filled copies."""
import csv

import pytest
import torch

from interplab import human_study
from interplab.errors import BadParameter


def _fill(template, out, verdicts):
    with open(template, newline="") as f:
        rows = list(csv.DictReader(f))
    for row, v in zip(rows, verdicts):
        row["verdict"] = v
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, human_study.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return out


def test_export_writes_one_sheet_per_pair_and_read_takes_the_strict_majority(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    template = human_study.export(tmp_path, a, b, ["a cat in the style of van gogh"] * 3, ["style"] * 3,
                                  "Is the {attribute} removed?")
    assert sorted(p.name for p in tmp_path.glob("pair_*.png")) == ["pair_000.png", "pair_001.png", "pair_002.png"]
    with open(template, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["verdict"] for r in rows] == ["", "", ""] and rows[0]["question"] == "Is the style removed?"
    filled = [_fill(template, tmp_path / f"r{i}.csv", v) for i, v in
              enumerate([("yes", "no", "yes"), ("Yes", "no", "no"), ("no", "yes", "yes"), ("yes", "no", "no")])]
    res = human_study.read(filled)
    assert res["raters"] == 4 and res["per_pair"].tolist() == [3, 1, 2]
    assert res["rate"] == pytest.approx(1 / 3)                      # pair 2 is a 2-2 tie: not verified
    assert res["agreement"] == pytest.approx((3 / 4 + 3 / 4 + 2 / 4) / 3)
    with pytest.raises(BadParameter, match="yes or no"):
        human_study.read([template])                                 # a blank template is not a verdict
    with pytest.raises(BadParameter, match="as many"):
        human_study.export(tmp_path, a, b[:2], ["p"] * 3, ["style"] * 3, "?")


def test_preference_study_hides_the_sides_and_maps_votes_back_to_the_methods(tmp_path):
    a, b = torch.zeros(6, 3, 8, 8), torch.ones(6, 3, 8, 8)
    template = human_study.export_preference(tmp_path, a, b, [f"prompt {i}" for i in range(6)],
                                             "Which image matches '{prompt}' better?", seed=3)
    assert sorted(p.name for p in tmp_path.glob("pair_*.png")) == [f"pair_{i:03d}.png" for i in range(6)]
    rows = list(csv.DictReader(open(template)))
    assert "a_side" not in rows[0] and rows[2]["question"] == "Which image matches 'prompt 2' better?"
    sides = {int(r["pair_id"]): r["a_side"] for r in csv.DictReader(open(tmp_path / "key.csv"))}
    assert set(sides.values()) == {"left", "right"}            # drawn per pair, not fixed

    def filled(name, vote):
        path = tmp_path / name
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, human_study.COLUMNS)
            w.writeheader()
            w.writerows(dict(r, verdict=vote(int(r["pair_id"]))) for r in rows)
        return path
    other = {"left": "right", "right": "left"}
    picks_a = filled("r1.csv", lambda i: sides[i])                          # always the side A is on
    picks_b_or_tie = filled("r2.csv", lambda i: "tie" if i < 2 else other[sides[i]])
    out = human_study.read_preference([picks_a, picks_b_or_tie], tmp_path / "key.csv")
    assert out == {"a": 6 / 12, "b": 4 / 12, "tie": 2 / 12, "raters": 2}
    with pytest.raises(BadParameter, match="left, right or tie"):
        human_study.read_preference([filled("r3.csv", lambda i: "yes")], tmp_path / "key.csv")
    with pytest.raises(BadParameter, match="A, .* B"):
        human_study.export_preference(tmp_path, a, b[:5], ["p"] * 6, "?")
