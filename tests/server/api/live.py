"""A live server for tests whose client is another program (lm-evaluation-harness, schemathesis).

`serving(settings)` runs `create_app(settings)` under uvicorn on a free loopback port, in a thread,
for as long as its `with` block lasts, so a module-scoped fixture can share one server across the
tests of a module. conftest's `live_server` fixture serves through it for one test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.api.app import create_app
from server.settings import Settings, load_settings
from tests.conftest import free_port


def demo_settings(state: Path, **overrides: Any) -> Settings:
    """The packaged demo bank on the embedded default tiers under `state`, as conftest has it."""
    return load_settings(data_dir=state, warmup=False, **overrides)


@dataclass
class LiveServer:
    app: FastAPI
    url: str  # http://127.0.0.1:PORT
    server: uvicorn.Server


@contextmanager
def live(settings: Settings) -> Iterator[LiveServer]:
    """Serve `settings` on 127.0.0.1 until the block ends."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(app, f"http://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """Serve `settings` on 127.0.0.1; yields the base URL."""
    with live(settings) as server:
        yield server.url
