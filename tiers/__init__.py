"""tiers: the storage hierarchy behind the memory bank (RAM cache, LMDB flash, disk, S3 cloud).

Bytes, keys, budgets and faults; no torch. Usable on its own:

    config = StoreConfig(tiers={"flash": {"kind": "lmdb", "path": "/data/flash"}},
                         placement={1: "flash"})
    store = await build_store(config, codec=BytesCodec(), digests=manifest_digests)
    fetched = await store.fetch_many([BlockKey("bank", 1, 3)])
"""

from tiers.base import ThreadedTier, Tier, TierWrapper
from tiers.breaker import BreakerState, CircuitBreaker
from tiers.cache import BlockCache, CacheStats
from tiers.capped import CappedTier
from tiers.config import StoreConfig, build_store, open_tier, tier_from_uri
from tiers.disk import DiskTier
from tiers.errors import (
    BlockNotFoundError,
    CircuitOpenError,
    ConfigError,
    CorruptBlockError,
    FetchFailedError,
    FetchTimeoutError,
    IntegrityError,
    InvalidKeyError,
    TierError,
    TierFullError,
    TierUnavailableError,
)
from tiers.keys import BlockKey, parse_storage_key, storage_key, validate_key
from tiers.lmdb_tier import LmdbTier
from tiers.metrics import StoreMetrics
from tiers.profiles import DeviceProfile, ProfiledTier, load_profiles
from tiers.s3 import S3Tier
from tiers.store import BlockCodec, BlockDigest, BytesCodec, Fetched, StorePolicy, TieredStore

__all__ = [
    "BlockCache",
    "BlockCodec",
    "BlockDigest",
    "BlockKey",
    "BlockNotFoundError",
    "BreakerState",
    "BytesCodec",
    "CacheStats",
    "CappedTier",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "CorruptBlockError",
    "DeviceProfile",
    "DiskTier",
    "FetchFailedError",
    "FetchTimeoutError",
    "Fetched",
    "IntegrityError",
    "InvalidKeyError",
    "LmdbTier",
    "ProfiledTier",
    "S3Tier",
    "StoreConfig",
    "StoreMetrics",
    "StorePolicy",
    "ThreadedTier",
    "Tier",
    "TierError",
    "TierFullError",
    "TierUnavailableError",
    "TierWrapper",
    "TieredStore",
    "build_store",
    "load_profiles",
    "open_tier",
    "parse_storage_key",
    "storage_key",
    "tier_from_uri",
    "validate_key",
]
