"""Shipped checkpoints: data/zoo/NAME/{model.safetensors, config.json, card.json, ...}.

The card records how the model was made (command, seed, steps, wall time), its quality gates and
the sha256 of every file; ``verify`` re-hashes the files against it, and every failure is a
one-line error that names the command which rebuilds the checkpoint.
"""
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import paths, provenance
from ..errors import ResourceUnavailable


def zoo_dir(name: str) -> Path:
    return paths.DATA / "zoo" / name


def train_command(name: str) -> str:
    return f"python -m interplab.zoo train {name}"


def missing(name: str, why: str) -> ResourceUnavailable:
    return ResourceUnavailable(f"zoo model {name!r} {why}; rebuild it with `{train_command(name)}`")


MAX_FILE_BYTES = 8 * 2 ** 20  # the repository tracks no file over 10 MB: larger state dicts are sharded


def shard_paths(path: Path) -> list[Path]:
    """The shards ``STEM-00001-of-0000N.safetensors`` that stand for ``path``, in order (none: not sharded)."""
    return sorted(path.parent.glob(f"{path.stem}-?????-of-?????{path.suffix}"))


def save_weights(path: Path, state: dict, half: bool = False, max_bytes: int = MAX_FILE_BYTES) -> list[Path]:
    """safetensors of a state dict; ``half`` stores floating tensors as float16 (the 40 MB budget).
    Over ``max_bytes`` the tensors go, in order, into shards named as ``shard_paths`` reads them.
    Returns the files written."""
    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in state.items()}
    shards, size = [{}], 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k], size = v, size + n
    for old in shard_paths(path) + [path]:
        old.unlink(missing_ok=True)
    if len(shards) > 1:
        out = [path.with_name(f"{path.stem}-{i + 1:05d}-of-{len(shards):05d}{path.suffix}") for i in range(len(shards))]
    else:
        out = [path]
    for p, part in zip(out, shards):
        provenance.atomic_write(p, lambda tmp, part=part: save_file(part, tmp))
    return out


def load_weights(path: Path) -> dict:
    """A state dict in float32 from ``path`` or from its shards."""
    state = {}
    for p in shard_paths(path) or [path]:
        state.update(load_file(p))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def write_card(name: str, *, seed: int, steps: int, wall_time_s: float, gates: dict, extra: dict | None = None,
               command: str | None = None, cpu_time_s: float | None = None) -> dict:
    """Hash every file of the model's folder (except the card) into card.json; returns the card."""
    d = zoo_dir(name)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != "card.json")
    card = {"name": name, "command": command or train_command(name), "seed": seed, "steps": steps,
            "wall_time_s": round(wall_time_s, 1),
            "cpu_time_s": None if cpu_time_s is None else round(cpu_time_s, 1), "gates": gates,
            "gates_pass": all(g["holds"] for g in gates.values()),
            "sha256": {p.relative_to(d).as_posix(): provenance.sha256_file(p) for p in files},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "packages": {k: v for k, v in provenance.package_versions().items()
                         if k in ("python", "torch", "transformers", "diffusers", "timm")}}
    card.update(extra or {})
    provenance.write_json(d / "card.json", card)
    return card


def read_card(name: str) -> dict:
    path = zoo_dir(name) / "card.json"
    if not path.exists():
        raise missing(name, "is not shipped (no card.json in data/zoo/)")
    return json.loads(path.read_text())


def verify(name: str) -> dict:
    """The card, after checking that every file it lists exists with its sha256."""
    card = read_card(name)
    for fname, digest in card["sha256"].items():
        p = zoo_dir(name) / fname
        if not p.exists():
            raise missing(name, f"lacks {fname}")
        if provenance.sha256_file(p) != digest:
            raise missing(name, f"has a corrupt {fname} (sha256 differs from card.json)")
    return card


def gate(value: float, threshold: float, op: str = ">=") -> dict:
    holds = value >= threshold if op == ">=" else value <= threshold
    return {"value": round(float(value), 4), "threshold": threshold, "op": op, "holds": bool(holds)}


def state_path(name: str) -> Path:
    """Where an interrupted training keeps its resumable state (outside git)."""
    return paths.BUILD / "zoo" / name / "state.pt"


def save_state(name: str, **state) -> None:
    path = state_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    provenance.atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(name: str) -> dict | None:
    path = state_path(name)
    return torch.load(path, weights_only=False) if path.exists() else None
