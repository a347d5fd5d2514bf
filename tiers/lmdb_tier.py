"""`LmdbTier`: the flash tier, one LMDB environment holding blocks by key.

LMDB maps the database into memory, so a read is a pointer into the page cache: `read` hands
`consume` a view of the mapped bytes inside the read transaction (no copy at all), and the view
is released when the transaction ends, before the call returns. Only `get` copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lmdb

from tiers.base import Buffer, Consume, T, ThreadedTier
from tiers.errors import TierFullError, TierUnavailableError

DEFAULT_MAP_SIZE = 64 << 30  # virtual address space only; the file grows as blocks are written


class LmdbTier(ThreadedTier):
    """Blocks in one LMDB environment (a directory with `data.mdb` and `lock.mdb`)."""

    backend_errors = (lmdb.Error,)

    def __init__(
        self,
        path: str | Path,
        *,
        name: str = "flash",
        map_size: int = DEFAULT_MAP_SIZE,
        concurrency: int = 8,
        readonly: bool = False,
        sync: bool = True,
    ) -> None:
        super().__init__(name, concurrency=concurrency)
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                subdir=True,
                readonly=readonly,
                max_readers=max(126, concurrency * 2),
                # Blocks are read whole and at random; OS readahead would waste flash bandwidth.
                readahead=False,
                sync=sync,
                metasync=sync,
                lock=True,
            )
        except lmdb.Error as exc:
            raise TierUnavailableError(name, f"cannot open LMDB environment: {exc}") from exc

    def _read(self, key: str, consume: Consume[T]) -> T | None:
        with self._env.begin(buffers=True) as txn:
            buf = txn.get(key.encode())
            if buf is None:
                return None
            view = memoryview(buf)
            try:
                return consume(view)
            finally:
                view.release()

    def _put(self, key: str, data: Buffer) -> None:
        try:
            with self._env.begin(write=True) as txn:
                txn.put(key.encode(), data)
        except lmdb.MapFullError as exc:
            raise TierFullError(self.name, "LMDB map is full; raise map_size") from exc

    def _contains(self, key: str) -> bool:
        with self._env.begin(buffers=True) as txn:
            return txn.get(key.encode()) is not None

    def _delete(self, key: str) -> bool:
        with self._env.begin(write=True) as txn:
            return bool(txn.delete(key.encode()))

    def _scan(self) -> Iterator[tuple[str, int]]:
        with self._env.begin(buffers=True) as txn, txn.cursor() as cur:
            for k, v in cur:
                yield bytes(k).decode(), len(v)

    def _close(self) -> None:
        self._env.close()
