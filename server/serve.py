"""`hmem serve`: settings from flags, `HMEM_*` environment and an optional file, then uvicorn.

With no arguments it serves the packaged demo bank on the embedded default tiers under the data
directory (`server.defaults`), on 127.0.0.1:8000.

Everything that can fail on the user's input fails before the model loads, in one line: the
settings, then the port (bound here, and that very socket handed to uvicorn, so a taken port is
found in milliseconds and nothing can take it in between), then the bank. The app's lifespan,
which opens the runtime (tiers, model, engine), runs here around uvicorn rather than inside it:
an error there is raised to `hmem` as it is, instead of being logged by uvicorn as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from server.api.app import create_app
from server.bank.reader import Bank
from server.defaults import bank_dir
from server.settings import Settings, load_settings
from tiers.errors import ConfigError

# Flags that set the setting of the same name.
SETTING_FLAGS = (
    "bank", "data_dir", "host", "port", "device", "dtype", "cloud_endpoint", "chat_template",
    "context_length",
)  # fmt: skip
# The --replicas flags that are `ClusterOptions` of the same name (server/cluster/app.py).
CLUSTER_OPTION_FLAGS = ("routing", "replica_cpus", "max_replicas_per_node", "spill")

logger = logging.getLogger("uvicorn.error")  # uvicorn's own: its format and level


class ServeError(Exception):
    """The server cannot start; the message says why and what to change."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = commands.add_parser(
        "serve",
        help="serve a bank over HTTP (OpenAI-compatible); with no arguments, the demo bank",
        description="Serve a memory bank over HTTP. Settings come from these flags, HMEM_* "
        "environment variables (HMEM_STORE__DEADLINE_S=0.5 sets store.deadline_s) and an "
        "optional settings file, strongest first.",
    )
    s.add_argument("--config", type=Path, metavar="FILE", help="settings file (TOML or JSON)")
    s.add_argument("--bank", type=Path, metavar="DIR", help="bank directory (default: demo bank)")
    s.add_argument("--data-dir", type=Path, metavar="DIR", help="state directory")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000; 0: any free port)")
    s.add_argument("--device", choices=["cpu", "cuda"])
    s.add_argument("--dtype", choices=["float32", "bfloat16"])
    s.add_argument("--cloud-endpoint", metavar="URL", help="S3 endpoint for the deepest level")
    s.add_argument(
        "--chat-template",
        type=Path,
        metavar="FILE",
        help="Jinja2 chat template for chat prompts, replacing the model's own",
    )
    s.add_argument(
        "--context-length",
        type=int,
        metavar="N",
        help="tokens per sequence, prompt and completion; sizes the KV cache "
        "(default: the model's max_position_embeddings)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    c = s.add_argument_group(
        "many replicas (Ray Serve; pip install 'hmem[cluster]', docs/cluster.md)"
    )
    c.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="serve with N engine replicas behind one ingress, requests routed to the replica "
        "that holds their memory (default: one process, no Ray)",
    )
    c.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster ('auto' on a machine that ran `ray start`, or HOST:6379); "
        "default: start a Ray on this machine",
    )
    c.add_argument(
        "--replica-cpus",
        type=float,
        metavar="F",
        help="Ray CPUs reserved per replica, and its torch threads (default: this machine's "
        "cores / N; with --ray-address, 1 CPU and every core of its machine)",
    )
    c.add_argument(
        "--max-replicas-per-node",
        type=int,
        metavar="K",
        help="at most K replicas per machine (1: one per machine; default: no limit)",
    )
    c.add_argument(
        "--routing",
        choices=["residency", "ray"],
        help="residency: to the replica holding the path (default); ray: Ray Serve's "
        "power of two choices",
    )
    c.add_argument(
        "--spill",
        type=int,
        metavar="K",
        help="residency routing passes a replica holding the path over when it has K or more "
        "requests in flight beyond the least loaded one, so a hot subtree spreads (default: 4)",
    )
    s.set_defaults(run=run, user_errors=(ServeError,))


