"""`hmem serve`: settings from flags, `HMEM_*` environment and an optional file, then uvicorn.

With no arguments it serves the packaged demo bank on the embedded default tiers under the data
directory (`server.defaults`), on 127.0.0.1:8000; with `--replicas N`, N engine replicas on Ray
Serve (`server.cluster`). The flags become settings and cluster options here; reading the
settings, binding the port and serving are `server.api.server`'s, starting Ray and deploying
`server.cluster.launch`'s. Ray is imported only for `--replicas`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from server.api.server import ServeError, hold_data_dir, listen_socket, run_server
from server.defaults import data_dir
from server.settings import Settings, load_settings

# Flags that set the setting of the same name.
SETTING_FLAGS = (
    "bank", "data_dir", "host", "port", "device", "dtype", "weights", "cloud_endpoint",
    "chat_template", "context_length",
)  # fmt: skip
# The --replicas flags that are `ClusterOptions` of the same name (server/cluster/app.py).
CLUSTER_OPTION_FLAGS = ("routing", "replica_cpus", "max_replicas_per_node", "spill")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve` to the `hmem` subcommands."""
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
    s.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="compute dtype (default float32)"
    )
    s.add_argument(
        "--weights",
        choices=["float", "int8"],
        help="anchor weights in the compute dtype, or int8 with a scale per output channel "
        "(half the bytes per token; default float)",
    )
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
    s.set_defaults(run=_serve, user_errors=(ServeError,))


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        name: value for name in SETTING_FLAGS if (value := getattr(args, name)) is not None
    }
    settings = load_settings(args.config, **overrides)
    if args.replicas is None:
        for flag in ("ray_address", *CLUSTER_OPTION_FLAGS):
            if getattr(args, flag) is not None:
                raise ServeError(f"--{flag.replace('_', '-')} needs --replicas N")
    # Before anything is opened, the port: a taken one fails here in milliseconds, not after the
    # model. Then the data directory: one server per directory.
    if args.replicas is None:
        with (
            listen_socket(settings.host, settings.port) as listener,
            hold_data_dir(data_dir(settings)),
        ):
            return run_server(settings, listener, log_level=args.log_level)
    with hold_data_dir(data_dir(settings)):
        return _serve_replicas(settings, args)


def _serve_replicas(settings: Settings, args: argparse.Namespace) -> int:
    """`--replicas N`: the Ray Serve application (server/cluster)."""
    from server.cluster.launch import run_cluster

    try:
        from server.cluster.app import ClusterOptions, OptionError
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
    except OptionError as exc:
        raise ServeError(f"--{exc.option.replace('_', '-')} {exc.rule}") from None
    # The port is checked free here, in milliseconds; Serve's proxy binds it once Ray is up.
    with listen_socket(settings.host, settings.port) as probe:
        port = probe.getsockname()[1]
    return run_cluster(
        settings, options, address=args.ray_address, port=port, log_level=args.log_level
    )
