"""`/tokenize`, `/detokenize` and `/tokenizer_info` as vLLM serves them: the ids are exactly the
ones the model is fed, the same as `transformers` gives from the anchor directory, and a prompt
sent as token ids is scored exactly as the same text sent as a string."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from server.api.app import create_app
from server.defaults import DEMO_BANK
from server.settings import Settings

TEXTS = ["The atomic number of Iron is", "naïve café — 東京", "<s> inside"]


@pytest.fixture
def client(demo_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(demo_settings)) as c:
        yield c


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_gives_the_ids_transformers_gives(client: TestClient, text: str) -> None:
    hf = AutoTokenizer.from_pretrained(DEMO_BANK / "anchor")
    r = client.post("/tokenize", json={"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == hf(text)["input_ids"]
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512
    assert len(body["token_strs"]) == body["count"]
    bare = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == hf(text, add_special_tokens=False)["input_ids"]
    back = client.post("/detokenize", json={"tokens": body["tokens"]}).json()
    assert back["prompt"] == hf.decode(body["tokens"], skip_special_tokens=True)


def test_tokenize_chat_counts_what_chat_completions_feeds(client: TestClient) -> None:
    messages = [{"role": "user", "content": "The capital of"}]
    ids = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    done = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert done.json()["usage"]["prompt_tokens"] == len(ids)
    hf = AutoTokenizer.from_pretrained(DEMO_BANK / "anchor")
    encoded = hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert ids == encoded["input_ids"]


def test_tokenizer_info_describes_the_anchor(client: TestClient) -> None:
    info = client.get("/tokenizer_info").json()
    assert info["bos_token"] == "<s>"
    assert info["eos_token"] == "</s>"
    assert info["model_max_length"] == 512
    assert "{{ bos_token }}" in info["chat_template"]
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_bad_tokenizer_requests_are_400(client: TestClient) -> None:
    r = client.post("/detokenize", json={"tokens": [1, 99999]})
    assert r.status_code == 400
    assert "outside" in r.json()["error"]["message"]
    r = client.post("/tokenize", json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404
    assert client.post("/tokenize", json={}).status_code == 400


def test_a_token_id_prompt_scores_as_its_text(client: TestClient) -> None:
    text = "The atomic number of Iron is 26."
    ids = client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    as_text = client.post(
        "/v1/completions",
        json={"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
    ).json()["choices"][0]["logprobs"]
    as_ids = client.post(
        "/v1/completions",
        json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
    ).json()["choices"][0]["logprobs"]
    assert as_ids == as_text
    # As lm-evaluation-harness sends them: without the BOS, which the server adds, as it does
    # to a string prompt; scored the same.
    bare = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    as_bare = client.post(
        "/v1/completions",
        json={
            "prompt": bare["tokens"],
            "max_tokens": 1,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
        },
    ).json()["choices"][0]["logprobs"]
    assert as_bare == as_text
