"""The load of bench.soak: bounded concurrent clients sending a mix of requests, and what each
request came back with.

Kinds: completions and chat completions, each streaming and not (greedy, a fixed list of
prompts, so each answer can be compared with the prompt's baseline); streams the client closes
after a few chunks (`disconnect`); and malformed requests (`malformed`: bad JSON, wrong types,
unknown fields, oversize values, a body over the server's cap). Every request has a timeout;
a timeout or a broken connection is recorded as such, never retried.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

# Greedy answers to these are the baselines: element facts (the demo corpus's kind of text) and
# other sentences, routed to several clusters.
PROMPTS = (
    "The atomic number of Thulium is",
    "The atomic number of Iron is",
    "The atomic number of Xenon is",
    "The symbol of Tungsten is",
    "Gold is a dense yellow metal that",
    "The capital of Fatra is",
    "Zatrepa was born in",
    "A chemist gave a short talk about",
    "Once upon a time",
    "The lab ordered a small sample of",
    "Market song",
    "The weather on the coast this weekend",
)
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 30.0  # a whole request, streams included
MAX_EVENTS = 1000  # server-sent events read from one stream, at most
KIND_WEIGHTS = {
    "completion": 3,
    "completion_stream": 3,
    "chat": 2,
    "chat_stream": 2,
    "disconnect": 1,
    "malformed": 1,
}
# Malformed requests: (name, route, body). A body of bytes is sent as it is, with a JSON
# content type; anything else is sent as JSON. Every one of them must be answered 4xx.
MALFORMED: tuple[tuple[str, str, Any], ...] = (
    ("bad_json", "/v1/completions", b'{"prompt": "The capital of", "max_tokens": '),
    ("bad_json_chat", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": '),
    ("wrong_type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}),
    ("wrong_type_chat", "/v1/chat/completions", {"messages": "hello", "max_tokens": 2}),
    ("unknown_field", "/v1/completions", {"prompt": "x", "max_tokens": 2, "frobnicate": True}),
    ("oversize_max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}),
    ("oversize_n", "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 10**6}),
    ("oversize_prompt", "/v1/completions", {"prompt": "word " * 2000, "max_tokens": 2}),
    ("oversize_stop", "/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": ["a"] * 100}),
    ("bad_path", "/v1/completions", {"prompt": "x", "memory": {"path": [99, 99, 99]}}),
    ("bad_mode", "/v1/chat/completions", {"messages": [], "memory": {"mode": "sideways"}}),
    ("negative_temperature", "/v1/completions", {"prompt": "x", "temperature": -1}),
    ("oversize_body", "/v1/completions", {"prompt": "x" * (5 << 20), "max_tokens": 2}),
)


def completion_body(prompt: str, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    return body | extra


def chat_body(prompt: str, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    return body | extra


def route_of(family: str) -> str:
    return "/v1/completions" if family == "completion" else "/v1/chat/completions"


def body_of(family: str, prompt: str, **kw: Any) -> dict[str, Any]:
    return completion_body(prompt, **kw) if family == "completion" else chat_body(prompt, **kw)


def answer_text(family: str, data: dict[str, Any]) -> str:
    choice = data["choices"][0]
    return str(choice["text"] if family == "completion" else choice["message"]["content"] or "")


def clean(memory: dict[str, Any] | None) -> bool:
    """Every level's block came from a tier (or the RAM cache) and nothing was degraded."""
    if not memory or memory.get("degraded"):
        return False
    blocks = memory.get("blocks") or []
    return bool(blocks) and all(b.get("tier") is not None for b in blocks)


def level_clean(memory: dict[str, Any] | None, level: int) -> str | None:
    """The tier that served `level`, when it was served and not degraded; else None."""
    if not memory:
        return None
    if any(d["level"] == level for d in memory.get("degraded") or ()):
        return None
    for b in memory.get("blocks") or ():
        if b["level"] == level and b.get("tier") is not None:
            return str(b["tier"])
    return None


@dataclass
class Outcome:
    """One request as the client saw it."""

    kind: str
    status: str  # the HTTP status, or "timeout" / "conn_error" / "bad_response"
    t: float  # seconds since the run's clock started, when the request ended
    seconds: float
    prompt: int | None = None
    variant: str | None = None  # which malformed request
    memory: dict[str, Any] | None = None
    text: str | None = None
    stream_error: str | None = None  # an error event inside a 200 stream
    check: str = ""  # match, mismatch, degraded, no_baseline; "" when not checkable


@dataclass
class StreamSeen:
    status: int
    text: str = ""
    memory: dict[str, Any] | None = None
    error: str | None = None
    events: int = 0
    done: bool = False  # `data: [DONE]` was read


async def read_stream(
    client: httpx.AsyncClient,
    family: str,
    body: dict[str, Any],
    *,
    close_after: int | None = None,
) -> StreamSeen:
    """POST a streaming request and read its events; with `close_after`, hang up after that many
    data events (the connection is closed, as a client that goes away closes it)."""
    parts: list[str] = []
    async with client.stream("POST", route_of(family), json=body) as r:
        seen = StreamSeen(r.status_code)
        if r.status_code != 200:
            await r.aread()
            return seen
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                seen.done = True
                break
            if seen.events >= MAX_EVENTS:
                break
            seen.events += 1
            chunk = json.loads(line[6:])
            if "error" in chunk:
                seen.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                continue
            seen.memory = chunk.get("memory", seen.memory)
            for choice in chunk.get("choices") or ():
                piece = choice.get("text") if family == "completion" else None
                if family == "chat":
                    piece = (choice.get("delta") or {}).get("content")
                if piece:
                    parts.append(piece)
            if close_after is not None and seen.events >= close_after:
                break
    seen.text = "".join(parts)
    return seen


