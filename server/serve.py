"""`hmem serve`: settings from flags, `HMEM_*` environment and an optional file, then uvicorn.

With no arguments it serves the packaged demo bank on the embedded default tiers under the data
directory (`server.defaults`), on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import uvicorn

from server.api.app import create_app
from server.bank.reader import Bank
from server.defaults import bank_dir
from server.settings import load_settings

# Flags that set the setting of the same name.
SETTING_FLAGS = (
    "bank", "data_dir", "host", "port", "device", "dtype", "cloud_endpoint", "chat_template",
)  # fmt: skip


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
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--device", choices=["cpu", "cuda"])
    s.add_argument("--dtype", choices=["float32", "bfloat16"])
    s.add_argument("--cloud-endpoint", metavar="URL", help="S3 endpoint for the deepest level")
    s.add_argument(
        "--chat-template",
        type=Path,
        metavar="FILE",
        help="Jinja2 chat template for chat prompts, replacing the model's own",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        name: value for name in SETTING_FLAGS if (value := getattr(args, name)) is not None
    }
    settings = load_settings(args.config, **overrides)
    Bank.open(bank_dir(settings), check_files=False)  # a bad bank: one line, before uvicorn
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        loop="auto",
        timeout_graceful_shutdown=10,
    )
    return 0
