"""The routes' dependencies: the runtime, the generator, the caller's policy, admin access.

Each is an `Annotated` type a route names in its signature; the bearer scheme is FastAPI's, so
`/openapi.json` documents it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.access import Access
from server.api.errors import APIError
from server.engine.generation import Generator
from server.metrics import ServerMetrics
from server.runtime import Runtime
from server.settings import KeyPolicy

_bearer = HTTPBearer(auto_error=False, description="an API key, or the admin key")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is None or not credentials.credentials.strip():
        return None
    return credentials.credentials.strip()


def get_runtime(request: Request) -> Runtime:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise APIError(503, "the server is starting or stopping", code="not_ready")
    return rt


def get_generator(request: Request, rt: Annotated[Runtime, Depends(get_runtime)]) -> Generator:
    generator: Generator = request.app.state.generator
    return generator


def get_metrics(request: Request) -> ServerMetrics:
    metrics: ServerMetrics = request.app.state.metrics
    return metrics


def get_policy(request: Request, credentials: Credentials) -> KeyPolicy | None:
    access: Access = request.app.state.access
    return access.policy(_token(credentials))


def require_admin(request: Request, credentials: Credentials) -> None:
    access: Access = request.app.state.access
    access.require_admin(_token(credentials))


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
GeneratorDep = Annotated[Generator, Depends(get_generator)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
PolicyDep = Annotated[KeyPolicy | None, Depends(get_policy)]
AdminDep = Annotated[None, Depends(require_admin)]
