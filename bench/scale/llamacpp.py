"""llama.cpp beside hmem: the anchor's weights as a GGUF file, and llama.cpp's decode speed and
logits on the same weights.

`write_gguf` writes an `Anchor` (or its state dict) as a GGUF file of llama.cpp's `llama`
architecture in f16, bf16 or q8_0; `decode_tokens_per_s` times llama.cpp's batch-1 greedy decode
through `llama-cpp-python`; `logits` gives llama.cpp's logits on token ids, so a test can check
that llama.cpp computes the same function as `Anchor` before any of its speed is believed (a
wrong q/k permutation runs just as fast and answers wrongly).

The file has no vocabulary (`tokenizer.ggml.model = "none"`, which llama.cpp's llama-vocab.cpp
accepts, with `llama.vocab_size` giving the number of token ids): token ids go in as they are.

    python -m bench.scale.llamacpp                 # the paper's 160M shape, random bf16 weights
    python -m bench.scale.llamacpp --shape small   # seconds

Needs the `llamacpp` extra (`pip install -e ".[llamacpp]"`: it compiles llama.cpp from source).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from server.bank.shapes import SHAPES
from server.bank.synthetic import random_bf16_bits
from server.model.anchor import Anchor
from server.model.config import AnchorConfig
from server.model.kv_cache import KVCache

if TYPE_CHECKING:
    import gguf
    import llama_cpp

GgufDType = Literal["f16", "bf16", "q8_0"]
GGUF_DTYPES: tuple[GgufDType, ...] = get_args(GgufDType)
Q8_0_BLOCK = 32  # values per Q8_0 block: every row length must be a multiple

# Hugging Face Llama names (those `Anchor` uses) -> GGUF names of llama.cpp's `llama` tensors.
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face Llama tensor name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    prefix, _, rest = hf_name.partition(".layers.")
    layer, _, suffix = rest.partition(".")
    if prefix != "model" or not layer.isdigit() or suffix not in _LAYER_NAMES:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{layer}.{_LAYER_NAMES[suffix]}"


def rotary_rows_to_gguf(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder a q or k projection's rows [n_heads * head_dim, in] from Hugging Face's rotary
    layout to llama.cpp's.

    Hugging Face rotates dimension i of a head with dimension i + head_dim/2 (the "halves"
    layout); llama.cpp's `llama` rotates adjacent pairs (2i, 2i + 1). Within each head, row
    i + j * head_dim/2 (j = 0, 1) moves to row 2i + j, so both compute the same attention.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    # [H, 2, hd/2, in] -> [H, hd/2, 2, in]: the two halves interleaved
    return weight.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def random_anchor(config: AnchorConfig, *, seed: int = 0) -> Anchor:
    """An anchor with the random bf16 weights `hmem bank generate` gives its anchor (magnitudes
    2^-7 to 2^-5, random signs; norm weights 1), built in memory, in bf16."""
    with torch.device("meta"):
        model = Anchor(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rng = np.random.default_rng([seed, 0, 1 << 41])
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head is listed once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                bits = torch.from_numpy(random_bf16_bits(rng, p.numel()))
                p.copy_(bits.view(torch.bfloat16).view(p.shape))
    return model.eval()


def _gguf_tensor(t: Tensor, dtype: GgufDType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A 2-D weight as the array GGUFWriter takes, and its GGML type."""
    import gguf

    kind = gguf.GGMLQuantizationType
    if dtype == "f16":
        return t.to(torch.float16).numpy(), kind.F16
    if dtype == "bf16":
        # The bf16 bit patterns as bytes [rows, 2 * cols]; from a bf16 model, exactly its values.
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), kind.BF16
    if t.shape[-1] % Q8_0_BLOCK:
        raise ValueError(
            f"q8_0 needs rows of a multiple of {Q8_0_BLOCK} values, got {tuple(t.shape)}"
        )
    return gguf.quants.quantize(t.float().numpy(), kind.Q8_0), kind.Q8_0


