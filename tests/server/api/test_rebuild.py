"""Banks served one after the other from one data directory, and a bank rebuilt in place.

Through the real app and its lifespan on the embedded default tiers (LMDB and a directory under
one data directory): each bank build keeps its own blocklist, a blocklist written for another
bank is never applied, and a rebuilt bank is served with its new blocks from the tiers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.bank import Bank, write_random_bank
from server.defaults import DEMO_BANK
from server.engine.blocklist import BlocklistError
from server.settings import Settings, load_settings
from tests.server.api.conftest import DEMO_SHAPE

ADMIN = {"Authorization": "Bearer admin-secret-key"}
PATH = [2, 1]  # level-1 cluster 2, level-2 cluster 9
BODY = {
    "prompt": "The atomic number of Thulium is",
    "max_tokens": 4,
    "temperature": 0,
    "echo": True,
    "logprobs": 0,
    "memory": {"path": PATH},
}


def write_bank(out: Path, *, bank_id: str, seed: int = 0, overwrite: bool = False) -> Bank:
    """A 2-level random bank (4 / 16 clusters) on the demo bank's trained anchor."""
    write_random_bank(
        out,
        bank_id=bank_id,
        levels=2,
        branching=4,
        widths=(16, 8),
        model=DEMO_SHAPE,
        anchor_dir=DEMO_BANK / "anchor",
        embedder={"kind": "hashed-tfidf", "dim": 256, "ngram_max": 2, "seed": 0},
        seed=seed,
        overwrite=overwrite,
    )
    return Bank.open(out)


def serving(bank: Bank, data_dir: Path, **extra: Any) -> Settings:
    return load_settings(
        bank=bank.path, data_dir=data_dir, warmup=False, admin_key="admin-secret-key", **extra
    )


def blocked(client: TestClient) -> list[dict[str, int]]:
    listed: list[dict[str, int]] = client.get("/v1/memory/blocklist", headers=ADMIN).json()[
        "blocked"
    ]
    return listed


def complete(client: TestClient) -> dict[str, Any]:
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_banks_served_one_after_the_other_keep_their_own_blocklists(tmp_path: Path) -> None:
    alpha = write_bank(tmp_path / "alpha", bank_id="alpha")
    beta = write_bank(tmp_path / "beta", bank_id="beta", seed=1)
    state = tmp_path / "state"

    with TestClient(create_app(serving(alpha, state))) as client:
        r = client.post("/v1/memory/block", json={"level": 1, "node": 2}, headers=ADMIN)
        assert r.json()["changed"] is True
        assert complete(client)["memory"]["blocked"] == [1, 2]

    with TestClient(create_app(serving(beta, state))) as client:
        assert blocked(client) == []
        memory = complete(client)["memory"]
        assert memory["blocked"] == []
        assert memory["degraded"] == []
        assert [b["level"] for b in memory["blocks"]] == [1, 2]

    with TestClient(create_app(serving(alpha, state))) as client:
        assert blocked(client) == [{"level": 1, "node": 2}]
        assert complete(client)["memory"]["blocked"] == [1, 2]

    file = state / "blocklists" / f"alpha-{alpha.fingerprint()}.json"
    lists = [p.name for p in (state / "blocklists").iterdir() if not p.name.endswith(".lock")]
    assert lists == [file.name]
    recorded = json.loads(file.read_text())
    assert (recorded["bank_id"], recorded["fingerprint"]) == ("alpha", alpha.fingerprint())


def test_a_blocklist_file_of_another_bank_given_explicitly_is_refused(tmp_path: Path) -> None:
    alpha = write_bank(tmp_path / "alpha", bank_id="alpha")
    beta = write_bank(tmp_path / "beta", bank_id="beta", seed=1)
    shared = tmp_path / "blocklist-of-alpha.json"
    with TestClient(create_app(serving(alpha, tmp_path / "state", blocklist_file=shared))) as c:
        c.post("/v1/memory/block", json={"level": 1, "node": 0}, headers=ADMIN)

    with (
        pytest.raises(BlocklistError, match=r"belongs to bank 'alpha' build .* not to the served "),
        TestClient(create_app(serving(beta, tmp_path / "state", blocklist_file=shared))),
    ):
        pass


def test_a_legacy_blocklist_is_applied_to_no_bank_and_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alpha = write_bank(tmp_path / "alpha", bank_id="alpha")
    state = tmp_path / "state"
    state.mkdir()
    legacy = state / "blocklist.json"
    legacy.write_text(json.dumps({"version": 1, "blocked": [{"level": 1, "node": 2}]}))

    with (
        caplog.at_level(logging.WARNING, logger="server.engine.blocklist"),
        TestClient(create_app(serving(alpha, state))) as client,
    ):
        assert blocked(client) == []
        assert complete(client)["memory"]["blocked"] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if str(legacy) in w and "not applied" in w]) == 1
    assert json.loads(legacy.read_text())["blocked"] == [{"level": 1, "node": 2}]  # left alone


def test_a_bank_rebuilt_in_place_is_served_with_its_new_blocks(tmp_path: Path) -> None:
    bank_dir, state = tmp_path / "bank", tmp_path / "state"
    old = write_bank(bank_dir, bank_id="alpha", seed=0)
    with TestClient(create_app(serving(old, state))) as client:
        before = complete(client)
        client.post("/v1/memory/block", json={"level": 2, "node": 3}, headers=ADMIN)

    new = write_bank(bank_dir, bank_id="alpha", seed=1, overwrite=True)  # same id, new weights
    assert new.fingerprint() != old.fingerprint()
    with TestClient(create_app(serving(new, state))) as client:
        after = complete(client)
        assert blocked(client) == []  # the old build's blocklist is not this build's

    memory = after["memory"]
    assert memory["degraded"] == []
    assert [(b["level"], b["node"], b["tier"]) for b in memory["blocks"]] == [
        (1, 2, "flash"),
        (2, 9, "disk"),
    ]
    assert logprobs(after) != logprobs(before)

    # Exactly what the new build gives on tiers that never held the old one.
    with TestClient(create_app(serving(new, tmp_path / "fresh-state"))) as client:
        assert logprobs(complete(client)) == logprobs(after)


def logprobs(response: dict[str, Any]) -> list[float | None]:
    (choice,) = response["choices"]
    values: list[float | None] = choice["logprobs"]["token_logprobs"]
    return values
