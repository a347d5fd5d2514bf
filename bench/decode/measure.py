"""What bench.decode measures outside the servers: the machine's memory-read bandwidth, the bytes
a decode step reads, and int8's logprobs against bf16's on the same weights."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from server.model.anchor import Anchor, DecoderLayer
from server.model.memory import MemoryBlock
from server.model.memory_batch import build_memory_batch
from server.model.quant import Int8Weight, PackedWeight, ServingWeight


def read_bandwidth(gib: float = 2.0, reps: int = 5) -> dict[str, float]:
    """GB/s of reading one large tensor, best of `reps`, with three read kernels (the machine's
    bandwidth is the fastest: a kernel slower than memory measures itself, not memory)."""
    n = int(gib * (1 << 30))
    raw = torch.empty(n, dtype=torch.uint8).random_(0, 255)
    kernels: dict[str, Callable[[], Tensor]] = {
        "sum_bf16": lambda: raw.view(torch.bfloat16).sum(),
        "sum_f32": lambda: raw.view(torch.float32).sum(),
        "amax_int8": lambda: raw.view(torch.int8).amax(),
    }
    out: dict[str, float] = {}
    for name, read in kernels.items():
        read()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
        out[name] = n / best / 1e9
    out["gb_per_s"] = max(out.values())
    return out


def _weight_bytes(w: ServingWeight) -> int:
    if isinstance(w, Int8Weight):
        return w.nbytes
    if isinstance(w, PackedWeight):
        return int(w.packed.numel()) * w.packed.element_size()
    return w.nbytes


def step_bytes(model: Anchor) -> int:
    """Bytes of weights one decode step reads: every projection, the output layer and the norms
    (an embedding lookup reads one row: left out). The KV cache and activations are left out too:
    at batch 1 and a short context they are under 1% of it."""
    total = 0
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        for w in (attn._qkv, attn._o, mlp._gate_up, mlp._down):
            assert w is not None, "prepare the model for serving first"
            total += _weight_bytes(w)
        total += layer.input_layernorm.weight.nbytes + layer.post_attention_layernorm.weight.nbytes
    assert model._head is not None
    return total + _weight_bytes(model._head) + int(model.model.norm.weight.nbytes)


def gguf_step_bytes(model: Anchor, kind: str) -> int:
    """The same for llama.cpp's file of `kind`: f16/bf16 2 bytes a weight, q8_0 34 bytes per
    block of 32 (int8 values and an f16 scale); norms in f32."""
    c = model.config
    per_layer = (
        c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        + c.n_heads * c.head_dim * c.d_model
        + 3 * c.d_model * c.intermediate_size
    )
    weights = c.n_layers * per_layer + c.vocab_size * c.d_model
    norms = (2 * c.n_layers + 1) * c.d_model * 4
    return (weights * 34 // 32 if kind == "q8_0" else weights * 2) + norms


@torch.inference_mode()
def logprob_differences(
    ref: Anchor,
    other: Anchor,
    prompts: Sequence[list[int]],
    *,
    new_tokens: int,
    ref_memory: Sequence[MemoryBlock] = (),
    other_memory: Sequence[MemoryBlock] = (),
) -> dict[str, Any]:
    """Teacher-forced on `ref`'s greedy continuation of each prompt: the absolute difference of
    the chosen tokens' logprobs, `other` against `ref`, and how often their argmax agrees."""
    dtype = next(ref.parameters()).dtype
    diffs: list[float] = []
    agree = total = 0
    mem_ref = build_memory_batch([list(ref_memory)], dtype=dtype) if ref_memory else None
    mem_other = build_memory_batch([list(other_memory)], dtype=dtype) if other_memory else None
    for ids in prompts:
        tokens = torch.tensor([ids])
        for _ in range(new_tokens):  # ref's greedy continuation
            nxt = ref(tokens, memory=mem_ref)[0, -1].argmax()
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        lp_ref = torch.log_softmax(ref(tokens, memory=mem_ref)[0, :-1].float(), -1)
        lp_other = torch.log_softmax(other(tokens, memory=mem_other)[0, :-1].float(), -1)
        chosen = tokens[0, 1:, None]
        start = len(ids) - 1  # the continuation's tokens
        d = (lp_other.gather(-1, chosen) - lp_ref.gather(-1, chosen))[start:, 0].abs()
        diffs += d.tolist()
        agree += int((lp_other[start:].argmax(-1) == lp_ref[start:].argmax(-1)).sum())
        total += len(d)
    return {
        "mean_abs": statistics.fmean(diffs),
        "max_abs": max(diffs),
        "argmax_agreement": agree / total,
        "tokens": total,
    }
