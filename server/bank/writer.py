"""`BankWriter`: writes a bank atomically, so a crash never leaves one that looks complete.

Everything goes into a hidden sibling directory `.{name}.partial-<random>`; `commit()` writes
`manifest.json` last, fsyncs every file and directory, and only then renames the directory to
its final name. Replacing an existing bank (`overwrite=True`) renames the old one aside, renames
the new one in, and deletes the old one, so readers see the old bank or the new one, never a mix.
An exception inside `with BankWriter(...)` removes the partial directory; a clean exit commits.
Blocks are given in any dtype and stored in the bank's (an int8 bank quantizes float blocks).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import Tensor

from server.bank.codec import as_stored, check_shapes, encode_block
from server.bank.errors import BankError, BankExistsError, BankFileMissingError, BankFormatError
from server.bank.layout import BankDType, ModelShape
from server.bank.manifest import (
    FORMAT,
    MANIFEST_NAME,
    VERSION,
    BankManifest,
    BlockEntry,
    parse_manifest,
)
from server.bank.paths import (
    ANCHOR_DIR,
    ANCHOR_FILES,
    ANCHOR_REQUIRED,
    BLOCKS_DIR,
    GENERIC_DIR,
    block_relpath,
    generic_relpath,
)
from server.bank.router_file import ROUTER_NAME, encode_router
from server.model.memory import MemoryBlock, MemoryType, memory_type_of
from tiers.disk import fsync_dir


def _check_target(path: Path, *, overwrite: bool) -> bool:
    """Whether a bank (or anything) must be moved aside; raise if it may not be replaced."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BankExistsError(path, "exists and is not a directory; refusing to replace it")
    if not path.exists() or not any(path.iterdir()):
        return False
    if not (path / MANIFEST_NAME).is_file():
        raise BankExistsError(path, "exists and is not a bank (no manifest.json); not replacing it")
    if not overwrite:
        raise BankExistsError(path, "a bank already exists here; pass overwrite=True to replace it")
    return True


