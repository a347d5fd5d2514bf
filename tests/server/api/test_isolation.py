"""No request can fail another: sampling values that round to zero, among a dozen concurrent
streams, leave the dozen with their usual text, and are served themselves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from server.settings import Settings

PROMPTS = ["The atomic number of Iron is", "The capital of", "The atomic number of Thulium is"]
POISONS: list[dict[str, Any]] = [
    {"prompt": "", "top_p": 5e-324},
    {"prompt": "x", "temperature": 2.2e-309},
    {"prompt": "x", "temperature": 1e-45, "top_p": 1e-45},
]


async def _stream_text(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, str]:
    text = ""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                text += "".join(c["text"] for c in chunk["choices"])
        return r.status_code, text


@pytest.mark.parametrize("poison", POISONS, ids=["top_p", "temperature", "both"])
async def test_a_poisoned_request_among_a_dozen_streams(
    demo_settings: Settings, live_server: Any, poison: dict[str, Any]
) -> None:
    server = live_server(demo_settings.model_copy(update={"max_batch": 16}))
    bodies = [
        {"prompt": PROMPTS[i % 3], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        for i in range(12)
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        alone = [await _stream_text(client, b) for b in bodies[:3]]
        results = await asyncio.gather(
            *(_stream_text(client, b) for b in bodies),
            client.post("/v1/completions", json={**poison, "max_tokens": 24}),
        )
        *streams, poisoned = results
        assert [status for status, _ in streams] == [200] * 12
        assert [text for _, text in streams] == [alone[i % 3][1] for i in range(12)]
        # Below vLLM's epsilon a temperature means greedy, and a nucleus keeps its top token.
        assert poisoned.status_code == 200, poisoned.text
        assert poisoned.json()["choices"][0]["finish_reason"] in ("stop", "length")
        ready = (await client.get("/ready")).json()
        assert ready["status"] == "ready"
