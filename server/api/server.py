"""One serving process: the port bound, then the app served by uvicorn.

`hmem serve` (`server.cli.serve`) reads the settings (`server.settings.load_settings`), then runs
these in order, so that everything that can fail on the user's input fails before the model
loads, in one line: the port (`listen_socket`: bound first, and that very socket handed to
uvicorn, so a taken port is found in milliseconds and nothing can take it in between), then the
bank (`run_server`). The app's lifespan, which opens the runtime (tiers, model, engine), runs
here around uvicorn rather than inside it: an error there is raised to `hmem` as it is, instead
of being logged by uvicorn as a traceback.

Before either, the data directory is taken (`hold_data_dir`): one `hmem serve` per directory,
since two would share its blocklists and tiers with neither knowing of the other. The lock is an
flock, which the kernel drops however the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from server.api.app import create_app
from server.bank.reader import Bank
from server.defaults import bank_dir
from server.settings import Settings

logger = logging.getLogger("uvicorn.error")  # uvicorn's own: its format and level


class ServeError(Exception):
    """The server cannot start; the message says why and what to change."""


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


DATA_DIR_LOCK = "serve.lock"  # in the data directory: held by the one server using it


@contextlib.contextmanager
def hold_data_dir(directory: Path) -> Iterator[None]:
    """Hold `directory` for this server; a ServeError in one line if another server holds it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / DATA_DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ServeError(f"cannot use data directory {directory}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise ServeError(
                f"another hmem serve{who} is using data directory {directory}: stop it, or give "
                "this one its own with --data-dir or HMEM_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_server(settings: Settings, listener: socket.socket, *, log_level: str) -> int:
    """Serve `settings`' bank on `listener` until Ctrl-C (KeyboardInterrupt) or SIGTERM."""
    bank = Bank.open(bank_dir(settings), check_files=False)  # a bad bank: one line
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # lifespan "off": uvicorn would log a startup error as a traceback; `run` runs it instead.
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    host, port = listener.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run() -> None:
        async with app.router.lifespan_context(app):  # opens the runtime; closes it on the way out
            logger.info(
                "serving bank %r on http://%s (Ctrl-C to stop)", bank.manifest.bank_id, where
            )
            await server.serve(sockets=[listener])

    try:
        with _signals_raised(), asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run())
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
