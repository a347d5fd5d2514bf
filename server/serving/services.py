"""`Services`: what the API is handed once the runtime is open, built from it in one place.

The routes get a `CompletionService`, a `MemoryService` and the served model's card through
FastAPI dependencies (`server/api/deps.py`); none of them sees the `Runtime` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from server.runtime import Runtime
from server.serving.completions import CompletionService
from server.serving.limits import Limits
from server.serving.memory import MemoryService
from server.serving.metrics import ServerMetrics


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model, as `/v1/models` describes it."""

    name: str
    bank_id: str
    fingerprint: str  # the bank build's: replicas compare it with the cluster ingress's
    created: int  # when the server started (Unix seconds)
    context_length: int
    memory_type: str
    levels: int
    branching: int
    widths: list[int]
    generic: bool


@dataclass(frozen=True, slots=True)
class Services:
    completions: CompletionService
    memory: MemoryService
    model: ModelInfo
    store_metrics: CollectorRegistry  # the tiers' figures, served with the server's on /metrics

    @classmethod
    def of(cls, rt: Runtime, metrics: ServerMetrics) -> Services:
        m = rt.bank.manifest
        completions = CompletionService(
            tokenizer=rt.tokenizer,
            vocab_size=rt.model.config.vocab_size,
            resolver=rt.resolver,
            engine=rt.engine,
            limits=Limits.of(rt.settings, context_length=rt.context_length),
            model_name=rt.model_name,
            metrics=metrics,
        )
        memory = MemoryService(resolver=rt.resolver, blocklist=rt.blocklist, store=rt.store)
        model = ModelInfo(
            name=rt.model_name,
            bank_id=m.bank_id,
            fingerprint=rt.fingerprint,
            created=int(rt.started_at),
            context_length=rt.context_length,
            memory_type=str(m.memory_type),
            levels=m.levels,
            branching=m.branching,
            widths=list(m.widths),
            generic=bool(m.generic),
        )
        return cls(completions, memory, model, rt.store_metrics.registry)

    @property
    def alive(self) -> bool:
        """The engine's model thread is running (a dead one serves nothing more)."""
        return self.completions.engine.alive
