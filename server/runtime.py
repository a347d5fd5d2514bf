"""Everything a serving process holds, opened in order from `Settings` and closed in reverse.

Open: the bank's manifest and router, the store over its tiers with the bank directory as the
last replica of every level (`OriginTier`: a missing or corrupt tier copy is served from the
bank's own file and repaired from it), on the embedded default the bank's blocks first copied to
the tiers (idempotent: good copies are kept, missing and corrupt ones written), the bank build's
blocklist (reloaded from its file), the anchor and tokenizer, and the engine's model thread,
which is then warmed up with one short generation so the first request pays no one-time costs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from server.bank.codec import torch_dtype
from server.bank.origin import ORIGIN, OriginTier
from server.bank.push import PushReport, push_bank
from server.bank.reader import Bank
from server.bank.router_file import ROUTER_NAME
from server.defaults import bank_dir, blocklist_file, legacy_blocklist_file, store_config
from server.engine.blocklist import Blocklist, warn_legacy_file
from server.engine.engine import Engine
from server.engine.memory import MemoryResolver
from server.engine.sampling import SamplingParams
from server.engine.threads import cpu_executor, single_threaded_torch
from server.malloc import fix_mmap_threshold
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor, read_config
from server.model.config import AnchorConfig
from server.model.errors import ModelError
from server.model.memory import MemoryBlock
from server.routing.tree import Router
from server.settings import Settings
from server.tokenizer import AnchorTokenizer
from tiers import ConfigError, S3Tier, StoreMetrics, TieredStore, TierError, build_store

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    bank: Bank
    model_name: str
    model: Anchor
    tokenizer: AnchorTokenizer
    store: TieredStore[MemoryBlock]
    store_metrics: StoreMetrics
    resolver: MemoryResolver
    blocklist: Blocklist
    engine: Engine
    embedded: bool
    fingerprint: str  # the bank build's (Bank.fingerprint)
    started_at: float
    executor: ThreadPoolExecutor  # torch work off the event loop, single-threaded (threads.py)

    @property
    def context_length(self) -> int:
        return self.engine.max_len

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ModelError("device is cuda but CUDA is not available on this machine")
        root = bank_dir(settings)
        fix_mmap_threshold()  # freed block buffers go back to the system (malloc.py)
        single_threaded_torch()  # this is the event loop's thread: it may route inline
        loop = asyncio.get_running_loop()
        executor = cpu_executor()
        bank = await loop.run_in_executor(executor, partial(Bank.open, root, check_files=False))
        # Before the tiers are seeded and the model loads: a context that cannot fit fails now.
        anchor_config = await loop.run_in_executor(executor, read_config, bank.anchor_dir)
        context_length = _context_length(settings, anchor_config)
        m = bank.manifest
        config, embedded = store_config(settings, m)
        metrics = StoreMetrics()
        store = await build_store(config, codec=bank.codec(), digests=m.digests(), metrics=metrics)
        try:
            origin = OriginTier(bank)
            try:
                store.add_tier(ORIGIN, origin, levels=m.memory_levels(), read_only=True)
            except BaseException:
                await origin.aclose()
                raise
            if embedded:
                await _place_blocks(
                    bank,
                    store,
                    config.placement,
                    verify_max_bytes=int(settings.seed_verify_max_bytes),
                )
            router = await loop.run_in_executor(executor, partial(
                Router.load, bank.path / ROUTER_NAME, m.embedder, branching=m.branching,
                levels=m.levels,
            ))  # fmt: skip
            dtype = torch_dtype(settings.dtype)
            model = await loop.run_in_executor(
                executor, partial(load_anchor, bank.anchor_dir, dtype=dtype, device=settings.device)
            )
            model.fuse_projections()  # q/k/v and gate/up as one matmul each: the same outputs
            # int8: half the bytes read per token; bf16 on a CPU: packed for oneDNN, read faster
            # (server/model/quant.py). Seconds at 160M.
            prepare = model.quantize_int8 if settings.weights == "int8" else model.pack_weights
            await loop.run_in_executor(executor, prepare)
            tokenizer = AnchorTokenizer.from_dir(
                bank.anchor_dir,
                model.config,
                chat_template=None
                if settings.chat_template is None
                else settings.chat_template.read_text(encoding="utf-8"),
            )
            generic = {
                level: block
                for level in m.memory_levels()
                if (block := bank.generic(level)) is not None
            }
            fingerprint = await loop.run_in_executor(executor, bank.fingerprint)
            if (legacy := legacy_blocklist_file(settings)) is not None:
                warn_legacy_file(legacy)
            blocklist = Blocklist.load(
                blocklist_file(settings, bank_id=m.bank_id, fingerprint=fingerprint),
                levels=m.levels,
                branching=m.branching,
                bank_id=m.bank_id,
                fingerprint=fingerprint,
            )
            resolver = MemoryResolver(
                bank_id=m.bank_id,
                router=router,
                store=store,
                memory_levels=m.memory_levels(),
                branching=m.branching,
                generic=generic,
                blocklist=blocklist,
                fallback=settings.fallback,
                deadline_s=settings.memory_deadline_s,
                executor=executor,
            )
            resolver.evict_blocked()
            engine = Engine(
                model,
                eos_ids=sorted(tokenizer.eos_ids),
                max_batch=settings.max_batch,
                max_queue=settings.max_queue,
                max_len=context_length,
                torch_threads=settings.torch_threads,
            )
            engine.start()
        except BaseException:
            await store.aclose()
            executor.shutdown(wait=False)
            raise
        runtime = cls(
            settings=settings,
            bank=bank,
            model_name=settings.model_name or m.bank_id,
            model=model,
            tokenizer=tokenizer,
            store=store,
            store_metrics=metrics,
            resolver=resolver,
            blocklist=blocklist,
            engine=engine,
            embedded=embedded,
            fingerprint=fingerprint,
            started_at=time.time(),
            executor=executor,
        )
        if settings.warmup:
            await runtime.warmup()
        return runtime

    async def warmup(self) -> None:
        """One short generation with memory: loads kernels and the first blocks."""
        prompt = self.tokenizer.encode("Hello")[: self.context_length - 1]
        max_tokens = min(2, self.context_length - len(prompt))
        blocks = list(self.resolver.generic.values())
        (gen,) = self.engine.submit([(prompt, SamplingParams(max_tokens=max_tokens), blocks)])
        async for _ in gen.stream():
            pass

    async def close(self) -> None:
        await self.engine.close()
        await self.store.aclose()
        self.executor.shutdown(wait=False)


def _context_length(settings: Settings, config: AnchorConfig) -> int:
    """Tokens a sequence may hold, which the KV cache is sized for: the setting, or the model's."""
    limit = config.max_seq_len
    if settings.context_length is None:
        return limit
    if settings.context_length > limit:
        raise ConfigError(
            f"context_length {settings.context_length} is more than the model's "
            f"max_position_embeddings {limit}: set context_length (--context-length, "
            f"HMEM_CONTEXT_LENGTH) to at most {limit}, or leave it unset to use {limit}"
        )
    return settings.context_length


