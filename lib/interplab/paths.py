"""Where things live, resolved from the package itself so notebooks work from any cwd.

nbval starts kernels in the notebook's folder and papermill in whatever folder it is
given; both find the repository through this file, never through the working directory.
"""
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parents[1]  # lib/interplab -> repository root (src layout)
NOTEBOOKS = ROOT / "notebooks"
FIGURES = ROOT / "figures"
DATA = ROOT / "data"
BUILD = ROOT / "build"

PROFILES = ("tiny", "paper")


def figures_root(root: Path = ROOT) -> Path:
    """Root under which ``<profile>/<chapter>/`` output folders go.

    ``INTERPLAB_OUT_ROOT`` redirects it (``make test`` points it into build/ so that
    executing notebooks under nbval never rewrites the committed figures).
    """
    env = os.environ.get("INTERPLAB_OUT_ROOT")
    return Path(env).resolve() if env else Path(root) / "figures"


def chapter_dir(profile: str, chapter: str) -> Path:
    return figures_root() / profile / chapter
