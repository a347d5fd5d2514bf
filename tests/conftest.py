"""Shared fixtures: real S3-compatible servers on loopback (moto in server mode, and
`rclone serve s3`, which keeps its objects on disk)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from moto.server import ThreadedMotoServer

# A run of the whole suite fails if any test file contributes no test (tests/collection_guard.py).
from tests.collection_guard import pytest_collection_modifyitems, pytest_testnodedown  # noqa: F401
from tiers.rclone_server import RcloneS3Server

# How `.ci/run`'s xdist workers share the suite out (tests/scheduling.py).
pytest_plugins = ("tests.scheduling",)

S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1 that a test can stop and start again on the same port.

    moto keeps its buckets in process memory, so objects survive a stop/start, like a real
    server coming back after an outage.
    """

    port: int
    _server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self._server is None:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    """`rclone serve s3` over a temporary directory: objects are files under `root/bucket/`."""
    with RcloneS3Server(tmp_path_factory.mktemp("rclone-s3") / "root") as server:
        yield server


@pytest.fixture
def s3_bucket(request: pytest.FixtureRequest) -> str:
    """A bucket name unique to the test (S3 names: lowercase, digits, dashes; 3-63 chars)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())
    return f"t-{name}"[:63].rstrip("-")


@pytest.fixture(autouse=True)
def _private_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test writes state (tiers, blocklist) under the real home directory."""
    monkeypatch.setenv("HMEM_DATA_DIR", str(tmp_path_factory.mktemp("hmem-data")))
