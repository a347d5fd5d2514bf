"""API keys, per-key memory policy, the admin key, and a blocklist that holds across restarts and
keeps blocked blocks away from every tier (shown by the tier read counters)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from server.api.app import create_app
from server.settings import KeyPolicy, Settings

USER = "user-key-123456"
OFF_ONLY = "off-only-key-123"
SHALLOW = "shallow-key-1234"
ADMIN = "admin-secret-key"


def _keyed(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "api_keys": {
                USER: KeyPolicy(),
                OFF_ONLY: KeyPolicy(modes=["off"], explicit_path=False),
                SHALLOW: KeyPolicy(levels=[1]),
            }
        }
    )


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _tier_reads(client: TestClient) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("hmem_tier_reads_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_keys_are_required_when_configured(three_tier_settings: Settings) -> None:
    body = {"prompt": "hello", "max_tokens": 1}
    with TestClient(create_app(_keyed(three_tier_settings))) as client:
        for headers in ({}, _auth("wrong-key-0000"), {"Authorization": "Basic abc"}):
            r = client.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
            assert client.get("/v1/models", headers=headers).status_code == 401
        assert client.post("/v1/completions", json=body, headers=_auth(USER)).status_code == 200
        assert client.post("/v1/completions", json=body, headers=_auth(ADMIN)).status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key
        assert client.get("/ready").status_code == 200


def test_a_keys_policy_limits_its_memory(three_tier_settings: Settings) -> None:
    with TestClient(create_app(_keyed(three_tier_settings))) as client:

        def post(key: str, **memory: Any) -> Any:
            return client.post(
                "/v1/completions",
                json={"prompt": "hello", "max_tokens": 1, "memory": memory},
                headers=_auth(key),
            )

        r = post(OFF_ONLY)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "memory_mode_forbidden"
        assert post(OFF_ONLY, mode="off").status_code == 200
        r = post(OFF_ONLY, mode="off", path=[0, 0, 0])
        assert r.status_code == 400  # a path needs mode auto: checked before the policy
        r = post(USER, path=[1, 2, 3])
        assert r.status_code == 200
        assert r.json()["memory"]["path"] == [1, 2, 3]

        shallow = post(SHALLOW).json()["memory"]
        assert [b["level"] for b in shallow["blocks"]] == [1]
        assert shallow["degraded"] == [
            {"level": 2, "reason": "disabled", "fallback": "generic"},
            {"level": 3, "reason": "disabled", "fallback": "generic"},
        ]
        # It is shown only the levels it may read: the path down to level 1, no deeper node,
        # and not whether a deeper cluster is blocked (issue 26, finding 9).
        full = post(USER).json()["memory"]["path"]
        assert len(full) == 3
        assert shallow["path"] == full[:1]
        assert {b["node"] for b in shallow["blocks"]} == {full[0]}
        branching = client.get("/v1/models", headers=_auth(USER)).json()["data"][0]["memory"][
            "branching"
        ]
        level2 = full[0] * branching + full[1]
        assert client.post("/v1/memory/block", json={"level": 2, "node": level2},
                           headers=_auth(ADMIN)).status_code == 200  # fmt: skip
        again = post(SHALLOW).json()["memory"]
        assert again["blocked"] == []
        assert [d["reason"] for d in again["degraded"]] == ["disabled", "disabled"]
        assert post(USER).json()["memory"]["blocked"] == [2, 3]


def test_admin_endpoints_need_the_admin_key(three_tier_settings: Settings) -> None:
    with TestClient(create_app(_keyed(three_tier_settings))) as client:
        for method, url, body in (
            ("POST", "/v1/memory/block", {"level": 1, "node": 0}),
            ("POST", "/v1/memory/unblock", {"level": 1, "node": 0}),
            ("POST", "/v1/memory/prefetch", {"path": [0, 0, 0]}),
            ("GET", "/v1/memory/blocklist", None),
        ):
            r = client.request(method, url, json=body, headers=_auth(USER))
            assert r.status_code == 403, url
            assert r.json()["error"]["type"] == "permission_error"
            assert client.request(method, url, json=body).status_code == 401
            assert client.request(method, url, json=body, headers=_auth(ADMIN)).status_code == 200
    no_admin = three_tier_settings.model_copy(update={"admin_key": None})
    with TestClient(create_app(no_admin)) as client:
        r = client.post("/v1/memory/block", json={"level": 1, "node": 0}, headers=_auth(ADMIN))
        assert r.status_code == 403
        assert "no admin key" in r.json()["error"]["message"]


def test_a_blocked_cluster_is_never_read_and_stays_blocked_after_a_restart(
    three_tier_settings: Settings,
) -> None:
    path = [2, 1, 3]  # level-1 node 2; level-2 node 9; level-3 node 39
    body = {"prompt": "hello", "max_tokens": 2, "memory": {"path": path}}
    with TestClient(create_app(three_tier_settings)) as client:
        r = client.post("/v1/memory/block", json={"level": 1, "node": 2}, headers=_auth(ADMIN))
        assert r.json()["changed"] is True
        bad = client.post("/v1/memory/block", json={"level": 2, "node": 16}, headers=_auth(ADMIN))
        assert bad.status_code == 400  # level 2 has nodes 0..15
        before = _tier_reads(client)
        memory = client.post("/v1/completions", json=body).json()["memory"]
        assert memory["blocked"] == [1, 2, 3]
        assert memory["blocks"] == []
        assert [d["reason"] for d in memory["degraded"]] == ["blocked"] * 3
        assert _tier_reads(client) == before  # no tier was asked for any of them
        r = client.post("/v1/memory/prefetch", json={"path": path}, headers=_auth(ADMIN))
        assert [lv["status"] for lv in r.json()["levels"]] == ["skipped"] * 3
        assert _tier_reads(client) == before
        # Another subtree is unaffected.
        other = client.post("/v1/completions", json={**body, "memory": {"path": [1, 1, 1]}}).json()[
            "memory"
        ]
        assert other["blocked"] == []
        assert len(other["blocks"]) == 3

    with TestClient(create_app(three_tier_settings)) as client:  # a restart
        listed = client.get("/v1/memory/blocklist", headers=_auth(ADMIN)).json()
        assert listed == {"blocked": [{"level": 1, "node": 2}]}
        before = _tier_reads(client)
        memory = client.post("/v1/completions", json=body).json()["memory"]
        assert memory["blocked"] == [1, 2, 3]
        assert _tier_reads(client) == before
        client.post("/v1/memory/unblock", json={"level": 1, "node": 2}, headers=_auth(ADMIN))
        memory = client.post("/v1/completions", json=body).json()["memory"]
        assert memory["blocked"] == []
        assert {b["tier"] for b in memory["blocks"]} == {"flash", "disk", "cloud"}


def test_blocking_evicts_a_cached_block(three_tier_settings: Settings) -> None:
    body = {"prompt": "hello", "max_tokens": 1, "memory": {"path": [3, 0, 0]}}
    with TestClient(create_app(three_tier_settings)) as client:
        client.post("/v1/completions", json=body)
        resident = client.get("/v1/memory/cache").json()["resident"]
        assert 3 in resident["1"]
        assert 12 in resident["2"]
        client.post("/v1/memory/block", json={"level": 2, "node": 12}, headers=_auth(ADMIN))
        resident = client.get("/v1/memory/cache").json()["resident"]
        assert 3 in resident["1"]  # the parent is not blocked
        assert 12 not in resident["2"]
        assert 48 not in resident["3"]
