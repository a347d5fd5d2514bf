"""`hmem bank convert`: a bank's blocks stored in another dtype (int8 for FFN banks), as a new bank.

A converted bank keeps the bank id, tree, router, anchor and tokenizer of its source; its blocks
and generic memories are new bytes with new sha256s, so their copies in tiers get new names
(`tiers.keys.storage_key`) and never mix with the source's. It is pushed with `hmem bank push
OUT` as any bank (`--prune` then deletes the source dtype's copies from those tiers).

Every block is read from the source directory (checked against its manifest), converted by the
codec (`encode_block`: float blocks quantized to int8 with a float32 scale per neuron, int8 ones
dequantized, floats cast) and written through `BankWriter`, so OUT appears whole or not at all:
an interrupted conversion leaves nothing, and is simply run again. `convert.json` in OUT records
the source build's fingerprint and both dtypes, so the same command over a finished conversion
does nothing, and one over a conversion of another build (or another bank) is refused.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.bank.errors import BankExistsError, BankFileMissingError, BankFormatError
from server.bank.layout import BANK_DTYPES, BankDType
from server.bank.manifest import MANIFEST_NAME, BlockEntry
from server.bank.paths import ANCHOR_REQUIRED, BLOCKS_DIR
from server.bank.push import progress_bar
from server.bank.reader import Bank
from server.bank.writer import BankWriter
from tiers.keys import BlockKey

CONVERT_RECORD = "convert.json"


@dataclass
class ConvertReport:
    """What one `convert_bank` call did."""

    blocks: int = 0  # blocks converted (generic memories not counted)
    source_bytes: int = 0  # bytes of the source's block files read
    bytes_written: int = 0  # bytes of the converted block files
    seconds: float = 0.0
    complete: bool = False  # OUT already held this conversion: nothing to do


def _open_source(src: Path) -> Bank:
    if (src / MANIFEST_NAME).is_file() and not (src / BLOCKS_DIR).is_dir():
        raise BankFileMissingError(
            src / BLOCKS_DIR,
            "its blocks directory (a bank made by `hmem bank generate` keeps its blocks in its "
            "tiers only: generate it again with --dtype instead)",
        )
    return Bank.open(src, require_anchor=False)


def _record(bank: Bank, dtype: str) -> dict[str, Any]:
    return {
        "source_bank_id": bank.manifest.bank_id,
        "source_fingerprint": bank.fingerprint(),
        "source_dtype": bank.manifest.dtype,
        "dtype": dtype,
    }


def _read_record(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / CONVERT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def convert_bank(
    src: str | Path,
    out: str | Path,
    *,
    dtype: BankDType,
    concurrency: int = 4,
    progress: bool = True,
    overwrite: bool = False,
) -> ConvertReport:
    """Write the bank at `src` with its blocks stored in `dtype` as a new bank at `out`.

    `int8` is for FFN banks (a LoRA or KV bank is refused by its manifest). Blocks are converted
    on `concurrency` threads. Over a finished conversion of the same build to the same dtype it
    does nothing (`complete`); `overwrite=True` replaces any other bank at `out`.
    """
    started = time.perf_counter()
    if dtype not in BANK_DTYPES:
        raise BankFormatError(f"dtype {dtype!r} is not one a bank stores: {list(BANK_DTYPES)}")
    src, out = Path(src), Path(out)
    if out.absolute().resolve() == src.absolute().resolve():
        raise BankExistsError(out, "is the source bank: a converted bank is a new directory")
    bank = _open_source(src)
    m = bank.manifest
    if m.dtype == dtype:
        raise BankFormatError(f"{str(src)!r}: its blocks are already {dtype}; nothing to convert")
    record = _record(bank, dtype)
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        if _read_record(out) == record:
            return ConvertReport(complete=True)
        raise BankExistsError(
            out,
            f"holds a bank that is not this build of {m.bank_id!r} converted to {dtype}; "
            "pass --overwrite to replace it",
        )
    report = ConvertReport()
    with BankWriter(
        out,
        bank_id=m.bank_id,
        memory_type=m.memory_type,
        levels=m.levels,
        branching=m.branching,
        widths=m.widths,
        dtype=dtype,
        model=m.model,
        embedder=m.embedder,
        lora_targets=m.lora_targets,
        overwrite=overwrite,
    ) as writer:
        writer.write_router(bank.router_tensors())
        if all((bank.anchor_dir / name).is_file() for name in ANCHOR_REQUIRED):
            writer.copy_anchor(bank.anchor_dir)
        for level in m.memory_levels():
            generic = bank.generic(level)
            if generic is not None:
                writer.write_generic(level, generic)
        _convert_blocks(bank, writer, report, concurrency=concurrency, progress=progress)
        writer.write_note(CONVERT_RECORD, (json.dumps(record, indent=2) + "\n").encode())
        writer.commit()
    report.seconds = time.perf_counter() - started
    return report


def _convert_blocks(
    bank: Bank, writer: BankWriter, report: ConvertReport, *, concurrency: int, progress: bool
) -> None:
    """Every block read, converted and written, `concurrency` at a time; a bar over bytes read."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    blocks = bank.manifest.blocks
    keys = bank.block_keys()

    def one(key: BlockKey) -> BlockEntry:
        return writer.write_block(key.level, key.node, bank.read_block(key))

    desc = f"convert {bank.manifest.bank_id} to {writer.manifest.dtype}"
    total = sum(blocks[str(k)].bytes for k in keys)
    with progress_bar(total, desc, progress) as bar, ThreadPoolExecutor(concurrency) as pool:
        futures: list[Future[BlockEntry]] = [pool.submit(one, key) for key in keys]
        try:
            for key, future in zip(keys, futures, strict=True):
                entry = future.result()  # the first failure stops the conversion
                report.blocks += 1
                report.source_bytes += blocks[str(key)].bytes
                report.bytes_written += entry.bytes
                bar.update(blocks[str(key)].bytes)
        finally:
            for future in futures:  # an interrupt waits for the blocks in flight only
                future.cancel()


__all__ = ["CONVERT_RECORD", "ConvertReport", "convert_bank"]
