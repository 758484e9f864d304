"""Run chapter notebooks headless with papermill: ``python -m interplab figures``.

Each notebook executes into ``build/executed/<profile>/`` with its figures written to a
staging folder; only when it finishes cleanly does the staging folder replace
``figures/<profile>/<chapter>/``. A failing notebook therefore never touches the last good
figures. A notebook is skipped when its file, the library source and its parameters are
unchanged since its last successful run (``--force`` overrides).
"""
import ast
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import paths, provenance
from .errors import BadParameter, UnknownChapter, UnknownProfile

# Small ops on a loaded 2-core machine are 10-50x slower with 2 OpenMP threads than with 1.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "agg", "HF_HUB_OFFLINE": "1"}


# Type of a parameter's default literal -> what an override must be (None defaults accept anything).
TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": (list, tuple), "tuple": (list, tuple),
         "dict": dict}


def _literal_type(source: str) -> str | None:
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None
    return None if value is None else type(value).__name__


@dataclass
class Result:
    chapter: str
    status: str  # "ok" | "skipped" | "FAILED"
    seconds: float = 0.0
    claims: str = ""
    error: str = ""


class Runner:
    """Discovers ``notebooks/ch*.ipynb`` under ``root`` and runs them for one profile."""

    def __init__(self, root=paths.ROOT, profile: str = "tiny", figures=None):
        if profile not in paths.PROFILES:
            raise UnknownProfile(f"profile={profile!r} is unknown; use one of {', '.join(paths.PROFILES)}")
        self.root, self.profile = Path(root), profile
        self.notebooks = self.root / "notebooks"
        self.figures = Path(figures) if figures else paths.figures_root(self.root)
        self.build = self.root / "build"

    # -- discovery -----------------------------------------------------------------
    def chapters(self) -> list[str]:
        return sorted(p.stem for p in self.notebooks.glob("ch*.ipynb"))

    def select(self, only=None) -> list[str]:
        """Chapters matching ``only`` (full names or prefixes such as ``ch03``); all when empty."""
        chapters = self.chapters()
        if not only:
            return chapters
        picked = []
        for key in only:
            hits = [c for c in chapters if c == key or c.startswith(key + "_") or c.startswith(key)]
            if not hits:
                raise UnknownChapter(f"no chapter notebook matches {key!r}; available: {', '.join(chapters)}")
            picked += [h for h in hits if h not in picked]
        return picked

    def parameters(self, chapter: str) -> dict:
        """``{name: {"default": str, "type": str, "help": str}}`` of the notebook's parameters cell."""
        import papermill as pm
        return pm.inspect_notebook(str(self.notebooks / f"{chapter}.ipynb"))

    def check_overrides(self, chapter: str, overrides: dict) -> None:
        known = self.parameters(chapter)
        for name in overrides:
            if name in ("profile", "out_dir"):
                raise BadParameter(f"-p {name}=... is set by the runner; use --profile instead")
            if name not in known:
                raise BadParameter(f"{chapter} has no parameter {name!r}; it has {', '.join(known)}")
            default = known[name]["default"]
            expected = _literal_type(default)
            if expected and not isinstance(overrides[name], TYPES.get(expected, object)):
                raise BadParameter(f"-p {name}={overrides[name]!r}: {chapter} expects {expected} (default {default})")

    # -- fingerprints ----------------------------------------------------------------
    def fingerprint(self, chapter: str, overrides: dict) -> str:
        h = hashlib.sha256()
        h.update((self.notebooks / f"{chapter}.ipynb").read_bytes())
        for src in sorted(paths.PACKAGE_DIR.rglob("*.py")):
            h.update(src.relative_to(paths.PACKAGE_DIR).as_posix().encode() + src.read_bytes())
        h.update(json.dumps({"profile": self.profile, **overrides}, sort_keys=True).encode())
        return h.hexdigest()

    def _state_file(self, chapter: str) -> Path:
        return self.build / "state" / self.profile / f"{chapter}.json"

    def is_fresh(self, chapter: str, fingerprint: str) -> bool:
        state = self._state_file(chapter)
        out = self.figures / self.profile / chapter
        return (state.exists() and (out / "claims.json").exists()
                and json.loads(state.read_text()).get("fingerprint") == fingerprint)

    # -- execution -----------------------------------------------------------------
    def run_one(self, chapter: str, overrides: dict | None = None, force: bool = False,
                progress: bool = True) -> Result:
        import papermill as pm
        overrides = dict(overrides or {})
        self.check_overrides(chapter, overrides)
        fingerprint = self.fingerprint(chapter, overrides)
        if not force and self.is_fresh(chapter, fingerprint):
            return Result(chapter, "skipped", claims=self.claims_summary(self.figures / self.profile / chapter))
        staging = self.build / "staging" / self.profile / chapter
        shutil.rmtree(staging, ignore_errors=True)
        executed = self.build / "executed" / self.profile / f"{chapter}.ipynb"
        executed.parent.mkdir(parents=True, exist_ok=True)
        params = {"profile": self.profile, "out_dir": str(staging), **overrides}
        os.environ.update(THREAD_ENV)
        os.environ["INTERPLAB_RUN_ID"] = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(self.notebooks / f"{chapter}.ipynb"), str(executed), parameters=params,
                                cwd=str(self.notebooks), kernel_name="python3",
                                progress_bar={"desc": chapter, "leave": False} if progress else False)
        except Exception as e:  # papermill raises on any cell error or a dead kernel
            return Result(chapter, "FAILED", time.perf_counter() - t0, error=_one_line(e))
        seconds = time.perf_counter() - t0
        self.promote(staging, self.figures / self.profile / chapter)
        provenance.write_manifest(self.figures / self.profile)
        provenance.write_gallery(self.figures / self.profile)
        provenance.write_json(self._state_file(chapter), {"fingerprint": fingerprint, "seconds": round(seconds, 1),
                                                          "finished": provenance.now()})
        return Result(chapter, "ok", seconds, claims=self.claims_summary(self.figures / self.profile / chapter))

    @staticmethod
    def promote(staging: Path, final: Path) -> None:
        """Swap the staging folder in for the final one with two renames (old kept until the swap)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def claims_summary(out: Path) -> str:
        claims = out / "claims.json"
        if not claims.exists():
            return ""
        rows = json.loads(claims.read_text())
        parts = []
        for kind in ("hard", "soft"):
            n = sum(r["kind"] == kind for r in rows)
            if n:
                parts.append(f"{kind} {sum(r['holds'] for r in rows if r['kind'] == kind)}/{n}")
        return ", ".join(parts)

    def run(self, only=None, overrides=None, force=False) -> list[Result]:
        from tqdm.auto import tqdm
        chapters = self.select(only)
        for c in chapters:
            self.check_overrides(c, overrides or {})
        results = []
        bar = tqdm(chapters, desc=f"figures [{self.profile}]", unit="notebook")
        for chapter in bar:
            bar.set_postfix_str(chapter)
            results.append(self.run_one(chapter, overrides, force))
        bar.close()
        return results


def _one_line(e: Exception) -> str:
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(e).__name__}: {e}"
    return " ".join(str(text).split())[:300]


def summary_table(results: list[Result]) -> str:
    rows = [("notebook", "status", "time", "claims held")]
    rows += [(r.chapter, r.status, f"{r.seconds:.0f} s" if r.status != "skipped" else "-", r.claims) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{r.chapter}: {r.error}" for r in results if r.error]
    return "\n".join(lines)
