"""`GET /v1/models` and `GET /v1/models/{model_id}`: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import PolicyDep, RuntimeDep
from server.api.errors import APIError
from server.api.schemas.common import error_responses
from server.api.schemas.models import ModelCard, ModelList, ModelMemory
from server.runtime import Runtime

router = APIRouter(tags=["models"])


def model_card(rt: Runtime) -> ModelCard:
    m = rt.bank.manifest
    return ModelCard(
        id=rt.model_name,
        created=int(rt.started_at),
        context_length=rt.context_length,
        memory=ModelMemory(
            type=str(m.memory_type),
            levels=m.levels,
            branching=m.branching,
            widths=list(m.widths),
            generic=bool(m.generic),
        ),
    )


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(policy: PolicyDep, rt: RuntimeDep) -> ModelList:
    return ModelList(data=[model_card(rt)])


@router.get(
    "/v1/models/{model_id}", response_model=ModelCard, responses=error_responses(401, 404, 503)
)
async def get_model(model_id: str, policy: PolicyDep, rt: RuntimeDep) -> ModelCard:
    if model_id != rt.model_name:
        raise APIError(404, f"model {model_id!r} does not exist", code="model_not_found")
    return model_card(rt)
