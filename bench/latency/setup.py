"""The two banks of bench.latency, the tiers they live on, and the cases that profile them.

`write_banks` writes the hierarchical and the flat bank with `write_random_bank` (the same bytes
per prompt); `hier_placement` puts their levels on flash, the external disk and the cloud; `Env`
says where this run's tiers live (a temporary directory, moto's S3 server) and builds store
configs; `write_profiles` writes the device profiles, each also scaled down to our fetch size.
A `Case` names the device profile of each tier (or none: the real tier).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.servers import MOTO_KEY_ID, MOTO_SECRET
from server.bank import Bank, write_random_bank
from server.bank.layout import DTYPE_ITEMSIZE, ModelShape, payload_bytes
from server.bank.push import push_bank
from tiers import DeviceProfile, StoreConfig, open_tier
from tiers.s3 import S3Tier

PAPER_FETCH = 39e9 / 16 + 155e9 / 256 + 618e9 / 4096  # 3.194 GB: docs/paper.md §5
SEED = {"flash": "seed-flash", "disk": "seed-external-disk", "cloud": "seed-cloud"}
BUCKET = "hmem-latency"
# Blocks are FFN memories of this anchor shape; widths set their bytes.
SHAPE = ModelShape(
    n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, head_dim=64, intermediate_size=1024
)
DEMO_SHAPE = ModelShape(
    n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=192
)


@dataclass(frozen=True)
class Case:
    title: str
    profiles: Mapping[str, str | None]  # tier -> device profile; None: the real tier
    one_disk: bool = False  # every level of both banks on the external disk

    @property
    def emulated(self) -> bool:
        return all(p is not None for p in self.profiles.values())


CASES = {
    "seed": Case("seed devices (paper Fig. 5, reduced scale)", dict(SEED)),
    "seed-cloud-20ms": Case(
        "seed devices, cloud with a 20 ms first byte", SEED | {"cloud": "seed-cloud-20ms"}
    ),
    "seed-one-disk": Case("both banks on the seed external disk (Fig. 5 right)", dict(SEED), True),
    "real": Case("this machine's tiers (calibrated)", dict.fromkeys(SEED)),
}


@dataclass
class Banks:
    hier: Bank
    flat: Bank

    @staticmethod
    def block_bytes(bank: Bank, level: int) -> int:
        """Bytes of one stored block of `level` (safetensors header included)."""
        return bank.manifest.blocks[str(bank.manifest.block_key(level, 0))].bytes

    @staticmethod
    def payload(bank: Bank, level: int) -> int:
        """Decoded bytes of one block of `level`: what it costs the RAM cache."""
        return payload_bytes(bank.manifest.block_shapes(level), bank.manifest.dtype)

    @property
    def fetch_bytes(self) -> int:
        return sum(self.block_bytes(self.hier, lv) for lv in self.hier.manifest.memory_levels())

    def describe(self) -> dict[str, Any]:
        keep = ("bank_id", "levels", "branching", "widths", "dtype")
        return {
            name: {k: getattr(b.manifest, k) for k in keep}
            | {
                "bank_bytes": b.manifest.bank_bytes(),
                "block_bytes": [self.block_bytes(b, lv) for lv in b.manifest.memory_levels()],
            }
            for name, b in (("hier", self.hier), ("flat", self.flat))
        }


def write_banks(
    root: Path,
    fetch: int,
    args: argparse.Namespace,
    *,
    shape: ModelShape,
    dtype: str,
    anchor: Path | None = None,
) -> Banks:
    """Widths 4x per level up, adding up to about `fetch` bytes per path; the flat bank's one
    width is their sum, so both fetch the same bytes."""
    L, b = args.levels, args.branching
    per_r = 3 * shape.n_layers * shape.d_model * DTYPE_ITEMSIZE[dtype]  # gate, up, down
    deepest = max(1, round(fetch / (per_r * sum(4**k for k in range(L)))))
    widths = [deepest * 4 ** (L - level) for level in range(1, L + 1)]
    common: dict[str, Any] = {
        "model": shape,
        "dtype": dtype,
        "seed": args.seed,
        "anchor_dir": anchor,
        "overwrite": True,
    }
    write_random_bank(root / "hier", bank_id="hier", levels=L, branching=b, widths=widths, **common)
    write_random_bank(
        root / "flat", bank_id="flat", levels=1, branching=b**L, widths=[sum(widths)], **common
    )
    need = anchor is not None
    return Banks(*(Bank.open(root / n, require_anchor=need) for n in ("hier", "flat")))


def hier_placement(levels: int, one_disk: bool = False) -> dict[int, str]:
    """Level 1 on flash, the deepest level (of 3 or more) in the cloud, the rest on the disk."""
    place = dict.fromkeys(range(1, levels + 1), "disk")
    if not one_disk:
        place[1] = "flash"
        if levels >= 3:
            place[levels] = "cloud"
    return place


@dataclass
class Env:
    """Where this run's tiers live, and its device profiles file."""

    work: Path
    endpoint: str

    @property
    def profiles_file(self) -> Path:
        return self.work / "profiles.toml"

    def tier(self, kind: str, where: str, profile: str | None) -> dict[str, Any]:
        if kind == "flash":
            return {
                "kind": "lmdb",
                "path": self.work / f"{where}.lmdb",
                "sync": False,
                "profile": profile,
            }
        if kind == "disk":
            return {"kind": "disk", "root": self.work / where, "fsync": False, "profile": profile}
        return {
            "kind": "s3",
            "bucket": BUCKET,
            "prefix": f"{where}/",
            "endpoint_url": self.endpoint,
            "region": "us-east-1",
            "access_key_id": MOTO_KEY_ID,
            "secret_access_key": MOTO_SECRET,
            "profile": profile,
        }

    def config(
        self,
        tiers: dict[str, Any],
        place: dict[int, str],
        *,
        ram: int,
        pin: Sequence[int] = (),
        profiles_file: Path | None = None,
    ) -> StoreConfig:
        pf = profiles_file or self.profiles_file
        fields = {"tiers": tiers, "placement": place, "ram_cache": ram, "pin_levels": list(pin)}
        return StoreConfig.model_validate(fields | {"profiles_file": pf, "deadline_s": 30.0})


async def push(bank: Bank, config: StoreConfig) -> None:
    tiers = {name: open_tier(name, t) for name, t in config.tiers.items()}
    try:
        for tier in tiers.values():
            if isinstance(tier, S3Tier):
                await tier.create_bucket()
        await push_bank(bank, tiers, config.placement, progress=False)
    finally:
        for tier in tiers.values():
            await tier.aclose()


def write_profiles(path: Path, profiles: dict[str, DeviceProfile], scale: float) -> None:
    """Every profile under its name, and as `NAME@scaled` with its bandwidth / `scale` (TOML)."""
    lines = [f"# bench.latency: NAME@scaled is NAME with its bandwidth / {scale:.6g}\n"]
    for name, p in profiles.items():
        for out_name, div in ((name, 1.0), (f"{name}@scaled", scale)):
            lines.append(f'["{out_name}"]\nlatency_ms = {p.latency_s * 1e3!r}')
            if p.bandwidth_bytes_s != float("inf"):
                lines.append(f"bandwidth_mb_s = {p.bandwidth_bytes_s / 1e6 / div!r}")
            note = f"{p.source} (bandwidth / {div:.6g}: same time at reduced scale)"
            lines.append(f"source = {json.dumps(note if div != 1.0 else p.source)}\n")
    path.write_text("\n".join(lines))
