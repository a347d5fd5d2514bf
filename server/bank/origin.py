"""`OriginTier`: the bank directory itself as a read-only tier, the last replica of every level.

Tiers hold copies; the bank directory holds the originals. Placed last in every level's chain
(`TieredStore.add_tier(..., read_only=True)`), it serves a block whose every tier copy is missing
or corrupt, and the store repairs those copies from what it read, in the background.

It answers storage names (`tiers.keys.storage_key`: `bank/L1/3.<sha256[:16]>`), and only those
whose content prefix is the manifest's sha256 of that block: a name from another build, or an
unsuffixed one, is a miss. It hands over the bytes of `blocks/L{level}/{node}.safetensors` as
they are; the store checks them against the manifest like any tier's. `put` and `delete` raise:
the store never writes a read-only tier.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from server.bank.paths import BLOCKS_DIR, SUFFIX, block_relpath
from server.bank.reader import Bank
from tiers.base import Buffer, Consume, T, ThreadedTier
from tiers.errors import TierUnavailableError
from tiers.keys import CONTENT_CHARS, parse_storage_key, storage_key

ORIGIN = "origin"


class OriginTier(ThreadedTier):
    """The block files of one opened bank, by storage name; read-only."""

    read_only = True

    def __init__(self, bank: Bank, *, name: str = ORIGIN, concurrency: int = 8) -> None:
        super().__init__(name, concurrency=concurrency)
        self.bank = bank

    def _file(self, name: str) -> Path | None:
        """The block file a storage name stands for, if it names a block of this build."""
        parsed = parse_storage_key(name)
        if parsed is None:
            return None
        key, content = parsed
        entry = self.bank.manifest.blocks.get(str(key))  # a key holds its bank id
        if entry is None or entry.sha256[:CONTENT_CHARS] != content:
            return None
        return self.bank.path / block_relpath(key.level, key.node)

    def _read(self, key: str, consume: Consume[T]) -> T | None:
        path = self._file(key)
        if path is None:
            return None
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.read()  # unbuffered: read(-1) loops until the end of the file
        except FileNotFoundError:
            return None
        return consume(memoryview(data))

    def _contains(self, key: str) -> bool:
        path = self._file(key)
        return path is not None and path.is_file()

    def _scan(self) -> Iterator[tuple[str, int]]:
        sizes: dict[int, dict[str, int]] = {}  # level -> file name -> size: one listing a level
        for key in self.bank.block_keys():
            if key.level not in sizes:
                directory = self.bank.path / BLOCKS_DIR / f"L{key.level}"
                try:
                    sizes[key.level] = {
                        e.name: e.stat().st_size for e in os.scandir(directory) if e.is_file()
                    }
                except FileNotFoundError:
                    sizes[key.level] = {}
            size = sizes[key.level].get(f"{key.node}{SUFFIX}")
            if size is not None:
                yield storage_key(key, self.bank.manifest.blocks[str(key)].sha256), size

    def _refuse(self) -> TierUnavailableError:
        return TierUnavailableError(self.name, "the bank directory is read-only; it is the origin")

    def _put(self, key: str, data: Buffer) -> None:
        raise self._refuse()

    def _delete(self, key: str) -> bool:
        raise self._refuse()

    async def put(self, key: str, data: Buffer) -> None:
        raise self._refuse()

    async def delete(self, key: str) -> bool:
        raise self._refuse()

    def _close(self) -> None:
        """Nothing to release: every read opens and closes its own file."""


__all__ = ["ORIGIN", "OriginTier"]
