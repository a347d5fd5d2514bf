"""bench.scale.llamacpp: the anchor as a GGUF file that llama.cpp runs as the same function.

A tiny anchor whose q is wider than the hidden size (head_dim 32 x 4 heads = 128 against 64) and
with grouped-query attention (2 kv heads), so the head-dim keys and the k permutation by kv heads
are exercised. The GGUF checks need `gguf`; the llama.cpp checks need `llama_cpp` (the
`llamacpp` extra) and are skipped without it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.scale.llamacpp import (
    decode_tokens_per_s,
    gguf_name,
    logit_error,
    logits,
    random_anchor,
    rotary_rows_to_gguf,
    write_gguf,
)
from server.model.anchor import Anchor
from server.model.config import AnchorConfig
from server.model.kv_cache import KVCache
from server.model.rope import apply_rope, rope_cos_sin
from tests.server.model.conftest import anchor

CFG = AnchorConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
    intermediate_size=128, rope_theta=100000.0, rms_norm_eps=1e-5, max_seq_len=128,
    tie_embeddings=True,
)  # fmt: skip
TOKENS = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19]


def f16_exact_anchor(config: AnchorConfig = CFG) -> Anchor:
    """The test anchor with every weight rounded to float16, so an f16 file holds exactly its
    weights and llama.cpp's f16 logits differ from `Anchor`'s float32 ones by arithmetic alone."""
    model = anchor(config, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def reference_logits(model: Anchor, tokens: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(model(torch.tensor([tokens]))[0], dtype=np.float32)  # [T, vocab]


def field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def test_rotary_permutation_turns_halves_rope_into_adjacent_pairs_rope() -> None:
    """What llama.cpp's `llama` computes with the permuted rows (rotating pairs 2i, 2i+1) is
    hmem's halves-layout rotation of the original rows, reordered the same way."""
    torch.manual_seed(0)
    n_heads, hd, d = 3, 8, 5
    w, x = torch.randn(n_heads * hd, d), torch.randn(d)
    positions = torch.tensor([[7]])
    cos, sin = rope_cos_sin(positions, hd, 10000.0, torch.float32)  # [1, 1, hd]
    q_hf = (w @ x).view(1, n_heads, 1, hd)  # [B, H, T, hd]
    expected = rotary_rows_to_gguf(apply_rope(q_hf, cos, sin).reshape(-1, 1), n_heads)[:, 0]

    q = (rotary_rows_to_gguf(w, n_heads) @ x).view(n_heads, hd // 2, 2)  # adjacent pairs
    theta = 7 * 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)  # [hd / 2]
    c, s = theta.cos(), theta.sin()
    rotated = torch.stack((q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c), -1)
    torch.testing.assert_close(rotated.reshape(-1), expected)


def test_gguf_names() -> None:
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("model.layers.12.self_attn.o_proj.weight") == "blk.12.attn_output.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_reads_back_with_llama_names_shapes_types_and_metadata(
    tmp_path: Path, dtype: str, tied: bool
) -> None:
    gguf = pytest.importorskip("gguf")
    config = replace(CFG, tie_embeddings=tied)
    model = f16_exact_anchor(config)
    path = write_gguf(model, tmp_path / "a.gguf", dtype)  # type: ignore[arg-type]
    reader = gguf.GGUFReader(path)

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.model") == "none"
    expected_meta = {
        "llama.vocab_size": 256, "llama.context_length": 128, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 32, "llama.attention.value_length": 32,
        "llama.rope.dimension_count": 32, "llama.rope.freq_base": 100000.0,
    }  # fmt: skip
    for key, value in expected_meta.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)

    kind = gguf.GGMLQuantizationType
    matrix_kind = {"f16": kind.F16, "bf16": kind.BF16, "q8_0": kind.Q8_0}[dtype]
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    expected_names = {gguf_name(n) for n in state if not (tied and n == "lm_head.weight")}
    assert set(tensors) == expected_names
    assert ("output.weight" in tensors) is not tied
    for hf_name, weight in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        t = tensors[gguf_name(hf_name)]
        assert list(t.shape) == list(reversed(weight.shape)), hf_name  # GGML order: ne0 first
        assert t.tensor_type == (kind.F32 if weight.ndim == 1 else matrix_kind), hf_name
    q = tensors["blk.1.attn_q.weight"]
    k = tensors["blk.1.attn_k.weight"]
    want_q = rotary_rows_to_gguf(state["model.layers.1.self_attn.q_proj.weight"], 4).numpy()
    want_k = rotary_rows_to_gguf(state["model.layers.1.self_attn.k_proj.weight"], 2).numpy()
    for got, want in ((q, want_q), (k, want_k)):
        values = gguf.quants.dequantize(got.data, got.tensor_type).reshape(want.shape)
        if dtype == "q8_0":
            np.testing.assert_allclose(values, want, atol=np.abs(want).max() / 127)
        else:  # the weights are f16 values, which bf16 holds to 8 bits of mantissa
            np.testing.assert_allclose(values, want, rtol=0 if dtype == "f16" else 2**-8)
    norm = tensors["blk.0.attn_norm.weight"]
    np.testing.assert_array_equal(norm.data, state["model.layers.0.input_layernorm.weight"])


