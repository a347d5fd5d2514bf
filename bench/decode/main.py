"""Decode at the hardware's limit, side by side in one run (docs/results.md, "Decode at the
hardware's limit"):

  - the machine's memory-read bandwidth (a large tensor read) and the ceiling it gives each
    engine: bandwidth / the bytes of weights one decode step reads;
  - batch-1 decode tokens/s over HTTP of hmem in bf16 (packed for oneDNN) and in int8
    (`--weights int8` on an int8 bank), anchor alone and with a warm path's memory, each
    against its ceiling; `transformers` bf16 generate on the same weights; llama.cpp
    (`llama-cpp-python`, the `llamacpp` extra) on the same weights as f16, bf16 and q8_0 GGUF;
  - the int8 bank's bytes and cold path fetch against the bf16 bank's (the same random weights,
    generated twice; every path read from the tiers with the page cache dropped);
  - quality: the int8 anchor's and memories' logprobs of the bf16 model's greedy tokens.

Both servers run at once (`hmem serve` each in its own process) so their requests interleave:
the ratios come from samples taken turn about. The bank has the paper's 160M anchor and path
widths (256, 64, 16, 4) on a 4-way tree (the 16-way one is 37 GB; a path's bytes are the same).

    python -m bench.decode                 # the paper's 160M shape: about 10 minutes
    python -m bench.decode --quick         # the small shape in seconds (the tests)

Writes decode.json and decode.md under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common.machine import machine
from bench.common.paths import leaf_path, path_keys
from bench.decode.measure import gguf_step_bytes, logprob_differences, read_bandwidth, step_bytes
from bench.decode.report import markdown, verdicts
from bench.scale.main import prompts
from bench.scale.measure import body, hf_decode, server_cold_fetch, warm
from bench.scale.setup import TierFiles, serve_process, serving_settings
from bench.serve.client import Variant, interleave, stream
from server.bank.codec import decode_block
from server.bank.generate import generate_bank
from server.bank.manifest import BankManifest, load_manifest
from server.bank.paths import ANCHOR_DIR
from server.bank.placement import placement_from_flags
from server.bank.shapes import SHAPES, BankShape
from server.bank.synthetic import random_block_bytes
from server.model.checkpoint import load_anchor, read_config
from server.model.memory import MemoryBlock, MemoryType
from server.tokenizer import AnchorTokenizer

WIDTHS = {"bf16": "bfloat16", "int8": "int8"}
GGUF_KINDS = ("f16", "bf16", "q8_0")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.decode",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("bench/out/decode"), help="report directory")
    p.add_argument("--work", type=Path, help="banks and tiers (default: a temporary directory)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="paper-160m", help="bank shape")
    p.add_argument("--branching", type=int, default=4, help="the tree's branching (paths' bytes "
                   "do not depend on it; the cold paths need one level-1 block each)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per decode")
    p.add_argument("--reps", type=int, default=6, help="decodes per variant")
    p.add_argument("--cold-paths", type=int, default=4, help="cold path fetches per bank")
    p.add_argument("--quality-prompts", type=int, default=8, help="prompts of the logprob check")
    p.add_argument("--quality-tokens", type=int, default=16, help="greedy tokens per prompt")
    p.add_argument("--context-length", type=int, default=512, help="the servers' context")
    p.add_argument("--threads", type=int, default=None, help="torch/llama.cpp threads "
                   "(default: every usable core)")  # fmt: skip
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--quick", action="store_true", help="the small shape, few repetitions")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.reps, args.max_tokens, args.cold_paths = "small", 2, 8, 2
        args.quality_prompts, args.quality_tokens, args.context_length = 2, 4, 128
    if args.cold_paths > args.branching:
        p.error("--cold-paths must be at most --branching (one level-1 block each)")
    return args


async def make_banks(shape: BankShape, work: Path, quick: bool) -> dict[str, Path]:
    banks = {}
    for width, dtype in WIDTHS.items():
        root = work / width
        config = placement_from_flags(
            [f"1=lmdb:{root}/flash", f"2={root}/disk", f"3={root}/disk", f"4={root}/disk"],
            bank_id=shape.name,
        )
        banks[width] = root / "bank"
        await generate_bank(banks[width], shape.with_dtype(dtype), config, progress=not quick)  # type: ignore[arg-type]
    return banks


def path_blocks(shape: BankShape, m: BankManifest, path: list[int]) -> list[MemoryBlock]:
    """The blocks of `path` exactly as the bank holds them (regenerated from the seed)."""
    out = []
    for key in path_keys(m.bank_id, path, m.branching):
        data, _ = random_block_bytes(shape.with_dtype(m.dtype), key.level, key.node, seed=0)
        out.append(decode_block(data, memory_type=MemoryType.FFN))
    return out


async def serve_both(
    args: argparse.Namespace, banks: dict[str, Path], work: Path
) -> dict[str, Any]:
    """Cold paths, then decode with and without memory, both banks' servers turn about."""
    result: dict[str, Any] = {}
    settings = {}
    for width, bank in banks.items():
        s = serving_settings(
            bank, endpoint_url=None, ram_cache=1 << 30, context_length=args.context_length,
            max_batch=4, data_dir=work / width / "data",
        )  # fmt: skip
        settings[width] = s | {"weights": "int8" if width == "int8" else "float"}
    manifests = {w: load_manifest(b) for w, b in banks.items()}
    text = prompts()[0]
    with (
        serve_process(settings["bf16"], work / "bf16", env={}, torch_threads=args.threads) as a,
        serve_process(settings["int8"], work / "int8", env={}, torch_threads=args.threads) as b,
    ):
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=600) as ca,
            httpx.AsyncClient(base_url=b.url, timeout=600) as cb,
        ):
            clients = {"bf16": ca, "int8": cb}
            cold: dict[str, list[float]] = {w: [] for w in clients}
            m0 = manifests["bf16"]
            for i in range(args.cold_paths):  # distinct level-1 blocks: every level is cold
                path = [i] + [0] * (m0.levels - 1)
                for width, c in clients.items():
                    files = TierFiles(settings[width]["store"], None)
                    cold[width] += await server_cold_fetch(c, manifests[width], files, [path])
            result["cold_s"] = cold
            hot = leaf_path(m0.branching**m0.levels - 1, m0.levels, m0.branching)
            variants: dict[str, Variant] = {}
            for width, c in clients.items():
                await warm(c, hot)
                variants[f"{width}/off"] = decoding(c, body(text, args.max_tokens, mode="off"))
                variants[f"{width}/path"] = decoding(c, body(text, args.max_tokens, path=hot))
            await interleave(variants, 1)  # warm-up
            result["decode"] = await interleave(variants, args.reps)
            result["hot_path"] = hot
            if not args.no_hf:
                result["hf"] = await hf_decode(
                    ca, banks["bf16"] / ANCHOR_DIR, prompts()[1], reps=args.reps,
                    max_tokens=args.max_tokens,
                )  # fmt: skip
        result["server_peak_anon"] = {"bf16": a.memory.peak_anon, "int8": b.memory.peak_anon}
    return result


