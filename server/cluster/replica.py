"""An engine replica: the whole single-machine server (`create_app`) inside a Ray Serve replica.

Each replica opens its own `Runtime` from the settings the `hmem serve` process read (bank,
tiers, anchor, engine; warmed up) in its constructor, so Ray Serve counts it live only once it
can serve. It answers `Forward`s from the ingress through the same app (`bridge.serve_asgi`),
reports what its RAM cache holds to the request router (`record_routing_stats`, polled by
Serve's controller every `request_routing_stats_period_s`), and fails Serve's health check when
its engine's model thread has died, so that Serve replaces it.

Plain Python, no Ray import: `server.cluster.app` wraps it as a deployment, and the tests and
bench can drive it directly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from server.api.app import create_app
from server.cluster.bridge import Forward, Frame, serve_asgi
from server.serving.services import Services
from server.settings import Settings

log = logging.getLogger(__name__)


class EngineReplica:
    """One engine replica; `replica_id` is the id the request router knows it by."""

    async def __init__(self, settings: dict[str, Any], replica_id: str | None = None) -> None:  # type: ignore[misc]
        self.settings = Settings.model_validate(settings)
        self.replica_id = replica_id or _serve_replica_id()
        self.app = create_app(self.settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        model = self.services.model
        self.fingerprint = model.fingerprint
        self._warned_hints = False
        log.info("replica %s serving bank %r", self.replica_id, model.bank_id)

    @classmethod
    async def open(cls, settings: dict[str, Any], replica_id: str) -> EngineReplica:
        """A replica outside Serve (tests, benches): the same constructor, awaited."""
        replica = cls.__new__(cls)
        await replica.__init__(settings, replica_id)  # type: ignore[misc]
        return replica

    @property
    def services(self) -> Services:
        services: Services | None = self.app.state.services
        if services is None:
            raise RuntimeError(f"replica {self.replica_id} is closed")
        return services

    async def serve_http(self, fwd: Forward) -> AsyncIterator[Frame]:
        """The response to `fwd`, as frames (`bridge.serve_asgi`)."""
        trust = fwd.fingerprint == self.fingerprint
        if fwd.hints and not trust and not self._warned_hints:
            self._warned_hints = True
            log.warning(
                "the ingress routed with bank build %s, this replica serves %s: routing "
                "prompts again here (is the same bank at the same path on every machine?)",
                fwd.fingerprint,
                self.fingerprint,
            )
        async for frame in serve_asgi(self.app, fwd, replica=self.replica_id, trust_hints=trust):
            yield frame

    def record_routing_stats(self) -> dict[str, Any]:
        """What the request router ranks this replica by (the nodes its RAM cache holds), and
        its cache's hits and misses for the ingress's per-replica gauges."""
        cache = self.services.memory.cache()
        return {"resident": cache.resident, "hits": cache.hits, "misses": cache.misses}

    def check_health(self) -> None:
        """Raise when this replica cannot serve: Serve then replaces it."""
        if not self.services.alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine's model thread has died")

    async def close(self) -> None:
        if self.app.state.services is not None:
            await self._lifespan.__aexit__(None, None, None)


def _serve_replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.to_full_id_str())
