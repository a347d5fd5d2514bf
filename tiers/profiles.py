"""Device profiles: make any tier behave like flash, an external disk or the cloud.

`ProfiledTier` wraps a tier and holds each read back until `latency + bytes / bandwidth` has
passed since it started. Concurrent reads share the device's bandwidth (one link per wrapped
tier, transfers queued on it), so a burst behaves as on the real device. Time spent in the real
read counts toward the emulated time: a real tier slower than its profile is not slowed further.
Named profiles ship in `profiles.toml` beside this module; users add theirs from a TOML or JSON
file of the same shape.
"""

from __future__ import annotations

import asyncio
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tiers.base import Buffer, Consume, T, Tier, TierWrapper
from tiers.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Per-read latency and sustained bandwidth of a storage device."""

    name: str
    latency_s: float
    bandwidth_bytes_s: float = math.inf
    source: str = ""

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ConfigError(f"profile {self.name!r}: latency must be >= 0")
        if self.bandwidth_bytes_s <= 0:
            raise ConfigError(f"profile {self.name!r}: bandwidth must be > 0")

    def transfer_s(self, nbytes: int) -> float:
        """The analytic time of one read of `nbytes` on an idle device."""
        return self.latency_s + nbytes / self.bandwidth_bytes_s


def _profile_from_mapping(name: str, spec: Mapping[str, Any]) -> DeviceProfile:
    unknown = set(spec) - {"latency_ms", "bandwidth_mb_s", "source"}
    if unknown:
        raise ConfigError(f"profile {name!r}: unknown fields {sorted(unknown)}")
    if "latency_ms" not in spec:
        raise ConfigError(f"profile {name!r}: latency_ms is required")
    try:
        latency_ms = float(spec["latency_ms"])
        bandwidth = float(spec.get("bandwidth_mb_s", math.inf))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"profile {name!r}: latency_ms and bandwidth_mb_s must be numbers"
        ) from exc
    return DeviceProfile(name, latency_ms / 1e3, bandwidth * 1e6, str(spec.get("source", "")))


def parse_profiles(data: Mapping[str, Any]) -> dict[str, DeviceProfile]:
    """Profiles from `{name: {latency_ms, bandwidth_mb_s (MB = 10^6 bytes), source}}`."""
    out: dict[str, DeviceProfile] = {}
    for name, spec in data.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"profile {name!r}: expected a table of fields")
        out[name] = _profile_from_mapping(name, spec)
    return out


def builtin_profiles() -> dict[str, DeviceProfile]:
    text = resources.files("tiers").joinpath("profiles.toml").read_text()
    return parse_profiles(tomllib.loads(text))


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """The built-in profiles, overridden and extended by those in `path` (TOML or JSON)."""
    profiles = builtin_profiles()
    if path is None:
        return profiles
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read profiles file {p.name!r}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"profiles file {p.name!r} is not valid: {exc}") from exc
    profiles.update(parse_profiles(data))
    return profiles


class ProfiledTier(TierWrapper):
    """A tier that answers no faster than `profile` allows."""

    def __init__(self, inner: Tier, profile: DeviceProfile) -> None:
        super().__init__(inner)
        self.profile = profile
        self._link_free_at = 0.0  # loop time when the emulated link finishes queued transfers

    async def _hold(self, started: float, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        transfer = nbytes / self.profile.bandwidth_bytes_s
        start = max(started, self._link_free_at)
        self._link_free_at = start + transfer
        wait = start + transfer + self.profile.latency_s - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def read(self, key: str, consume: Consume[T]) -> T | None:
        started = asyncio.get_running_loop().time()
        sizes: list[int] = []

        def measured(view: memoryview) -> T:
            sizes.append(len(view))
            return consume(view)

        result = await self.inner.read(key, measured)
        await self._hold(started, sizes[0] if sizes else 0)
        return result

    async def put(self, key: str, data: Buffer) -> None:
        started = asyncio.get_running_loop().time()
        await self.inner.put(key, data)
        await self._hold(started, memoryview(data).nbytes)

    async def contains(self, key: str) -> bool:
        started = asyncio.get_running_loop().time()
        found = await self.inner.contains(key)
        await self._hold(started, 0)
        return found
