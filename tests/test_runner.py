"""The papermill runner on a throw-away repository with two tiny notebooks."""
import json

import nbformat
import pytest

from interplab.__main__ import main
from interplab.errors import BadParameter, UnknownChapter, UnknownProfile
from interplab.runner import Runner, summary_table

PARAMS = 'profile = "tiny"\nseed = 0\ndevice = "auto"\nout_dir = None\nfail = False\n'
BODY = """\
import interplab, matplotlib.pyplot as plt
ch = interplab.start("{name}", profile=profile, seed=seed, device=device, out_dir=out_dir, params=dict(fail=fail))
fig, ax = plt.subplots(); ax.plot([0, seed + 1])
ch.figure(fig, "line")
if fail:
    raise RuntimeError("notebook broke on purpose")
ch.claim("seed_nonneg", "seed >= 0", dissertation="-", reproduced=seed, threshold=0, op=">=")
ch.finish()
"""


def write_notebook(path, name):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(BODY.format(name=name))]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    (root / "notebooks").mkdir()
    write_notebook(root / "notebooks" / "ch01_alpha.ipynb", "ch01_alpha")
    return root


def test_run_skip_fail_keeps_last_good(repo):
    runner = Runner(root=repo)
    out = repo / "figures" / "tiny" / "ch01_alpha"

    [first] = runner.run(["ch01"], {})
    assert first.status == "ok", first.error
    assert first.claims == "hard 1/1"
    png = (out / "line.png").read_bytes()
    sidecar = json.loads((out / "line.json").read_text())
    assert sidecar["parameters"]["fail"] is False and sidecar["run_id"]
    manifest = json.loads((repo / "figures" / "tiny" / "MANIFEST.json").read_text())
    assert "ch01_alpha/line.png" in manifest["chapters"]["ch01_alpha"]["files"]
    assert (repo / "build" / "executed" / "tiny" / "ch01_alpha.ipynb").exists()
    gallery = (repo / "figures" / "tiny" / "README.md").read_text()
    assert "![line](ch01_alpha/line.png)" in gallery and "| seed >= 0 | hard |" in gallery

    [again] = runner.run(["ch01_alpha"], {})
    assert again.status == "skipped"

    [broken] = runner.run(["ch01"], {"fail": True, "seed": 5})
    assert broken.status == "FAILED" and "notebook broke on purpose" in broken.error
    assert (out / "line.png").read_bytes() == png, "a failed run must leave the last good figure"
    assert json.loads((out / "line.json").read_text()) == sidecar
    assert "FAILED" in summary_table([first, broken])

    [forced] = runner.run(["ch01"], {}, force=True)
    assert forced.status == "ok"


def test_cli_exit_codes_and_errors(repo, monkeypatch, capsys):
    monkeypatch.setattr("interplab.runner.paths.ROOT", repo)
    monkeypatch.setattr(Runner.__init__, "__defaults__", (repo, "tiny", None))
    assert main(["figures", "--only", "ch01", "-p", "fail=true"]) == 1
    assert main(["figures", "--only", "ch42"]) == 2
    assert "no chapter notebook matches 'ch42'" in capsys.readouterr().err
    assert main(["figures", "--only", "ch01", "-p", "colour=red"]) == 2
    assert "has no parameter 'colour'" in capsys.readouterr().err
    assert main(["figures", "--list"]) == 0
    assert "fail = False" in capsys.readouterr().out


def test_runner_input_errors(repo):
    with pytest.raises(UnknownProfile):
        Runner(root=repo, profile="medium")
    with pytest.raises(UnknownChapter):
        Runner(root=repo).select(["ch77"])
    with pytest.raises(BadParameter, match="--profile"):
        Runner(root=repo).check_overrides("ch01_alpha", {"profile": "paper"})
    with pytest.raises(BadParameter, match="expects int"):
        Runner(root=repo).check_overrides("ch01_alpha", {"seed": "one"})
    with pytest.raises(BadParameter, match="expects bool"):
        Runner(root=repo).check_overrides("ch01_alpha", {"fail": 3})


def test_out_root_redirects_the_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_OUT_ROOT", str(tmp_path / "scratch"))
    assert Runner(root=tmp_path).figures == (tmp_path / "scratch").resolve()
    monkeypatch.delenv("INTERPLAB_OUT_ROOT")
    assert Runner(root=tmp_path).figures == tmp_path / "figures"
