"""The faults of bench.soak, each with a start, an end and a recovery measurement.

- `s3_kill`: moto SIGKILLed, restarted on the same port after `hold_s`. moto keeps objects in
  process memory and has no persistence in server mode, so level 3 is pushed again
  (`push_bank`) before the fault counts as ended: its end is S3 answering with its objects.
- `s3_hang`: moto SIGSTOPped for `hold_s`, then SIGCONTed (the end).
- `corrupt_disk`: bytes flipped in place inside a level-2 copy in the disk tier's directory.
- `corrupt_lmdb`: a level-1 copy overwritten with flipped bytes in an LMDB write transaction,
  from this process (LMDB allows several processes on one environment).

A corrupted block is one on the path of some prompt (`POST /v1/memory/route`), the one most
prompts share that is not corrupt already; its copy is found by listing the tier and parsing
each name (`{bank}/L{level}/{node}.{sha16}`, or `{bank}/L{level}/{node}` from before content
naming). Recovery: from the fault's end until a request on the affected level is answered with
that level from its home tier (not from a replica or the bank directory, which may stand in
while the home is out) and not degraded; for corruption also until the copy's sha256 matches
the manifest again (the server repairing it), each bounded by `recovery_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common.servers import Moto
from bench.soak.load import PROMPTS, completion_body, level_clean
from server.bank import Bank
from server.bank.push import push_bank
from tiers.base import Tier
from tiers.disk import SUFFIX, DiskTier
from tiers.errors import InvalidKeyError, TierError
from tiers.keys import BlockKey, parse_storage_key, storage_key
from tiers.lmdb_tier import LmdbTier
from tiers.s3 import S3Tier

FAULTS = ("s3_kill", "s3_hang", "corrupt_disk", "corrupt_lmdb")
LEVEL_OF = {"s3_kill": 3, "s3_hang": 3, "corrupt_disk": 2, "corrupt_lmdb": 1}
HOME = {1: "flash", 2: "disk", 3: "cloud"}  # each level's home tier, and its only one
FLIPPED = 64  # bytes flipped in the middle of a copy (inside its tensors, past the header)
PROBE_EVERY_S = 0.2


def block_of(name: str) -> BlockKey | None:
    """The block a tier's copy holds, from its name; None for any other name."""
    parsed = parse_storage_key(name)
    if parsed is not None:
        return parsed[0]
    try:
        return BlockKey.parse(name)
    except InvalidKeyError:
        return None


def flip(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + FLIPPED]) + data[mid + FLIPPED :]


