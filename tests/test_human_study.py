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
