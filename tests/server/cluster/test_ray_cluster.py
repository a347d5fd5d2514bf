"""The Ray Serve application end to end: a local Ray, two engine replicas, the real clients.

One Ray session and one deployment serve the whole module (Ray takes about 10 s to start and a
deployment about 15 s). The tests speak HTTP to Serve's proxy on a loopback port with the
official openai client and httpx, read which replica served each request from the ingress's
`x-hmem-replica` header, and kill a replica with `ray.kill` (the actor's process is killed, as
by the OOM killer or a lost machine) in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.settings import load_settings
from tests.conftest import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from server.cluster.app import APP_NAME, ENGINE, ClusterOptions, build_app  # noqa: E402
from server.cluster.ingress import REPLICA_HEADER  # noqa: E402

pytestmark = pytest.mark.slow

IRON = "The atomic number of Iron is"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo bank on two replicas behind the ingress; the base URL."""
    data = tmp_path_factory.mktemp("cluster-data")
    settings = load_settings(data_dir=data, max_tokens_limit=256)
    port = free_port()
    ray.init(
        namespace="hmem-test",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 * 2**20,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ClusterOptions(replicas=2, replica_cpus=0.5, stats_period_s=0.5)
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[ENGINE]
    return int(status.replica_states.get("RUNNING", 0))


def live_replicas(base: str) -> set[str]:
    """The engine replicas the ingress routes to now, by their ids (from its /metrics)."""
    prefix = 'hmem_replica_reporting{replica="'
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {line[len(prefix) :].split('"', 1)[0] for line in text.splitlines()
            if line.startswith(prefix)}  # fmt: skip


def completion(base: str, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json=body, timeout=timeout)


def test_completions_and_chat_through_the_ingress(cluster: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="demo", prompt=IRON, max_tokens=3, temperature=0)
    assert done.choices[0].text.startswith(" 26")
    chat = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "What is the atomic number of Iron?"}],
        max_tokens=4,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "The atomic number of Neon?"}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # The API's own errors come through unchanged.
    bad = completion(cluster, {"prompt": IRON, "max_tokens": 0})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "max_tokens"
    models = httpx.get(f"{cluster}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == "demo"


def test_requests_of_one_subtree_land_on_one_replica(cluster: str) -> None:
    served: dict[int, Counter[str]] = {}
    for subtree in (1, 6):
        served[subtree] = Counter()
        for child in range(8):
            r = completion(
                cluster,
                {"prompt": "A", "max_tokens": 1, "memory": {"path": [subtree, child]}},
            )
            assert r.status_code == 200, r.text
            served[subtree][r.headers[REPLICA_HEADER]] += 1
    for subtree, counts in served.items():
        assert len(counts) == 1, f"subtree {subtree} went to {dict(counts)}"
    # The routed text of a prompt lands where its path's subtree does, too.
    routed = completion(cluster, {"prompt": IRON, "max_tokens": 1}).json()["memory"]["path"]
    again = {
        completion(cluster, {"prompt": IRON, "max_tokens": 1}).headers[REPLICA_HEADER]
        for _ in range(4)
    }
    assert len(again) == 1, f"{routed}: {again}"
    # What each replica holds reaches the ingress's /metrics within a report period or two.
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{cluster}/metrics", timeout=30).text
        subtrees = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("hmem_replica_resident_subtrees{")
        ]
        if (len(subtrees) == 2 and sum(subtrees) >= 2) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(subtrees) == 2, text
    assert sum(subtrees) >= 2, text
    # Every replica's own metrics, relabelled.
    assert 'hmem_generated_tokens_total{memory="on",replica="' in text
    assert 'hmem_cluster_placed_total{how="' in text


def test_a_client_that_leaves_mid_stream_frees_its_sequence(cluster: str) -> None:
    body = {"prompt": IRON, "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster}/v1/completions", json=body, timeout=60) as r:
        replica = r.headers[REPLICA_HEADER]
        for line in r.iter_lines():
            if '"text"' in line:
                break  # one token in: hang up
    series = f'hmem_engine_active_sequences{{replica="{replica}"}}'
    cancelled = f'hmem_engine_cancelled_sequences_total{{replica="{replica}"}}'
    deadline = time.monotonic() + 20
    while _metric(cluster, series) != 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _metric(cluster, series) == 0
    assert _metric(cluster, cancelled) >= 1


