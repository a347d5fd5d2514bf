"""Settings of the storage hierarchy, validated up front, and the factory that builds it.

`StoreConfig` is what a deployment writes (in the server's settings file or `HMEM_STORE__*`
environment variables): the tiers by name, where each level lives, which tiers are caches with
a byte cap, the RAM budget, deadlines and breaker settings. Every mistake is reported with the
field to fix before anything is opened. `tier_from_uri` turns the short forms a CLI takes
(`lmdb:PATH`, a directory, `s3://bucket/prefix`) into tier settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, model_validator

from tiers.base import Tier
from tiers.cache import BlockCache
from tiers.capped import CappedTier
from tiers.disk import DiskTier
from tiers.errors import ConfigError
from tiers.lmdb_tier import DEFAULT_MAP_SIZE, LmdbTier
from tiers.metrics import StoreMetrics
from tiers.profiles import ProfiledTier, load_profiles
from tiers.s3 import AddressingStyle, S3Tier
from tiers.store import BlockCodec, BlockDigest, StoredBlock, StorePolicy, TieredStore

V = TypeVar("V")


class _TierSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: int = Field(8, ge=1, le=512, description="blocking calls in flight at once")
    profile: str | None = Field(None, description="device profile to emulate (bench, testing)")
    cap: ByteSize | None = Field(None, description="byte cap; only for tiers listed as caches")


class LmdbTierSettings(_TierSettings):
    kind: Literal["lmdb"] = "lmdb"
    path: Path
    map_size: ByteSize = ByteSize(DEFAULT_MAP_SIZE)
    sync: bool = True


class DiskTierSettings(_TierSettings):
    kind: Literal["disk"] = "disk"
    root: Path
    fsync: bool = True


class S3TierSettings(_TierSettings):
    kind: Literal["s3"] = "s3"
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: AddressingStyle = "path"
    access_key_id: SecretStr | None = None  # None: boto3's chain (AWS_* environment, profile)
    secret_access_key: SecretStr | None = None
    concurrency: int = Field(16, ge=1, le=512)
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=10)


TierSettings = Annotated[
    LmdbTierSettings | DiskTierSettings | S3TierSettings, Field(discriminator="kind")
]


class StoreConfig(BaseModel):
    """Where blocks live and how they are fetched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tiers: dict[str, TierSettings]
    placement: dict[int, list[str]] = Field(description="level -> [home tier, replicas...]")
    cache_tiers: list[str] = Field(default_factory=list, description="capped tiers read first")
    ram_cache: ByteSize = ByteSize(1 << 30)
    pin_levels: list[int] = Field(default_factory=list)
    level_weights: dict[int, float] = Field(default_factory=dict)
    deadline_s: float = Field(2.0, gt=0)
    tier_timeout_s: float | None = Field(None, gt=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_reset_s: float = Field(5.0, gt=0)
    failure_ttl_s: float = Field(2.0, ge=0)
    promote: bool = True
    # A read pending this long starts the next tier of its chain beside it: seconds, "auto"
    # (a quarter of deadline_s), or "off" (TOML has no null).
    hedge_after_s: float | Literal["auto", "off"] | None = "auto"
    # A tier read still running when its caller's deadline passes counts against its breaker.
    count_deadline_misses: bool = True
    profiles_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _placement_lists(cls, data: Any) -> Any:
        # Accept `placement: {1: "flash"}` as shorthand for `{1: ["flash"]}`.
        if isinstance(data, dict) and isinstance(data.get("placement"), dict):
            data = dict(data)
            data["placement"] = {
                k: [v] if isinstance(v, str) else v for k, v in data["placement"].items()
            }
        return data

    @model_validator(mode="after")
    def _consistent(self) -> StoreConfig:
        if "ram" in self.tiers:
            raise ValueError("tiers: the name 'ram' is reserved for the RAM cache")
        for level, names in self.placement.items():
            if level < 1:
                raise ValueError(f"placement: levels start at 1, got {level}")
            if not names:
                raise ValueError(f"placement.{level}: name at least one tier")
            for name in names:
                if name not in self.tiers:
                    raise ValueError(f"placement.{level}: unknown tier {name!r}")
                if name in self.cache_tiers:
                    raise ValueError(f"placement.{level}: {name!r} is a cache tier, not a home")
        for name in self.cache_tiers:
            if name not in self.tiers:
                raise ValueError(f"cache_tiers: unknown tier {name!r}")
            if self.tiers[name].cap is None:
                raise ValueError(f"tiers.{name}.cap: a cache tier needs a byte cap")
        for name, tier in self.tiers.items():
            if tier.cap is not None and name not in self.cache_tiers:
                raise ValueError(f"tiers.{name}.cap: only cache tiers are capped (a home is not)")
        hedge = self.hedge_after_s
        if isinstance(hedge, float | int) and hedge <= 0:
            raise ValueError(f'hedge_after_s: seconds > 0, "auto" or "off", got {hedge}')
        return self

    def policy(self) -> StorePolicy:
        return StorePolicy(
            deadline_s=self.deadline_s,
            tier_timeout_s=self.tier_timeout_s,
            breaker_failures=self.breaker_failures,
            breaker_reset_s=self.breaker_reset_s,
            failure_ttl_s=self.failure_ttl_s,
            promote=self.promote,
            hedge_after_s=None if self.hedge_after_s == "off" else self.hedge_after_s,
            count_deadline_misses=self.count_deadline_misses,
        )


def tier_from_uri(uri: str, **extra: Any) -> LmdbTierSettings | DiskTierSettings | S3TierSettings:
    """`lmdb:PATH` or `lmdb://PATH`, `s3://bucket/prefix`, or a directory (`file://` optional).

    `extra` fills the other fields (an S3 `endpoint_url`, `region`, `concurrency`, ...).
    """
    if uri.startswith("lmdb:"):
        path = uri.removeprefix("lmdb:").removeprefix("//")
        if not path:
            raise ConfigError(f"{uri!r}: an LMDB tier needs a path, as in lmdb:/data/flash")
        return LmdbTierSettings(path=Path(path), **extra)
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ConfigError(f"{uri!r}: an S3 tier needs a bucket, as in s3://bucket/prefix")
        return S3TierSettings(bucket=parsed.netloc, prefix=parsed.path.lstrip("/"), **extra)
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"{uri!r}: unsupported scheme; use lmdb:, s3:// or a directory")
    return DiskTierSettings(root=Path(uri.removeprefix("file://")), **extra)


