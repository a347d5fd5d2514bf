"""The math of the memory-augmented anchor, pinned by equivalences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model.anchor import layer_memories
from server.model.kv_cache import KVCache
from server.model.memory import FFNBlock, MemoryType
from server.model.memory_batch import build_memory_batch
from tests.server.model.conftest import CFG, anchor, random_block

TOKENS = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 2, 33, 70]])


@pytest.mark.parametrize("kind", list(MemoryType))
def test_a_memory_with_zero_output_projection_leaves_logits_unchanged(kind: MemoryType) -> None:
    model = anchor()
    blocks = [random_block(kind, w, seed=i, zero_out=True) for i, w in enumerate((8, 4, 2))]
    memory = build_memory_batch([blocks], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS, memory=memory), model(TOKENS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(MemoryType))
def test_a_nonzero_memory_changes_the_logits(kind: MemoryType) -> None:
    model = anchor()
    memory = build_memory_batch([[random_block(kind, 8, seed=1)]], dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(model(TOKENS, memory=memory), model(TOKENS), atol=1e-3)


def test_concatenated_inner_dimension_equals_per_level_sum_and_a_wider_swiglu() -> None:
    model = anchor()
    mlp = model.model.layers[0].mlp
    levels = [random_block(MemoryType.FFN, w, seed=10 + w) for w in (8, 4, 2)]
    assert all(isinstance(b, FFNBlock) for b in levels)
    x = torch.randn(3, 5, CFG.d_model)
    layer = 0
    with torch.no_grad():
        base = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        per_level = base.clone()
        for b in levels:
            assert isinstance(b, FFNBlock)
            h = F.silu(x @ b.gate[layer].T) * (x @ b.up[layer].T)  # [B, T, r_l]
            per_level += h @ b.down[layer].T
        # The paper's definition: the SwiGLU with its inner dimension grown by every level.
        gate_w = torch.cat([mlp.gate_proj.weight, *(b.gate[layer] for b in levels)])  # type: ignore[union-attr]
        up_w = torch.cat([mlp.up_proj.weight, *(b.up[layer] for b in levels)])  # type: ignore[union-attr]
        down_w = torch.cat([mlp.down_proj.weight, *(b.down[layer] for b in levels)], dim=1)  # type: ignore[union-attr]
        wide = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T
        memory = build_memory_batch([levels] * 3, dtype=torch.float32)
        ours = mlp(x, layer_memories(memory, CFG.n_layers)[layer])
    torch.testing.assert_close(ours, per_level, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, wide, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(MemoryType))
def test_a_heterogeneous_batch_equals_each_sequence_run_alone(kind: MemoryType) -> None:
    model = anchor()
    prompts = [
        [5, 17, 3, 88, 42, 9, 61],
        [12, 4, 90],
        [7, 7, 7, 7, 1],
        [33, 70, 2, 2],
    ]
    memories = [
        [
            random_block(kind, 8, seed=1),
            random_block(kind, 4, seed=2),
            random_block(kind, 2, seed=3),
        ],
        [random_block(kind, 8, seed=4), random_block(kind, 2, seed=5)],  # a level missing
        [],  # no memory at all
        [random_block(kind, 8, seed=1)],  # shares level 1 with the first sequence
    ]
    T = max(map(len, prompts))
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])  # right-padded
    with torch.no_grad():
        batched = model(tokens, memory=build_memory_batch(memories, dtype=torch.float32))
        for i, (p, mem) in enumerate(zip(prompts, memories, strict=True)):
            alone = model(torch.tensor([p]), memory=build_memory_batch([mem], dtype=torch.float32))
            torch.testing.assert_close(batched[i, : len(p)], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [None, *MemoryType])
def test_kv_cache_decoding_equals_recomputing_the_whole_sequence(kind: MemoryType | None) -> None:
    model = anchor()
    prompts = [[5, 17, 3, 88, 42], [12, 4]]
    continuations = [[9, 61, 2, 33], [90, 1, 8, 8]]
    blocks = [[], []] if kind is None else [[random_block(kind, w, seed=w)] for w in (8, 4)]
    mem = build_memory_batch(blocks, dtype=torch.float32)
    cache = KVCache(CFG, batch_size=2, max_len=32, dtype=torch.float32)
    T = max(map(len, prompts))
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])  # right-padded prefill
    lengths = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        model(tokens, cache=cache, memory=mem)
        for step in range(4):
            nxt = torch.tensor([[c[step]] for c in continuations])
            logits = model(nxt, positions=lengths[:, None].clone(), cache=cache, memory=mem)
            for i in range(2):
                full = torch.tensor([prompts[i] + continuations[i][: step + 1]])
                alone = build_memory_batch([blocks[i]], dtype=torch.float32)
                ref = model(full, memory=alone)
                torch.testing.assert_close(logits[i, 0], ref[0, -1], rtol=1e-4, atol=1e-5)
            lengths += 1


def test_bf16_runs_and_stays_close_to_fp32() -> None:
    model = anchor()
    memory = build_memory_batch([[random_block(MemoryType.FFN, 8, seed=1)]], dtype=torch.float32)
    with torch.no_grad():
        ref = model(TOKENS, memory=memory)
        low = model.to(torch.bfloat16)
        mem16 = build_memory_batch(
            [[random_block(MemoryType.FFN, 8, seed=1)]], dtype=torch.bfloat16
        )
        out = low(TOKENS, memory=mem16)
    assert out.dtype == torch.bfloat16
    assert (out.float().softmax(-1) - ref.softmax(-1)).abs().max() < 0.05


def test_context_past_the_cache_is_refused() -> None:
    model = anchor()
    cache = KVCache(CFG, batch_size=1, max_len=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="past the context length 4"):
        model(TOKENS, cache=cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(MemoryType))
def test_cuda_matches_cpu_with_memory_and_cache(kind: MemoryType) -> None:
    model = anchor()
    blocks = [[random_block(kind, 8, seed=1)], [random_block(kind, 4, seed=2)]]
    tokens = torch.tensor([[5, 17, 3, 88], [12, 4, 0, 0]])
    with torch.no_grad():
        ref = model(tokens, memory=build_memory_batch(blocks, dtype=torch.float32))
        gpu = model.to("cuda")
        cache = KVCache(CFG, batch_size=2, max_len=16, dtype=torch.float32, device="cuda")
        mem = build_memory_batch(blocks, dtype=torch.float32, device="cuda")
        out = gpu(tokens.cuda(), cache=cache, memory=mem)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(MemoryType))
def test_fused_projections_give_the_same_logits_and_state(kind: MemoryType) -> None:
    """`fuse_projections` (serving) computes q/k/v and gate/up in one matmul each: the same
    logits with every memory type (LoRA patches q, k, v, gate and up here), the same state dict,
    and no second copy of the weights."""
    model = anchor()
    targets = ("q", "k", "v", "gate", "up")
    blocks = [random_block(kind, w, seed=i, targets=targets) for i, w in enumerate((8, 4))]
    memory = build_memory_batch([blocks, blocks[:1]], dtype=torch.float32)
    tokens = torch.cat([TOKENS, TOKENS.flip(1)])
    with torch.no_grad():
        before = model(tokens, memory=memory)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        params = sum(p.numel() for p in model.parameters())
        model.fuse_projections()
        torch.testing.assert_close(model(tokens, memory=memory), before, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert sum(p.numel() for p in model.parameters()) == params
    attn = model.model.layers[0].self_attn
    assert attn._qkv is not None
    assert attn.q_proj.weight.data_ptr() == attn._qkv.data_ptr()  # a view, not a copy