@dataclass
class Load:
    """The clients, the baselines they are checked against, and every outcome."""

    client: httpx.AsyncClient
    clock: Callable[[], float]
    baseline: dict[tuple[str, int], str]
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    def _check(self, family: str, prompt: int, text: str, memory: dict[str, Any] | None) -> str:
        if not clean(memory):
            return "degraded"
        expected = self.baseline.get((family, prompt))
        if expected is None:
            return "no_baseline"
        if text == expected:
            return "match"
        if len(self.mismatches) < 20:
            self.mismatches.append(
                {"family": family, "prompt": PROMPTS[prompt], "expected": expected, "got": text}
                | {"memory": memory, "t": round(self.clock(), 3)}
            )
        return "mismatch"

    async def _timed(self, kind: str, work: Awaitable[Outcome]) -> Outcome:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                out = await work
        except (httpx.TimeoutException, TimeoutError):
            out = Outcome(kind, "timeout", 0.0, 0.0)
        except httpx.TransportError:
            out = Outcome(kind, "conn_error", 0.0, 0.0)
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            out = Outcome(kind, "bad_response", 0.0, 0.0, stream_error=repr(exc)[:200])
        out.t, out.seconds = self.clock(), time.perf_counter() - started
        self.outcomes.append(out)
        return out

    async def one(self, kind: str, rng: random.Random) -> Outcome:
        prompt = rng.randrange(len(PROMPTS))
        if kind == "malformed":
            return await self._timed(kind, self._malformed(rng.randrange(len(MALFORMED))))
        if kind == "disconnect":
            family = rng.choice(("completion", "chat"))
            return await self._timed(kind, self._disconnect(family, prompt, rng.randint(1, 4)))
        family, _, streaming = kind.partition("_")
        return await self._timed(kind, self._answer(kind, family, prompt, bool(streaming)))

    async def _answer(self, kind: str, family: str, prompt: int, streaming: bool) -> Outcome:
        body = body_of(family, PROMPTS[prompt], stream=streaming)
        if streaming:
            s = await read_stream(self.client, family, body)
            out = Outcome(kind, str(s.status), 0, 0, prompt, memory=s.memory, text=s.text)
            out.stream_error = s.error
            if s.status == 200 and not s.done and s.error is None:
                out.stream_error = "the stream ended without data: [DONE]"
        else:
            r = await self.client.post(route_of(family), json=body)
            out = Outcome(kind, str(r.status_code), 0, 0, prompt)
            if r.status_code == 200:
                data = r.json()
                out.memory, out.text = data.get("memory"), answer_text(family, data)
        if out.status == "200" and out.stream_error is None and out.text is not None:
            out.check = self._check(family, prompt, out.text, out.memory)
        return out

    async def _disconnect(self, family: str, prompt: int, after: int) -> Outcome:
        body = body_of(family, PROMPTS[prompt], stream=True, ignore_eos=True) | {"max_tokens": 64}
        s = await read_stream(self.client, family, body, close_after=after)
        out = Outcome("disconnect", str(s.status), 0, 0, prompt, memory=s.memory)
        out.stream_error = s.error
        return out

    async def _malformed(self, i: int) -> Outcome:
        name, route, body = MALFORMED[i]
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            r = await self.client.post(route, content=body, headers=headers)
        else:
            r = await self.client.post(route, json=body)
        await r.aclose()
        return Outcome("malformed", str(r.status_code), 0, 0, variant=name)

    async def worker(self, i: int, stop: asyncio.Event, *, max_requests: int) -> None:
        """Requests back to back until `stop` is set, at most `max_requests`."""
        rng = random.Random(self.seed * 1000 + i)
        kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
        for _ in range(max_requests):
            if stop.is_set():
                return
            await self.one(rng.choices(kinds, weights)[0], rng)

    async def run(self, n: int, stop: asyncio.Event, *, max_requests: int = 100_000) -> None:
        async with asyncio.TaskGroup() as workers:  # one failing cancels the others
            for i in range(n):
                workers.create_task(self.worker(i, stop, max_requests=max_requests))


async def record_baseline(
    client: httpx.AsyncClient, *, tries: int = 5
) -> tuple[dict[tuple[str, int], str], list[str]]:
    """Each prompt's greedy answer (completion and chat), from a clean fetch; problems found."""
    baseline: dict[tuple[str, int], str] = {}
    problems: list[str] = []
    for family in ("completion", "chat"):
        for i, prompt in enumerate(PROMPTS):
            memory = None
            for _ in range(tries):
                r = await client.post(route_of(family), json=body_of(family, prompt))
                r.raise_for_status()
                data = r.json()
                memory = data.get("memory")
                if clean(memory):
                    baseline[(family, i)] = answer_text(family, data)
                    break
            else:
                degraded = (memory or {}).get("degraded")
                problems.append(
                    f"{family} {prompt!r}: no clean answer in {tries} tries: {degraded}"
                )
    return baseline, problems