def write_gguf(
    model: Anchor | Mapping[str, Tensor],
    path: str | Path,
    dtype: GgufDType = "f16",
    *,
    config: AnchorConfig | None = None,
) -> Path:
    """Write the anchor's weights as a GGUF file for llama.cpp's `llama` architecture.

    `model` is an `Anchor`, or its state dict with `config`. Matrices are stored in `dtype`;
    norm weights stay float32, as llama.cpp expects. Tied embeddings write no `output.weight`
    (llama.cpp then uses `token_embd.weight` as the head). Returns `path`.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    if isinstance(model, Anchor):
        config, state = model.config, model.state_dict()
    elif config is None:
        raise ValueError("a state dict needs its AnchorConfig: pass config=")
    else:
        state = dict(model)
    c, path = config, Path(path)
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("hmem anchor")
    writer.add_file_type(file_type)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    # q is n_heads x head_dim wide, not d_model: llama.cpp reads head_dim from these keys.
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model("none")  # no vocabulary: token ids are given, not text
    for hf_name, tensor in state.items():
        if c.tie_embeddings and hf_name == "lm_head.weight":
            continue
        t = tensor.detach().cpu()
        if hf_name.endswith("q_proj.weight"):
            t = rotary_rows_to_gguf(t, c.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = rotary_rows_to_gguf(t, c.n_kv_heads)
        if t.ndim == 1:
            writer.add_tensor(gguf_name(hf_name), t.float().numpy())
        else:
            array, kind = _gguf_tensor(t, dtype)
            writer.add_tensor(gguf_name(hf_name), array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@contextlib.contextmanager
def _llama(
    gguf_path: str | Path, *, n_ctx: int, threads: int, logits_all: bool
) -> Iterator[llama_cpp.Llama]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_version() -> str:
    """llama-cpp-python's version (it pins the llama.cpp commit it builds)."""
    import llama_cpp

    return str(llama_cpp.__version__)


def logits(gguf_path: str | Path, token_ids: Sequence[int], *, threads: int = 2) -> np.ndarray:
    """llama.cpp's logits at every position of `token_ids`, one forward: float32 [T, vocab]."""
    n = len(token_ids)
    with _llama(gguf_path, n_ctx=n, threads=threads, logits_all=True) as llm:
        llm.eval(list(token_ids))
        return np.array(llm.scores[:n], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class DecodeFigures:
    """Batch-1 greedy decode: `new_tokens` single-token steps after a prefill, per repetition."""

    tokens_per_s: float  # median over repetitions
    rep_tokens_per_s: tuple[float, ...]
    prefill_s: float  # median
    new_tokens: int
    threads: int
    engine: str  # e.g. "llama-cpp-python 0.3.36"
    tokens: tuple[int, ...]  # the greedy continuation (the same each repetition)


def decode_tokens_per_s(
    gguf_path: str | Path,
    prompt_ids: Sequence[int],
    new_tokens: int = 64,
    *,
    threads: int = 2,
    reps: int = 3,
) -> DecodeFigures:
    """llama.cpp's batch-1 decode speed on a GGUF file.

    Each repetition clears the KV cache, prefills the prompt in one `Llama.eval`, then runs
    `new_tokens` decode steps: `Llama.eval([token])` (one `llama_decode` of one token, logits for
    it alone) and the argmax of its logits, read in place through `llama_get_logits_ith` (no
    copy), feeding the next step. tokens/s = `new_tokens` / the wall time of those steps
    (`perf_counter`), Python's per-step work (building the one-token batch, the argmax over the
    vocabulary) included as a real decode loop has it. One untimed repetition first pages the
    weights in. The figure is the median over `reps`.
    """
    import llama_cpp

    if new_tokens < 1 or not prompt_ids:
        raise ValueError("need a prompt and new_tokens >= 1")
    prompt = list(prompt_ids)
    n_ctx = len(prompt) + new_tokens + 1
    with _llama(gguf_path, n_ctx=n_ctx, threads=threads, logits_all=False) as llm:
        n_vocab = llm.n_vocab()

        def next_token() -> int:
            row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return int(np.ctypeslib.as_array(row, shape=(n_vocab,)).argmax())

        def run(steps: int) -> tuple[float, float, list[int]]:
            llm.reset()  # type: ignore[no-untyped-call]  # the next eval drops the cache from 0
            t0 = time.perf_counter()
            llm.eval(prompt)
            out = [next_token()]
            t1 = time.perf_counter()
            for _ in range(steps):
                llm.eval(out[-1:])
                out.append(next_token())
            return t1 - t0, time.perf_counter() - t1, out

        run(min(new_tokens, 8))
        timed = [run(new_tokens) for _ in range(reps)]
    rates = tuple(new_tokens / decode_s for _, decode_s, _ in timed)
    return DecodeFigures(
        tokens_per_s=statistics.median(rates),
        rep_tokens_per_s=rates,
        prefill_s=statistics.median(prefill for prefill, _, _ in timed),
        new_tokens=new_tokens,
        threads=threads,
        engine=f"llama-cpp-python {llama_cpp_version()}",
        tokens=tuple(timed[-1][2]),
    )


def hmem_decode_tokens_per_s(
    model: Anchor, prompt_ids: Sequence[int], new_tokens: int = 64, *, reps: int = 3
) -> DecodeFigures:
    """The same loop on hmem's `Anchor` in this process, in its dtype, with a `KVCache` (no
    memory, no engine or HTTP: the model's own step against llama.cpp's), torch's threads as
    set."""
    prompt = torch.tensor([list(prompt_ids)])  # [1, T]
    T = prompt.shape[1]

    def run() -> tuple[float, float, list[int]]:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.config, batch_size=1, max_len=T + new_tokens + 1, dtype=dtype)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = [int(model(prompt, cache=cache)[0, -1].argmax())]
            t1 = time.perf_counter()
            for pos in range(T, T + new_tokens):
                step = model(torch.tensor([out[-1:]]), positions=torch.tensor([[pos]]), cache=cache)
                out.append(int(step[0, -1].argmax()))
            return t1 - t0, time.perf_counter() - t1, out

    run()
    timed = [run() for _ in range(reps)]
    rates = tuple(new_tokens / decode_s for _, decode_s, _ in timed)
    return DecodeFigures(
        tokens_per_s=statistics.median(rates),
        rep_tokens_per_s=rates,
        prefill_s=statistics.median(prefill for prefill, _, _ in timed),
        new_tokens=new_tokens,
        threads=torch.get_num_threads(),
        engine=f"hmem Anchor (torch {torch.__version__})",
        tokens=tuple(timed[-1][2]),
    )


