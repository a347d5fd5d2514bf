"""Chat templates: rendered exactly as `transformers`' `apply_chat_template` renders them, encoded
with the BOS the template writes, replaced by `--chat-template`, and refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from server.cli import main
from server.defaults import DEMO_BANK
from server.model.config import AnchorConfig
from server.model.families import read_config
from server.runtime import Runtime
from server.settings import load_settings
from server.tokenizer import AnchorTokenizer, ChatTemplateError
from tiers.errors import ConfigError

DEMO_ANCHOR = DEMO_BANK / "anchor"

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "The atomic number of Thulium is"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Qu'est-ce que le 日本? 😀"},
        {"role": "assistant", "content": "Japan"},
        {"role": "user", "content": "And <s> or </s>?"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}],
        }
    ],
    [{"role": "assistant", "content": None, "tool_calls": []}, {"role": "user", "content": "x"}],
]

# A template that leans on what Hugging Face's environment provides: loop controls, namespace,
# the `tojson` filter, `raise_exception`, whitespace control, and tools in the context.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% if tools %}[tools] {{ tools | tojson }}
{% endif %}
{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('role ' + m['role'] + ' is not supported') }}
  {% endif %}
  {% if m['role'] == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
[{{ ns.n }}:{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}[assistant] {% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up an element's atomic number: é",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
        },
    }
]


def demo_config() -> AnchorConfig:
    return read_config(json.loads((DEMO_ANCHOR / "config.json").read_text()))


@pytest.fixture(scope="module")
def ours() -> AnchorTokenizer:
    return AnchorTokenizer.from_dir(DEMO_ANCHOR, demo_config())


@pytest.fixture(scope="module")
def hf() -> Any:
    return AutoTokenizer.from_pretrained(DEMO_ANCHOR)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_is_transformers_apply_chat_template(
    ours: AnchorTokenizer, hf: Any, chat: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    expected = hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.render_chat(chat, add_generation_prompt=add_generation_prompt) == expected


def test_the_demo_template_starts_with_one_bos_and_ends_with_the_assistant_line(
    ours: AnchorTokenizer, hf: Any
) -> None:
    text = ours.render_chat(CHATS[1])
    assert text == (
        "<s><|system|>\nAnswer in one word.</s>\n<|user|>\nQu'est-ce que le 日本? 😀</s>\n"
        "<|assistant|>\nJapan</s>\n<|user|>\nAnd <s> or </s>?</s>\n<|assistant|>\n"
    )
    ids = ours.encode(text, add_bos=False)  # the template wrote the BOS: encode adds none
    assert ids[0] == ours.bos_id
    assert ids[1] != ours.bos_id
    assert ids == hf.apply_chat_template(CHATS[1], add_generation_prompt=True)["input_ids"]
    assert ours.render_chat(CHATS[0], add_generation_prompt=False).endswith("</s>\n")


def test_a_richer_template_renders_as_transformers_does(ours: AnchorTokenizer, hf: Any) -> None:
    mine = AnchorTokenizer.from_dir(DEMO_ANCHOR, demo_config(), chat_template=RICH_TEMPLATE)
    chat = CHATS[1]
    expected = hf.apply_chat_template(
        chat, tools=TOOLS, chat_template=RICH_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert mine.render_chat(chat, tools=TOOLS) == expected
    assert '"description": "Look up an element\'s atomic number: é"' in expected  # no escaping
    assert mine.render_chat(chat) == hf.apply_chat_template(
        chat, chat_template=RICH_TEMPLATE, tokenize=False, add_generation_prompt=True
    )


def test_extra_variables_and_strftime_now_reach_the_template(ours: AnchorTokenizer) -> None:
    template = "{{ greeting }} {{ strftime_now('%Y') | length }} {{ pad_token }}"
    mine = AnchorTokenizer.from_dir(DEMO_ANCHOR, demo_config(), chat_template=template)
    assert mine.render_chat([], greeting="hi") == "hi 4 <pad>"


def test_raise_exception_is_a_chat_template_error_with_its_message() -> None:
    mine = AnchorTokenizer.from_dir(DEMO_ANCHOR, demo_config(), chat_template=RICH_TEMPLATE)
    with pytest.raises(ChatTemplateError) as info:
        mine.render_chat([{"role": "tool", "content": "69"}])
    assert str(info.value) == "role tool is not supported"
    with pytest.raises(ChatTemplateError, match="could not render these messages"):
        mine.render_chat([{"content": "no role"}, {"role": 3, "content": "x"}])


def test_a_template_syntax_error_fails_when_loaded(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match=r"does not parse: .*endfor.* \(line 1\)"):
        AnchorTokenizer.from_dir(
            DEMO_ANCHOR, demo_config(), chat_template="{% for m in messages %}{{ m }}"
        )
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    for name in ("tokenizer.json", "config.json"):
        (anchor / name).write_bytes((DEMO_ANCHOR / name).read_bytes())
    (anchor / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x"}))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json does not parse"):
        AnchorTokenizer.from_dir(anchor, demo_config())
    # The operator's file replaces the broken one, which is then never compiled.
    fixed = AnchorTokenizer.from_dir(anchor, demo_config(), chat_template="{{ bos_token }}")
    assert fixed.render_chat([]) == "<s>"


def test_chat_template_jinja_beside_the_config_is_the_template(tmp_path: Path) -> None:
    """transformers 5 saves the template as chat_template.jinja, which wins over the config's."""
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (anchor / name).write_bytes((DEMO_ANCHOR / name).read_bytes())
    (anchor / "chat_template.jinja").write_text(RICH_TEMPLATE)
    mine = AnchorTokenizer.from_dir(anchor, demo_config())
    assert mine.chat_template == RICH_TEMPLATE
    expected = AutoTokenizer.from_pretrained(anchor).apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True
    )
    assert mine.render_chat(CHATS[1]) == expected


def test_the_setting_checks_the_file_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.jinja"
    good.write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert load_settings(chat_template=good).chat_template == good
    monkeypatch.setenv("HMEM_CHAT_TEMPLATE", str(good))
    assert load_settings().chat_template == good
    monkeypatch.delenv("HMEM_CHAT_TEMPLATE")

    with pytest.raises(ConfigError, match=r"chat_template: .*chat template file .* does not exist"):
        load_settings(chat_template=tmp_path / "missing.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if add_generation_prompt %}\n<|assistant|>\n")
    # `hmem serve` stops before starting anything, with one line naming the file.
    assert main(["serve", "--chat-template", str(bad), "--data-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hmem: error: invalid settings: chat_template: ")
    assert f"the chat template in {bad} does not parse" in err
    assert "\n" not in err


def test_serve_help_lists_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--chat-template FILE" in capsys.readouterr().out


async def test_the_runtime_serves_the_file_given_in_settings(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    )
    runtime = await Runtime.open(
        load_settings(data_dir=tmp_path / "state", warmup=False, chat_template=template)
    )
    try:
        tok = runtime.tokenizer
        assert tok.chat_template == template.read_text()
        text = tok.render_chat([{"role": "user", "content": "Thulium?"}])
        assert text == "<s>Q: Thulium?\nA:"
        assert tok.encode(text, add_bos=False)[:2] == [1, *tok.encode("Q", add_bos=False)]
    finally:
        await runtime.close()
