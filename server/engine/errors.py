"""The errors of a request the engine's layer refuses: each names the field it is about.

`RequestError` is a `ValueError` (house style: bad input is a 400) that carries `param`, the
request field to change, and `code`, OpenAI's machine-readable reason. The API maps the whole
tree to status codes in one place (`server/api/errors.py`) and never reads a field name out of a
message.
"""

from __future__ import annotations

__all__ = ["RequestError"]


class RequestError(ValueError):
    """A request the server cannot serve as asked; `param` names the field to change."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code or "invalid_value"
