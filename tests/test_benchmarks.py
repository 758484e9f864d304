"""Every benchmark script still runs: each at its smallest setting, writing into a temporary folder.

The benchmarks are scripts, not timed tests, so nothing here checks a speed. What they do check
runs: each one asserts that its fast path and its reference path give the same numbers (allclose)
before it reports a ratio, so a benchmark that runs is also a correctness check of the batched code.
"""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# script -> (arguments of its smallest run, the JSON it writes)
SMOKE = {
    "bench_tracing": (["--repeats", "1"], "bench_tracing.json"),
    "bench_unet_tracing": (["--repeats", "1", "--steps", "1"], "bench_unet_tracing.json"),
    "bench_locogen": (["--repeats", "1", "--steps", "1"], "bench_locogen.json"),
    "bench_editing": (["--repeats", "1"], "bench_editing.json"),
    "bench_mmct": (["--repeats", "1", "--no-inverse", "--edit-dims", "64", "256"], "bench_mmct.json"),
    "bench_sds_wiclp": (["--repeats", "1", "--steps", "1"], "bench_sds_wiclp.json"),
    "bench_decompose": (["--repeats", "1", "--toy-n", "4", "--paper-n", "1"], "bench_decompose.json"),
    "bench_influence": (["--quick"], "bench_influence.json"),
    "bench_fastdiffsel": (["--pools", "20", "--tasks", "2", "--repeats", "1", "--restarts", "2"], "bench_fastdiffsel.json"),
    "bench_attnattrib": (["--n", "4", "--repeats", "1"], "bench_attnattrib_qa_lm.json"),
}


def test_every_benchmark_script_has_a_smoke_run():
    assert sorted(SMOKE) == sorted(p.stem for p in BENCHMARKS.glob("bench_*.py"))


@pytest.fixture
def torch_defaults():
    """A script expects a process of its own: the same global RNG state whatever ran before it, and
    bench_influence's float64 default dtype put back afterwards."""
    dtype, state = torch.get_default_dtype(), torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_rng_state(state)


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs(script, tmp_path, monkeypatch, torch_defaults):
    args, written = SMOKE[script]
    monkeypatch.setenv("INTERPLAB_BENCH_OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import benchmarks/timing.py as a sibling
    monkeypatch.delitem(sys.modules, "timing", raising=False)
    committed = BENCHMARKS / "results" / written
    before = committed.read_bytes() if committed.exists() else None
    runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")
    assert json.loads((tmp_path / written).read_text())                    # a non-empty result, written here
    assert (committed.read_bytes() if committed.exists() else None) == before  # and the committed one untouched