async def _place_blocks(
    bank: Bank,
    store: TieredStore[MemoryBlock],
    placement: Mapping[int, Sequence[str]],
    *,
    verify_max_bytes: int,
) -> None:
    """Copy the bank's blocks to the embedded default's tiers: write what is missing or corrupt.

    Copies already there are read back and their sha256 checked when the bank's blocks total at
    most `verify_max_bytes` (`seed_verify_max_bytes`); above it, their name (which holds their
    content's digest) and size are trusted, and a corrupt copy is left to the store, which reads
    past it and repairs it from the bank directory when it is asked for. One log line says which.

    Tier by tier: one that cannot be reached (the cloud endpoint down at start) is not fatal.
    The server starts, the other tiers get their blocks, and the unreachable tier's levels are
    served degraded, as they would be had it failed later.
    """
    bank_bytes = sum(entry.bytes for entry in bank.manifest.blocks.values())
    check = bank_bytes <= verify_max_bytes
    done = PushReport()
    for name, tier in store.tiers.items():
        levels = {level: [name] for level, names in placement.items() if name in names}
        if not levels:
            continue
        try:
            if isinstance(tier, S3Tier):
                await tier.create_bucket()
            report = await push_bank(
                bank,
                {name: tier},
                levels,
                progress=False,
                some_levels=True,
                trust_existing=not check,
            )
        except TierError as exc:
            log.warning(
                "could not copy the bank's blocks to tier %r (%s); its levels are served "
                "degraded until it answers",
                name,
                exc,
            )
            continue
        done.tiers.update(report.tiers)
    t = done.total
    how = (
        f"copies already there sha256-checked (bank {bank_bytes / 2**20:.1f} MiB <= "
        f"seed_verify_max_bytes {verify_max_bytes / 2**20:.1f} MiB)"
        if check
        else f"copies already there trusted on name and size (bank {bank_bytes / 2**20:.1f} MiB "
        f"> seed_verify_max_bytes {verify_max_bytes / 2**20:.1f} MiB)"
    )
    log.info(
        "seeded the default tiers with bank %r: %s; %d written, %d checked good, %d trusted, "
        "%d repaired",
        bank.manifest.bank_id,
        how,
        t.written,
        t.checked,
        t.trusted,
        t.repaired,
    )
