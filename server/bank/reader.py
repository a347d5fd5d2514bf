"""`Bank`: a bank directory opened for reading, every block checked before it is used.

`Bank.open` validates the manifest and that the files it names are there (router, anchor,
generic memories, block files); `read_block` checks a block file's size and sha256 against the
manifest before decoding it, and the decoded tensors are views of the one buffer read. Only
JSON and safetensors are read, never pickle.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from server.bank.codec import BankBlockCodec, decode_block
from server.bank.errors import (
    BankFileMissingError,
    BlockFormatError,
    BlockIntegrityError,
    BlockNotInBankError,
)
from server.bank.manifest import BankManifest, BlockEntry, load_manifest
from server.bank.paths import (
    ANCHOR_DIR,
    ANCHOR_REQUIRED,
    BLOCKS_DIR,
    SUFFIX,
    block_relpath,
    generic_relpath,
)
from server.bank.router_file import ROUTER_NAME, load_router
from server.model.memory import MemoryBlock
from tiers.errors import InvalidKeyError
from tiers.keys import BlockKey

FINGERPRINT_CHARS = 16


def read_verified(path: Path, entry: BlockEntry) -> bytearray:
    """The bytes of `path`, checked against the manifest's size and sha256."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.bytes:
                raise BlockIntegrityError(path, f"{size} bytes, the manifest says {entry.bytes}")
            buf = bytearray(size)
            view, done = memoryview(buf), 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise BlockIntegrityError(path, f"file shrank to {done} bytes while read")
                done += n
            view.release()
    except FileNotFoundError:
        raise BankFileMissingError(path, "a file its manifest lists") from None
    if hashlib.sha256(buf).hexdigest() != entry.sha256:
        raise BlockIntegrityError(path, "sha256 does not match the manifest")
    return buf


