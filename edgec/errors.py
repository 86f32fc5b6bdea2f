"""The one exception tree of edgec.

Every error a user can cause derives from :class:`EdgecError` and renders as a
single line — what went wrong, why, and how to fix it. The CLI prints that line
and exits with :attr:`EdgecError.exit_code` (2 for bad input) without a
traceback. Internal invariants use ``assert`` instead.

This module imports nothing from edgec, so every stage (``edgec.search``,
``edgec.compile``, ``edgec.targets``) may import it without depending on the core.
"""

from __future__ import annotations


class EdgecError(Exception):
    """Root of edgec's errors: one line ``what: why; fix`` and an exit code."""

    exit_code = 2

    def __init__(self, what: str, why: str = "", fix: str = "") -> None:
        self.what, self.why, self.fix = what, why, fix
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message shown to the user."""
        text = self.what
        if self.why:
            text += f": {self.why}"
        if self.fix:
            text += f" — {self.fix}"
        return " ".join(text.split())  # never more than one line


class ConfigError(EdgecError):
    """A bad option, config key or contradictory setting."""


class DataError(EdgecError):
    """A dataset that is missing, malformed or unusable."""


class ModelError(EdgecError):
    """A model file or checkpoint that cannot be used."""


class ExportError(EdgecError):
    """ONNX export failed or the exported model does not match PyTorch."""


class TargetError(EdgecError):
    """An unknown or unavailable target, or a runtime failure on it."""


class OutputDirError(EdgecError):
    """The output directory cannot be used (not empty, locked, unwritable)."""


class NoQualifyingCandidate(EdgecError):
    """The search finished but no candidate met the accuracy drop and budgets."""

    exit_code = 3
