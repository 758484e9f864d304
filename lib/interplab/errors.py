"""Errors that name their fix.

Every error a user can cause (a typo in a profile, a chapter that does not exist,
weights that cannot be fetched offline) is an ``InterplabError`` whose message is one
line saying what went wrong and what to do. The runner prints that line instead of a
stack trace from deep inside a library.
"""


class InterplabError(Exception):
    """Base class: the message is a single line that names the fix."""


class UnknownProfile(InterplabError, ValueError):
    pass


class UnknownChapter(InterplabError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class BadParameter(InterplabError, ValueError):
    pass


class ResourceUnavailable(InterplabError, FileNotFoundError):
    """Paper-profile weights or data that are absent and cannot be downloaded here."""


class ClaimFailed(InterplabError, AssertionError):
    """A hard claim of a tiny-profile notebook did not hold."""


def check_choice(name: str, value, choices) -> None:
    """Raise ``BadParameter`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise BadParameter(f"{name}={value!r} is not valid; use one of {', '.join(map(repr, choices))}")


def resource_unavailable(what: str, how: str) -> ResourceUnavailable:
    """The error for a paper-profile model or dataset that is not on disk."""
    return ResourceUnavailable(f"{what} is not available offline; {how}")
