"""Chat templates: the Jinja2 text that turns a list of chat messages into one prompt string.

A checkpoint carries its template in `tokenizer_config.json` (or `chat_template.jinja`); an
operator may replace it with a file. It is rendered the way Hugging Face's
`apply_chat_template` renders it: a sandboxed, immutable environment with `trim_blocks` and
`lstrip_blocks`, loop controls, `tojson` (no HTML escaping), `raise_exception`, `strftime_now`,
and the `{% generation %}` tag, so the prompt the server builds from messages is the text
`transformers` builds from the same checkpoint. A template is compiled once, when it is loaded:
a syntax error stops start-up instead of failing every request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["NO_CHAT_TEMPLATE", "ChatTemplate", "ChatTemplateError"]

NO_CHAT_TEMPLATE = "this model has no chat template; start the server with --chat-template FILE"


class ChatTemplateError(ValueError):
    """A chat template that is missing, does not parse, or refuses the messages it was given."""


class _RaisedByTemplate(jinja2.TemplateError):
    """What `raise_exception(message)` raises: the template's own message, for the client."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    Hugging Face templates; rendering a prompt keeps its body as it is."""

    tags = {"generation"}  # noqa: RUF012  (Jinja declares it a plain set on Extension)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as Hugging Face's does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: `self` is args[0]
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        super().__setitem__(name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with _")


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _dict
    env.globals["namespace"] = _Namespace
    return env


class ChatTemplate:
    """A compiled chat template. `origin` names where its text came from, for error messages."""

    def __init__(self, text: str, *, origin: str) -> None:
        try:
            self._template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"the chat template in {origin} does not parse: {_one_line(exc.message)} "
                f"(line {exc.lineno})"
            ) from None
        self.text = text
        self.origin = origin

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        documents: Sequence[Mapping[str, Any]] | None,
        context: Mapping[str, Any],
    ) -> str:
        """The prompt text of `messages`; `context` holds the special tokens and extra variables.

        Keys whose value is None are dropped from each message first, as `transformers` does
        (OpenAI clients send `"content": null` beside tool calls; templates test for absence).
        """
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"a chat message must be an object, not {message!r}")
            chat.append({k: v for k, v in message.items() if v is not None})
        variables = {
            **context,
            "messages": chat,
            "tools": None if tools is None else [dict(t) for t in tools],
            "documents": None if documents is None else [dict(d) for d in documents],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except _RaisedByTemplate as exc:
            raise ChatTemplateError(str(exc.message)) from None
        # What a template does to messages of an unexpected shape (a missing key, a number added
        # to a string): the request's fault, answered as bad input rather than a server error.
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as exc:
            raise ChatTemplateError(
                f"the chat template could not render these messages: {_one_line(str(exc))}"
            ) from None


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())
