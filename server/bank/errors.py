"""The exception tree of `server.bank`: what can be wrong with a bank, a manifest or a block.

Every message names the field, tensor or file at fault, so that whoever built the bank knows what
to fix. Errors about content (a malformed manifest or block) are `ValueError`s: bad input, a 400
upstream. Missing files are also `FileNotFoundError`s and an existing bank in the way of a writer
is also a `FileExistsError`, so callers that only know the standard library still catch them.
"""

from __future__ import annotations

from pathlib import Path


class BankError(Exception):
    """Base class of every error raised by `server.bank`."""


class BankFormatError(BankError, ValueError):
    """A manifest, router file or writer argument breaks the bank format (version 1)."""


class BlockFormatError(BankFormatError):
    """A block's bytes are not a well-formed safetensors blob of the expected tensors."""


class BlockIntegrityError(BankError, ValueError):
    """A block file does not match the size or sha256 the manifest records for it."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"block file {str(path)!r} failed verification: {message}")
        self.path = Path(path)


class BankFileMissingError(BankError, FileNotFoundError):
    """A file the bank must hold (manifest, router, anchor, a block) is not there."""

    def __init__(self, path: Path | str, what: str) -> None:
        super().__init__(f"bank is missing {what}: {str(path)!r}")
        self.path = Path(path)


class BankExistsError(BankError, FileExistsError):
    """A writer's target already exists and `overwrite` was not given (or it is not a bank)."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{str(path)!r}: {message}")
        self.path = Path(path)


class BlockNotInBankError(BankError, LookupError):
    """A block key the bank's manifest does not list."""

    def __init__(self, key: str) -> None:
        super().__init__(f"block {key!r} is not in the bank's manifest")
        self.key = key
