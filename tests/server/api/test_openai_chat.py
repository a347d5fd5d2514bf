"""The official openai client's chat API, unmodified, against a live server: chat completions
rendered by the anchor's chat template, the demo answering its facts in chat, streaming with
usage, n and seeds, logprobs, stop strings, the memory extension, and its own exception types for
errors."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from server.defaults import DEMO_BANK
from server.settings import Settings, load_settings

QUESTION = "The atomic number of Thulium is"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You answer with numbers."},
    {"role": "user", "content": QUESTION},
]


@pytest.fixture
def client(demo_settings: Settings, live_server: Any) -> Iterator[openai.OpenAI]:
    server = live_server(demo_settings)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-key", max_retries=0) as c:
        yield c


def test_chat_completes_with_the_templated_prompt(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert done.object == "chat.completion"
    (choice,) = done.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert done.usage is not None
    # The prompt is the template's rendering: BOS, a role line and an end per message, and the
    # assistant's opening (byte tokens: one per character).
    rendered = "<|system|>\nYou answer with numbers.</s>\n<|user|>\n" + QUESTION + "</s>\n"
    rendered += "<|assistant|>\n"
    # <s> and each </s> are one token; every other character is one byte token.
    assert done.usage.prompt_tokens == 1 + len(rendered.replace("</s>", "E"))
    # Routed on the user's turn: the same path as the question asked as a completion.
    path = (done.model_extra or {})["memory"]["path"]
    plain = client.completions.create(model="demo", prompt=QUESTION, max_tokens=1)
    assert path == (plain.model_extra or {})["memory"]["path"]


def test_the_demo_answers_its_rare_fact_in_chat(client: openai.OpenAI) -> None:
    """Thulium is in the rarest bucket of the demo corpus: asked as a question in chat, the demo
    answers from its memory and ends its reply, as the conversations it was trained on do."""
    messages: list[Any] = [{"role": "user", "content": "What is the atomic number of Thulium?"}]
    done = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=64, temperature=0
    )
    (choice,) = done.choices
    reply = choice.message.content or ""
    assert re.search(r"\b69\b", reply), reply
    assert choice.finish_reason == "stop"
    off = client.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=64,
        temperature=0,
        extra_body={"memory": {"mode": "off"}},
    )
    assert not re.search(r"\b69\b", off.choices[0].message.content or "")


def test_chat_streams_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length")
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    whole = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_chat_n_and_seed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "demo", "messages": MESSAGES, "max_tokens": 12}
    a = client.chat.completions.create(**kwargs, n=3, seed=11, temperature=1.0)
    b = client.chat.completions.create(**kwargs, n=3, seed=11, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    lp = done.choices[0].logprobs
    assert lp is not None
    assert lp.content is not None
    assert "".join(t.token for t in lp.content) == done.choices[0].message.content
    for t in lp.content:
        assert len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy takes the top
        assert t.bytes == list(t.token.encode())


def test_chat_stop_memory_and_errors(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = whole.choices[0].message.content or ""
    assert len(text) >= 4
    cut = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stop=[text[2:4], "never", "appears", "in", "it", "at all"],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].message.content == text[: text.index(text[2:4])]
    assert cut.choices[0].finish_reason == "stop"
    off = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=2, extra_body={"memory": {"mode": "off"}}
    )
    assert (off.model_extra or {})["memory"]["blocks"] == []
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=[], max_tokens=1)
    assert "messages" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="demo",
            messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "tools are not supported" in str(bad.value)


def test_a_bank_without_a_chat_template_names_the_flag(tmp_path: Path, live_server: Any) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(DEMO_BANK, bank)
    (bank / "anchor" / "tokenizer_config.json").unlink()
    server = live_server(load_settings(bank=bank, data_dir=tmp_path / "state", warmup=False))
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1)
        assert "--chat-template" in str(bad.value)
        assert client.completions.create(model="demo", prompt=QUESTION, max_tokens=1).choices
    # The same bank with a template file given at start-up chats.
    template = tmp_path / "chat.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    settings = load_settings(
        bank=bank, data_dir=tmp_path / "state2", warmup=False, chat_template=template
    )
    server = live_server(settings)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as client:
        done = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1)
    assert done.usage is not None
    rendered = "You answer with numbers.\n" + QUESTION + "\n"
    assert done.usage.prompt_tokens == 1 + len(rendered)
