"""One error shape for every failure, as OpenAI's API writes it, leaking no paths or secrets.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_value"}}

Handlers turn request-validation errors, HTTP errors, the errors of the layers below (a request
the generator cannot serve, a memory request the key may not make, a full queue, a shutdown, a
chat template that fails) and anything unexpected into that shape, in one place. An unexpected
exception is logged with its traceback and answered with a fixed message: its text may hold a
file path or a credential, so it never reaches the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.schemas.common import INVALID_UNICODE
from server.engine.engine import EngineClosedError, EngineOverloadedError
from server.engine.memory import MemoryForbiddenError
from server.serving.errors import RequestError, UnknownModelError
from server.tokenizer import ChatTemplateError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# pydantic names the member of a union that failed ("str", "list[int]", "function-after[...]")
# in an error's location; a client wants the field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if p in ("body", "query"):
            continue
        if isinstance(p, str) and ("[" in p or p in _TYPE_TAGS):
            break
        parts.append(str(p))
    return ".".join(parts)


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One line naming each bad field, and the first field's name as `param`."""
    if not errors:
        return "invalid request", None
    unicode = [e for e in errors if e.get("type") == INVALID_UNICODE]
    if unicode:  # the same string refused by every shape the body could take: said once
        return str(unicode[0]["msg"]), str(unicode[0]["ctx"]["param"])
    msgs = []
    for e in errors[:5]:
        where = _loc(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "invalid value"))
        msgs.append(f"{where}: {msg}" if where else msg)
    first = _loc(tuple(errors[0].get("loc", ()))) or None
    return "; ".join(msgs), first


_NOT_AN_OBJECT = frozenset({"model_attributes_type", "dict_type", "model_type"})


def _body_message(errors: list[Any]) -> str | None:
    """A whole-body problem (not JSON, not an object) in words, or None for field errors."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}"
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in _NOT_AN_OBJECT:
        return "the body must be a JSON object"
    return None


def to_api_error(exc: Exception) -> APIError:
    """The HTTP answer to an error of the layers below the API."""
    if isinstance(exc, RequestError):
        status = 400
        if isinstance(exc, UnknownModelError):
            status = 404
        elif isinstance(exc, MemoryForbiddenError):
            status = 403
        return APIError(status, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ChatTemplateError):
        return APIError(400, str(exc), param="messages", code="chat_template")
    if isinstance(exc, EngineOverloadedError):
        return APIError(
            429,
            "the server is at capacity; retry after the time in Retry-After",
            code="server_overloaded",
            headers={"Retry-After": str(round(exc.retry_after_s))},
        )
    if isinstance(exc, EngineClosedError):
        return APIError(503, "the server is shutting down", code="shutting_down")
    raise TypeError(f"no HTTP mapping for {type(exc).__name__}")


DOMAIN_ERRORS: tuple[type[Exception], ...] = (
    RequestError,
    ChatTemplateError,
    EngineOverloadedError,
    EngineClosedError,
)


def install(app: FastAPI) -> None:
    """Register the handlers that answer every error in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, _domain)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        whole = _body_message(errors)
        if whole is not None:
            return JSONResponse(error_body(400, whole, code="invalid_json"), status_code=400)
        message, param = validation_message(errors)
        return JSONResponse(
            error_body(400, message, param=param, code="invalid_request"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the body is not valid JSON (or not UTF-8)"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(
            error_body(exc.status_code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(500, "internal server error", code="internal_error"), status_code=500
        )
