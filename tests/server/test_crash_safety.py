"""`kill -9` in the middle of `hmem bank push` and of a blocklist change, for real.

A subprocess pushes a bank to a disk tier or an LMDB tier, or blocks clusters one after another,
and is killed with SIGKILL once the tier (or its output) shows it is part way. What it leaves must
never be used half-written: after a push, every copy in the tier is whole (missing ones are just
missing) and a second push completes the bank; after a blocklist change, the file loads and holds
one of the lists that were written.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest

from server.bank import Bank, write_random_bank
from server.bank.placement import placement_from_flags
from server.bank.push import VerifyReport, verify_bank
from server.engine.blocklist import Blocklist
from tiers import StoreConfig, open_tier

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LEVELS, BRANCHING = 3, 8
N_BLOCKS = 8 + 64 + 512
KILL_AFTER = 40  # copies seen in the tier before the push is killed
POLL_S = 0.002
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Bank:
    """584 blocks of 48 KiB: long enough to push (fsync per copy) that a kill lands part way."""
    out = tmp_path_factory.mktemp("crash") / "bank"
    write_random_bank(out, levels=LEVELS, branching=BRANCHING, widths=(64, 64, 64))
    return Bank.open(out, require_anchor=False)


def hmem(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]


def disk_count(root: Path) -> Callable[[], int]:
    def count() -> int:
        return sum(
            1 for _, _, files in os.walk(root) for f in files if f.endswith(".blk")
        )  # temp files are named .tmp-*, without the suffix

    return count


class LmdbCount:
    """Entries in an LMDB environment another process is writing (read-only, its own reader)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env: lmdb.Environment | None = None

    def __call__(self) -> int:
        if self.env is None:
            if not (self.path / "data.mdb").exists():
                return 0
            self.env = lmdb.open(str(self.path), readonly=True, lock=True, subdir=True)
        return int(self.env.stat()["entries"])

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


def kill_part_way(proc: subprocess.Popen[bytes], seen: Callable[[], int], at_least: int) -> int:
    """SIGKILL `proc` once `seen()` reaches `at_least`; what `seen()` was just before."""
    deadline = time.monotonic() + TIMEOUT_S
    while (n := seen()) < at_least:
        if proc.poll() is not None:
            pytest.fail(f"the subprocess ended (exit {proc.returncode}) before it could be killed")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the subprocess made no progress in {TIMEOUT_S} s")
        time.sleep(POLL_S)  # a test watching another process: nothing to await
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    return n


@pytest.mark.parametrize("kind", ["disk", "lmdb"])
def test_a_push_killed_part_way_leaves_whole_copies_and_the_next_push_completes(
    bank: Bank, tmp_path: Path, kind: str
) -> None:
    place = tmp_path / kind
    uri = f"lmdb:{place}" if kind == "lmdb" else str(place)
    flags = [f"{level}={uri}" for level in range(1, LEVELS + 1)]
    tier_args = [arg for flag in flags for arg in ("--tier", flag)]
    push = hmem("bank", "push", str(bank.path), *tier_args, "--no-progress", "--concurrency", "2")
    lmdb_seen = LmdbCount(place)
    seen = lmdb_seen if kind == "lmdb" else disk_count(place)
    try:
        with subprocess.Popen(push, cwd=REPO, stdout=subprocess.DEVNULL) as proc:
            kill_part_way(proc, seen, KILL_AFTER)
    finally:
        lmdb_seen.close()

    config = placement_from_flags(flags, bank_id="tiny", levels=LEVELS)
    before = asyncio.run(verify(bank, config))
    missing = sum(len(t.missing) for t in before.tiers.values())
    assert 0 < missing <= N_BLOCKS - KILL_AFTER  # killed part way
    assert all(not t.corrupt for t in before.tiers.values())  # no torn copy under a real name

    done = subprocess.run(push, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert f"{missing} blocks written, 0 repaired" in done.stdout
    assert f"{N_BLOCKS - missing} checked good" in done.stdout
    after = asyncio.run(verify(bank, config))
    assert after.ok
    assert sum(t.ok for t in after.tiers.values()) == N_BLOCKS


async def verify(bank: Bank, config: StoreConfig) -> VerifyReport:
    tiers = {name: open_tier(name, t) for name, t in config.tiers.items()}
    try:
        return await verify_bank(bank, tiers, config.placement, progress=False)
    finally:
        for tier in tiers.values():
            await tier.aclose()


# -- the blocklist --------------------------------------------------------------------------------

BANK_ID, FINGERPRINT = "crash", "0123456789abcdef"
NODES: int = BRANCHING**LEVELS  # level-3 clusters: blocked one by one, then unblocked one by one
BLOCKER = f"""
import sys
from pathlib import Path
from server.engine.blocklist import Blocklist

blocklist = Blocklist.load(
    Path(sys.argv[1]), levels={LEVELS}, branching={BRANCHING},
    bank_id={BANK_ID!r}, fingerprint={FINGERPRINT!r},
)
step = 0
for change in (blocklist.block, blocklist.unblock):
    for node in range({NODES}):
        change({LEVELS}, node)
        step += 1
        print(step, flush=True)
"""


def state_number(entries: list[tuple[int, int]]) -> int:
    """Which of the lists the blocker writes `entries` is: the changes made to reach it."""
    assert all(level == LEVELS for level, _ in entries)
    nodes = [node for _, node in entries]
    k = len(nodes)
    if nodes == list(range(k)):  # blocking: nodes 0 .. k-1 blocked
        return k
    if nodes == list(range(NODES - k, NODES)):  # unblocking: nodes 0 .. NODES-k-1 unblocked
        return 2 * NODES - k
    pytest.fail(f"not a list the blocker wrote: {nodes}")


@pytest.mark.parametrize("kill_after", [1, 25, 300])
def test_a_blocklist_change_killed_part_way_leaves_a_list_that_was_written(
    tmp_path: Path, kill_after: int
) -> None:
    file = tmp_path / "blocklists" / f"{BANK_ID}-{FINGERPRINT}.json"
    blocker = [sys.executable, "-c", BLOCKER, str(file)]
    acknowledged = 0
    with subprocess.Popen(blocker, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # each line: that change is on disk (persisted before it returns)
            acknowledged = int(line)
            if acknowledged >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                break
        assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL

    def load() -> Blocklist:
        return Blocklist.load(
            file, levels=LEVELS, branching=BRANCHING, bank_id=BANK_ID, fingerprint=FINGERPRINT
        )

    state = state_number(load().entries())
    assert state >= acknowledged  # nothing acknowledged is lost
    others = {p.name for p in file.parent.iterdir()} - {file.name}
    assert all(name.startswith(f".{file.name}.") for name in others)  # at most a stray temp file

    # The next run goes on from there.
    assert load().block(1, 0)
    assert (1, 0) in load().entries()