def test_a_state_dict_needs_its_config(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="config="):
        write_gguf(anchor(CFG).state_dict(), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="dtype"):
        write_gguf(anchor(CFG), tmp_path / "a.gguf", "q4_0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # max |logit difference| / std of hmem's logits. Measured: f16 3e-3, bf16 3e-2, q8_0
    # 0.10-0.13 (llama.cpp rounds activations to the weights' type for the matmuls; q8_0 both
    # ways); q and k left in Hugging Face's row order: 1.85.
    [("f16", 1e-2), ("bf16", 0.1), ("q8_0", 0.3)],
)
@pytest.mark.parametrize("tied", [True, False])
def test_llama_cpp_computes_the_anchors_logits(
    tmp_path: Path, dtype: str, tolerance: float, tied: bool
) -> None:
    pytest.importorskip("llama_cpp")
    model = f16_exact_anchor(replace(CFG, tie_embeddings=tied))
    path = write_gguf(model, tmp_path / "a.gguf", dtype)  # type: ignore[arg-type]
    got = logits(path, TOKENS, threads=1)
    want = reference_logits(model, TOKENS)
    assert got.shape == want.shape == (len(TOKENS), CFG.vocab_size)
    assert logit_error(want, got) < tolerance
    if dtype == "f16":
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_llama_cpp_greedy_decode_follows_the_anchor(tmp_path: Path) -> None:
    """Decode through llama.cpp's KV cache picks the tokens hmem's own cached decode picks, and
    reports a positive speed."""
    pytest.importorskip("llama_cpp")
    model = f16_exact_anchor()
    path = write_gguf(model, tmp_path / "a.gguf", "f16")
    prompt, new = TOKENS[:6], 12
    figures = decode_tokens_per_s(path, prompt, new, threads=1, reps=2)
    assert figures.tokens_per_s > 0
    assert len(figures.rep_tokens_per_s) == 2
    assert all(r > 0 for r in figures.rep_tokens_per_s)
    assert figures.engine.startswith("llama-cpp-python ")

    cache = KVCache(CFG, batch_size=1, max_len=len(prompt) + new + 1, dtype=torch.float32)
    with torch.inference_mode():
        want = [int(model(torch.tensor([prompt]), cache=cache)[0, -1].argmax())]
        for pos in range(len(prompt), len(prompt) + new):
            step = model(torch.tensor([want[-1:]]), positions=torch.tensor([[pos]]), cache=cache)
            want.append(int(step[0, -1].argmax()))
    assert list(figures.tokens) == want


def test_random_anchor_has_the_generated_anchors_values() -> None:
    model = random_anchor(CFG, seed=3)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(params["model.norm.weight"], torch.ones(CFG.d_model, dtype=torch.bfloat16))
    magnitudes = params["model.layers.0.mlp.up_proj.weight"].float().abs()
    assert magnitudes.min() >= 2**-7
    assert magnitudes.max() < 2**-5
    assert torch.equal(model.model.embed_tokens.weight, random_anchor(CFG, seed=3).lm_head.weight)
