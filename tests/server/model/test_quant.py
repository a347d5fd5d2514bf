"""int8 weights: the rounding, the kernel against float, an int8 anchor and int8 FFN memories."""

from __future__ import annotations

import pytest
import torch

from server.model.anchor import Anchor
from server.model.config import AnchorConfig
from server.model.kv_cache import KVCache
from server.model.memory import (
    FFNBlock,
    MemoryFormatError,
    MemoryType,
    block_from_tensors,
    dequantize_block,
    quantize_block,
)
from server.model.memory_batch import FFNMemoryBatch, build_memory_batch
from server.model.quant import INT8_K_ALIGN, Int8Weight, PackedWeight, int8_matmul, quantize_int8
from tests.server.model.conftest import CFG, anchor, random_block

# d_model 64 and head widths that are multiples of 16: every projection takes the int8 kernel.
ALIGNED = AnchorConfig(
    vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
    intermediate_size=128, max_seq_len=64, tie_embeddings=True,
)  # fmt: skip


def test_quantize_int8_rounds_each_row_to_within_half_a_step() -> None:
    w = torch.randn(48, 40) * torch.linspace(0.01, 3, 48)[:, None]
    w[5] = 0  # a zero row keeps scale 1 and values 0
    q, scale = quantize_int8(w)
    assert q.dtype is torch.int8
    assert scale.shape == (48,)
    assert int(q.abs().max()) == 127
    assert scale[5] == 1
    assert not q[5].any()
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())
    # Along another dimension: one scale per column.
    qc, sc = quantize_int8(w, dim=0)
    assert sc.shape == (40,)
    assert bool(((qc.float() * sc - w).abs() <= sc / 2 + 1e-6).all())


@pytest.mark.parametrize("k", [64, 48, 40, 7])  # 40 and 7 are not multiples of 16: widened
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_matches_the_widened_weight(k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(k)
    w = Int8Weight.of(torch.randn(24, k).to(dtype))
    x = torch.randn(3, 5, k).to(dtype)
    out = int8_matmul(x, w.q, w.scale)
    ref = x.float() @ (w.q.float() * w.scale.float()[:, None]).T
    assert out.shape == (3, 5, 24)
    assert out.dtype is dtype
    # The kernel takes bf16 activations (float32 ones are rounded to bf16 for it); widened
    # weights of odd widths keep float32's precision.
    tol = 1e-4 if dtype is torch.float32 and k % INT8_K_ALIGN else 3e-2
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def _logprobs(model: Anchor, tokens: torch.Tensor, **kw: object) -> torch.Tensor:
    return torch.log_softmax(model(tokens, **kw).float(), dim=-1)  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [ALIGNED, CFG], ids=["aligned", "odd-widths"])
def test_int8_anchor_stays_close_to_float_and_halves_its_bytes(config: AnchorConfig) -> None:
    ref = anchor(config, seed=1)
    model = anchor(config, seed=1).quantize_int8()
    assert model.quantized
    tokens = torch.randint(
        0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        lp_ref, lp = _logprobs(ref, tokens), _logprobs(model, tokens)
    chosen = lp_ref.argmax(-1, keepdim=True)
    diff = (lp.gather(-1, chosen) - lp_ref.gather(-1, chosen)).abs()
    assert float(diff.mean()) < 0.02
    assert float((lp.exp() - lp_ref.exp()).abs().max()) < 0.05
    # Float weights are released: projections and output table are int8 now. Norms stay float,
    # and so does an untied embedding table (a lookup reads one row of it).
    floats = sum(p.numel() for p in model.parameters())
    table = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    assert floats == config.d_model * (2 * config.n_layers + 1) + table


def test_int8_anchor_decodes_with_the_cache_as_without() -> None:
    model = anchor(ALIGNED, seed=2).quantize_int8()
    tokens = torch.randint(
        0, ALIGNED.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1)
    )
    cache = KVCache(ALIGNED, batch_size=1, max_len=32, dtype=torch.float32)
    with torch.no_grad():
        full = model(tokens)
        model(tokens[:, :8], cache=cache)
        step = model(tokens[:, 8:], positions=torch.tensor([[8]]), cache=cache)
    assert torch.allclose(step[0, 0], full[0, 8], atol=1e-4)


def test_quantized_ffn_block_round_trips_by_neuron() -> None:
    block = random_block(MemoryType.FFN, 12, seed=3)
    assert isinstance(block, FFNBlock)
    q = quantize_block(block)
    assert q.quantized
    assert {t.dtype for t in (q.gate, q.up, q.down)} == {torch.int8}
    assert q.scales is not None
    assert all(s.shape == (CFG.n_layers, 12) for s in q.scales)
    back = dequantize_block(q, torch.float32)
    assert isinstance(back, FFNBlock)
    for name in ("gate", "up", "down"):
        a, b = getattr(back, name), getattr(block, name)
        assert float((a - b).abs().max()) <= float(b.abs().max()) / 127
    # The names a codec stores are the names a block is made from.
    again = block_from_tensors(MemoryType.FFN, q.tensors())
    assert isinstance(again, FFNBlock)
    assert again.quantized


