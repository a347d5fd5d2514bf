"""Integrity end to end through the app: a corrupt tier copy is reported and repaired from the
bank directory, and a block with no good copy anywhere degrades its level as `corrupt` and makes
`/ready` say so until a good copy is back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.bank import Bank
from server.bank.push import stored_name
from server.settings import Settings, load_settings
from tests.server.api.conftest import write_three_level_bank
from tiers.disk import SUFFIX
from tiers.keys import BlockKey

PROMPT = "The atomic number of Iron is"


@pytest.fixture
def bank(tmp_path: Path) -> Bank:
    return write_three_level_bank(tmp_path / "bank")


@pytest.fixture
def settings(bank: Bank, tmp_path: Path) -> Settings:
    # The embedded default: level 1 on LMDB, levels 2 and 3 on disk, the bank as the origin.
    return load_settings(bank=bank.path, data_dir=tmp_path / "state", warmup=False)


def trusting(settings: Settings) -> Settings:
    """`settings` with start-up seeding that keeps present copies on name and size."""
    return settings.model_copy(update={"seed_verify_max_bytes": 0})


def flip(path: Path) -> None:
    """Flip 16 bytes in the middle of a file."""
    data = path.read_bytes()
    mid = len(data) // 2
    path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :])


def complete(client: TestClient) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def level2(answer: dict[str, Any]) -> dict[str, Any]:
    (block,) = [b for b in answer["memory"]["blocks"] if b["level"] == 2]
    return block


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def served_level2_copy(
    settings: Settings, bank: Bank, tmp_path: Path
) -> tuple[dict[str, Any], BlockKey, Path]:
    """A first answer, its level-2 block, and where that block's copy lies in the disk tier."""
    with TestClient(create_app(settings)) as client:
        first = complete(client)
    key = BlockKey(bank.manifest.bank_id, 2, level2(first)["node"])
    return first, key, tmp_path / "state" / "tiers" / "disk" / (stored_name(bank, key) + SUFFIX)


def test_a_corrupt_copy_is_served_from_the_bank_and_repaired(
    settings: Settings, bank: Bank, tmp_path: Path
) -> None:
    first, _, copy = served_level2_copy(settings, bank, tmp_path)
    good = copy.read_bytes()
    flip(copy)
    # A fresh process (its RAM cache cannot hide the disk copy) that trusts the seeded copies on
    # name and size at start, as it does for banks over `seed_verify_max_bytes`.
    with TestClient(create_app(trusting(settings))) as client:
        answer = complete(client)
        block = level2(answer)
        assert block["tier"] == "origin"
        assert block["corrupt"] == ["disk"]
        assert answer["memory"]["degraded"] == []
        assert answer["choices"][0]["text"] == first["choices"][0]["text"]
        wait_for(lambda: copy.read_bytes() == good)  # repaired in the background
        metrics = client.get("/metrics").text
        assert 'hmem_tier_corrupt_total{level="2",tier="disk"} 1.0' in metrics
        assert client.get("/ready").json()["status"] == "ready"
    with TestClient(create_app(settings)) as client:
        block = level2(complete(client))
        assert (block["tier"], block["corrupt"]) == ("disk", [])


def test_no_good_copy_anywhere_degrades_the_level_and_ready_says_so(
    settings: Settings, bank: Bank, tmp_path: Path
) -> None:
    _, key, copy = served_level2_copy(settings, bank, tmp_path)
    source = bank.path / "blocks" / "L2" / f"{key.node}.safetensors"
    original = source.read_bytes()
    flip(copy)
    flip(source)
    try:
        with TestClient(create_app(trusting(settings))) as client:
            answer = complete(client)
            (degraded,) = [d for d in answer["memory"]["degraded"] if d["level"] == 2]
            assert degraded["reason"] == "corrupt"
            assert level2(answer)["corrupt"] == ["disk", "origin"]
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["status"] == "degraded"
            assert ready.json()["corrupt_blocks"] == {"2": 1}
            health = client.get("/health")
            assert health.status_code == 200
            assert health.json()["corrupt_blocks"] == {"2": 1}
            # The bank directory gets its good file back: the next read serves and repairs it.
            source.write_bytes(original)
            answer = complete(client)
            assert answer["memory"]["degraded"] == []
            assert level2(answer)["tier"] == "origin"
            assert client.get("/ready").json()["corrupt_blocks"] == {}
            assert client.get("/ready").status_code == 200
    finally:
        source.write_bytes(original)
