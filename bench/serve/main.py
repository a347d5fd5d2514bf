"""Serving: time to first token and decode rate with memory against anchor-only, concurrent
heterogeneous load against one stream at a time, and our decoding against Hugging Face
`transformers` generation of the same weights (docs/results.md).

The real app (`create_app`, its lifespan, the engine's model thread) is served by uvicorn in a
background thread on a loopback port, or `--url` names a running server (in its own process);
the client is httpx (async, one event loop in the main thread) over real HTTP. In-process, the
client shares the GIL and the cores with the server: keep it light. Every comparison is measured
side by side in one run: the compared variants are interleaved (the first one rotating every
repetition), repeated, and the ratio is that of their medians. Torch's thread count is left as
it is unless `--torch-threads` sets it (for this process, so for the in-process server too).

  1. TTFT: streaming; from sending the request to the first SSE chunk that carries generated
     text; memory "auto" (routed, blocks warm in the RAM cache: every prompt is run once first)
     against memory "off". Goal: ratio <= 1.15. Beside them (1b), the same paths given
     explicitly: memory without the routing step.
  2. Decode tokens/s of one stream (streaming, greedy, max_tokens 128): tokens after the first
     over the time from the first token's chunk to the last's; memory against anchor-only.
     Goal: >= 0.85.
  3. 16 streams at once, each with its own explicit `memory.path` and prompt, against the same
     16 requests one at a time: generated tokens over wall time. Goal: >= 3x.
  4. Anchor-only decode tokens/s of one greedy stream: the server over HTTP/SSE, the engine
     in this process without HTTP (`Engine`, its model thread, token events), and the plain
     batched loop `greedy_decode` (no engine; from the time of N tokens less that of 1) against
     `LlamaForCausalLM.generate(do_sample=False)` on the same weights and prompt ids (a
     streamer times each token). Goal: ours faster; the greedy tokens must agree.

The client and the comparison harness live in `bench.serve.client`, case 4 in `bench.serve.hf`, the
table and the plot in `bench.serve.report`.

    python -m bench.serve [--url URL] [--bank DIR] [--rounds N] [--max-tokens 128]
                          [--streams 16] [--torch-threads N] [--no-hf] [--quick]
                          [--out bench/out/serve]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
import uvloop

from bench.common.machine import command_line
from bench.common.machine import machine as base_machine
from bench.common.servers import local_server
from bench.serve.client import Variant, compared, interleave, request, stream
from bench.serve.hf import Local, case_hf, load_local
from bench.serve.report import plot, rows_of, table
from server.defaults import DEMO_BANK
from server.settings import load_settings

# Prompts on which greedy decoding of the demo bank runs past 128 tokens without an EOS, with
# memory and without (found by a search over short word salads): equal work in both variants.
LONG_PROMPTS = (
    "Gold a sea",
    "A garden in weekend lab",
    "Market song",
    "Weekend atomic",
    "Lab morning",
    "A lab the",
)
# TTFT prompts: the long ones and queries of the demo corpus (routed to several paths).
TTFT_PROMPTS = (
    *LONG_PROMPTS,
    "The atomic number of Iron is",
    "The capital of Fatra is",
    "Zatrepa was born in",
    "A chemist gave a short talk about",
    "Once upon a time",
    "The lab ordered a small sample of",
)


def machine() -> dict[str, Any]:
    import transformers

    return base_machine() | {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "httpx": httpx.__version__,
        "uvicorn": uvicorn.__version__,
    }


# -- the server ---------------------------------------------------------------------------------


def server_settings(bank: Path, data_dir: Path, max_batch: int) -> Any:
    return load_settings(
        bank=None if bank == DEMO_BANK else bank,
        data_dir=data_dir,
        max_batch=max_batch,
        max_queue=4 * max_batch,
        warmup=True,
    )


# -- the cases ----------------------------------------------------------------------------------


async def case_ttft(c: httpx.AsyncClient, rounds: int) -> dict[str, Any]:
    """Routed memory, the same paths given explicitly (no routing), and no memory."""
    paths, warm = {}, []
    for p in TTFT_PROMPTS:  # warm: route once, fetch each path's blocks into the RAM cache
        s = await stream(c, request(p, 4, mode="auto"))
        assert s.memory is not None
        paths[p] = s.memory["path"]
        await stream(c, request(p, 4, mode="off"))

    def variant(**memory: Any) -> Variant:
        async def ttft(r: int) -> float:
            p = TTFT_PROMPTS[r % len(TTFT_PROMPTS)]
            mem = {**memory, "path": paths[p]} if memory.get("path") else memory
            s = await stream(c, request(p, 4, **mem))
            if mem["mode"] == "auto":
                assert s.memory is not None
                warm.append(all(b["cached"] for b in s.memory["blocks"]))
            return s.ttft

        return ttft

    variants = {"auto": variant(mode="auto"), "path": variant(mode="auto", path=True)}
    variants["off"] = variant(mode="off")
    samples = await interleave(variants, rounds * len(TTFT_PROMPTS))
    return compared(samples, "auto", "off") | {"all_blocks_cached": f"{sum(warm)}/{len(warm)}"}


async def case_decode(c: httpx.AsyncClient, rounds: int, max_tokens: int) -> dict[str, Any]:
    tokens: dict[str, list[int]] = {"auto": [], "off": []}

    def variant(mode: str) -> Variant:
        async def decode(r: int) -> float:
            s = await stream(c, request(LONG_PROMPTS[r % len(LONG_PROMPTS)], max_tokens, mode=mode))
            tokens[mode].append(s.tokens)
            return s.decode_rate

        return decode

    samples = await interleave({m: variant(m) for m in tokens}, rounds * len(LONG_PROMPTS))
    mean_tokens = {m: statistics.fmean(t) for m, t in tokens.items()}
    return compared(samples, "auto", "off") | {"mean_tokens": mean_tokens}


def distinct_paths(n: int, levels: int, branching: int) -> list[list[int]]:
    """n paths of child indices; distinct for n <= branching**2 when levels >= 2."""
    return [
        [(i * (1 + 2 * lv) + (i // branching) * lv) % branching for lv in range(levels)]
        for i in range(n)
    ]


async def case_concurrent(
    c: httpx.AsyncClient, rounds: int, *, max_tokens: int, paths: list[list[int]]
) -> dict[str, Any]:
    bodies = [
        request(TTFT_PROMPTS[i % len(TTFT_PROMPTS)], max_tokens, mode="auto", path=path)
        for i, path in enumerate(paths)
    ]
    tokens: list[int] = []

    async def together(_: int) -> float:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(stream(c, b) for b in bodies))
        tokens.append(sum(s.tokens for s in done))
        return tokens[-1] / (max(s.done for s in done) - t0)

    async def one_by_one(_: int) -> float:
        t0, n = time.perf_counter(), 0
        for b in bodies:
            n += (await stream(c, b)).tokens
        return n / (time.perf_counter() - t0)

    warm = await asyncio.gather(*(stream(c, b) for b in bodies))  # every path's blocks
    seen = {tuple(s.memory["path"]) for s in warm if s.memory}
    samples = await interleave({"concurrent": together, "sequential": one_by_one}, rounds)
    extra = {"streams": len(bodies), "distinct_paths": len(seen), "tokens": tokens[-1]}
    return compared(samples, "concurrent", "sequential") | extra | {"paths": paths}


# -- the run ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, url: str, local: Local | None) -> dict[str, Any]:
    limits = httpx.Limits(
        max_connections=args.streams + 4, max_keepalive_connections=args.streams + 4
    )
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        card = (await c.get("/v1/models")).raise_for_status().json()["data"][0]
        mem = card["memory"]
        paths = distinct_paths(args.streams, mem["levels"], mem["branching"])
        result: dict[str, Any] = {"model": card}
        print("1. TTFT ...", flush=True)
        result["ttft"] = await case_ttft(c, 2 * args.rounds)
        print("2. decode ...", flush=True)
        result["decode"] = await case_decode(c, args.rounds, args.max_tokens)
        print("3. concurrent ...", flush=True)
        result["concurrent"] = await case_concurrent(
            c, args.rounds, max_tokens=args.max_tokens, paths=paths
        )
        if local is not None:
            print("4. against transformers ...", flush=True)
            result["hf"] = await case_hf(
                c, local, prompt=LONG_PROMPTS[0], rounds=args.rounds, n=args.max_tokens
            )
            await local.engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", help="a running server (skips starting one here)")
    parser.add_argument("--bank", type=Path, default=DEMO_BANK, help="bank (default: the demo)")
    parser.add_argument("--data-dir", type=Path, help="server state (default: a temporary dir)")
    parser.add_argument("--rounds", type=int, default=0, help="repetitions of each comparison")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip case 4 (transformers)")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads (default: leave)"
    )
    parser.add_argument("--quick", action="store_true", help="a round each, short (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/serve"))
    args = parser.parse_args()
    if not args.rounds:
        args.rounds = 1 if args.quick else 10
    if args.quick:
        args.max_tokens = min(args.max_tokens, 32)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} threads), "
        f"transformers {info['transformers']}"
    )
    started = time.perf_counter()
    local = None if args.no_hf else load_local(args.bank)
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
            where = f"server at {url} (its settings unknown here)"
        else:
            data_dir = args.data_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="hmem-bench-serve-"))
            )
            url = stack.enter_context(
                local_server(server_settings(args.bank, data_dir, max_batch=args.streams))
            )
            where = f"in-process uvicorn thread at {url}, max_batch {args.streams}"
        print(f"server: {where}", flush=True)
        result = uvloop.run(run(args, url, local))
    elapsed = time.perf_counter() - started

    rows = rows_of(result, args.max_tokens)
    print(f"\n{table(rows)}\n")
    t, cc = result["ttft"], result["concurrent"]
    print(
        f"TTFT: {len(t['samples']['auto'])} samples per variant; memory requests with every "
        f"block cached: {t['all_blocks_cached']}; mean tokens per decode request: "
        + ", ".join(f"{m} {v:.1f}" for m, v in result["decode"]["mean_tokens"].items())
        + f"; concurrent case: {cc['distinct_paths']} distinct paths"
    )
    if "hf" in result:
        ag = result["hf"]["agreement"]
        print(
            f"greedy agreement with HF on {ag['prompt']!r} ({ag['max_new_tokens']} new tokens): "
            f"engine ids {ag['engine_ids_equal_hf']}, greedy_decode ids {ag['loop_ids_equal_hf']}, "
            f"server text {ag['http_text_equal_hf']}; tokens {ag['tokens']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command_line(),
        "machine": info,
        "server": where,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "elapsed_s": elapsed,
        "rows": rows,
    } | result
    (args.out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(result, rows, args.out / "serve.png")
    print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.png'} ({elapsed:.0f} s)")
