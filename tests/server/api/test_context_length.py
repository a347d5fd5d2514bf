"""`context_length`: the KV cache is sized for the deployment, and the API holds requests to it.

Through the real app and its lifespan on the demo bank (whose anchor has 512 positions), and
through `hmem serve` for the flag.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.cli import main
from server.serving.services import Services
from server.settings import Settings, load_settings
from tiers import ConfigError


def test_a_small_context_sizes_the_cache_and_bounds_requests(demo_settings: Settings) -> None:
    settings = demo_settings.model_copy(update={"context_length": 32})
    with TestClient(create_app(settings)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        assert isinstance(services, Services)
        cache = services.completions.engine.cache
        assert cache.k.shape[3] == cache.v.shape[3] == 32  # [L, B, n_kv, S, hd]
        (card,) = client.get("/v1/models").json()["data"]
        assert card["context_length"] == 32
        assert client.get("/tokenizer_info").json()["model_max_length"] == 32
        # A string prompt gets a BOS: "x" * 20 is 21 tokens, and 21 + 16 > 32.
        for body, param in [
            ({"prompt": "x" * 20, "max_tokens": 16}, "max_tokens"),
            ({"prompt": "x" * 40, "max_tokens": 1}, "prompt"),
        ]:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded"
            assert err["param"] == param
            assert "context length of 32 tokens" in err["message"]
        r = client.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 11})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 11


def test_the_smallest_context_still_warms_up(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "state", context_length=2, warmup=True)
    with TestClient(create_app(settings)) as client:
        bos = client.app.state.services.completions.tokenizer.bos_id  # type: ignore[attr-defined]
        assert isinstance(bos, int)
        other = bos + 1
        r = client.post("/v1/completions", json={"prompt": [[other]], "max_tokens": 1})
        assert r.status_code == 400  # with the BOS it is given, a 1-token prompt is 2 tokens
        r = client.post("/v1/completions", json={"prompt": [[bos]], "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_a_context_longer_than_the_model_is_refused_at_start(demo_settings: Settings) -> None:
    settings = demo_settings.model_copy(update={"context_length": 513})
    with (
        pytest.raises(ConfigError, match=r"context_length 513 .* max_position_embeddings 512"),
        TestClient(create_app(settings)),
    ):
        pass


@pytest.mark.parametrize(
    ("length", "message"),
    [
        ("1", "context_length: Input should be greater than or equal to 2"),
        ("4096", "context_length 4096 is more than the model's max_position_embeddings 512"),
    ],
)
def test_serve_takes_the_flag_and_refuses_a_bad_length_in_one_line(
    length: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--context-length", length, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hmem: error: ")
    assert message in err
    assert err.count("\n") == 1