@dataclass
class Fault:
    """One fault: when it started and ended, and how the server came back (run-clock seconds)."""

    kind: str
    level: int
    start: float
    end: float | None = None
    target: str = ""  # the copy corrupted, or the S3 server's pid
    node: int | None = None  # the corrupted block's node (None: the whole level is affected)
    prompt: int | None = None  # the prompt the recovery probe sends
    recovered_s: float | None = None  # fault end -> the level answered from its home, clean
    verified_s: float | None = None  # fault end -> the copy's sha256 matches (corruption)
    window_end: float | None = None  # when recovery was measured (or given up)
    notes: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Injector:
    """Injects the faults and measures recovery, with the bench's own handles on the tiers."""

    client: httpx.AsyncClient
    clock: Callable[[], float]
    moto: Moto
    bank: Bank
    tiers: Mapping[str, Tier]  # flash (LMDB), disk, cloud (S3), opened in this process
    routes: Mapping[int, list[int]]  # prompt -> its node id at each level
    hold_s: float
    recovery_s: float
    corrupted: dict[str, BlockKey] = field(default_factory=dict)  # tier:copy -> block, not good
    times: Counter[BlockKey] = field(default_factory=Counter)  # corruptions of each block

    async def run(self, kind: str) -> Fault:
        faults = {
            "s3_kill": self.s3_kill,
            "s3_hang": self.s3_hang,
            "corrupt_disk": self.corrupt_disk,
            "corrupt_lmdb": self.corrupt_lmdb,
        }
        return await faults[kind]()

    # -- the cloud ------------------------------------------------------------------------------

    async def s3_kill(self) -> Fault:
        fault = Fault("s3_kill", 3, self.clock(), target=f"moto pid {self.moto.pid}")
        fault.prompt = 0
        self.moto.kill()
        await asyncio.sleep(self.hold_s)
        restarted = time.perf_counter()
        self.moto.start()
        await asyncio.to_thread(self.moto.wait_ready)
        fault.notes["restart_s"] = round(time.perf_counter() - restarted, 3)
        pushed = time.perf_counter()
        cloud = self.tiers["cloud"]
        assert isinstance(cloud, S3Tier)
        await cloud.create_bucket()
        report = await push_bank(
            self.bank, {"cloud": cloud}, {3: ["cloud"]}, progress=False, some_levels=True
        )
        fault.notes["repush_s"] = round(time.perf_counter() - pushed, 3)
        fault.notes["repushed_blocks"] = sum(t.written for t in report.tiers.values())
        fault.target += f"; up again in {fault.notes['restart_s']:.1f} s, "
        fault.target += f"level 3 pushed again in {fault.notes['repush_s']:.1f} s"
        fault.end = self.clock()
        await self._recover(fault)
        return fault

    async def s3_hang(self) -> Fault:
        fault = Fault("s3_hang", 3, self.clock(), target=f"moto pid {self.moto.pid}")
        fault.prompt = 0
        self.moto.pause()
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.moto.resume()
        fault.end = self.clock()
        await self._recover(fault)
        return fault

    # -- corruption -----------------------------------------------------------------------------

    def _pick(self, level: int) -> tuple[int, int] | None:
        """(node, prompt): a node of `level` on some prompt's path that is not corrupt now, the
        one corrupted least often so far, then the one most prompts share."""
        bad = {k.node for k in self.corrupted.values() if k.level == level}
        users = Counter(
            path[level - 1] for path in self.routes.values() if path[level - 1] not in bad
        )
        if not users:
            return None
        bank = self.bank.manifest.bank_id
        node = min(users, key=lambda n: (self.times[BlockKey(bank, level, n)], -users[n], n))
        prompt = min(p for p, path in self.routes.items() if path[level - 1] == node)
        return node, prompt

    async def _copy_name(self, tier: Tier, key: BlockKey) -> str | None:
        """The tier's copy of `key`: the one named after this build's content if listed."""
        names = sorted(name for name, _ in await tier.scan() if block_of(name) == key)
        current = storage_key(key, self.bank.manifest.blocks[str(key)].sha256)
        return current if current in names else (names[0] if names else None)

    async def _corrupt(self, kind: str, tier_name: str) -> Fault:
        level = LEVEL_OF[kind]
        fault = Fault(kind, level, self.clock())
        pick = self._pick(level)
        if pick is None:
            fault.skipped = f"every level-{level} block on the prompts' paths is corrupt already"
            fault.end = fault.window_end = self.clock()
            return fault
        fault.node, fault.prompt = pick
        key = BlockKey(self.bank.manifest.bank_id, level, fault.node)
        tier = self.tiers[tier_name]
        name = await self._copy_name(tier, key)
        if name is None:
            fault.skipped = f"no copy of {key} in tier {tier_name!r}"
            fault.end = fault.window_end = self.clock()
            return fault
        fault.target = f"{tier_name}:{name}"
        if isinstance(tier, DiskTier):
            await asyncio.to_thread(_flip_file, tier.root / f"{name}{SUFFIX}")
        else:
            assert isinstance(tier, LmdbTier)
            data = await tier.get(name)
            assert data is not None, f"{name} vanished from {tier_name}"
            await tier.put(name, flip(data))
        self.corrupted[fault.target] = key
        self.times[key] += 1
        fault.start = fault.end = self.clock()
        await asyncio.gather(self._recover(fault), self._verify(fault, tier, name, key))
        if fault.verified_s is not None:
            del self.corrupted[fault.target]
        return fault

    async def corrupt_disk(self) -> Fault:
        return await self._corrupt("corrupt_disk", "disk")

    async def corrupt_lmdb(self) -> Fault:
        return await self._corrupt("corrupt_lmdb", "flash")

    # -- recovery -------------------------------------------------------------------------------

    async def _recover(self, fault: Fault) -> None:
        """Probe with the fault's prompt until its level is served from its home, not degraded."""
        assert fault.end is not None
        assert fault.prompt is not None
        body = completion_body(PROMPTS[fault.prompt]) | {"max_tokens": 1}
        deadline = fault.end + self.recovery_s
        served: Counter[str] = Counter()  # which tier served the level to each probe
        fault.notes["probes_served_by"] = served
        for _ in range(int(self.recovery_s / PROBE_EVERY_S) + 1):
            with contextlib.suppress(httpx.HTTPError):
                r = await self.client.post("/v1/completions", json=body)
                memory = r.json().get("memory") if r.status_code == 200 else None
                tier = level_clean(memory, fault.level)
                served[tier or f"none ({r.status_code})"] += 1
                if tier == HOME[fault.level]:
                    fault.recovered_s = round(self.clock() - fault.end, 3)
                    break
            if self.clock() > deadline:
                break
            await asyncio.sleep(PROBE_EVERY_S)
        fault.window_end = max(fault.window_end or 0.0, self.clock())

    async def _verify(self, fault: Fault, tier: Tier, name: str, key: BlockKey) -> None:
        """Read the copy back until its sha256 matches the manifest (the server repaired it)."""
        assert fault.end is not None
        entry = self.bank.manifest.blocks[str(key)]
        deadline = fault.end + self.recovery_s
        for _ in range(int(self.recovery_s / PROBE_EVERY_S) + 1):
            with contextlib.suppress(TierError):
                got = await tier.read(name, lambda v: (v.nbytes, hashlib.sha256(v).hexdigest()))
                if got == (entry.bytes, entry.sha256):
                    fault.verified_s = round(self.clock() - fault.end, 3)
                    break
            if self.clock() > deadline:
                break
            await asyncio.sleep(PROBE_EVERY_S)
        fault.window_end = max(fault.window_end or 0.0, self.clock())


def _flip_file(path: Path) -> None:
    """Flip bytes in place, as bit rot would: same file, same size, no rename."""
    with path.open("r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2)
        chunk = f.read(FLIPPED)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