class BankWriter:
    """Builds a bank in a partial directory; `commit()` makes it appear whole, atomically."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        bank_id: str,
        memory_type: MemoryType,
        levels: int,
        branching: int,
        widths: list[int] | tuple[int, ...],
        dtype: BankDType,
        model: ModelShape,
        embedder: Mapping[str, Any],
        lora_targets: list[str] | tuple[str, ...] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self._fields: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "bank_id": bank_id,
            "memory_type": memory_type,
            "levels": levels,
            "branching": branching,
            "widths": list(widths),
            "dtype": dtype,
            "model": model,
            "lora_targets": None if lora_targets is None else list(lora_targets),
            "embedder": dict(embedder),
        }
        self.manifest = parse_manifest(self._fields, source="(BankWriter arguments)")
        _check_target(self.out_dir, overwrite=overwrite)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.partial = Path(
            tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent)
        )
        # mkdtemp makes the directory private (0700); a bank is read by the serving user too.
        self.partial.chmod(0o755)
        self._blocks: dict[str, BlockEntry] = {}
        self._generic: dict[str, BlockEntry] = {}
        self._router_written = False
        self._lock = threading.Lock()  # blocks may be written from several threads
        self._state = "open"

    # -- writing --------------------------------------------------------------------------------

    def _write(self, relpath: str, data: bytes) -> BlockEntry:
        path = self.partial / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return BlockEntry(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def _check_open(self) -> None:
        if self._state != "open":
            raise BankError(f"bank writer for {str(self.out_dir)!r} is {self._state}")

    def _encode(self, level: int, block: MemoryBlock, what: str) -> bytes:
        m = self.manifest
        if memory_type_of(block) is not m.memory_type:
            raise BankFormatError(
                f"{what}: a {memory_type_of(block)} block in a {m.memory_type} bank"
            )
        try:
            block = as_stored(block, m.dtype)  # an int8 bank quantizes float blocks
            check_shapes(block.tensors(), m.block_shapes(level))
        except BankFormatError as exc:
            raise type(exc)(f"{what}: {exc}") from exc
        return encode_block(block, dtype=m.dtype)

    def write_block(self, level: int, node: int, block: MemoryBlock) -> BlockEntry:
        """Write the block of `node` at `level` (shapes checked against the manifest)."""
        self._check_open()
        key = str(self.manifest.block_key(level, node))
        with self._lock:
            if key in self._blocks:
                raise BankFormatError(f"block {key!r} was already written")
        entry = self._write(block_relpath(level, node), self._encode(level, block, key))
        with self._lock:
            self._blocks[key] = entry
        return entry

    def write_generic(self, level: int, block: MemoryBlock) -> BlockEntry:
        """Write the generic memory of `level` (same shapes as one block of that level)."""
        self._check_open()
        entry = self._write(generic_relpath(level), self._encode(level, block, f"generic L{level}"))
        with self._lock:
            self._generic[f"L{level}"] = entry
        return entry

    def write_router(self, tensors: Mapping[str, Tensor]) -> None:
        """Write `router.safetensors`: `centroids.L{l}` for every level, plus embedder tensors."""
        self._check_open()
        self._write(ROUTER_NAME, encode_router(self.manifest, tensors))
        self._router_written = True

    def write_note(self, name: str, data: bytes) -> None:
        """Write a file of the bank's maker beside the bank's own (how it was made); no reader
        of the bank reads it."""
        self._check_open()
        reserved = {MANIFEST_NAME, ROUTER_NAME, ANCHOR_DIR, BLOCKS_DIR, GENERIC_DIR}
        if "/" in name or name in reserved or name.startswith("."):
            raise BankFormatError(
                f"{name!r} is not a name for a note: a plain file name, none of {sorted(reserved)}"
            )
        self._write(name, data)

    def copy_anchor(self, src_dir: str | Path) -> None:
        """Copy the anchor's config.json and model.safetensors, and its tokenizer files."""
        self._check_open()
        src = Path(src_dir)
        for name in ANCHOR_REQUIRED:
            if not (src / name).is_file():
                raise BankFileMissingError(src / name, "an anchor file to copy")
        dest = self.partial / ANCHOR_DIR
        dest.mkdir(exist_ok=True)
        for name in ANCHOR_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dest / name)
                with open(dest / name, "rb") as f:
                    os.fsync(f.fileno())

    # -- finishing ------------------------------------------------------------------------------

    def commit(self) -> BankManifest:
        """Write the manifest last, then make the bank appear at `out_dir` in one rename."""
        self._check_open()
        try:
            if not self._router_written:
                raise BankFormatError(f"{ROUTER_NAME} was not written: call write_router() first")
            manifest = parse_manifest(
                {**self._fields, "generic": self._generic, "blocks": self._blocks},
                source="(written bank)",
            )
            self._write(MANIFEST_NAME, manifest.to_json().encode())
            for dirpath, _dirs, _files in os.walk(self.partial, topdown=False):
                fsync_dir(Path(dirpath))
            self._install()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self.manifest = manifest
        return manifest

    def _install(self) -> None:
        parent = self.out_dir.parent
        if not _check_target(self.out_dir, overwrite=self.overwrite):
            try:
                os.rename(self.partial, self.out_dir)  # replaces an empty directory only
            except OSError as exc:
                raise BankExistsError(self.out_dir, f"appeared while writing: {exc}") from exc
            fsync_dir(parent)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=parent))
        try:
            os.rename(self.out_dir, old)  # onto the empty temp directory
        except BaseException:
            old.rmdir()
            raise
        try:
            os.rename(self.partial, self.out_dir)
        except BaseException:
            os.rename(old, self.out_dir)
            raise
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove everything written so far. Safe to call more than once."""
        if self._state == "open":
            self._state = "aborted"
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()
