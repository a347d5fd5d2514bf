"""StoreConfig validation, tier URIs, and secrets kept out of reprs and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import S3Server
from tiers import (
    ConfigError,
    DiskTier,
    LmdbTier,
    S3Tier,
    StoreConfig,
    TierUnavailableError,
    tier_from_uri,
)
from tiers.config import DiskTierSettings, LmdbTierSettings, S3TierSettings, open_tier


def config(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "tiers": {
            "flash": {"kind": "lmdb", "path": "/tmp/f"},
            "disk": {"kind": "disk", "root": "/tmp/d"},
        },
        "placement": {1: "flash", 2: ["disk"]},
    }
    base.update(overrides)
    return base


def test_placement_shorthand_and_defaults() -> None:
    cfg = StoreConfig.model_validate(config())
    assert cfg.placement == {1: ["flash"], 2: ["disk"]}
    assert int(cfg.ram_cache) == 1 << 30
    assert cfg.policy().deadline_s == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"placement": {1: "nvme"}}, "placement.1: unknown tier 'nvme'"),
        ({"placement": {0: "flash"}}, "levels start at 1"),
        ({"cache_tiers": ["ssd"]}, "cache_tiers: unknown tier 'ssd'"),
        (
            {
                "tiers": {"d": {"kind": "disk", "root": "/d"}, "c": {"kind": "disk", "root": "/c"}},
                "placement": {1: "d"},
                "cache_tiers": ["c"],
            },
            "tiers.c.cap: a cache tier needs a byte cap",
        ),
        ({"cache_tiers": ["flash"]}, "'flash' is a cache tier, not a home"),
        ({"deadline_s": 0}, "deadline_s"),
        ({"ram_cache": "lots"}, "ram_cache"),
        ({"tiers": {"ram": {"kind": "disk", "root": "/x"}}, "placement": {1: "ram"}}, "reserved"),
        ({"tiers": {"x": {"kind": "tape", "root": "/x"}}, "placement": {1: "x"}}, "tape"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_mistakes_are_reported_with_the_field_to_fix(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        StoreConfig.model_validate(config(**overrides))


def test_a_cap_on_a_home_tier_is_refused() -> None:
    tiers = {"disk": {"kind": "disk", "root": "/d", "cap": "1GiB"}}
    with pytest.raises(ValidationError, match="only cache tiers are capped"):
        StoreConfig.model_validate({"tiers": tiers, "placement": {1: "disk"}})


def test_tier_uris() -> None:
    assert tier_from_uri("lmdb:/data/flash") == LmdbTierSettings(path=Path("/data/flash"))
    assert tier_from_uri("lmdb:///data/flash") == LmdbTierSettings(path=Path("/data/flash"))
    assert tier_from_uri("/data/disk") == DiskTierSettings(root=Path("/data/disk"))
    assert tier_from_uri("file:///data/disk") == DiskTierSettings(root=Path("/data/disk"))
    s3 = tier_from_uri("s3://bank-bucket/demo/v1", endpoint_url="http://127.0.0.1:9000")
    assert s3 == S3TierSettings(
        bucket="bank-bucket", prefix="demo/v1", endpoint_url="http://127.0.0.1:9000"
    )
    for bad in ("lmdb:", "s3:///x", "ftp://host/x"):
        with pytest.raises(ConfigError):
            tier_from_uri(bad)


def test_secrets_never_show_in_reprs_or_dumps() -> None:
    s3 = S3TierSettings(bucket="bkt", access_key_id="AKIDSECRET", secret_access_key="hunter2pass")
    cfg = StoreConfig(tiers={"cloud": s3}, placement={3: ["cloud"]})
    for text in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert "hunter2pass" not in text
        assert "AKIDSECRET" not in text


async def test_open_tier_builds_each_kind(tmp_path: Path, s3_server: S3Server) -> None:
    lmdb_tier = open_tier("f", LmdbTierSettings(path=tmp_path / "f", map_size=1 << 20))
    disk_tier = open_tier("d", DiskTierSettings(root=tmp_path / "d"))
    s3_tier = open_tier("c", S3TierSettings(bucket="bkt", endpoint_url=s3_server.endpoint_url))
    assert isinstance(lmdb_tier, LmdbTier)
    assert isinstance(disk_tier, DiskTier)
    assert isinstance(s3_tier, S3Tier)
    for t in (lmdb_tier, disk_tier, s3_tier):
        await t.aclose()


async def test_s3_errors_leak_no_credentials(s3_server: S3Server) -> None:
    tier = S3Tier(
        "no-such-bucket-here",
        endpoint_url=s3_server.endpoint_url,
        region="us-east-1",
        access_key_id="AKIDLEAKCHECK",
        secret_access_key="s3cr3t-leak-check",
    )
    with pytest.raises(TierUnavailableError) as info:
        await tier.put("b/L1/0", b"x")
    assert "NoSuchBucket" in str(info.value)
    assert "s3cr3t" not in str(info.value)
    assert "AKIDLEAKCHECK" not in str(info.value)
    await tier.aclose()
