"""Device profiles: the built-in table, user files, and the emulated latency and bandwidth."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tiers import ConfigError, DeviceProfile, DiskTier, ProfiledTier, load_profiles


def test_builtin_profiles_include_the_seed_hierarchy() -> None:
    profiles = load_profiles()
    for name in ("seed-flash", "seed-external-disk", "seed-cloud"):
        assert profiles[name].source
    seed = [profiles[n] for n in ("seed-flash", "seed-external-disk", "seed-cloud")]
    assert seed[0].bandwidth_bytes_s > seed[1].bandwidth_bytes_s > seed[2].bandwidth_bytes_s
    # The paper's flat bank: 3.194 GB from the external disk in 198 ms.
    assert profiles["seed-external-disk"].transfer_s(3_194_000_000) == pytest.approx(0.198, 0.01)


def test_user_profiles_from_toml_and_json_extend_and_override(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text("[mine]\nlatency_ms = 3\nbandwidth_mb_s = 50\n[nvme]\nlatency_ms = 1\n")
    profiles = load_profiles(toml)
    assert profiles["mine"] == DeviceProfile("mine", 0.003, 50e6)
    assert profiles["nvme"].latency_s == 0.001
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"j": {"latency_ms": 2}}))
    assert load_profiles(js)["j"].latency_s == 0.002


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[x]\nbandwidth_mb_s = 5\n", "latency_ms is required"),
        ("[x]\nlatency_ms = -1\n", "latency must be >= 0"),
        ("[x]\nlatency_ms = 1\nbandwidth_mb_s = 0\n", "bandwidth must be > 0"),
        ("[x]\nlatency_ms = 1\nspeed = 3\n", "unknown fields"),
        ("[x]\nlatency_ms = 'fast'\n", "must be numbers"),
        ("not toml [", "is not valid"),
    ],
)
def test_bad_profiles_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_profiles(path)


def test_a_missing_profiles_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_profiles(tmp_path / "nope.toml")


async def test_reads_take_at_least_latency_plus_transfer(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "d")
    await disk.put("b/L1/0", b"x" * 100_000)
    tier = ProfiledTier(disk, DeviceProfile("t", latency_s=0.05, bandwidth_bytes_s=1e6))
    started = time.perf_counter()
    assert await tier.get("b/L1/0") == b"x" * 100_000
    assert time.perf_counter() - started >= 0.05 + 0.1
    await tier.aclose()


async def test_concurrent_reads_share_the_bandwidth(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "d")
    for i in range(4):
        await disk.put(f"b/L1/{i}", b"x" * 50_000)
    tier = ProfiledTier(disk, DeviceProfile("t", latency_s=0.0, bandwidth_bytes_s=1e6))
    started = time.perf_counter()
    await asyncio.gather(*(tier.get(f"b/L1/{i}") for i in range(4)))
    assert time.perf_counter() - started >= 4 * 0.05  # 200 kB over a 1 MB/s link
    await tier.aclose()
