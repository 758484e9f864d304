import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import interplab
from interplab import provenance
from interplab.errors import BadParameter, ClaimFailed, UnknownProfile


def make(tmp_path, profile="tiny", **kw):
    return interplab.start("ch99_test", profile=profile, seed=3, device="cpu", out_dir=tmp_path / profile / "ch99_test", **kw)


def test_figure_and_table_write_files_with_sidecars(tmp_path):
    ch = make(tmp_path, params={"n": 5})
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = ch.figure(fig, "fig1", inputs=[__file__])
    ch.table(pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}), "tab1")
    out = tmp_path / "tiny" / "ch99_test"
    assert png == out / "fig1.png" and (out / "fig1.pdf").exists()
    assert (out / "tab1.csv").read_text().splitlines()[0] == "a,b"
    assert (out / "tab1.md").read_text().splitlines()[2] == "| 1.000 | x   |"
    side = json.loads((out / "fig1.json").read_text())
    assert side["parameters"] == {"profile": "tiny", "seed": 3, "device": "cpu", "n": 5}
    assert side["outputs"]["fig1.png"] == provenance.sha256_file(out / "fig1.png")
    assert side["inputs"][__file__] == provenance.sha256_file(__file__)
    assert set(side) >= {"git", "versions", "seed", "device", "wall_time_s", "notebook"}
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_claims_hold_fail_and_json(tmp_path):
    ch = make(tmp_path)
    ch.claim("a", "x >= 0.5", dissertation=0.9, reproduced=0.7, threshold=0.5, op=">=")
    ch.claim("b", "compound", dissertation="-", reproduced="2/3", holds=False, kind="soft")
    table = ch.finish()  # soft failures do not raise
    rows = json.loads((tmp_path / "tiny" / "ch99_test" / "claims.json").read_text())
    assert [(r["id"], r["holds"], r["kind"]) for r in rows] == [("a", True, "hard"), ("b", False, "soft")]
    assert rows[0]["threshold"] == ">= 0.5" and len(table) == 2
    manifest = json.loads((tmp_path / "tiny" / "MANIFEST.json").read_text())
    assert manifest["chapters"] == {} or "ch99_test" in manifest["chapters"]


def test_hard_claim_failure_raises_in_tiny_only(tmp_path):
    ch = make(tmp_path)
    ch.claim("c", "x > 1", dissertation=2, reproduced=0.5, threshold=1, op=">")
    with pytest.raises(ClaimFailed, match="c"):
        ch.finish()
    ch = make(tmp_path, profile="paper")
    ch.claim("c", "x > 1", dissertation=2, reproduced=0.5, threshold=1, op=">")
    ch.finish()  # reported, not raised, in paper


def test_claim_input_validation(tmp_path):
    ch = make(tmp_path)
    with pytest.raises(BadParameter):
        ch.claim("d", "both", dissertation=1, reproduced=1, threshold=1, op=">=", holds=True)
    with pytest.raises(BadParameter):
        ch.claim("d", "neither", dissertation=1, reproduced=1)
    with pytest.raises(BadParameter):
        ch.claim("d", "bad kind", dissertation=1, reproduced=1, holds=True, kind="medium")
    ch.claim("d", "ok", dissertation=1, reproduced=1, holds=True)
    with pytest.raises(BadParameter, match="twice"):
        ch.claim("d", "dup", dissertation=1, reproduced=1, holds=True)


def test_start_rejects_bad_profile_seed_device(tmp_path):
    with pytest.raises(UnknownProfile, match="tiny, paper"):
        interplab.start("ch99_test", profile="huge", out_dir=tmp_path)
    with pytest.raises(BadParameter, match="seed"):
        interplab.start("ch99_test", seed="zero", out_dir=tmp_path)
    with pytest.raises(BadParameter, match="cuda|torch device"):
        interplab.start("ch99_test", device="cuda:0" if not __import__("torch").cuda.is_available() else "tpu",
                        out_dir=tmp_path)


def test_compare_prints_both_values(tmp_path, capsys):
    ch = make(tmp_path)
    ch.compare("Spearman", dissertation=0.97, reproduced=0.912345)
    assert "dissertation 0.97 | reproduced (tiny) 0.9123" in capsys.readouterr().out


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError):
        provenance.atomic_write(target, broken)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_an_undefined_value_never_holds_and_infinity_compares(tmp_path):
    import numpy as np
    ch = make(tmp_path, profile="paper")
    for op in (">=", "<=", "<", ">"):
        assert not ch.claim(f"nan{op}", "undefined", dissertation=0.7, reproduced=float("nan"), threshold=0.7, op=op).holds
    assert ch.claim("inf", "x >= 1", dissertation=1, reproduced=np.float64("inf"), threshold=1.0, op=">=").holds
    assert ch.claims[-1].reproduced == "inf"


def test_by_profile_fills_only_what_was_left_at_none():
    assert interplab.by_profile(None, "tiny", 64, 300) == 64 and interplab.by_profile(None, "paper", 64, 300) == 300
    assert interplab.by_profile(7, "paper", 64, 300) == 7
    with pytest.raises(UnknownProfile):
        interplab.by_profile(None, "huge", 64, 300)


def test_schematic_draws_every_box_and_arrow():
    import matplotlib
    matplotlib.use("Agg")
    from interplab.plotting import schematic
    fig = schematic({"a": (0.2, 0.5, "first"), "b": (0.5, 0.5, "second"), "c": (0.8, 0.2, "third")},
                    [("a", "b", "then"), ("b", "c")], "overview")
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.texts} >= {"first", "second", "third", "then"}
    assert sum(1 for c in ax.get_children() if type(c).__name__ == "Annotation") == 2
    with pytest.raises(KeyError):
        schematic({"a": (0.2, 0.5, "first")}, [("a", "missing")], "broken")
