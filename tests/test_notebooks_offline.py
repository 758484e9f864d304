"""The landed notebooks' paper profiles offline: each stops at its first missing model or dataset with
ResourceUnavailable, one line that says what to fetch and where (never an error from inside a library).

The code cells run in this process (as papermill would run them, with ``profile = "paper"``); Chapter 3 is left
out because its paper branch computes Fig 3.1 on synthetic data before it needs MNIST (a minute of CPU)."""
import random
import re

import nbformat
import numpy as np
import pytest
import torch

from interplab import paths
from interplab.errors import ResourceUnavailable

NEEDS = {"ch04_hard_md": "Meta-Dataset", "ch06_multimodal_causal_trace": "llava-hf/llava-1.5-7b-hf",
         "ch07_rep_decompose": "imagenet"}


def run_paper(name):
    nb = nbformat.read(paths.ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    src = "\n\n".join(c.source for c in nb.cells if c.cell_type == "code")
    src, n = re.subn(r'^profile = "tiny".*$', 'profile = "paper"', src, count=1, flags=re.M)
    assert n == 1
    src = re.sub(r'^device = .*$', 'device = "cpu"', src, count=1, flags=re.M)
    exec(compile(src, name, "exec"), {"__name__": "__main__"})


@pytest.fixture
def isolated():
    """The notebooks seed every generator and switch gradients off: give later tests back what they had."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    with torch.enable_grad():
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_paper_profile_stops_with_one_line_saying_what_to_fetch(name, tmp_path, monkeypatch, isolated):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INTERPLAB_OUT_ROOT", str(tmp_path))
    with pytest.raises(ResourceUnavailable) as err:
        run_paper(name)
    message = str(err.value)
    assert NEEDS[name] in message and "\n" not in message
    assert any(w in message for w in ("download", "copy", "convert", "write", "export")), message