def test_int8_ffn_blocks_are_refused_half_made() -> None:
    q = quantize_block(random_block(MemoryType.FFN, 4, seed=4)).tensors()
    with pytest.raises(MemoryFormatError, match="missing its scales"):
        block_from_tensors(MemoryType.FFN, {k: v for k, v in q.items() if k != "down.scale"})
    with pytest.raises(MemoryFormatError, match="mixes int8 and float"):
        block_from_tensors(MemoryType.FFN, {**q, "gate": q["gate"].float()})
    with pytest.raises(MemoryFormatError, match="expected floats"):
        block_from_tensors(MemoryType.FFN, {**q, "up.scale": q["up.scale"][:, :2]})
    with pytest.raises(MemoryFormatError, match="ffn memories only"):
        quantize_block(random_block(MemoryType.LORA, 4, seed=5))


def test_int8_memories_batch_pad_inertly_and_match_their_float_twins() -> None:
    """Two sequences with paths of different widths, int8, batched: each row's logits are what
    the same blocks widened to float give, and what the row gives alone."""
    model = anchor(ALIGNED, seed=6)
    paths = [
        [random_block(MemoryType.FFN, r, seed=10 + r, config=ALIGNED) for r in (8, 4, 2)],
        [random_block(MemoryType.FFN, r, seed=20 + r, config=ALIGNED) for r in (8, 1)],
    ]
    q_paths = [[quantize_block(b) for b in path] for path in paths]
    batch = build_memory_batch(q_paths, dtype=torch.float32)
    assert isinstance(batch, FFNMemoryBatch)
    assert batch.gate_up.dtype is torch.int8
    assert batch.down.shape[-1] % INT8_K_ALIGN == 0  # 14 neurons padded to 16
    widened = [[dequantize_block(b, torch.float32) for b in path] for path in q_paths]
    tokens = torch.randint(
        0, ALIGNED.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        out = model(tokens, memory=batch)
        ref = model(tokens, memory=build_memory_batch(widened, dtype=torch.float32))
        alone = model(tokens[1:], memory=build_memory_batch(q_paths[1:], dtype=torch.float32))
        none = model(tokens)
    # The int8 kernel rounds float32 activations to bf16: within bf16's precision of the widened
    # blocks' logits, and the same logits batched or alone.
    assert torch.allclose(out, ref, atol=3e-2 * float(ref.abs().max()))
    assert float((out - ref).abs().mean()) < 3e-3 * float(ref.abs().max())
    assert torch.allclose(out[1:], alone, atol=1e-5)
    assert not torch.allclose(out, none, atol=1e-3)  # the memories do something


def test_a_batch_refuses_int8_and_float_blocks_together() -> None:
    block = random_block(MemoryType.FFN, 4, seed=7)
    with pytest.raises(MemoryFormatError, match="mixes int8 and float"):
        build_memory_batch([[block], [quantize_block(block)]], dtype=torch.float32)


def test_packed_bf16_weights_give_the_plain_products() -> None:
    ref = anchor(ALIGNED, seed=8).to(torch.bfloat16).fuse_projections()
    model = anchor(ALIGNED, seed=8).to(torch.bfloat16).pack_weights()
    if not PackedWeight.available(ref.lm_head.weight):
        pytest.skip("no oneDNN on this machine")
    assert isinstance(model._head, PackedWeight)
    tokens = torch.randint(
        0, ALIGNED.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3)
    )
    memory = build_memory_batch(
        [[random_block(MemoryType.FFN, 16, seed=9, config=ALIGNED)]], dtype=torch.bfloat16
    )
    with torch.no_grad():
        for kw in ({}, {"memory": memory}):
            rows = tokens[:1] if kw else tokens
            out, want = model(rows, **kw).float(), ref(rows, **kw).float()  # type: ignore[arg-type]
            assert torch.allclose(out, want, atol=0.02 * float(want.abs().max()))
    # A float32 model is left as it is: packed, its products measured slower.
    plain = anchor(ALIGNED, seed=8).pack_weights()
    assert plain._head is None


@pytest.mark.parametrize("kind", [MemoryType.LORA, MemoryType.KV])
def test_an_int8_anchor_takes_lora_and_kv_memories(kind: MemoryType) -> None:
    ref = anchor(CFG, seed=11)
    model = anchor(CFG, seed=11).quantize_int8()
    block = random_block(kind, 4, seed=12)
    memory = build_memory_batch([[block]], dtype=torch.float32)
    tokens = torch.randint(
        0, ALIGNED.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        lp_ref = torch.log_softmax(ref(tokens, memory=memory), -1)
        lp = torch.log_softmax(model(tokens, memory=memory), -1)
        without = torch.log_softmax(model(tokens), -1)
    assert float((lp.exp() - lp_ref.exp()).abs().max()) < 0.05
    assert float((lp.exp() - without.exp()).abs().max()) > 0.01  # the memory is applied
