"""Case 4 of bench.serve: anchor-only decode of one greedy stream by hmem (the server over
HTTP/SSE, the engine in this process, the plain `greedy_decode` loop) against Hugging Face
`transformers` generation (`LlamaForCausalLM.generate(do_sample=False)`) of the same weights and
prompt ids, and whether their greedy tokens agree.

Apart from `bench.serve.main` because it loads a second copy of the model (and transformers) in this
process; `--no-hf` skips it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.serve.client import Variant, interleave, median, request, stream
from server.bank.reader import Bank
from server.engine.engine import Engine, TokenEvent
from server.engine.sampling import SamplingParams
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor
from server.tokenizer import AnchorTokenizer
from server.training.evaluate import greedy_decode


class TokenClock:
    """A `generate` streamer noting when each new token comes (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.times = 0, list[float]()

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


@dataclass
class Local:
    """Our anchor (for the engine and the plain loop) and the HF model, in this process."""

    model: Anchor
    tokenizer: AnchorTokenizer
    engine: Engine
    hf: Any


def load_local(bank: Path) -> Local:
    import transformers
    from transformers import LlamaForCausalLM

    hf_logging: Any = transformers.logging  # untyped
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    anchor_dir = Bank.open(bank, check_files=False).anchor_dir
    model = load_anchor(anchor_dir, dtype=torch.float32, device="cpu")
    tokenizer = AnchorTokenizer.from_dir(anchor_dir, model.config)
    engine = Engine(model, eos_ids=sorted(tokenizer.eos_ids), max_batch=1, max_queue=1)
    engine.start()
    hf: Any = LlamaForCausalLM.from_pretrained(anchor_dir, dtype=torch.float32)
    return Local(model, tokenizer, engine, hf.eval())


def common_prefix(a: list[int] | str, b: list[int] | str) -> int:
    pairs = zip(a, b, strict=False)
    return next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(a), len(b)))


async def case_hf(
    c: httpx.AsyncClient, local: Local, *, prompt: str, rounds: int, n: int
) -> dict[str, Any]:
    ids = local.tokenizer.encode(prompt)  # what the server feeds the model (BOS first)
    eos = sorted(local.tokenizer.eos_ids)
    out: dict[str, Any] = {}

    async def http(_: int) -> float:
        s = await stream(c, request(prompt, n, mode="off"))
        out["http"], out["http_tokens"] = s.text, s.tokens
        return s.decode_rate

    async def engine(_: int) -> float:
        (gen,) = local.engine.submit([(ids, SamplingParams(max_tokens=n, temperature=0), [])])
        got, times = [], []
        async for ev in gen.stream():
            if isinstance(ev, TokenEvent):
                times.append(time.perf_counter())
                got.append(ev.token)
        out["engine"] = got
        return rate(times)

    def loop(new: int) -> Variant:
        async def timed(_: int) -> float:
            t0 = time.perf_counter()
            (got,) = greedy_decode(local.model, [ids], max_new_tokens=new, eos_ids=eos)
            out[f"loop_{new}"] = got
            return time.perf_counter() - t0

        return timed

    async def hf(_: int) -> float:
        prompt_ids, clock = torch.tensor([ids]), TokenClock()  # [1, T]
        with torch.inference_mode():
            full = local.hf.generate(
                prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                max_new_tokens=n,
                do_sample=False,
                streamer=clock,
                pad_token_id=eos[0] if eos else 0,
            )
        out["hf"] = [t for t in full[0, len(ids) :].tolist() if t not in eos]  # [new]
        return rate(clock.times)

    variants = {"http": http, "engine": engine, "loop_n": loop(n), "loop_1": loop(1), "hf": hf}
    await interleave(variants, 1)  # warm-up
    samples = await interleave(variants, rounds * len(variants))
    med = {k: median(v) for k, v in samples.items()}
    loop_tokens = len(out[f"loop_{n}"])
    rates = {"http": med["http"], "engine": med["engine"], "hf": med["hf"]}
    rates["loop"] = (loop_tokens - 1) / (med["loop_n"] - med["loop_1"])
    hf_ids, hf_text = out["hf"], local.tokenizer.decode(out["hf"])
    agreement = {
        "prompt": prompt,
        "prompt_ids": ids,
        "max_new_tokens": n,
        "tokens": {
            "hf": len(hf_ids),
            "engine": len(out["engine"]),
            "loop": loop_tokens,
            "http": out["http_tokens"],
        },
        "engine_ids_equal_hf": out["engine"] == hf_ids,
        "loop_ids_equal_hf": out[f"loop_{n}"] == hf_ids,
        "http_text_equal_hf": out["http"] == hf_text,
        "engine_common_prefix_tokens": common_prefix(out["engine"], hf_ids),
        "loop_common_prefix_tokens": common_prefix(out[f"loop_{n}"], hf_ids),
        "http_common_prefix_chars": common_prefix(out["http"], hf_text),
        "hf_text": hf_text,
    }
    return {"rates": rates, "medians": med, "samples": samples, "agreement": agreement}
