"""interplab: the notebook-first companion to *Interpreting Deep Learning Models* (Basu, 2025).

Organised by mechanism: ``hooks`` (read/replace activations), ``anatomy`` (where each model
family keeps its layers), ``influence`` (Chapter 3's estimators), and the notebook plumbing
``chapter`` (figures, tables, claims with provenance) and ``runner`` (papermill).
"""
from .errors import InterplabError

__version__ = "0.1.0"
__all__ = ["start", "by_profile", "InterplabError", "__version__"]


def start(*args, **kwargs):
    """Open a chapter session; see :func:`interplab.chapter.start`. (Lazy: the CLI needs no torch.)"""
    from .chapter import start as _start
    return _start(*args, **kwargs)


def by_profile(value, profile: str, tiny, paper):
    """A notebook parameter left at None takes its profile's value (``tiny`` or ``paper``); set, it wins."""
    if profile not in ("tiny", "paper"):
        from .errors import UnknownProfile
        raise UnknownProfile(f"profile={profile!r}; use 'tiny' or 'paper'")
    return value if value is not None else (tiny if profile == "tiny" else paper)
