"""Blocked clusters: persisted, reloaded at start, and checked before any block is fetched.

Blocking the cluster `(level, node)` blocks its block and every block below it in the tree (its
subtree), as the paper blocks "the best-matching level-1 subtree". A path's block at level l is
blocked when the path's node at any level <= l is. The file is JSON, written atomically (a temp
file, fsync, rename, fsync of the directory), so a crash leaves the old list or the new one,
never half of either. A change is read-modify-write under an flock on a lock file beside it
(`.NAME.lock`): two processes serving one bank build (two servers, or replicas on one machine)
each add to the list as the file holds it, and neither loses the other's entries.

A blocklist belongs to one bank build: cluster (1, 2) of one build is not that of another. The
file records the bank id and the build's fingerprint (`Bank.fingerprint`), and a blocklist opened
for a bank refuses a file that names another bank or build, or none (version 1 files, written
before blocklists were tied to their bank).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tiers.disk import fsync_dir

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: records bank_id and fingerprint; 1 recorded no bank
_legacy_warned: set[Path] = set()  # legacy files already named in a warning by this process


class BlocklistError(ValueError):
    """A cluster outside the bank's tree, or a blocklist file that cannot be used."""


class Blocklist:
    """The set of blocked clusters of one tree (`levels` deep, `branching` wide).

    With `bank_id` (and the build's `fingerprint`), it is that bank's: the file records both, and
    a file recording another bank or build, or none, is refused at load.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        levels: int,
        branching: int,
        bank_id: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.path = path
        self.levels = levels
        self.branching = branching
        self.bank_id = bank_id
        self.fingerprint = fingerprint
        self._blocked: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: Path | None,
        *,
        levels: int,
        branching: int,
        bank_id: str | None = None,
        fingerprint: str | None = None,
    ) -> Blocklist:
        """The persisted list at `path` (an absent file is an empty list)."""
        blocklist = cls(
            path, levels=levels, branching=branching, bank_id=bank_id, fingerprint=fingerprint
        )
        if path is not None:
            blocklist._blocked = blocklist._read()
        return blocklist

    def _read(self) -> set[tuple[int, int]]:
        """The entries the file holds now (none when there is no file)."""
        path = self.path
        if path is None or not path.exists():
            return set()
        try:
            data = json.loads(path.read_text())
            version = data.get("version")
            if version not in (1, FORMAT_VERSION):
                raise BlocklistError(f"version {version!r}, expected {FORMAT_VERSION}")
            entries = [(int(e["level"]), int(e["node"])) for e in data["blocked"]]
            for level, node in entries:
                self.check(level, node)  # a file written for another tree
            owner = (data.get("bank_id"), data.get("fingerprint")) if version != 1 else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BlocklistError(f"blocklist file {path} is not usable: {exc}") from None
        if self.bank_id is not None and owner != (self.bank_id, self.fingerprint):
            raise BlocklistError(self._not_ours(path, owner))
        return set(entries)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Hold the lock file beside the list (no-op without a file): one writer at a time."""
        if self.path is None:
            yield
            return
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.path.parent.parent)  # the new directory's entry, before a file in it
        fd = os.open(self.path.parent / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _not_ours(self, path: Path, owner: tuple[object, object] | None) -> str:
        this = f"bank {self.bank_id!r} build {self.fingerprint}"
        if owner is None:
            whose = "records no bank (written by an hmem before blocklists were per bank)"
        else:
            whose = f"belongs to bank {owner[0]!r} build {owner[1]}"
        return (
            f"blocklist file {path} {whose}, not to the served {this}: set blocklist_file to "
            "this bank's own file, or leave it unset (each bank build then has its own under "
            "DATA_DIR/blocklists); block the clusters again on this build if they still apply"
        )

    def check(self, level: int, node: int) -> None:
        """Raise `BlocklistError` unless (level, node) is a cluster of this tree."""
        if not 1 <= level <= self.levels:
            raise BlocklistError(f"level must be in 1..{self.levels}, got {level}")
        n = self.branching**level
        if not 0 <= node < n:
            raise BlocklistError(f"node of level {level} must be in 0..{n - 1}, got {node}")

    def entries(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._blocked)

    def block(self, level: int, node: int) -> bool:
        """Block a cluster and its subtree and persist; False if it was already blocked."""
        return self._change(level, node, add=True)

    def unblock(self, level: int, node: int) -> bool:
        """Unblock a cluster (not blocks blocked through an ancestor); False if it was not."""
        return self._change(level, node, add=False)

    def _change(self, level: int, node: int, *, add: bool) -> bool:
        self.check(level, node)
        with self._lock, self._file_lock():
            current = self._read() if self.path is not None else set(self._blocked)
            self._blocked = current  # what other processes wrote, taken in as well
            if ((level, node) in current) == add:
                return False
            updated = set(current)
            if add:
                updated.add((level, node))
            else:
                updated.discard((level, node))
            self._save(updated)  # persisted before it takes effect: a crash never loses a block
            self._blocked = updated
            return True

    def blocked_levels(self, node_ids: Sequence[int]) -> list[int]:
        """The levels of a path (node ids, level 1 first) whose block is blocked."""
        with self._lock:
            blocked = self._blocked
        out: list[int] = []
        through_ancestor = False
        for level, node in enumerate(node_ids, start=1):
            through_ancestor = through_ancestor or (level, node) in blocked
            if through_ancestor:
                out.append(level)
        return out

    def covers(self, level: int, node: int) -> bool:
        """Is the block (level, node) blocked, itself or through an ancestor?"""
        with self._lock:
            blocked = self._blocked
        for up in range(level, 0, -1):
            if (up, node) in blocked:
                return True
            node //= self.branching
        return False

    def covered(self, keys: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Those of `keys` (level, node) that are blocked."""
        return [k for k in keys if self.covers(*k)]

    def _save(self, blocked: set[tuple[int, int]]) -> None:
        if self.path is None:
            return
        body = {
            "version": FORMAT_VERSION,
            "bank_id": self.bank_id,
            "fingerprint": self.fingerprint,
            "blocked": [{"level": level, "node": node} for level, node in sorted(blocked)],
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)


def warn_legacy_file(path: Path) -> None:
    """Say once per process that a blocklist file recording no bank is applied to none."""
    if path in _legacy_warned or not path.is_file():
        return
    _legacy_warned.add(path)
    log.warning(
        "blocklist file %s records no bank (written before blocklists were per bank build): it "
        "is not applied. Each bank build now keeps its own list under %s; block its clusters "
        "again there (POST /v1/memory/block), then delete %s",
        path,
        path.parent / "blocklists",
        path,
    )
