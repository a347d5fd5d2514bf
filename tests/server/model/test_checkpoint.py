"""Hugging Face layout: logits equal the `transformers` reference Llama; refusals name the cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from server.model.checkpoint import load_anchor, save_anchor
from server.model.config import AnchorConfig
from server.model.errors import CheckpointError, UnsupportedArchitectureError
from tests.server.model.conftest import CFG, anchor

CFG_TIED = replace(CFG, tie_embeddings=True)
TOKENS = torch.tensor([[1, 5, 17, 3, 88, 42, 9, 61, 2, 33], [4, 4, 8, 15, 16, 23, 42, 0, 1, 2]])


def reference(tmp_path: Path, **overrides: object) -> tuple[LlamaForCausalLM, Path]:
    kwargs: dict[str, object] = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # larger than the default init, so differences would show
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 4},  # plain multi-head attention
        {"num_key_value_heads": 1, "rope_theta": 500000.0},  # multi-query, Llama-3 base
        {"head_dim": 16},  # head_dim != hidden / heads
    ],
)
def test_logits_match_the_transformers_reference(
    tmp_path: Path, overrides: dict[str, object]
) -> None:
    ref, directory = reference(tmp_path, **overrides)
    ours = load_anchor(directory)
    with torch.no_grad():
        expected = ref(TOKENS).logits
        got = ours(TOKENS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_anchor_we_save_is_read_by_transformers(tmp_path: Path) -> None:
    model = anchor()
    save_anchor(model, tmp_path)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(TOKENS).logits, model(TOKENS), rtol=1e-5, atol=1e-5)
    again = load_anchor(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), model(TOKENS))


def test_bf16_load(tmp_path: Path) -> None:
    _, directory = reference(tmp_path)
    model = load_anchor(directory, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model(TOKENS).dtype == torch.bfloat16


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"architectures": ["FalconForCausalLM"], "model_type": "falcon"},
            "unsupported model_type 'falcon'",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"pretraining_tp": 2}, "pretraining_tp=2"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"num_attention_heads": 3}, "multiple of"),
    ],
)
def test_unsupported_architectures_are_refused_by_name(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    _, directory = reference(tmp_path)
    _edit_config(directory, **changes)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        load_anchor(directory)


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    _, directory = reference(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        load_anchor(directory)


def test_a_misshapen_or_extra_tensor_is_named(tmp_path: Path) -> None:
    _, directory = reference(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(31,\)"):
        load_anchor(directory)
    tensors["model.norm.weight"] = torch.ones(32)
    tensors["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"
    ):
        load_anchor(directory)


def test_pickle_only_checkpoints_and_empty_dirs_are_refused(tmp_path: Path) -> None:
    _, directory = reference(tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads"):
        load_anchor(directory)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_anchor(tmp_path / "nothing")


def test_a_tied_checkpoint_shares_the_embedding_with_the_head(tmp_path: Path) -> None:
    ref, directory = reference(tmp_path, tie_word_embeddings=True)
    model = load_anchor(directory)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())
    # A tied checkpoint that also stores the head loads too; the stored head is dropped.
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, directory / "model.safetensors")
    again = load_anchor(directory)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), ref(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_a_bf16_checkpoint_loads_into_exactly_its_own_bytes(tmp_path: Path) -> None:
    model = anchor(CFG_TIED).to(torch.bfloat16)
    save_anchor(model, tmp_path)
    loaded = load_anchor(tmp_path, dtype=torch.bfloat16)
    stored = load_file(tmp_path / "model.safetensors")
    file_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    params = list(loaded.parameters())  # each tied parameter once
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() * p.element_size() for p in params) == file_bytes
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_a_float32_checkpoint_loads_as_bf16_with_the_same_logits_as_a_cast(tmp_path: Path) -> None:
    model = anchor(CFG_TIED)
    save_anchor(model, tmp_path)
    loaded = load_anchor(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model.to(torch.bfloat16)(TOKENS))


# Loads the checkpoint in argv[1] and prints how far the peak RSS rose above the RSS before the
# load, in bytes, with one forward pass so that every weight has been read. Writing 5 to
# /proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so import-time peaks of
# torch do not hide the load's own.
_PEAK_RSS = """
import sys
import torch
from server.model.checkpoint import load_anchor

def status(key):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
model = load_anchor(sys.argv[1])
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
print(status("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loading_holds_one_copy_of_the_weights(tmp_path: Path) -> None:
    # About 100 MB of float32 weights; the largest single tensor is 16 MB.
    config = AnchorConfig(
        vocab_size=8192, d_model=512, n_layers=5, n_heads=8, n_kv_heads=8,
        intermediate_size=2048, tie_embeddings=True,
    )  # fmt: skip
    save_anchor(anchor(config), tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 95e6 < size < 110e6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    growth = int(done.stdout.split()[-1])
    assert growth < 1.5 * size, f"peak RSS rose by {growth / size:.2f}x the checkpoint's size"
