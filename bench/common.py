"""What the bench scripts share: the machine's description and a server in a background thread.

Imported as `bench.common` after a script has put the repository root first on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model, cores, Python and platform: printed and stored beside every figure."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores, python = os.cpu_count(), platform.python_version()
    return {"cpu": model, "cores": cores, "python": python, "platform": platform.platform()}


@contextlib.contextmanager
def local_server(settings: Any) -> Iterator[str]:
    """create_app(settings) under uvicorn in a background thread on loopback; yields its URL."""
    import uvicorn

    from server.api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start (see its log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
