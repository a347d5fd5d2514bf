"""What bench.scale runs against: the generated bank, its tiers, and `hmem serve` as its own
process, watched for memory.

The server runs in a process of its own (`hmem serve --config`) so that its memory is its own:
`ProcessMemory` samples `/proc/PID/status` (RssAnon: heap, tensors, the RAM cache; RssFile: the
page cache of mapped files, LMDB's map, shared libraries) and keeps the peak of each. Cold reads
are made cold by `evict`: `posix_fadvise(DONTNEED)` drops a file's clean pages from the page
cache, without root and without touching anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common.servers import child_env, free_port
from server.bank.manifest import BankManifest
from server.bank.paths import ANCHOR_DIR
from tiers.keys import BlockKey, storage_key

ADMIN_KEY = "scale-bench-admin"


def evict(path: Path) -> None:
    """Drop `path`'s clean pages from the page cache (a no-op for a missing file)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class TierFiles:
    """Where each level's copies lie on this machine's disk, for `evict`."""

    settings: dict[str, Any]  # the serving settings' [store]
    s3_root: Path | None  # the directory the S3 server keeps its objects in

    def files(self, manifest: BankManifest, key: BlockKey) -> list[Path]:
        store = self.settings
        out: list[Path] = []
        for name in store["placement"][str(key.level)]:
            tier = store["tiers"][name]
            stored = storage_key(key, manifest.blocks[str(key)].sha256)
            if tier["kind"] == "lmdb":
                out.append(Path(tier["path"]) / "data.mdb")
            elif tier["kind"] == "disk":
                out.append(Path(tier["root"]) / f"{stored}.blk")
            elif self.s3_root is not None:
                out.append(self.s3_root / tier["bucket"] / f"{tier.get('prefix', '')}{stored}")
        return out

    def evict_blocks(self, manifest: BankManifest, keys: list[BlockKey]) -> None:
        for key in keys:
            for path in self.files(manifest, key):
                evict(path)


@dataclass
class ProcessMemory:
    """Peak and last RssAnon / RssFile of a process, sampled every `interval_s` on a thread."""

    pid: int
    interval_s: float = 0.2
    peak_anon: int = 0
    peak_file: int = 0
    last_anon: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, anon)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def read(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0]) * 1024
        return out

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            try:
                m = self.read()
            except OSError:
                return
            self.last_anon = m["RssAnon"]
            self.peak_anon = max(self.peak_anon, m["RssAnon"])
            self.peak_file = max(self.peak_file, m["RssFile"])
            self.samples.append((time.perf_counter() - t0, m["RssAnon"]))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def serving_settings(
    bank: Path,
    *,
    endpoint_url: str | None,
    ram_cache: int,
    context_length: int,
    max_batch: int,
    data_dir: Path,
) -> dict[str, Any]:
    """The bank's `serve.json`, pointed at this run's S3 endpoint, budget and sizes."""
    settings: dict[str, Any] = json.loads((bank / "serve.json").read_text())
    store = settings["store"]
    for tier in store["tiers"].values():
        if tier["kind"] == "s3" and endpoint_url is not None:
            tier["endpoint_url"] = endpoint_url
    store["ram_cache"] = ram_cache
    # A cold level-4 block comes from S3: give it time, the bench measures how long it takes.
    store["deadline_s"] = 30.0
    settings.update(
        bank=str(bank.resolve()),
        dtype="bfloat16",
        context_length=context_length,
        max_batch=max_batch,
        max_queue=256,
        max_tokens_limit=context_length,
        admin_key=ADMIN_KEY,
        data_dir=str(data_dir),
    )
    return settings


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    memory: ProcessMemory
    log: Path


@contextlib.contextmanager
def serve_process(
    settings: dict[str, Any], workdir: Path, *, env: dict[str, str], torch_threads: int | None
) -> Iterator[ServerProcess]:
    """`hmem serve --config` in its own process on a free port; stopped on exit."""
    port = free_port()
    config = workdir / "settings.json"
    settings = settings | {"port": port}
    if torch_threads is not None:
        settings["torch_threads"] = torch_threads
    config.write_text(json.dumps(settings, indent=2))
    log = workdir / "server.log"
    hmem = Path(sys.executable).with_name("hmem")
    with open(log, "wb") as out:
        proc = subprocess.Popen(  # noqa: S603
            [str(hmem), "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env() | env,  # no HMEM_* of ours: it would override the settings file
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"hmem serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"hmem serve did not start in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        memory = ProcessMemory(proc.pid)
        memory.start()
        try:
            yield ServerProcess(url, proc, memory, log)
        finally:
            memory.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def anchor_bytes(bank: Path) -> int:
    """Bytes of the anchor's weights file (what the server holds of it in RAM)."""
    return (bank / ANCHOR_DIR / "model.safetensors").stat().st_size
