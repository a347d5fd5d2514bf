"""The servers a bench runs against: child processes (moto's S3 server, `hmem serve`) that a
bench can SIGKILL, SIGSTOP and SIGCONT, restart on the same port and read the RSS of, and the app
under uvicorn in a background thread (`local_server`).

Every child is started with PR_SET_PDEATHSIG (Linux), so it dies with the bench even if the bench
is killed before its `finally` blocks run; `stop` sends SIGCONT first (a stopped process cannot
act on SIGTERM), then SIGTERM, then SIGKILL, each wait bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1
MOTO_KEY_ID = MOTO_SECRET = "test"  # noqa: S105 (moto accepts any credentials)


def free_port() -> int:
    """A loopback port free when asked (the OS's pick for a port-0 bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the bench goes away."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """One child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], *, log: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log, self.env = name, list(argv), log, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped by us

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.stopped = False

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """SIGKILL (after SIGCONT), and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(timeout=10)
        self.stopped = False

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGCONT, SIGTERM, and SIGKILL if it has not exited within `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self.stopped = False

    def rss_kib(self) -> int | None:
        """VmRSS from /proc/PID/status, in KiB; None when it is not running."""
        if not self.alive:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_http(self, url: str, *, timeout_s: float, ok: tuple[int, ...] = (200,)) -> float:
        """Seconds until GET `url` answers one of `ok`; raises if the child dies or time is up."""
        started = time.monotonic()
        for _ in range(int(timeout_s / 0.1) + 1):
            if not self.alive:
                raise RuntimeError(f"{self.name} exited; its log ends:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code in ok:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} not ready after {timeout_s:.0f} s; its log ends:\n{self.log_tail()}"
        )


def child_env() -> dict[str, str]:
    """This environment without HMEM_* (which would override the settings file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMEM_")}
    return env | {"PYTHONUNBUFFERED": "1"}


class Moto(Child):
    """moto's S3 server (`python -m moto.server`) on a fixed loopback port."""

    def __init__(self, port: int, log: Path) -> None:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        super().__init__("moto", argv, log=log, env=child_env())
        self.port = port

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        return self.wait_http(f"{self.endpoint_url}/moto-api/", timeout_s=timeout_s)


class HmemServer(Child):
    """`hmem serve --config FILE` (this checkout's `server.cli`) on a loopback port."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        argv = [sys.executable, "-m", "server.cli", "serve", "--config", str(config)]
        super().__init__("hmem serve", [*argv, "--log-level", "warning"], log=log, env=child_env())
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        return self.wait_http(f"{self.url}/ready", timeout_s=timeout_s)


@contextlib.contextmanager
def moto_process(log: Path = Path(os.devnull)) -> Iterator[Moto]:
    """moto's S3 server in its own process (its own GIL) on a free loopback port, ready; a bench
    may SIGSTOP it (`Moto.pause`). Always resumed and killed at the end, and killed with the
    bench."""
    moto = Moto(free_port(), log)
    moto.start()
    try:
        moto.wait_ready()
        yield moto
    finally:
        moto.kill()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """`moto_process`, for a bench that needs only its endpoint URL."""
    with moto_process() as moto:
        yield moto.endpoint_url


@contextlib.contextmanager
def local_server(settings: Any) -> Iterator[str]:
    """create_app(settings) under uvicorn in a background thread on loopback; yields its URL."""
    import uvicorn

    from server.api.app import create_app

    port = free_port()
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