def open_tier(name: str, settings: LmdbTierSettings | DiskTierSettings | S3TierSettings) -> Tier:
    """The tier itself, without profile or cap wrappers."""
    if isinstance(settings, LmdbTierSettings):
        return LmdbTier(
            settings.path,
            name=name,
            map_size=int(settings.map_size),
            concurrency=settings.concurrency,
            sync=settings.sync,
        )
    if isinstance(settings, DiskTierSettings):
        return DiskTier(
            settings.root, name=name, concurrency=settings.concurrency, fsync=settings.fsync
        )
    secret = settings.secret_access_key
    key_id = settings.access_key_id
    return S3Tier(
        settings.bucket,
        name=name,
        prefix=settings.prefix,
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        addressing_style=settings.addressing_style,
        access_key_id=key_id.get_secret_value() if key_id else None,
        secret_access_key=secret.get_secret_value() if secret else None,
        concurrency=settings.concurrency,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        max_attempts=settings.max_attempts,
    )


async def build_store(
    config: StoreConfig,
    *,
    codec: BlockCodec[V],
    digests: Mapping[str, BlockDigest] | None,
    metrics: StoreMetrics | None = None,
) -> TieredStore[V]:
    """Open every tier (with its profile and cap), build the store, and index capped tiers."""
    profiles = load_profiles(config.profiles_file)
    for name, settings in config.tiers.items():
        if settings.profile is not None and settings.profile not in profiles:
            known = ", ".join(sorted(profiles))
            raise ConfigError(
                f"tiers.{name}.profile: unknown profile {settings.profile!r} ({known})"
            )
    tiers: dict[str, Tier] = {}
    try:
        for name, settings in config.tiers.items():
            tier: Tier = open_tier(name, settings)
            if settings.profile is not None:
                tier = ProfiledTier(tier, profiles[settings.profile])
            if settings.cap is not None:
                tier = CappedTier(tier, int(settings.cap))
            tiers[name] = tier
        ram: BlockCache[StoredBlock[V]] = BlockCache(
            int(config.ram_cache),
            pinned_levels=config.pin_levels,
            level_weights=config.level_weights,
        )
        store = TieredStore(
            tiers,
            config.placement,
            codec=codec,
            ram=ram,
            digests=digests,
            cache_tiers=config.cache_tiers,
            policy=config.policy(),
            metrics=metrics,
        )
        await store.open()
    except BaseException:
        for tier in tiers.values():
            await tier.aclose()
        raise
    return store
