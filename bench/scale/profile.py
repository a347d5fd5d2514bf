"""Where the time of a step with memory goes, at the bank's shape (the "why" behind
bench.scale's serving ratios; docs/results.md, "Paper scale").

Loads the bank's anchor as `hmem serve` does (bf16, projections fused), decodes one path's
blocks from their tier copies, and times, in this process and with no server: building the
memory batch, prefill with memory against without, and one decode step with memory against
without, for 1 and 16 sequences; then `torch.profiler` splits a decode step with memory by
operator.

    python -m bench.scale.profile --bank /data/scale/bank --s3-root /data/scale/s3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common.paths import path_keys
from server.bank.codec import decode_block
from server.bank.manifest import load_manifest
from server.bank.paths import ANCHOR_DIR
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor
from server.model.kv_cache import KVCache
from server.model.memory import MemoryBlock, MemoryType
from server.model.memory_batch import MemoryBatch, build_memory_batch
from tiers.config import StoreConfig, open_tier
from tiers.keys import storage_key
from tiers.rclone_server import RcloneS3Server


async def path_blocks(bank: Path, s3_root: Path, path: list[int]) -> list[MemoryBlock]:
    import json

    m = load_manifest(bank)
    settings = json.loads((bank / "serve.json").read_text())
    with RcloneS3Server(s3_root) as srv:
        for tier in settings["store"]["tiers"].values():
            if tier["kind"] == "s3":
                tier.update(srv.client_settings())
        store = StoreConfig.model_validate(settings["store"])
        blocks = []
        for key in path_keys(m.bank_id, path, m.branching):
            name = store.placement[key.level][0]
            tier = open_tier(name, store.tiers[name])
            try:
                data = await tier.get(storage_key(key, m.blocks[str(key)].sha256))
            finally:
                await tier.aclose()
            assert data is not None, key
            blocks.append(decode_block(data, memory_type=MemoryType.FFN))
    return blocks


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `fn` over `reps` runs after one warm-up."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def timed_pair(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, run alternately (machine noise hits both alike)."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def step(model: Anchor, batch: int, prompt: int, memory: MemoryBatch | None) -> Callable[[], Any]:
    cache = KVCache(model.config, batch_size=batch, max_len=prompt + 8, dtype=torch.bfloat16)
    tokens = torch.randint(0, 1000, (batch, 1))
    positions = torch.full((batch, 1), prompt)
    return lambda: model(tokens, positions=positions, cache=cache, memory=memory)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale.profile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--bank", type=Path, required=True)
    p.add_argument("--s3-root", type=Path, required=True)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_anchor(args.bank / ANCHOR_DIR, dtype=torch.bfloat16).fuse_projections()
    m = load_manifest(args.bank)
    blocks = asyncio.run(path_blocks(args.bank, args.s3_root, [0] * m.levels))
    print(f"torch threads {torch.get_num_threads()}, prompt {args.prompt_tokens} tokens")
    print("| what | 1 sequence | 16 sequences |\n| --- | --- | --- |")
    rows: dict[str, list[str]] = {}
    for batch in (1, 16):
        build = timed(
            lambda b=batch: build_memory_batch([blocks] * b, dtype=torch.bfloat16), args.reps
        )
        memory = build_memory_batch([blocks] * batch, dtype=torch.bfloat16)
        tokens = torch.randint(0, 1000, (batch, args.prompt_tokens))
        pre_mem, pre_off = timed_pair(
            lambda t=tokens, mb=memory: model(t, memory=mb), lambda t=tokens: model(t), args.reps
        )
        dec_mem, dec_off = timed_pair(
            step(model, batch, args.prompt_tokens, memory),
            step(model, batch, args.prompt_tokens, None),
            args.reps * 3,
        )
        for name, value in (
            ("build the memory batch", f"{build * 1e3:.1f} ms"),
            ("prefill with memory / without", f"{pre_mem * 1e3:.0f} / {pre_off * 1e3:.0f} ms "
             f"= {pre_mem / pre_off:.3f}x"),
            ("decode step with memory / without", f"{dec_mem * 1e3:.1f} / {dec_off * 1e3:.1f} "
             f"ms = {dec_mem / dec_off:.3f}x"),
        ):  # fmt: skip
            rows.setdefault(name, []).append(value)
    for name, values in rows.items():
        print(f"| {name} | {' | '.join(values)} |")
    run = step(model, 1, args.prompt_tokens, build_memory_batch([blocks], dtype=torch.bfloat16))
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.reps):
            run()
    print("\none decode step with memory, by operator:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
