"""Provenance: atomic writes, sidecar records and the per-profile manifest.

Every figure or table file ``name.ext`` gets a sidecar ``name.json`` that says how it was
made (notebook, parameters, git commit and dirty flag, package versions, seed, device,
wall time, sha256 of inputs and outputs). ``MANIFEST.json`` at ``figures/<profile>/``
indexes every sidecar of that profile, so a reader can check any file against its hash.
"""
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from . import paths

TRACKED_PACKAGES = ("torch", "torchvision", "transformers", "diffusers", "timm", "open_clip_torch",
                    "numpy", "scipy", "scikit-learn", "matplotlib", "seaborn", "papermill", "nbval")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(x):
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def git_state(root=paths.ROOT) -> dict:
    """``{"sha": ..., "dirty": bool}``; ``sha`` is None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!figures")
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}


@lru_cache(maxsize=1)
def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hash_inputs(inputs) -> dict:
    """``{str(path): sha256}`` for files; other inputs (e.g. a dataset name) map to None."""
    out = {}
    for item in inputs or ():
        p = Path(item)
        out[str(item)] = sha256_file(p) if p.is_file() else None
    return out


def write_manifest(profile_dir) -> Path:
    """Rebuild ``MANIFEST.json`` of one profile from the sidecars under it.

    Rebuilt from scratch every time, so it can never disagree with the files it lists.
    """
    profile_dir = Path(profile_dir)
    chapters = {}
    for sidecar in sorted(profile_dir.glob("*/*.json")):
        if sidecar.name == "claims.json":
            continue
        record = json.loads(sidecar.read_text())
        if "outputs" not in record:
            continue
        entry = chapters.setdefault(sidecar.parent.name, {"files": {}, "git": record.get("git"),
                                                          "parameters": record.get("parameters")})
        entry["files"].update({f"{sidecar.parent.name}/{k}": v for k, v in record["outputs"].items()})
    for chapter, entry in chapters.items():
        claims = profile_dir / chapter / "claims.json"
        if claims.exists():
            rows = json.loads(claims.read_text())
            entry["claims"] = {kind: f"{sum(r['holds'] for r in rows if r['kind'] == kind)}/"
                                     f"{sum(r['kind'] == kind for r in rows)}" for kind in ("hard", "soft")}
    return write_json(profile_dir / "MANIFEST.json", {"profile": profile_dir.name, "chapters": chapters})
