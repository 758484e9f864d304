"""Timing and output paths shared by the benchmark scripts."""
import os
import time
from pathlib import Path


def best_of(fn, repeats: int):
    """(last result, fastest wall seconds, fastest CPU seconds of this thread) over ``repeats`` calls.

    CPU time (``time.thread_time``; torch runs on this thread with one OpenMP thread) is reported
    too: on a shared machine a pass longer than a scheduler slice waits for the other processes,
    which inflates wall time for long batched passes far more than for a loop's short ones.
    """
    wall = cpu = float("inf")
    out = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        cpu = min(cpu, time.thread_time() - c0)
        wall = min(wall, time.perf_counter() - t0)
    return out, wall, cpu


def machine() -> str:
    """"x86_64, 2 cores, 1 torch threads": what every benchmark JSON records about where it ran."""
    import platform

    import torch
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def results_path(name: str) -> Path:
    """Where a benchmark writes its JSON: benchmarks/results/, or ``$INTERPLAB_BENCH_OUT`` (the smoke tests)."""
    folder = Path(os.environ.get("INTERPLAB_BENCH_OUT") or Path(__file__).resolve().parent / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
