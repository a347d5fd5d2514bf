"""What bench.cluster runs against: a generated bank on real tiers, and hmem as a Ray Serve
application deployed afresh for every run.

The bank has random weights (`hmem bank generate`): level 1 in LMDB, levels 2 and 3 in
`rclone serve s3` over a directory on loopback, so a RAM miss below level 1 is a real HTTP GET
(and its sha256 check and decode), not a page-cache copy. It is kept under `--out` and reused by
later runs (the generator skips a bank that is whole).

Every run deploys the application again (`serve.run` after `serve.delete`): new replica
processes, empty RAM caches, a new ingress with a new router, in one Ray session.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.bank.generate import generate_bank
from server.bank.placement import placement_from_flags
from server.bank.shapes import BankShape
from server.model.config import AnchorConfig
from server.settings import Settings
from tiers.config import StoreConfig
from tiers.rclone_server import RcloneS3Server

# A small Llama anchor (4 layers of 256) and a 3-level, 8-way tree: 8 level-1 subtrees. FFN
# blocks of 786 kB, 393 kB and 197 kB (bf16), 132 MB of blocks in all.
CLUSTER = BankShape(
    name="cluster",
    anchor=AnchorConfig(
        vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
        intermediate_size=768, rope_theta=100000.0, max_seq_len=512, tie_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    ),
    levels=3, branching=8, widths=(128, 64, 32), dtype="bfloat16", tokenizer_vocab=2000,
    router_dim=256,
)  # fmt: skip
# The same tree at test size (4-way, 84 blocks of a few kB): `--quick`.
QUICK = BankShape(
    name="cluster-quick",
    anchor=AnchorConfig(
        vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        intermediate_size=256, rope_theta=100000.0, max_seq_len=256, tie_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    ),
    levels=3, branching=4, widths=(32, 16, 8), dtype="bfloat16", tokenizer_vocab=1000,
    router_dim=64,
)  # fmt: skip
BUCKET = "hmem"
APP_NAME = "hmem"


@dataclass(frozen=True)
class BenchBank:
    """A generated bank and where its tiers are."""

    path: Path
    shape: BankShape
    store: StoreConfig  # its tiers, the S3 tier pointed at this run's server
    s3_keys: dict[str, str]  # the S3 server's access key pair, for the replicas' settings

    def store_with(self, ram_cache: int) -> dict[str, Any]:
        """The store settings of one deployment: this RAM cache and nothing pinned, so that the
        cache alone decides hits; a deadline no fetch here reaches, so none is degraded."""
        store = self.store.model_dump(mode="json", exclude_none=True)
        for tier in store["tiers"].values():
            if tier["kind"] == "s3":
                tier |= self.s3_keys  # in the settings, not the environment: they travel
        return store | {"ram_cache": ram_cache, "pin_levels": [], "deadline_s": 30.0}


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[RcloneS3Server]:
    """`rclone serve s3` over `root` on a free loopback port, stopped on exit."""
    server = RcloneS3Server(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def ensure_bank(root: Path, shape: BankShape, s3: RcloneS3Server) -> BenchBank:
    """The bank of `shape` under `root` (generated on the first run, reused after); its level 1
    in `root`/flash, levels 2-3 in the bucket of `s3`."""
    creds = s3.client_settings()
    flags = [
        f"1=lmdb:{root}/flash",
        f"2=s3://{BUCKET}/{shape.name}",
        f"3=s3://{BUCKET}/{shape.name}",
    ]
    config = placement_from_flags(
        flags, bank_id=shape.name, endpoint_url=creds["endpoint_url"], region=creds["region"]
    )
    keys = {k: creds[k] for k in ("access_key_id", "secret_access_key")}
    cloud = config.tiers["cloud"]
    tiers = dict(config.tiers) | {"cloud": cloud.model_validate(cloud.model_dump() | keys)}
    config = config.model_copy(update={"tiers": tiers})
    t0 = time.perf_counter()
    report = await generate_bank(root / "bank", shape, config, progress=False)
    if not report.complete:
        print(f"generated bank {shape.name} in {time.perf_counter() - t0:.0f} s under {root}")
    return BenchBank(root / "bank", shape, config, keys)


def settings_for(bank: BenchBank, *, ram_cache: int, state_dir: Path) -> Settings:
    """The settings every replica of one deployment serves with."""
    return Settings.model_validate(
        {
            "bank": bank.path,
            "store": bank.store_with(ram_cache),
            "dtype": "bfloat16",
            "data_dir": state_dir,
            "context_length": 256,
            "max_batch": 16,
            "max_queue": 64,
            "max_tokens_limit": 64,
        }
    )


@contextlib.contextmanager
def ray_session(port: int) -> Iterator[None]:
    """A local Ray and Serve's HTTP proxy on 127.0.0.1:`port`; both shut down on exit."""
    import ray
    from ray import serve

    ray.init(
        namespace="hmem",
        include_dashboard=False,
        object_store_memory=256 * 2**20,  # requests are kilobytes; the caches need the RAM
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no line per deploy and delete
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        try:
            with contextlib.suppress(Exception):
                serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()


@contextlib.contextmanager
def deployed(settings: Settings, *, replicas: int, routing: str, spill: int) -> Iterator[float]:
    """The application deployed and healthy (yields the seconds that took); deleted on exit."""
    from ray import serve

    from server.cluster.app import ClusterOptions, build_app

    # Replicas take no Ray CPUs: they all share this machine's cores (torch threads are
    # shared out by build_app: cores // replicas each).
    options = ClusterOptions(replicas=replicas, routing=routing, replica_cpus=0, spill=spill)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/")
    try:
        yield time.perf_counter() - t0
    finally:
        serve.delete(APP_NAME)
