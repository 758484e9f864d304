"""The notebook session: one object per executed chapter notebook.

A chapter notebook starts with ``ch = interplab.start(...)``, writes every figure and
table through ``ch.figure`` / ``ch.table`` (atomic, with a provenance sidecar), prints
"dissertation vs reproduced" lines with ``ch.compare``, records claims with ``ch.claim``
and ends with ``ch.finish()``, which prints the claims table, writes ``claims.json`` and,
in the tiny profile, fails the notebook if a hard claim does not hold.
"""
import math
import operator
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import paths, provenance
from .errors import BadParameter, ClaimFailed, UnknownProfile

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass
class Claim:
    id: str
    claim: str
    dissertation: object
    reproduced: object
    threshold: object
    kind: str
    holds: bool
    note: str = ""


@dataclass
class Comparison:
    label: str
    dissertation: object
    reproduced: object
    note: str = ""


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; asking for an absent device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadParameter(f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadParameter(f"device={device!r} but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(chapter: str, profile: str = "tiny", seed: int = 0, device: str = "auto", out_dir=None,
          params: dict | None = None) -> "Chapter":
    """Open a chapter session: validate, seed, pick the device and the output folder."""
    if profile not in paths.PROFILES:
        raise UnknownProfile(f"profile={profile!r} is unknown; use one of {', '.join(paths.PROFILES)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BadParameter(f"seed={seed!r} must be an integer")
    return Chapter(chapter, profile, seed, resolve_device(device),
                   Path(out_dir) if out_dir else paths.chapter_dir(profile, chapter), dict(params or {}))


def _plain(x):
    """A value as JSON will hold it, rounded for the eye."""
    if isinstance(x, (np.generic, torch.Tensor)):
        x = x.item()
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else str(x)
    return x


class Chapter:
    def __init__(self, chapter, profile, seed, device, out_dir, params):
        self.chapter, self.profile, self.seed, self.device = chapter, profile, seed, device
        self.out_dir = Path(out_dir)
        self.params = {"profile": profile, "seed": seed, "device": str(device), **params}
        self.claims: list[Claim] = []
        self.comparisons: list[Comparison] = []
        self.outputs: list[str] = []
        self._t0 = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(seed)
        from .plotting import set_style
        set_style()
        print(f"{chapter} | profile={profile} seed={seed} device={device} -> {self.out_dir}")

    @property
    def tiny(self) -> bool:
        return self.profile == "tiny"

    # -- outputs -------------------------------------------------------------------
    def _record(self, name: str, files: list[Path], inputs, extra=None) -> Path:
        record = {
            "chapter": self.chapter,
            "notebook": f"notebooks/{self.chapter}.ipynb",
            "name": name,
            "parameters": self.params,
            "seed": self.seed,
            "device": _device_name(self.device),
            "git": provenance.git_state(),
            "versions": provenance.package_versions(),
            "run_id": os.environ.get("INTERPLAB_RUN_ID"),
            "created": provenance.now(),
            "wall_time_s": round(time.perf_counter() - self._t0, 2),
            "inputs": provenance.hash_inputs(inputs),
            "outputs": {f.name: provenance.sha256_file(f) for f in files},
            **(extra or {}),
        }
        self.outputs += [f.name for f in files]
        return provenance.write_json(self.out_dir / f"{name}.json", record)

    def figure(self, fig, name: str, inputs=(), formats=("png", "pdf"), dpi: int = 150) -> Path:
        """Write ``fig`` as ``name.png`` + ``name.pdf`` (atomically) with a sidecar; returns the PNG path."""
        files = [provenance.atomic_write(self.out_dir / f"{name}.{ext}",
                                         lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=dpi,
                                                                          bbox_inches="tight",
                                                                          metadata=_fixed_metadata(ext)))
                 for ext in formats]
        self._record(name, files, inputs)
        return files[0]

    def table(self, df, name: str, inputs=(), floatfmt: str = ".3f") -> Path:
        """Write a pandas DataFrame as ``name.csv`` + ``name.md`` with a sidecar; returns the CSV path."""
        csv = provenance.atomic_write_text(self.out_dir / f"{name}.csv", df.to_csv(index=False))
        md = provenance.atomic_write_text(self.out_dir / f"{name}.md",
                                          df.to_markdown(index=False, floatfmt=floatfmt) + "\n")
        self._record(name, [csv, md], inputs)
        return csv

    # -- claims --------------------------------------------------------------------
    def compare(self, label: str, dissertation, reproduced, note: str = "") -> Comparison:
        """Print and keep one "dissertation value vs reproduced value" line."""
        row = Comparison(label, _plain(dissertation), _plain(reproduced), note)
        self.comparisons.append(row)
        print(f"{label}: dissertation {row.dissertation} | reproduced ({self.profile}) {row.reproduced}"
              + (f"  [{note}]" if note else ""))
        return row

    def claim(self, id: str, claim: str, dissertation, reproduced, threshold=None, op: str | None = None,
              holds: bool | None = None, kind: str = "hard", note: str = "") -> Claim:
        """Record a claim. Either ``op`` (``reproduced op threshold`` decides) or ``holds`` (a bool the
        notebook computed, for compound claims such as "at every group size")."""
        if kind not in ("hard", "soft"):
            raise BadParameter(f"claim kind={kind!r}; use 'hard' or 'soft'")
        if (op is None) == (holds is None):
            raise BadParameter(f"claim {id!r}: give exactly one of op= (with threshold=) or holds=")
        if op is not None:
            if op not in OPS:
                raise BadParameter(f"claim {id!r}: op={op!r}; use one of {', '.join(OPS)}")
            value = _plain(reproduced)
            # a non-finite float is kept as "nan" / "inf"; compared as a float, nan never holds (an AUROC of
            # one class, a mean of nothing: an undefined result is not a reproduced one)
            holds = bool(OPS[op](float(value) if isinstance(value, str) else value, threshold))
            threshold = f"{op} {_plain(threshold)}"
        if any(c.id == id for c in self.claims):
            raise BadParameter(f"claim id {id!r} recorded twice; ids must be unique")
        row = Claim(id, claim, _plain(dissertation), _plain(reproduced), _plain(threshold), kind, bool(holds), note)
        self.claims.append(row)
        print(f"[{'holds' if row.holds else 'DOES NOT HOLD'}] ({kind}) {id}: reproduced {row.reproduced}"
              + (f", threshold {row.threshold}" if threshold is not None else ""))
        return row

    def finish(self):
        """Print the claims table, write ``claims.json`` (+ comparisons), fail on a hard claim in tiny."""
        import pandas as pd
        rows = [asdict(c) for c in self.claims]
        provenance.write_json(self.out_dir / "claims.json", rows)
        provenance.write_json(self.out_dir / "comparisons.json", [asdict(c) for c in self.comparisons])
        if self.out_dir.parent.name == self.profile:
            provenance.write_manifest(self.out_dir.parent)
        table = pd.DataFrame(rows, columns=[f for f in Claim.__dataclass_fields__])
        with pd.option_context("display.max_colwidth", 60, "display.width", 200):
            print(table[["id", "kind", "dissertation", "reproduced", "threshold", "holds"]].to_string(index=False))
        failed = [c for c in self.claims if c.kind == "hard" and not c.holds]
        soft_failed = [c for c in self.claims if c.kind == "soft" and not c.holds]
        for c in soft_failed:
            print(f"not reproduced in {self.profile}: {c.id}" + (f" ({c.note})" if c.note else ""))
        held = sum(c.holds for c in self.claims)
        print(f"{self.chapter}: {held}/{len(self.claims)} claims hold "
              f"({time.perf_counter() - self._t0:.0f} s)")
        if failed and self.tiny:
            raise ClaimFailed(f"{len(failed)} hard claim(s) failed in tiny: {', '.join(c.id for c in failed)}")
        return table


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _fixed_metadata(ext: str) -> dict:
    # Drop the creation date so identical figures hash identically across runs.
    return {"png": {"Software": None}, "pdf": {"CreationDate": None}}.get(ext, {})
