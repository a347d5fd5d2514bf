"""The embedded default: what `hmem serve` serves, and where, when nothing is configured.

- The bank: the demo bank shipped inside the package (`server/demo_bank`, built by `hmem demo`
  with fixed seeds; every block is checked against its manifest sha256 on every read).
- The tiers, under the data directory: level 1 on flash (LMDB), deeper levels on disk (one file
  per block), and the deepest level on S3-compatible cloud storage when `cloud_endpoint` is set
  (bucket `cloud_bucket`, prefix the bank id). Level 1 is pinned in RAM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from server.bank.manifest import BankManifest
from server.settings import Settings
from tiers import StoreConfig

DEMO_BANK = Path(__file__).resolve().parent / "demo_bank"


def default_data_dir() -> Path:
    """$HMEM_DATA_DIR, else $XDG_DATA_HOME/hmem, else ~/.local/share/hmem."""
    if env := os.environ.get("HMEM_DATA_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "hmem"


def data_dir(settings: Settings) -> Path:
    return settings.data_dir if settings.data_dir is not None else default_data_dir()


def bank_dir(settings: Settings) -> Path:
    """The bank to serve: the settings' bank, else the packaged demo bank."""
    return settings.bank if settings.bank is not None else DEMO_BANK


def blocklist_file(settings: Settings, *, bank_id: str, fingerprint: str) -> Path:
    """The settings' `blocklist_file`, else this bank build's own file under the data directory.

    `DATA_DIR/blocklists/{bank_id}-{fingerprint}.json`: banks served one after the other from
    one data directory, and rebuilds of one bank, never share a blocklist.
    """
    if settings.blocklist_file is not None:
        return settings.blocklist_file
    return data_dir(settings) / "blocklists" / f"{bank_id}-{fingerprint}.json"


def legacy_blocklist_file(settings: Settings) -> Path | None:
    """Where blocklists were kept before they were per bank, when no file is configured."""
    if settings.blocklist_file is not None:
        return None
    return data_dir(settings) / "blocklist.json"


def embedded_store_config(settings: Settings, manifest: BankManifest) -> StoreConfig:
    """Flash for level 1, disk below it, the cloud for the deepest level when configured."""
    root = data_dir(settings) / "tiers"
    levels = manifest.memory_levels() or [1]
    deepest = max(levels)
    tiers: dict[str, dict[str, Any]] = {
        "flash": {"kind": "lmdb", "path": root / "flash.lmdb"},
        "disk": {"kind": "disk", "root": root / "disk"},
    }
    cloud = settings.cloud_endpoint is not None and deepest > 1
    if cloud:
        tiers["cloud"] = {
            "kind": "s3",
            "bucket": settings.cloud_bucket,
            "prefix": manifest.bank_id,
            "endpoint_url": settings.cloud_endpoint,
        }
    placement: dict[int, list[str]] = {}
    for level in levels:
        if level == 1:
            placement[level] = ["flash"]
        elif level == deepest and cloud:
            placement[level] = ["cloud"]
        else:
            placement[level] = ["disk"]
    return StoreConfig.model_validate(
        {"tiers": tiers, "placement": placement, "pin_levels": [1] if 1 in levels else []}
    )


def store_config(settings: Settings, manifest: BankManifest) -> tuple[StoreConfig, bool]:
    """The configured store, or the embedded default; True when it is the embedded default."""
    if settings.store is not None:
        return settings.store, False
    return embedded_store_config(settings, manifest), True