def test_a_request_pinned_to_a_replica_is_answered_by_it(cluster: str) -> None:
    ids = sorted(live_replicas(cluster))
    assert len(ids) == 2
    for rid in ids:
        for _ in range(3):  # Serve's own routing would split these between the two
            r = httpx.get(f"{cluster}/v1/memory/cache", headers={REPLICA_HEADER: rid}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.headers[REPLICA_HEADER] == rid
            assert set(r.json()) >= {"resident", "hits", "misses"}
    r = httpx.get(f"{cluster}/v1/memory/cache", headers={REPLICA_HEADER: "nobody"}, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_replica"


def _sse_events(raw: str) -> list[Any]:
    out = []
    for event in raw.split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_replica_killed_mid_burst_loses_no_request(cluster: str) -> None:
    subtree = 3
    probe = completion(cluster, {"prompt": "A", "max_tokens": 1, "memory": {"path": [subtree, 0]}})
    victim = probe.headers[REPLICA_HEADER]
    retries_before = _metric(cluster, 'hmem_cluster_retries_total{reason="replica_lost"}')

    async def burst() -> list[tuple[bool, int, str]]:
        async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:

            async def one(i: int) -> tuple[bool, int, str]:
                stream = i % 4 == 0
                body = {
                    "prompt": f"Element number {i} is",
                    "max_tokens": 160,
                    "ignore_eos": True,
                    "memory": {"path": [subtree, i % 8]},
                    "stream": stream,
                }
                r = await client.post("/v1/completions", json=body)
                return stream, r.status_code, r.text

            tasks = [asyncio.create_task(one(i)) for i in range(16)]
            # Kill once the burst is decoding on the victim (whatever this machine's speed).
            active = f'hmem_engine_active_sequences{{replica="{victim}"}} '
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                text = (await client.get("/metrics")).text
                line = next((x for x in text.splitlines() if x.startswith(active)), None)
                if line is not None and float(line.rsplit(" ", 1)[1]) >= 2:
                    break
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            return await asyncio.gather(*tasks)

    results = asyncio.run(burst())
    for stream, status, text in results:
        assert status == 200, text
        if not stream:
            body = json.loads(text)
            assert body["choices"][0]["finish_reason"] == "length", body
            continue
        events = _sse_events(text)
        if events[-1] == "[DONE]":
            assert any(e != "[DONE]" and e["choices"] and e["choices"][0]["text"] for e in events)
        else:
            # Cut after tokens were sent: the tokens stand, then the error event says why.
            assert events[-1]["error"]["code"] == "replica_lost"
            assert any("choices" in e and e["choices"] and e["choices"][0]["text"] for e in events)
    retried = _metric(cluster, 'hmem_cluster_retries_total{reason="replica_lost"}')
    assert retried > retries_before, "the kill hit no request in flight: the burst ended first"

    # Serve starts a replica in the dead one's place, and it serves. Until Serve's controller
    # notices the death the victim still counts as running: wait for it to be replaced.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        live = live_replicas(cluster)
        if len(live) == 2 and victim not in live and running_replicas() == 2:
            break
        time.sleep(1)
    assert victim not in live
    assert len(live) == 2
    assert running_replicas() == 2
    served = set()
    for child in range(8):
        r = completion(cluster, {"prompt": IRON, "max_tokens": 2, "memory": {"path": [0, child]}})
        assert r.status_code == 200, r.text
        served.add(r.headers[REPLICA_HEADER])
    assert victim not in served


def _metric(base: str, series: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_builder_for_serve_run_refuses_unknown_arguments() -> None:
    from server.cluster.app import build

    with pytest.raises(ValueError, match="unknown arguments"):
        build({"replica": "2"})
