"""The official openai Python client, unmodified, against a live server: completes, streams,
reads logprobs, passes the memory extension, and gets its own exception types for errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from server.settings import KeyPolicy, Settings

PROMPT = "The atomic number of Thulium is"


@pytest.fixture
def client(demo_settings: Settings, live_server: Any) -> Iterator[openai.OpenAI]:
    settings = demo_settings.model_copy(update={"api_keys": {}, "admin_key": None})
    server = live_server(settings)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-key", max_retries=0) as c:
        yield c


def test_completes(client: openai.OpenAI) -> None:
    done = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0)
    assert done.object == "text_completion"
    (choice,) = done.choices
    assert choice.text.startswith(" 69")
    assert choice.finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 4
    memory = (done.model_extra or {})["memory"]
    assert len(memory["path"]) == 2


def test_streams(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0)
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_reads_logprobs(client: openai.OpenAI) -> None:
    done = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=3
    )
    lp = done.choices[0].logprobs
    assert lp is not None
    assert lp.tokens is not None
    assert lp.token_logprobs is not None
    assert lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == done.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen is not None
        assert len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy takes the top token


def test_memory_extension_and_errors(client: openai.OpenAI) -> None:
    off = client.completions.create(
        model="demo",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        extra_body={"memory": {"mode": "off"}},
    )
    assert (off.model_extra or {})["memory"]["blocks"] == []
    assert not off.choices[0].text.startswith(" 69")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=0)
    assert "max_tokens" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=1)
    assert [m.id for m in client.models.list()] == ["demo"]


def test_a_key_is_checked(demo_settings: Settings, live_server: Any) -> None:
    settings = demo_settings.model_copy(update={"api_keys": {"sk-right-key-1": KeyPolicy()}})
    server = live_server(settings)
    url = f"{server.url}/v1"
    with (
        openai.OpenAI(base_url=url, api_key="sk-wrong-key", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.completions.create(model="demo", prompt="x", max_tokens=1)
    with openai.OpenAI(base_url=url, api_key="sk-right-key-1", max_retries=0) as right:
        assert right.completions.create(model="demo", prompt="x", max_tokens=1).choices
