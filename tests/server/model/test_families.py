"""Each supported family, on random weights `transformers` makes: the same logits as its own
implementation, in float32 and bf16, alone, with zeroed memories, and decoding from a cache
(past a sliding window)."""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor, save_anchor
from server.model.errors import UnsupportedArchitectureError
from server.model.kv_cache import KVCache
from server.model.memory import FFNBlock, KVBlock, LoRABlock, MemoryBlock, MemoryType
from server.model.memory_batch import build_memory_batch

# Sequences longer than the 4-token windows below, so the window matters.
TOKENS = torch.tensor(
    [[1, 5, 17, 3, 88, 42, 9, 61, 2, 33, 7, 19], [4, 4, 8, 15, 16, 23, 42, 0, 1, 2, 90, 3]]
)
SMALL: dict[str, Any] = {
    "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
}  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    model: str  # the transformers class
    config: str
    extra: dict[str, Any]


FAMILIES = [
    Family("llama", "LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": False}),
    Family("llama-tied", "LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": True}),
    Family(
        "llama-3.1-rope",
        "LlamaForCausalLM",
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ),
    Family(
        "llama-linear-rope",
        "LlamaForCausalLM",
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    Family(
        "llama-biases",
        "LlamaForCausalLM",
        "LlamaConfig",
        {"attention_bias": True, "mlp_bias": True},
    ),
    Family("mistral", "MistralForCausalLM", "MistralConfig", {"sliding_window": 4}),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True}),
    Family(
        "qwen2-window",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 32}),
    Family("phi3", "Phi3ForCausalLM", "Phi3Config", {"sliding_window": 4, "pad_token_id": 0}),
    Family(
        "gemma2",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 4},
    ),
    Family(
        "gemma3",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 4,
            "sliding_window_pattern": 2,
        },
    ),
]
IDS = [f.name for f in FAMILIES]


def reference(family: Family, directory: Path, seed: int = 0) -> torch.nn.Module:
    """A random `transformers` model of the family, saved to `directory`."""
    config_cls = getattr(transformers, family.config)
    config = config_cls(**{**SMALL, **family.extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, family.model)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init, so a difference would show; norms near their unit.
            if "norm" in name:
                p.uniform_(-0.2, 0.2) if "gemma" in family.name else p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Family, torch.nn.Module, Path]:
    family: Family = request.param
    directory = tmp_path_factory.mktemp(family.name)
    return family, reference(family, directory), directory


def _theirs(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The reference's logits (float32) with its weights in `dtype` (a copy: rounding the
    module's own weights to bf16 and back would change them)."""
    with torch.no_grad():
        copy = model if dtype is torch.float32 else deepcopy(model).to(dtype)
        out: torch.Tensor = copy(TOKENS).logits.float()
    return out


def _zero_blocks(model: Anchor) -> list[list[MemoryBlock]]:
    c = model.config
    L, d, g = c.n_layers, c.d_model, torch.Generator().manual_seed(1)
    ffn = FFNBlock(gate=torch.randn(L, 8, d, generator=g), up=torch.randn(L, 8, d, generator=g),
                   down=torch.zeros(L, d, 8))  # fmt: skip
    return [[ffn], [ffn]]


def test_float32_logits_equal_the_reference(saved: tuple[Family, torch.nn.Module, Path]) -> None:
    _, theirs, directory = saved
    ours = load_anchor(directory)
    assert ours.config.family == json.loads((directory / "config.json").read_text())["model_type"]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(TOKENS), _theirs(theirs, torch.float32), rtol=1e-4, atol=1e-4
        )


