"""The routes' dependencies: the serving layer's services, the caller's policy, admin access.

Each is an `Annotated` type a route names in its signature; the bearer scheme is FastAPI's, so
`/openapi.json` documents it. Routes get services, never the `Runtime`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.access import Access
from server.api.errors import APIError
from server.serving.completions import CompletionService
from server.serving.memory import MemoryService
from server.serving.metrics import ServerMetrics
from server.serving.services import ModelInfo, Services
from server.settings import KeyPolicy

_bearer = HTTPBearer(auto_error=False, description="an API key, or the admin key")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is None or not credentials.credentials.strip():
        return None
    return credentials.credentials.strip()


def services_of(request: Request) -> Services | None:
    """The services while the runtime is open; None while starting or stopping."""
    services: Services | None = getattr(request.app.state, "services", None)
    return services


def get_services(request: Request) -> Services:
    services = services_of(request)
    if services is None:
        raise APIError(503, "the server is starting or stopping", code="not_ready")
    return services


def get_completions(services: Annotated[Services, Depends(get_services)]) -> CompletionService:
    return services.completions


def get_memory(services: Annotated[Services, Depends(get_services)]) -> MemoryService:
    return services.memory


def get_model(services: Annotated[Services, Depends(get_services)]) -> ModelInfo:
    return services.model


def get_metrics(request: Request) -> ServerMetrics:
    metrics: ServerMetrics = request.app.state.metrics
    return metrics


def get_policy(request: Request, credentials: Credentials) -> KeyPolicy | None:
    access: Access = request.app.state.access
    return access.policy(_token(credentials))


def require_admin(request: Request, credentials: Credentials) -> None:
    access: Access = request.app.state.access
    access.require_admin(_token(credentials))


CompletionsDep = Annotated[CompletionService, Depends(get_completions)]
MemoryDep = Annotated[MemoryService, Depends(get_memory)]
ModelDep = Annotated[ModelInfo, Depends(get_model)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
PolicyDep = Annotated[KeyPolicy | None, Depends(get_policy)]
AdminDep = Annotated[None, Depends(require_admin)]
