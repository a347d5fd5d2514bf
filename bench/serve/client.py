"""The client side of bench.serve: one streamed completion over HTTP/SSE as the client saw it,
and the harness that measures compared variants side by side (interleaved, the first one
rotating every repetition; the ratio is that of their medians).

Shared by the serving cases (`bench.serve.main`) and the comparison with Hugging Face `transformers`
(`bench.serve.hf`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Stream:
    """One streamed completion as the client saw it (perf_counter seconds)."""

    sent: float
    first: float | None = None  # the first chunk carrying generated text
    last: float | None = None  # the last chunk carrying generated text
    done: float = 0.0  # `data: [DONE]`
    tokens: int = 0  # completion_tokens (usage)
    text: str = ""
    memory: dict[str, Any] | None = None

    @property
    def ttft(self) -> float:
        assert self.first is not None, "no generated text"
        return self.first - self.sent

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first token."""
        if self.first is None or self.last is None or self.tokens < 2:
            return float("nan")
        return (self.tokens - 1) / (self.last - self.first)


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> Stream:
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    out, parts = Stream(sent=time.perf_counter()), []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if line == "data: [DONE]":
                out.done = now
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            out.memory = chunk.get("memory", out.memory)
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["text"]:
                    out.first = out.first or now
                    out.last = now
                    parts.append(choice["text"])
    out.text = "".join(parts)
    return out


def request(prompt: str, max_tokens: int, **memory: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "memory": memory}


def median(xs: list[float]) -> float:
    return statistics.median([x for x in xs if x == x])  # NaN-free


Variant = Callable[[int], Awaitable[float]]


async def interleave(variants: dict[str, Variant], reps: int) -> dict[str, list[float]]:
    """Each variant once per repetition r (given r), the first one rotating; their samples."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(await variants[name](r))
    return samples


def compared(samples: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    med = {name: median(xs) for name, xs in samples.items()}
    return {"a": med[a], "b": med[b], "ratio": med[a] / med[b], "medians": med, "samples": samples}