def test_bf16_logits_equal_the_reference(saved: tuple[Family, torch.nn.Module, Path]) -> None:
    _, theirs, directory = saved
    ours = load_anchor(directory, dtype=torch.bfloat16)
    expected = _theirs(theirs, torch.bfloat16)
    with torch.no_grad():
        got = ours(TOKENS).float()
    # bf16 keeps 8 bits of mantissa: the two implementations round in places of their own.
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.03 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_zeroed_memories_leave_the_logits_unchanged(
    saved: tuple[Family, torch.nn.Module, Path],
) -> None:
    _, theirs, directory = saved
    ours = load_anchor(directory)
    memory = build_memory_batch(_zero_blocks(ours), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(TOKENS, memory=memory), _theirs(theirs, torch.float32), rtol=1e-4, atol=1e-4
        )


def test_decoding_from_the_cache_equals_the_reference(
    saved: tuple[Family, torch.nn.Module, Path],
) -> None:
    """Prefill 3 tokens, then one at a time past the window: each step's logits are the
    reference's at that position (one row alone, then both rows batched)."""
    _, theirs, directory = saved
    ours = load_anchor(directory).fuse_projections()
    expected = _theirs(theirs, torch.float32)
    for rows in (slice(0, 1), slice(0, 2)):
        tokens = TOKENS[rows]
        B, T = tokens.shape
        cache = KVCache(ours.config, batch_size=B, max_len=32, dtype=torch.float32)
        with torch.no_grad():
            got = [ours(tokens[:, :3], cache=cache)]
            for t in range(3, T):
                positions = torch.full((B, 1), t)
                got.append(ours(tokens[:, t : t + 1], positions=positions, cache=cache))
        torch.testing.assert_close(torch.cat(got, 1), expected[rows], rtol=1e-4, atol=1e-4)


def test_int8_serving_stays_close(saved: tuple[Family, torch.nn.Module, Path]) -> None:
    _, theirs, directory = saved
    ours = load_anchor(directory, dtype=torch.bfloat16).quantize_int8()
    expected = _theirs(theirs, torch.float32)
    with torch.no_grad():
        got = ours(TOKENS).float()
    assert (got - expected).abs().mean() <= 0.05 * expected.abs().mean()


def test_a_saved_anchor_is_the_checkpoint_again(
    saved: tuple[Family, torch.nn.Module, Path], tmp_path: Path
) -> None:
    """What `save_anchor` writes, `transformers` reads as the same model of the same family."""
    family, theirs, directory = saved
    save_anchor(load_anchor(directory), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == json.loads((directory / "config.json").read_text())["model_type"]
    again = getattr(transformers, family.model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS).logits, _theirs(theirs, torch.float32))


@pytest.mark.parametrize("kind", [MemoryType.LORA, MemoryType.KV])
def test_lora_and_kv_memories_run_on_each_family(
    saved: tuple[Family, torch.nn.Module, Path], kind: MemoryType
) -> None:
    _, theirs, directory = saved
    ours = load_anchor(directory)
    c = ours.config
    L, g = c.n_layers, torch.Generator().manual_seed(2)
    block: MemoryBlock
    if kind is MemoryType.LORA:
        q_out = c.n_heads * c.head_dim
        block = LoRABlock(a={"q": torch.randn(L, 4, c.d_model, generator=g)},
                          b={"q": torch.zeros(L, q_out, 4)})  # fmt: skip
    else:
        shape = (L, c.n_kv_heads, 4, c.head_dim)
        block = KVBlock(k=torch.randn(shape, generator=g), v=torch.zeros(shape))
    memory = build_memory_batch([[block], [block]], dtype=torch.float32)
    with torch.no_grad():
        zeroed = ours(TOKENS, memory=memory)
    if kind is MemoryType.LORA:  # a zero update leaves the logits as they are
        torch.testing.assert_close(zeroed, _theirs(theirs, torch.float32), rtol=1e-4, atol=1e-4)
    else:  # zero values still take attention weight: the logits move, and stay finite
        assert torch.isfinite(zeroed).all()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}, "model_type 'falcon'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_type='longrope'"),
        ({"partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"layer_types": ["chunked_attention"] * 3}, "layer_types"),
    ],
)
def test_what_a_family_does_not_run_is_refused_by_name(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    reference(FAMILIES[IDS.index("phi3")], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        load_anchor(tmp_path)
