"""hmem as a Ray Serve application: one ingress deployment and N engine replicas.

`build_app(settings, ClusterOptions(...))` returns the application `hmem serve --replicas N`
runs (`server.cluster.launch`); `build(args)` is the same for Ray's own tooling:

    serve run server.cluster.app:build replicas=4 config=/etc/hmem/settings.toml

The settings are read once, where the application is built, and shipped to every replica as
values (paths made absolute), so replicas on other machines serve what this process was told,
not their own environment's defaults. docs/cluster.md has the design, docs/deploy.md the
operations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from server.cluster.bridge import Forward
from server.cluster.ingress import Ingress, IngressOptions, create_ingress_app, routing_executor
from server.cluster.placer import Placer
from server.cluster.replica import EngineReplica
from server.cluster.router import RayDefaultRouter, ResidencyRouter
from server.cluster.routing_state import DECISIONS, OBSERVED, live_routers, replica_reports
from server.defaults import bank_dir, data_dir
from server.settings import Settings, load_settings

Routing = Literal["residency", "ray"]
APP_NAME = "hmem"
ENGINE = "EngineReplica"
INGRESS = "Ingress"


class OptionError(ValueError):
    """A `ClusterOptions` value out of range; `option` names the field (the command line says
    it as its flag)."""

    def __init__(self, option: str, rule: str) -> None:
        super().__init__(f"{option} {rule}")
        self.option = option
        self.rule = rule


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    replicas: int = 2
    routing: Routing = "residency"
    # Ray CPUs per replica; None: this machine's cores / N on a local Ray, 1 on a cluster.
    replica_cpus: float | None = None
    local: bool = True  # Ray runs on this machine only (no --ray-address)
    max_replicas_per_node: int | None = None
    spill: int = 4  # requests in flight beyond the least loaded at which a holder is passed over
    stats_period_s: float = 1.0  # how often Serve collects each replica's residency report
    retries: int = 3
    health_check_period_s: float = 2.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise OptionError("replicas", f"must be at least 1, got {self.replicas}")
        if self.routing not in ("residency", "ray"):
            raise OptionError("routing", f"must be 'residency' or 'ray', got {self.routing!r}")
        if self.replica_cpus is not None and self.replica_cpus < 0:
            raise OptionError("replica_cpus", f"must be at least 0, got {self.replica_cpus}")
        if self.spill < 1:
            raise OptionError("spill", f"must be at least 1, got {self.spill}")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise OptionError(
                "max_replicas_per_node", f"must be at least 1, got {self.max_replicas_per_node}"
            )


def replica_cpus(options: ClusterOptions) -> float:
    """The Ray CPUs each replica reserves: as asked, else a share of this machine or 1."""
    if options.replica_cpus is not None:
        return options.replica_cpus
    return round(_cores() / options.replicas, 3) if options.local else 1.0


def shipped_settings(settings: Settings, options: ClusterOptions) -> dict[str, Any]:
    """`settings` as plain values for the replicas: paths absolute, the data directory named,
    and each replica's torch threads as many as the CPUs it reserved, unless set. On a cluster
    with no `replica_cpus` given, a replica's torch runs on every core of its machine (one
    replica per machine, `max_replicas_per_node` 1)."""
    values = settings.model_dump(exclude_unset=False)
    values["data_dir"] = data_dir(settings).resolve()
    values["bank"] = bank_dir(settings).resolve()
    for name in ("chat_template", "blocklist_file"):
        if values.get(name) is not None:
            values[name] = Path(values[name]).resolve()
    if values.get("admin_key") is not None:
        values["admin_key"] = settings.admin_key.get_secret_value() if settings.admin_key else None
    if values.get("torch_threads") is None and (options.local or options.replica_cpus):
        values["torch_threads"] = max(1, int(replica_cpus(options)))
    return values


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class EngineDeployment(EngineReplica):
    """The engine replica as Serve runs it (`EngineReplica`, with Serve's replica id)."""

    async def __del__(self) -> None:  # Serve awaits it on a graceful shutdown
        await self.close()


@serve.ingress()
class IngressDeployment:
    """The ingress replica: routes prompts, forwards to `engine`, serves the merged metrics."""

    def __init__(
        self, settings: dict[str, Any], engine: DeploymentHandle[Any], retries: int
    ) -> None:
        s = Settings.model_validate(settings)
        self.executor = routing_executor()
        placer = Placer.open(str(bank_dir(s)), executor=self.executor)
        self.ingress = Ingress(
            placer,
            engine,
            replica_reports,
            options=IngressOptions(retries=retries),
            observe=OBSERVED.record,
            decision=DECISIONS.pop,
        )

    async def _ready(self) -> None:
        """Make sure this process's router exists (it starts with the first request)."""
        if not live_routers():
            await self.ingress._one(Forward("GET", "/health", b"", [], b""), 60.0)

    def __serve_build_asgi_app__(self) -> Any:
        return create_ingress_app(self.ingress, ready=self._ready)


def build_app(settings: Settings, options: ClusterOptions) -> serve.Application:
    """The application: `options.replicas` engine replicas behind one ingress."""
    shipped = shipped_settings(settings, options)
    # By import path: Serve imports it where the handle lives (the ingress), in that process.
    router_cls = ResidencyRouter if options.routing == "residency" else RayDefaultRouter
    router_path = f"{router_cls.__module__}.{router_cls.__qualname__}"
    actor_options: dict[str, Any] = {"num_cpus": replica_cpus(options)}
    spread: dict[str, Any] = {}
    if options.max_replicas_per_node is not None:
        spread["max_replicas_per_node"] = options.max_replicas_per_node
    engine: Any = serve.deployment(
        EngineDeployment,
        name=ENGINE,
        num_replicas=options.replicas,
        ray_actor_options=actor_options,
        # Serve passes a replica over once this many requests are in flight on it; the engine's
        # own slots and queue are the same limit, so a full replica is never sent more.
        max_ongoing_requests=settings.max_batch + settings.max_queue,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=max(10.0, 3 * options.health_check_period_s),
        graceful_shutdown_timeout_s=10.0,
        **spread,
        request_router_config=RequestRouterConfig(  # pydantic v1 model: untyped fields
            request_router_class=router_path,  # type: ignore[arg-type]
            request_router_kwargs={"spill": options.spill}
            if options.routing == "residency"
            else {},
            request_routing_stats_period_s=options.stats_period_s,  # type: ignore[arg-type]
            request_routing_stats_timeout_s=max(5.0, 5 * options.stats_period_s),  # type: ignore[arg-type]
        ),
    )
    ingress: Any = serve.deployment(
        IngressDeployment,
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,  # it only waits on replicas; they bound the load
    )
    app: serve.Application = ingress.bind(shipped, engine.bind(shipped), options.retries)
    return app


def build(args: dict[str, str]) -> serve.Application:
    """The application for `serve run server.cluster.app:build key=value ...`.

    Keys: `config` (a settings file), `bank`, `replicas`, `routing`, `replica_cpus`,
    `max_replicas_per_node`, `spill`; the settings' environment (HMEM_*) applies as always.
    """

    # The options' own values, converted; the rest keep `ClusterOptions`' defaults.
    convert: dict[str, Any] = {"replicas": int, "routing": str, "replica_cpus": float,
                               "max_replicas_per_node": int, "spill": int}  # fmt: skip
    known = {"config", "bank", *convert}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; known: {sorted(known)}")
    overrides: dict[str, Any] = {}
    if "bank" in args:
        overrides["bank"] = Path(args["bank"])
    settings = load_settings(Path(args["config"]) if "config" in args else None, **overrides)
    import ray

    # `serve run` has connected to (or started) a Ray by now: one live node is one machine.
    nodes = []
    if ray.is_initialized():
        nodes = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    given = {name: conv(args[name]) for name, conv in convert.items() if name in args}
    return build_app(settings, ClusterOptions(local=len(nodes) <= 1, **given))
