"""Exceptions the runtime raises for things a user can cause.

Every error is a `GptexportError`, so a command line can catch one class and print one line.
"""


class GptexportError(Exception):
    """Base class: a one-line message a user can act on (no traceback needed)."""


class ArtifactError(GptexportError):
    """The artifact directory is missing, incomplete, modified, or not loadable."""


class ProviderError(GptexportError):
    """The requested execution provider is unknown or not available here, or its settings (threads) are invalid."""


class GenerationError(GptexportError, ValueError):
    """A generation argument (prompt, length, sampling parameter) is invalid."""
