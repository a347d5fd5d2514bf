"""Faults over real HTTP: the cloud tier stopped during a burst, overload, a client that leaves.

A tier outage degrades a level to the generic memory and every request is still answered 200;
a full queue answers 429 with Retry-After; a client that disconnects mid-stream frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from typing import Any

import httpx

from server.settings import Settings
from tests.conftest import S3Server


async def _ready(client: httpx.AsyncClient) -> dict[str, Any]:
    data: dict[str, Any] = (await client.get("/ready")).json()
    return data


async def _wait_active(client: httpx.AsyncClient, n: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await _ready(client))["engine"]["active"] != n:
        assert time.monotonic() < deadline, f"engine never reached {n} active sequences"
        await asyncio.sleep(0.02)


PATHS = [[a, b, c] for a in range(2) for b in range(2) for c in range(4)]  # 16 distinct


async def _burst_with_s3_stopped(
    server: Any, s3_server: S3Server
) -> tuple[list[httpx.Response], str]:
    """16 completions on distinct paths while the S3 server is down; and the metrics after."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def one(path: list[int]) -> httpx.Response:
            return await client.post(
                "/v1/completions",
                json={"prompt": "hello", "max_tokens": 2, "memory": {"path": path}},
            )

        s3_server.stop()
        try:
            responses = await asyncio.gather(*(one(p) for p in PATHS))
        finally:
            s3_server.start()
        return list(responses), (await client.get("/metrics")).text


async def test_the_cloud_tier_stopped_mid_burst_is_served_from_the_bank_directory(
    three_tier_settings: Settings, s3_server: S3Server, live_server: Any
) -> None:
    responses, _ = await _burst_with_s3_stopped(live_server(three_tier_settings), s3_server)
    assert [r.status_code for r in responses] == [200] * len(PATHS)
    for r in responses:
        memory = r.json()["memory"]
        by_level = {b["level"]: b for b in memory["blocks"]}
        assert by_level[1]["tier"] in ("flash", "ram")
        assert by_level[2]["tier"] in ("disk", "ram")
        assert by_level[3]["tier"] == "origin"  # the bank directory, the last replica
        assert memory["degraded"] == []


async def test_the_cloud_tier_stopped_mid_burst_degrades_level_3_only_without_an_origin(
    three_tier_settings: Settings, s3_server: S3Server, live_server: Any
) -> None:
    # A bank directory without its level-3 blocks (they live in the cloud only): nothing to
    # fall back on but the generic memory.
    assert three_tier_settings.bank is not None
    shutil.rmtree(three_tier_settings.bank / "blocks" / "L3")
    responses, metrics = await _burst_with_s3_stopped(live_server(three_tier_settings), s3_server)
    assert [r.status_code for r in responses] == [200] * len(PATHS)
    for r in responses:
        memory = r.json()["memory"]
        assert [b["level"] for b in memory["blocks"]] == [1, 2, 3]
        by_level = {b["level"]: b for b in memory["blocks"]}
        assert by_level[1]["tier"] in ("flash", "ram")
        assert by_level[2]["tier"] in ("disk", "ram")
        assert by_level[3]["tier"] is None  # level 3 never came
        (degraded,) = memory["degraded"]
        assert degraded["level"] == 3
        assert degraded["reason"] in ("late", "unavailable")
        assert degraded["fallback"] == "generic"
    assert 'hmem_memory_degraded_total{level="3"' in metrics


async def test_a_full_queue_answers_429_with_retry_after(
    demo_settings: Settings, live_server: Any
) -> None:
    settings = demo_settings.model_copy(update={"max_batch": 1, "max_queue": 0})
    server = live_server(settings)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        body = {"prompt": "The capital of", "max_tokens": 400, "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as held:
            assert held.status_code == 200
            await _wait_active(client, 1)
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        await _wait_active(client, 0)
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 200


async def test_a_client_leaving_mid_stream_frees_its_slot(
    demo_settings: Settings, live_server: Any
) -> None:
    settings = demo_settings.model_copy(update={"max_batch": 1, "max_queue": 0})
    server = live_server(settings)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        # ignore_eos: the sequence can only end by the disconnect (or after 480 tokens).
        body = {"prompt": "The capital of", "max_tokens": 480, "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    json.loads(line.removeprefix("data: "))
                    chunks += 1
                if chunks >= 3:
                    break  # leave the stream: the response is closed
        await _wait_active(client, 0)
        # Ended by the disconnect, not by running out its 480 tokens.
        assert (await _ready(client))["engine"]["cancelled"] == 1
        metrics = (await client.get("/metrics")).text
        assert "hmem_engine_cancelled_sequences_total 1.0" in metrics
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


async def test_a_non_streaming_client_leaving_cancels_its_generation(
    demo_settings: Settings, live_server: Any
) -> None:
    settings = demo_settings.model_copy(update={"max_batch": 8})
    server = live_server(settings)
    body = {"prompt": "The capital of", "max_tokens": 480, "n": 8, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        # 8 x 480 tokens take seconds on these cores; the client gives up as soon as they run.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as leaving:
            sent = asyncio.create_task(leaving.post("/v1/completions", json=body))
            await _wait_active(client, 8)
            sent.cancel()  # closes the connection mid-request, as a client timing out does
            with contextlib.suppress(asyncio.CancelledError):
                await sent
        await _wait_active(client, 0)
        ready = await _ready(client)
        assert ready["engine"]["cancelled"] == 8
        metrics = (await client.get("/metrics")).text
        generated = float(metrics.split("hmem_generated_tokens_total{memory=")[1].split()[1])
        assert generated < 8 * 480  # the rows were freed, not run to their end
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
