"""Errors of the model package: every refusal names what it refused and why."""

from __future__ import annotations


class ModelError(ValueError):
    """Base class of the model package's errors (bad input: a 400 or a clear CLI error)."""


class UnsupportedArchitectureError(ModelError):
    """A checkpoint's config.json describes a model this anchor cannot run."""


class CheckpointError(ModelError):
    """A checkpoint's files or tensors are missing, extra, or of the wrong shape."""


class MemoryFormatError(ModelError):
    """A block's tensors do not have the names or shapes its memory type requires."""
