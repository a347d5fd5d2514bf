"""`run_cluster`: the Ray Serve application on a local Ray, or on a running cluster, until a signal.

What `hmem serve --replicas N` (`server.cli.serve`) runs once the settings, the cluster options
and the port have passed; the bank is opened first, so a bad one fails in one line before Ray
starts. Then Ray starts (or joins `--ray-address`), Serve's HTTP proxy binds the settings' host
and port, and the application deploys; `run_cluster` returns only on Ctrl-C or SIGTERM, after
Serve and, when it started it, Ray have shut down.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from server.bank.reader import Bank
from server.defaults import bank_dir
from server.settings import Settings

log = logging.getLogger("hmem.cluster")


def run_cluster(
    settings: Settings,
    options: Any,
    *,
    address: str | None,
    port: int,
    log_level: str,
) -> int:
    """Serve `settings` with `options` (a `ClusterOptions`) until interrupted; the exit status.

    Ray is imported here, not at the top: `hmem serve` reports a missing Ray in one line first.
    """
    import ray
    from ray import serve

    from server.cluster.app import APP_NAME, build_app

    bank = Bank.open(bank_dir(settings), check_files=False)  # a bad bank: one line, before Ray
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    started_ray = not ray.is_initialized() and address is None
    local: dict[str, Any] = {}
    if address is None:
        # Ray's default object store is 30% of RAM in /dev/shm; requests and responses here are
        # kilobytes, and the replicas need that memory for their caches.
        local["object_store_memory"] = 256 * 2**20
    ray.init(
        address=address,
        namespace="hmem",
        include_dashboard=False,
        **local,
        logging_level=getattr(logging, log_level.upper()),
        log_to_driver=True,
    )
    where = f"[{settings.host}]:{port}" if ":" in settings.host else f"{settings.host}:{port}"
    try:
        serve.start(http_options={"host": settings.host, "port": port})
        log.info("deploying %d engine replicas (%s routing)", options.replicas, options.routing)
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/", blocking=False)
        log.info(
            "serving bank %r on http://%s with %d replicas (Ctrl-C to stop)",
            bank.manifest.bank_id,
            where,
            options.replicas,
        )
        _wait_for_signal()
    finally:
        try:
            serve.delete(APP_NAME)
            if started_ray:
                serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            if started_ray:
                ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    """Block until SIGINT (then raise KeyboardInterrupt: `hmem` exits 130) or SIGTERM (return).

    Handlers of its own, since Ray's driver replaces Python's SIGINT handler with one that does
    not interrupt a sleeping main thread.
    """
    got: list[int] = []
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if got[0] == signal.SIGINT:
        raise KeyboardInterrupt