def read_settings(config_file: Path | None, **overrides: Any) -> Settings:
    """`load_settings`, with a settings file that does not parse named in the error."""
    try:
        return load_settings(config_file, **overrides)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        kind = "JSON" if config_file is not None and config_file.suffix == ".json" else "TOML"
        raise ConfigError(f"settings file {config_file} is not valid {kind}: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(f"settings file {config_file} is a directory") from None


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds one; a ServeError in one line if it can't."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Like uvicorn: a port whose last connections are still in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except socket.gaierror:
        sock.close()
        raise ServeError(f"cannot listen on {where}: unknown host {host!r} (--host)") from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"{where} is in use (another server?): stop it, or serve on another port with "
                "--port or HMEM_PORT"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ServeError(f"cannot listen on {where}: no such address here (--host)") from None
        if exc.errno == errno.EACCES:
            raise ServeError(
                f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
            ) from None
        raise ServeError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        name: value for name in SETTING_FLAGS if (value := getattr(args, name)) is not None
    }
    settings = read_settings(args.config, **overrides)
    if args.replicas is None:
        for flag in ("ray_address", *CLUSTER_OPTION_FLAGS):
            if getattr(args, flag) is not None:
                raise ServeError(f"--{flag.replace('_', '-')} needs --replicas N")
        # Before anything is opened: a taken port fails here in milliseconds, not after the model.
        with listen_socket(settings.host, settings.port) as listener:
            return _serve(settings, listener, log_level=args.log_level)
    return _serve_replicas(settings, args)


def _serve_replicas(settings: Settings, args: argparse.Namespace) -> int:
    """`--replicas N`: the Ray Serve application (server/cluster)."""
    from server.cluster.command import run_cluster

    try:
        from server.cluster.app import ClusterOptions
    except ImportError:
        raise ServeError(
            "--replicas needs Ray Serve, which is not installed: pip install 'hmem[cluster]'"
        ) from None
    if args.spill is not None and args.routing == "ray":
        raise ServeError("--spill applies to --routing residency, not to Ray's own routing")
    # Flags not given keep `ClusterOptions`' defaults.
    given = {
        name: value for name in CLUSTER_OPTION_FLAGS if (value := getattr(args, name)) is not None
    }
    try:
        options = ClusterOptions(replicas=args.replicas, local=args.ray_address is None, **given)
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")  # the option's name first: say it as the flag
        raise ServeError(f"--{name.replace('_', '-')} {rest}") from None
    # The port is checked free here, in milliseconds; Serve's proxy binds it once Ray is up.
    with listen_socket(settings.host, settings.port) as probe:
        port = probe.getsockname()[1]
    return run_cluster(
        settings, options, address=args.ray_address, port=port, log_level=args.log_level
    )


def _serve(settings: Settings, listener: socket.socket, *, log_level: str) -> int:
    bank = Bank.open(bank_dir(settings), check_files=False)  # a bad bank: one line
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # lifespan "off": uvicorn would log a startup error as a traceback; `serve` runs it instead.
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    host, port = listener.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def serve() -> None:
        async with app.router.lifespan_context(app):  # opens the runtime; closes it on the way out
            logger.info(
                "serving bank %r on http://%s (Ctrl-C to stop)", bank.manifest.bank_id, where
            )
            await server.serve(sockets=[listener])

    try:
        with _signals_raised(), asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve())
    except _Terminated:
        # SIGTERM (`docker stop`), after a clean shutdown: end as the signal would have ended
        # the process (PID 1 in a container ignores it, and returns 0).
        signal.raise_signal(signal.SIGTERM)
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed, as uvicorn's `loop="auto"` picks it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class _Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that the runtime still closes on the way out."""


@contextlib.contextmanager
def _signals_raised() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM `_Terminated` in the main thread.

    While it serves, uvicorn takes both signals itself (a graceful shutdown) and raises them
    again once it has stopped. asyncio's own SIGINT handling would then cancel the task that is
    closing the runtime; raised as exceptions instead, they unwind through the app's lifespan,
    which closes the runtime (engine thread, tiers) before `hmem` reports the interrupt. Before
    uvicorn starts (the model loading), Ctrl-C stops the start at once the same way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, interrupt),
        signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
