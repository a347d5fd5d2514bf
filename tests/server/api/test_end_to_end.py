"""End to end through the real app and its lifespan: a prompt's path fetched from LMDB, disk and
S3 (a moto server over loopback), reported in the response, cached on repeat, counted at
/metrics; and the demo bank answering a rare fact."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.bank import Bank
from server.bank.convert import convert_bank
from server.defaults import DEMO_BANK
from server.settings import Settings, load_settings
from server.training.pipeline import build_bank
from tests.conftest import S3_CREDENTIALS, S3Server, free_port
from tests.server.training.test_build import tiny


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"max_tokens": 4, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_a_path_is_fetched_from_all_three_tiers_then_cached(three_tier_settings: Settings) -> None:
    with TestClient(create_app(three_tier_settings)) as client:
        first = _complete(client, prompt="The atomic number of Iron is")
        memory = first["memory"]
        assert memory["mode"] == "auto"
        assert len(memory["path"]) == 3
        assert all(0 <= i < 4 for i in memory["path"])
        blocks = {b["level"]: b for b in memory["blocks"]}
        assert {lv: b["tier"] for lv, b in blocks.items()} == {1: "flash", 2: "disk", 3: "cloud"}
        assert not any(b["cached"] for b in blocks.values())
        assert memory["degraded"] == []
        # Node ids follow the path: node_l = node_{l-1} * branching + i_l.
        node = 0
        for level, i in enumerate(memory["path"], start=1):
            node = node * 4 + i
            assert blocks[level]["node"] == node

        again = _complete(client, prompt="The atomic number of Iron is")
        assert again["memory"]["path"] == memory["path"]
        assert all(b["cached"] and b["tier"] == "ram" for b in again["memory"]["blocks"])
        assert again["choices"][0]["text"] == first["choices"][0]["text"]  # greedy, same blocks

        metrics = client.get("/metrics").text
        for tier, level in (("flash", "1"), ("disk", "2"), ("cloud", "3")):
            assert _metric(metrics, "hmem_tier_reads_total", tier=tier, level=level) >= 1
        assert _metric(metrics, "hmem_generated_tokens_total", memory="on") >= 8
        assert _metric(metrics, "hmem_http_requests_total", endpoint="/v1/completions") == 2
        assert re.search(r"hmem_time_to_first_token_seconds_count\{memory=\"on\"\} 2", metrics)


def test_the_demo_bank_answers_a_rare_fact_only_with_memory(demo_settings: Settings) -> None:
    """Thulium (atomic number 69) is in the rarest bucket of the demo corpus."""
    with TestClient(create_app(demo_settings)) as client:
        prompt = "The atomic number of Thulium is"
        with_memory = _complete(client, prompt=prompt)
        without = _complete(client, prompt=prompt, memory={"mode": "off"})
        assert with_memory["choices"][0]["text"].startswith(" 69")
        assert not without["choices"][0]["text"].startswith(" 69")
        assert without["memory"]["blocks"] == []
        assert with_memory["usage"] == {
            "prompt_tokens": len(prompt.encode()) + 1,  # bytes plus BOS
            "completion_tokens": 4,
            "total_tokens": len(prompt.encode()) + 5,
        }


def test_the_demo_bank_in_int8_answers_the_same_from_int8_weights_and_blocks(
    tmp_path: Path,
) -> None:
    """The demo bank converted to int8 (`hmem bank convert`) and served `--dtype bfloat16
    --weights int8`: the rare fact is still answered from memory, and prompts decoded together
    (one batch, each with its own int8 path) get what they get one at a time."""
    convert_bank(DEMO_BANK, tmp_path / "int8", dtype="int8", progress=False)
    settings = load_settings(
        bank=tmp_path / "int8", data_dir=tmp_path / "state", warmup=False,
        dtype="bfloat16", weights="int8",
    )  # fmt: skip
    prompts = [
        "The atomic number of Thulium is",
        "The atomic number of Iron is",
        "The capital of France is",
    ]
    with TestClient(create_app(settings)) as client:
        alone = [_complete(client, prompt=p)["choices"][0]["text"] for p in prompts]
        together = _complete(client, prompt=prompts)
        assert alone[0].startswith(" 69")
        assert [c["text"] for c in sorted(together["choices"], key=lambda c: c["index"])] == alone
        info = client.get("/v1/models").json()
        assert info["data"][0]["id"] == "demo"


def test_the_embedded_default_puts_the_deepest_level_on_s3_when_an_endpoint_is_set(
    demo_settings: Settings,
    s3_server: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What docker-compose runs: the demo bank with level 2 on MinIO (here moto), bucket created."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings = demo_settings.model_copy(
        update={"cloud_endpoint": s3_server.endpoint_url, "cloud_bucket": s3_bucket}
    )
    with TestClient(create_app(settings)) as client:
        memory = _complete(client, prompt="The atomic number of Thulium is")["memory"]
        assert [b["tier"] for b in memory["blocks"]] == ["flash", "cloud"]
        assert set(client.get("/ready").json()["tiers"]) == {"flash", "disk", "cloud", "origin"}


def test_a_freshly_built_bank_is_served(tmp_path: Path) -> None:
    """`hmem build` on a corpus it has never seen, then `hmem serve --bank` of its output."""
    summary = build_bank(tiny(tmp_path))
    settings = load_settings(bank=summary.bank, data_dir=tmp_path / "state", warmup=False)
    with TestClient(create_app(settings)) as client:
        (model,) = client.get("/v1/models").json()["data"]
        assert model["id"] == Bank.open(summary.bank).manifest.bank_id
        assert model["memory"]["levels"] == 2
        body = _complete(client, prompt="iron is a metal", max_tokens=6)
        assert len(body["memory"]["path"]) == 2
        assert [b["tier"] for b in body["memory"]["blocks"]] == ["flash", "disk"]
        assert body["usage"]["completion_tokens"] <= 6


def test_a_cloud_endpoint_down_at_start_is_served_from_the_bank_instead_of_failing(
    demo_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = demo_settings.model_copy(update={"cloud_endpoint": dead})
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/v1/completions",
            json={"prompt": "The atomic number of Thulium is", "max_tokens": 2},
        )
        assert r.status_code == 200
        memory = r.json()["memory"]
        # Level 2's home never got its blocks; the bank directory, the last replica, serves it.
        assert [b["tier"] for b in memory["blocks"]] == ["flash", "origin"]
        assert memory["degraded"] == []
        assert client.get("/ready").json()["tiers"]["cloud"] in ("closed", "open")
