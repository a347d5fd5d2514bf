"""What the bench scripts share: the machine's description, a server in a background thread,
percentiles.

Imported as `bench.common` after a script has put the repository root first on sys.path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def pct(xs: Sequence[float], q: float) -> float:
    """The `q`-th percentile of `xs` (0 to 100, interpolated); NaN when there are none."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


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


@dataclass
class Moto:
    proc: subprocess.Popen[bytes]
    endpoint: str
    stopped: bool = False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        if self.stopped:
            self.proc.send_signal(signal.SIGCONT)
            self.stopped = False


def _die_with_parent() -> None:
    """In the child: be killed if this bench dies first (even by SIGKILL), stopped or not."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def moto_process() -> Iterator[Moto]:
    """moto's S3 server in its own process (its own GIL), on a free loopback port; a bench may
    SIGSTOP it (`Moto.stop`). Always resumed and killed at the end, and killed with the bench."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(  # noqa: S603
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )
    moto = Moto(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20.0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not accept connections in 20 s") from None
                time.sleep(0.1)
        yield moto
    finally:
        moto.resume()
        proc.kill()
        proc.wait()