def decoding(c: httpx.AsyncClient, request: dict[str, Any]) -> Variant:
    """A variant of `interleave`: one streamed completion's decode tokens/s."""

    async def run(_: int) -> float:
        return (await stream(c, request)).decode_rate

    return run


def llamacpp(args: argparse.Namespace, anchor_dir: Path, work: Path) -> dict[str, Any]:
    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed: pip install -e '.[llamacpp]'"}
    from bench.scale.llamacpp import decode_tokens_per_s, write_gguf

    model = load_anchor(anchor_dir, dtype=torch.float32)
    tok = AnchorTokenizer.from_dir(anchor_dir, read_config(anchor_dir))
    ids = tok.encode(prompts()[0])
    out: dict[str, Any] = {}
    files = {kind: write_gguf(model, work / f"anchor-{kind}.gguf", kind) for kind in GGUF_KINDS}  # type: ignore[arg-type]
    del model
    threads = args.threads or torch.get_num_threads()
    for kind in GGUF_KINDS:  # one repetition each per round, so load hits all alike
        out.setdefault(kind, [])
    for _ in range(args.reps):
        for kind, path in files.items():
            fig = decode_tokens_per_s(path, ids, args.max_tokens, threads=threads, reps=1)
            out[kind].append(fig.tokens_per_s)
            out["engine"] = fig.engine
    return out


def quality(
    args: argparse.Namespace, shape: BankShape, banks: dict[str, Path], hot: list[int]
) -> dict[str, Any]:
    anchor_dir = banks["bf16"] / ANCHOR_DIR
    ref = load_anchor(anchor_dir, dtype=torch.bfloat16).pack_weights()
    int8 = load_anchor(anchor_dir, dtype=torch.bfloat16).quantize_int8()
    tok = AnchorTokenizer.from_dir(anchor_dir, ref.config)
    ids = [tok.encode(t)[:48] for t in prompts()[: args.quality_prompts]]
    m = {w: load_manifest(b) for w, b in banks.items()}
    mem = {w: path_blocks(shape, m[w], hot) for w in banks}
    n = args.quality_tokens
    return {
        "anchor": logprob_differences(ref, int8, ids, new_tokens=n),
        "memory": logprob_differences(
            ref, int8, ids, new_tokens=n, ref_memory=mem["bf16"], other_memory=mem["int8"]
        ),
        "step_bytes": {"bf16": step_bytes(ref), "int8": step_bytes(int8)},
        "gguf_step_bytes": {k: gguf_step_bytes(ref, k) for k in GGUF_KINDS},
    }


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shape = replace(SHAPES[args.shape], branching=args.branching)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": machine(), "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
    }}  # fmt: skip
    result["bandwidth"] = read_bandwidth(gib=0.25 if args.quick else 2.0)
    banks = await make_banks(shape, work, args.quick)
    result["banks"] = {
        w: {
            "bank_bytes": load_manifest(b).bank_bytes(),
            "path_bytes": load_manifest(b).fetch_bytes(),
        }
        for w, b in banks.items()
    }
    result["banks"]["paper_16way"] = {
        w: {"bank_bytes": SHAPES[args.shape].with_dtype(d).bank_bytes()}  # type: ignore[arg-type]
        for w, d in WIDTHS.items()
    }
    result |= await serve_both(args, banks, work)
    result["quality"] = quality(args, shape, banks, result["hot_path"])
    result["bandwidth_end"] = read_bandwidth(gib=0.25 if args.quick else 2.0)
    if not args.no_llamacpp:
        result["llamacpp"] = llamacpp(args, banks["bf16"] / ANCHOR_DIR, work)
    result["verdicts"] = verdicts(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args, args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="hmem-decode-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    (args.out / "decode.json").write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    (args.out / "decode.md").write_text(text)
    print(text)
    return 0
