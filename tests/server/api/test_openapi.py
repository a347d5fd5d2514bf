"""The served `/openapi.json` describes the API: every body, every response and error shape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.settings import Settings


@pytest.fixture
def schema(demo_settings: Settings) -> Iterator[dict[str, Any]]:
    with TestClient(create_app(demo_settings)) as c:
        yield c.get("/openapi.json").json()


def test_every_post_documents_its_body_and_its_errors(schema: dict[str, Any]) -> None:
    posts = {p: ops["post"] for p, ops in schema["paths"].items() if "post" in ops}
    assert set(posts) >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/v1/memory/route",
        "/v1/memory/block",
    }
    for path, op in posts.items():
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body, path
        assert "400" in op["responses"], path
        assert "422" not in op["responses"], path  # bad input is a 400 here, not FastAPI's 422
        error = op["responses"]["400"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}, path


def test_response_models_and_the_bearer_scheme_are_documented(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    for name in ("CompletionResponse", "ChatCompletionResponse", "TokenizeResponse", "ModelList"):
        assert name in components
    assert "HTTPValidationError" not in components
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
