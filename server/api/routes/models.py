"""`GET /v1/models` and `GET /v1/models/{model_id}`: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import ModelDep, PolicyDep
from server.api.errors import APIError
from server.api.schemas.common import error_responses
from server.api.schemas.models import ModelCard, ModelList, ModelMemory
from server.serving.services import ModelInfo

router = APIRouter(tags=["models"])


def model_card(m: ModelInfo) -> ModelCard:
    return ModelCard(
        id=m.name,
        created=m.created,
        context_length=m.context_length,
        memory=ModelMemory(
            type=m.memory_type,
            levels=m.levels,
            branching=m.branching,
            widths=m.widths,
            generic=m.generic,
        ),
    )


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(policy: PolicyDep, model: ModelDep) -> ModelList:
    return ModelList(data=[model_card(model)])


@router.get(
    "/v1/models/{model_id}", response_model=ModelCard, responses=error_responses(401, 404, 503)
)
async def get_model(model_id: str, policy: PolicyDep, model: ModelDep) -> ModelCard:
    if model_id != model.name:
        raise APIError(404, f"model {model_id!r} does not exist", code="model_not_found")
    return model_card(model)
