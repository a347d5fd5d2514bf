"""The serving layer's refusals, each a `RequestError` naming the field it is about."""

from __future__ import annotations

from server.engine.errors import RequestError

__all__ = ["ContextLengthError", "RequestError", "UnknownModelError"]


class ContextLengthError(RequestError):
    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class UnknownModelError(RequestError):
    """A model name this server does not serve (a 404)."""

    def __init__(self, name: str, served: str) -> None:
        super().__init__(
            f"model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )
