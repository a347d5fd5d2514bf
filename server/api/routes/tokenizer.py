"""`POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`, at the server root as vLLM has them.

Token ids are exactly those the completion and chat routes feed the model: a text prompt gets
the BOS the server adds (`add_special_tokens`), a conversation is rendered by the chat template,
which writes its own.
"""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import CompletionsDep, PolicyDep
from server.api.schemas.common import error_responses
from server.api.schemas.tokenizer import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from server.engine.text import token_strings

router = APIRouter(tags=["tokenizer"])


@router.post(
    "/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 503)
)
async def tokenize(
    req: TokenizeRequest, policy: PolicyDep, service: CompletionsDep
) -> TokenizeResponse:
    if isinstance(req, TokenizeChatRequest):
        ids = await service.tokenize_chat(
            model=req.model,
            turns=req.turns(),
            add_generation_prompt=req.add_generation_prompt,
            add_special_tokens=req.add_special_tokens,
        )
    else:
        ids = await service.tokenize(
            model=req.model, text=req.prompt, add_special_tokens=req.add_special_tokens
        )
    return TokenizeResponse(
        count=len(ids),
        max_model_len=service.context_length,
        tokens=ids,
        token_strs=token_strings(service.tokenizer, ids) if req.return_token_strs else None,
    )


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=error_responses(400, 401, 404, 503),
)
async def detokenize(
    req: DetokenizeRequest, policy: PolicyDep, service: CompletionsDep
) -> DetokenizeResponse:
    return DetokenizeResponse(prompt=await service.detokenize(model=req.model, ids=req.tokens))


@router.get(
    "/tokenizer_info",
    response_model=TokenizerInfoResponse,
    responses=error_responses(401, 503),
)
async def tokenizer_info(policy: PolicyDep, service: CompletionsDep) -> TokenizerInfoResponse:
    tok = service.tokenizer
    return TokenizerInfoResponse.of(
        tok.config,
        tokenizer_class=tok.config.get("tokenizer_class", "PreTrainedTokenizerFast"),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        model_max_length=service.context_length,
        chat_template=tok.chat_template,
    )
