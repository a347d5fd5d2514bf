"""`DiskTier`: one file per block under a root directory.

Reads are a single `os.pread` of the whole file on a worker thread (measured in
`docs/results.md`: `aiofiles` open + read of 1 MiB costs 2.3x a threaded `os.pread`, 8.5x an
inline one). Writes are atomic: a temp
file in the same directory, `fsync`, `os.replace`, then `fsync` of the directory, so a crash
leaves either the old block, the new block, or a stray temp file that the next open removes,
never a torn block under a real key.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tiers.base import Buffer, Consume, T, ThreadedTier
from tiers.errors import TierFullError

SUFFIX = ".blk"
_TMP_PREFIX = ".tmp-"
# A temp file younger than this may belong to a writer in another process (a bank push).
_STALE_TEMP_S = 600.0


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (the directory entry, not only the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskTier(ThreadedTier):
    """Blocks as files `root/<key>.blk`; key segments become directories."""

    def __init__(
        self,
        root: str | Path,
        *,
        name: str = "disk",
        concurrency: int = 8,
        fsync: bool = True,
    ) -> None:
        super().__init__(name, concurrency=concurrency)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._remove_stale_temp_files()

    def _path(self, key: str) -> Path:
        # The key was validated (no '..', no absolute paths), so this stays under root.
        return self.root / (key + SUFFIX)

    def _read(self, key: str, consume: Consume[T]) -> T | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
            if len(data) < size:  # short read (signals, network file systems): finish it
                rest = bytearray(data)
                while len(rest) < size:
                    chunk = os.pread(fd, size - len(rest), len(rest))
                    if not chunk:
                        break
                    rest += chunk
                data = bytes(rest)
        finally:
            os.close(fd)
        return consume(memoryview(data))

    def _put(self, key: str, data: Buffer) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self._fsync:
                fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFullError(self.name, "no space left on device") from exc
            raise

    def _contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def _delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def _scan(self) -> Iterator[tuple[str, int]]:
        for dirpath, _dirs, files in os.walk(self.root):
            for fname in files:
                if fname.endswith(SUFFIX) and not fname.startswith(_TMP_PREFIX):
                    full = os.path.join(dirpath, fname)
                    rel = os.path.relpath(full, self.root)[: -len(SUFFIX)]
                    yield rel.replace(os.sep, "/"), os.stat(full).st_size

    def _remove_stale_temp_files(self) -> None:
        """Old temp files were left by a crash mid-write: no block is lost by removing them."""
        cutoff = time.time() - _STALE_TEMP_S
        for dirpath, _dirs, files in os.walk(self.root):
            for fname in files:
                tmp = Path(dirpath, fname)
                with contextlib.suppress(FileNotFoundError):
                    if fname.startswith(_TMP_PREFIX) and tmp.stat().st_mtime < cutoff:
                        tmp.unlink()

    def _close(self) -> None:
        """Nothing to release: every call opens and closes its own file."""
