"""Control of the traced form: what the model looks like while torch.export runs.

Fusion is deterministic only if the traced graph has a known shape. This context manager is the one place that
adjusts the model for tracing (for example a registered attention function); the default leaves it as it is.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def traced_form(model, facts: dict):
    """Adjust `model` for the trace and restore it afterwards. Default: no change."""
    yield model
