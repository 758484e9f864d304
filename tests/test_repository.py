"""House rules of the repository itself: notebook contract, environment, pins."""
import re
import tomllib

import nbformat
import pytest
import yaml

from interplab import paths

NOTEBOOKS = sorted(paths.NOTEBOOKS.glob("ch*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no chapter notebooks found"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{nb_path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_cell(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    names = set(re.findall(r"^(\w+)\s*=", first.source, flags=re.M))
    assert {"profile", "seed", "device", "out_dir"} <= names
    assert re.search(r'^profile\s*=\s*"tiny"', first.source, flags=re.M), "default profile must be tiny"
    assert re.search(r"^out_dir\s*=\s*None", first.source, flags=re.M)
    assert f'"{nb_path.stem}"' in "".join(c.source for c in nb.cells), "start() must name the chapter as its file"


def test_environment_yml_mirrors_pyproject():
    env = yaml.safe_load((paths.ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-e .[dev]"], "environment.yml must install the package itself; pins live in pyproject.toml"


def test_pins_are_exact_and_torch_pair_matches():
    project = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert all("==" in r for r in reqs), [r for r in reqs if "==" not in r]
    pins = dict(r.split("==") for r in reqs)
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")


def test_model_libraries_import_together():
    # timm and open_clip import torchvision at import time; a mismatched pair breaks all four.
    import diffusers  # noqa: F401
    import open_clip  # noqa: F401
    import timm  # noqa: F401
    import torchvision
    from transformers import CLIPModel  # noqa: F401
    assert torchvision.ops.nms is not None


def test_readme_chapter_table_matches_committed_claims():
    """The README's "tiny claims held" column must say what figures/tiny/<chapter>/claims.json says."""
    import json
    readme = (paths.ROOT / "README.md").read_text()
    for nb in NOTEBOOKS:
        claims = paths.FIGURES / "tiny" / nb.stem / "claims.json"
        row = next((line for line in readme.splitlines() if f"notebooks/{nb.name}" in line and line.startswith("|")), None)
        assert row is not None, f"README's chapter table has no row for {nb.name}"
        if not claims.exists():
            continue
        rows = json.loads(claims.read_text())
        for kind in ("hard", "soft"):
            n = sum(r["kind"] == kind for r in rows)
            held = sum(r["holds"] for r in rows if r["kind"] == kind)
            assert f"{kind} {held}/{n}" in row, f"README row for {nb.stem} should say '{kind} {held}/{n}'"


def test_no_tracked_file_is_over_10_mb():
    # the house rule; zoo weights over the limit are sharded by interplab.zoo.store.save_weights
    import subprocess
    if not (paths.ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=paths.ROOT, capture_output=True, check=True).stdout
    big = [f for f in files.decode().split("\0") if f and (paths.ROOT / f).is_file()
           and (paths.ROOT / f).stat().st_size > 10 * 2 ** 20]
    assert not big, f"tracked files over 10 MB: {big}"