class Bank:
    """An opened bank directory: its manifest, and verified reads of its blocks."""

    def __init__(self, path: Path, manifest: BankManifest) -> None:
        self.path = path
        self.manifest = manifest
        self._fingerprint: str | None = None

    @classmethod
    def open(
        cls, path: str | Path, *, require_anchor: bool = True, check_files: bool = True
    ) -> Bank:
        """Open a bank: validate its manifest and check that the files it needs exist.

        `require_anchor=False` accepts a bank without an anchor (test banks); `check_files=False`
        skips listing the block directories (a bank whose blocks live only in tiers).
        """
        root = Path(path)
        if not root.is_dir():
            raise BankFileMissingError(root, "its directory")
        bank = cls(root, load_manifest(root))
        required = [root / ROUTER_NAME]
        if require_anchor:
            required += [root / ANCHOR_DIR / name for name in ANCHOR_REQUIRED]
        required += [root / generic_relpath(int(n[1:])) for n in bank.manifest.generic]
        for file in required:
            if not file.is_file():
                raise BankFileMissingError(file, "a required file")
        if check_files:
            bank._check_block_files()
        return bank

    def _check_block_files(self) -> None:
        """Every block the manifest lists has its file (one directory listing per level)."""
        by_level: dict[int, list[int]] = {}
        for key in self.manifest.blocks:
            parsed = BlockKey.parse(key)
            by_level.setdefault(parsed.level, []).append(parsed.node)
        for level, nodes in sorted(by_level.items()):
            directory = self.path / BLOCKS_DIR / f"L{level}"
            try:
                present = {e.name for e in os.scandir(directory) if e.is_file()}
            except FileNotFoundError:
                present = set()
            for node in sorted(nodes):
                if f"{node}{SUFFIX}" not in present:
                    raise BankFileMissingError(self.path / block_relpath(level, node), "a block")

    # -- paths ----------------------------------------------------------------------------------

    @property
    def anchor_dir(self) -> Path:
        return self.path / ANCHOR_DIR

    def _key(self, key: str | BlockKey) -> BlockKey:
        try:
            parsed = key if isinstance(key, BlockKey) else BlockKey.parse(key)
        except InvalidKeyError as exc:
            raise BlockNotInBankError(str(key)) from exc
        if str(parsed) not in self.manifest.blocks:
            raise BlockNotInBankError(str(parsed))
        return parsed

    def block_path(self, key: str | BlockKey) -> Path:
        parsed = self._key(key)
        return self.path / block_relpath(parsed.level, parsed.node)

    def generic_path(self, level: int) -> Path | None:
        """The generic memory file of `level`, or None when the bank has none for it."""
        self.manifest.width(level)  # checks the level
        if f"L{level}" not in self.manifest.generic:
            return None
        return self.path / generic_relpath(level)

    # -- reading --------------------------------------------------------------------------------

    def block_bytes(self, key: str | BlockKey) -> bytearray:
        """A block's verified bytes, as tiers hold them (what `hmem bank push` copies)."""
        parsed = self._key(key)
        return read_verified(self.block_path(parsed), self.manifest.blocks[str(parsed)])

    def _decode(self, path: Path, data: bytearray, level: int) -> MemoryBlock:
        m = self.manifest
        try:
            return decode_block(
                data, memory_type=m.memory_type, expected=m.block_shapes(level), dtype=m.dtype
            )
        except BlockFormatError as exc:
            raise BlockFormatError(f"{str(path)!r}: {exc}") from exc

    def read_block(self, key: str | BlockKey) -> MemoryBlock:
        """A block, verified against the manifest, then decoded and shape-checked."""
        parsed = self._key(key)
        path = self.block_path(parsed)
        data = read_verified(path, self.manifest.blocks[str(parsed)])
        return self._decode(path, data, parsed.level)

    def generic(self, level: int) -> MemoryBlock | None:
        """The generic memory of `level`, or None when the bank has none for it."""
        path = self.generic_path(level)
        if path is None:
            return None
        data = read_verified(path, self.manifest.generic[f"L{level}"])
        return self._decode(path, data, level)

    def router_tensors(self) -> dict[str, Tensor]:
        """`router.safetensors`: centroids per level (checked) and the embedder's tensors."""
        return load_router(self.manifest, self.path / ROUTER_NAME)

    def block_keys(self, level: int | None = None) -> list[BlockKey]:
        """The bank's block keys in (level, node) order, of one level or all."""
        parsed = sorted(BlockKey.parse(k) for k in self.manifest.blocks)
        return [k for k in parsed if level is None or k.level == level]

    def iter_blocks(self, level: int | None = None) -> Iterator[tuple[BlockKey, MemoryBlock]]:
        """(key, block) for every block, read and verified one at a time."""
        for key in self.block_keys(level):
            yield key, self.read_block(key)

    def verify(self) -> None:
        """Hash every block and generic file against the manifest; raise on the first bad one."""
        for key in self.block_keys():
            self.read_block(key)
        for level in self.manifest.memory_levels():
            self.generic(level)
        self.router_tensors()

    def fingerprint(self) -> str:
        """This build's identity: 16 hex digits of a sha256 over its block index and router.

        Two builds with the same bank id are different banks when their blocks or their
        clusters differ: state kept per bank (the blocklist) is kept per fingerprint. Reads the
        router file once (on first call; a caller on an event loop runs it in a thread).
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(b"hmem-bank-fingerprint-1\n")
            digest.update(f"{self.manifest.bank_id}\n".encode())
            for key, entry in sorted(self.manifest.blocks.items()):
                digest.update(f"{key} {entry.bytes} {entry.sha256}\n".encode())
            digest.update(b"router\n")
            try:
                with open(self.path / ROUTER_NAME, "rb") as f:
                    digest.update(hashlib.file_digest(f, "sha256").digest())
            except FileNotFoundError:
                raise BankFileMissingError(self.path / ROUTER_NAME, "a required file") from None
            self._fingerprint = digest.hexdigest()[:FINGERPRINT_CHARS]
        return self._fingerprint

    def codec(self) -> BankBlockCodec:
        """The `tiers.BlockCodec` that decodes this bank's blocks."""
        return BankBlockCodec(self.manifest)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bank({str(self.path)!r}, bank_id={m.bank_id!r}, memory_type={m.memory_type})"
