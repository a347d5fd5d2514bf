"""Exceptions of the router package: embedders, the centroid tree and router.safetensors.

Every error derives from `RouterError`. Bad input (a spec or tensors that do not fit) is also a
`ValueError`; a missing file is also a `FileNotFoundError`, so callers can map them at the API
boundary without knowing this package.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class of every error raised by `server.routing`."""


class EmbedderMismatchError(RouterError, ValueError):
    """An embedder spec and what was found (weights, tensors, dimension) do not agree."""


class EmbedderFilesMissingError(RouterError, FileNotFoundError):
    """The files an embedder needs (model weights, tokenizer, config) are not where looked."""


class CentroidTreeError(RouterError, ValueError):
    """Centroid tensors with a missing level, a wrong shape, a bad dtype or non-finite values."""


class RouterFileError(RouterError, ValueError):
    """router.safetensors is unreadable or holds tensors the router does not know."""


class RouterFileNotFoundError(RouterError, FileNotFoundError):
    """router.safetensors is not at the path given."""
