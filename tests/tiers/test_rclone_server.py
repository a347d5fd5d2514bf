"""`rclone serve s3` on loopback: the real `S3Tier` against a second S3 implementation, one that
keeps its objects as files on disk and whose memory does not grow with the bytes it holds."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from tests.tiers.conftest import blob
from tiers import ConfigError, S3Tier, TierUnavailableError, open_tier, tier_from_uri
from tiers.rclone_server import RcloneS3Server


async def open_tier_on(
    server: RcloneS3Server, bucket: str, prefix: str = "", **extra: object
) -> S3Tier:
    """The S3 tier as the project builds it from a URI and settings, with its bucket created."""
    settings = tier_from_uri(f"s3://{bucket}/{prefix}", **server.client_settings(), **extra)
    tier = open_tier("cloud", settings)
    assert isinstance(tier, S3Tier)
    await tier.create_bucket()
    return tier


def files_under(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}


async def test_s3_tier_round_trip(rclone_s3: RcloneS3Server, s3_bucket: str) -> None:
    tier = await open_tier_on(rclone_s3, s3_bucket, "hmem")
    try:
        assert not await tier.create_bucket()  # it exists now
        keys = ["bank/L1/0", "bank/L1/1", "bank/L2/0"]
        blocks = {key: blob(1000 + i, seed=i) for i, key in enumerate(keys)}
        for key, data in blocks.items():
            await tier.put(key, data)
        for key, data in blocks.items():
            assert await tier.get(key) == data
            assert await tier.contains(key)
        assert await tier.get_many([*blocks, "bank/L1/404"]) == [*blocks.values(), None]
        assert await tier.get("bank/L1/404") is None
        assert await tier.read("bank/L1/404", len) is None
        assert not await tier.contains("bank/L1/404")
        assert sorted(await tier.scan()) == sorted((k, len(v)) for k, v in blocks.items())

        await tier.put("bank/L1/0", b"replaced")
        assert await tier.get("bank/L1/0") == b"replaced"
        assert await tier.delete("bank/L1/0")
        assert not await tier.contains("bank/L1/0")
        assert await tier.get("bank/L1/0") is None
        assert not await tier.delete("bank/L1/0")
    finally:
        await tier.aclose()


async def test_objects_are_files_under_root_bucket_prefix(
    rclone_s3: RcloneS3Server, s3_bucket: str
) -> None:
    tier = await open_tier_on(rclone_s3, s3_bucket, "hmem")
    try:
        await tier.put("bank/L3/7.0123456789abcdef", blob(5000, seed=7))
        await tier.put("bank/L3/8.0123456789abcdef", blob(300, seed=8))
    finally:
        await tier.aclose()
    bucket_dir = rclone_s3.root / s3_bucket
    assert files_under(bucket_dir) == {
        "hmem/bank/L3/7.0123456789abcdef": 5000,
        "hmem/bank/L3/8.0123456789abcdef": 300,
    }
    assert (bucket_dir / "hmem/bank/L3/7.0123456789abcdef").read_bytes() == blob(5000, seed=7)


@pytest.mark.slow
async def test_server_memory_does_not_grow_with_the_bytes_it_holds(
    rclone_s3: RcloneS3Server, s3_bucket: str
) -> None:
    n, size, bodies = 150, 2 << 20, [blob(2 << 20, seed=i) for i in range(4)]
    tier = await open_tier_on(rclone_s3, s3_bucket, concurrency=4)
    keys = [f"bank/L4/{i}" for i in range(n)]
    try:
        # Warm up as many connections as the puts below use: their buffers are not data held.
        await asyncio.gather(*(tier.put(f"warm/{i}", bodies[i]) for i in range(4)))
        before = rclone_s3.rss_bytes()
        await asyncio.gather(*(tier.put(key, bodies[i % 4]) for i, key in enumerate(keys)))
        after = rclone_s3.rss_bytes()
        assert await tier.get(keys[-1]) == bodies[(n - 1) % 4]

        written = n * size
        on_disk = sum(files_under(rclone_s3.root / s3_bucket / "bank").values())
        figures = (
            f"wrote {written >> 20} MiB ({on_disk >> 20} MiB on disk); server RSS "
            f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
        )
        assert on_disk == written, figures
        assert after - before < written / 3, figures
    finally:
        await asyncio.gather(*(tier.delete(key) for key in keys))
        await tier.aclose()


async def test_objects_survive_a_stop_and_start_on_the_same_port(tmp_path: Path) -> None:
    with RcloneS3Server(tmp_path / "root") as server:
        tier = await open_tier_on(server, "restart", max_attempts=1)
        try:
            await tier.put("bank/L1/0", blob(4000, seed=1))
            endpoint, pid = server.endpoint_url, server.pid
            server.stop()
            server.stop()  # idempotent
            assert server.pid is None
            with pytest.raises(TierUnavailableError):
                await tier.get("bank/L1/0")

            server.start()
            assert server.endpoint_url == endpoint
            assert server.pid not in (None, pid)
            assert await tier.get("bank/L1/0") == blob(4000, seed=1)  # same client, reconnected
        finally:
            await tier.aclose()
    assert server.pid is None


def test_server_runs_in_its_own_session(rclone_s3: RcloneS3Server) -> None:
    """A Ctrl-C sent to the caller's process group does not reach the server."""
    assert rclone_s3.pid is not None
    assert os.getsid(rclone_s3.pid) == rclone_s3.pid != os.getsid(0)


def test_a_port_another_server_answers_on_is_refused(
    rclone_s3: RcloneS3Server, tmp_path: Path
) -> None:
    other = RcloneS3Server(tmp_path / "root", port=rclone_s3.port)
    with pytest.raises(TierUnavailableError, match="already answers"):
        other.start()
    assert other.pid is None


def test_a_server_that_exits_at_start_says_why(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: free to a probe, taken to a bind
        server = RcloneS3Server(tmp_path / "root", port=held.getsockname()[1])
        with pytest.raises(TierUnavailableError, match=r"(?s)exited.*address already in use"):
            server.start()
    assert server.pid is None


def test_a_missing_binary_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"/nonexistent/rclone.*pip install 'hmem\[scale\]'"):
        RcloneS3Server(tmp_path / "root", binary="/nonexistent/rclone")


def test_an_access_key_rclone_would_refuse_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="access_key"):
        RcloneS3Server(tmp_path / "root", access_key="AK")