def logit_error(reference: np.ndarray, other: np.ndarray) -> float:
    """max |other - reference| over every position and token, relative to the reference's
    standard deviation (the logits' scale)."""
    return float(np.abs(other - reference).max() / reference.std())


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="paper-160m", choices=sorted(SHAPES))
    p.add_argument("--dtypes", default=",".join(GGUF_DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="where the GGUF files go (default: a temp dir)")
    args = p.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if bad := set(dtypes) - set(GGUF_DTYPES):
        p.error(f"--dtypes: unknown {sorted(bad)}; choose from {GGUF_DTYPES}")
    torch.set_num_threads(args.threads)
    load_before = f"{os.getloadavg()[0]:.2f}"
    config = SHAPES[args.shape].anchor
    model = random_anchor(config, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    prompt = [int(i) for i in rng.integers(1, config.vocab_size, args.prompt_tokens)]
    with torch.inference_mode():
        reference = model.float()(torch.tensor([prompt]))[0].numpy()  # float32 [T, vocab]
    model = model.to(torch.bfloat16).fuse_projections()  # hmem serves fused projections
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        engines: dict[str, Callable[[], DecodeFigures]] = {}
        errors = {}
        for dtype in dtypes:
            path = write_gguf(model, out / f"{args.shape}-{dtype}.gguf", dtype)
            name = f"llama.cpp {dtype}"
            errors[name] = logit_error(reference, logits(path, prompt, threads=args.threads))
            engines[name] = partial(
                decode_tokens_per_s, path, prompt, args.new_tokens, threads=args.threads, reps=1
            )
        engines["hmem Anchor bf16"] = partial(
            hmem_decode_tokens_per_s, model, prompt, args.new_tokens, reps=1
        )
        # Round robin, one repetition of each engine at a time: load from other work on these
        # cores changes over minutes, and this way each engine meets the same conditions.
        runs: dict[str, list[DecodeFigures]] = {name: [] for name in engines}
        for _ in range(args.reps):
            for name, run in engines.items():
                runs[name].append(run())
    print(
        f"shape {args.shape}: {config.n_params() / 1e6:.1f}M params; batch 1, prompt "
        f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.threads} threads; "
        f"llama-cpp-python {llama_cpp_version()}; load average {load_before} before, "
        f"{os.getloadavg()[0]:.2f} after (other work on these cores slows both engines)"
    )
    print("| engine | decode tok/s (median) | per rep | prefill ms | max logit err / std |")
    print("| --- | --- | --- | --- | --- |")
    for name, figures in runs.items():
        rates = [f.tokens_per_s for f in figures]
        prefill_ms = statistics.median(f.prefill_s for f in figures) * 1e3
        error = f"{errors[name]:.2e}" if name in errors else "-"
        per_rep = ", ".join(f"{r:.1f}" for r in rates)
        print(
            f"| {name} | {statistics.median(rates):.1f} | {per_rep} | {prefill_ms:.1f} | {error} |"
        )


if __name__ == "__main__":
    main()
