"""Random weights for generated banks: block bytes, an anchor checkpoint, a tokenizer.

`hmem bank generate` writes tens of GB, so values are made from random bits rather than
`torch.randn`: each bf16 value takes a random sign, a random 7-bit mantissa and one of two
exponents, giving magnitudes in [2^-7, 2^-5) (about 0.008 to 0.031, std about 0.018, close to the
0.02 of a fresh memory). numpy's PCG64 makes these at memory speed, seeded per block from (seed,
level, node), so a block's bytes, and therefore its sha256, depend on nothing else (and the
bank's dtype: an int8 bank's blocks are those bf16 values quantized): an interrupted generation
resumes by skipping what its journal lists, and a rerun writes the same bank. The anchor is a
Hugging Face Llama checkpoint of the shape's architecture with the same kind of values (norm
weights 1). Its tokenizer is a byte-level BPE trained by `tokenizers` on
the Python standard library's own source, which ships with every interpreter: English
identifiers and prose enough to learn gpt-neox's 50,277 tokens in seconds, with no download.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server.bank.codec import encode_block, torch_dtype
from server.bank.layout import INT8, block_shapes
from server.bank.shapes import BankShape
from server.model.anchor import Anchor
from server.model.memory import FFNBlock, MemoryType

EOS_TOKEN = "<|endoftext|>"  # noqa: S105 (a token, not a password); gpt-neox's BOS and EOS, id 0
_SIGN_MANTISSA = np.uint16(0x80FF)  # sign, the exponent's lowest bit, the 7-bit mantissa
_EXPONENT = np.uint16(0x3C00)  # exponent 120 (or 121 with the bit above): 2^-7 (or 2^-6)


def random_bf16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random bf16 values as their uint16 bit patterns (see the module docstring)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    np.bitwise_and(bits, _SIGN_MANTISSA, out=bits)
    np.bitwise_or(bits, _EXPONENT, out=bits)
    return bits


def _random_tensor(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    n = int(np.prod(shape))
    t = torch.from_numpy(random_bf16_bits(rng, n)).view(torch.bfloat16).view(shape)
    return t if dtype == torch.bfloat16 else t.to(dtype)


def block_rng(seed: int, level: int, node: int) -> np.random.Generator:
    return np.random.default_rng([seed, level, node])


def _random_ffn_block(shape: BankShape, level: int, rng: np.random.Generator) -> FFNBlock:
    shapes = block_shapes(MemoryType.FFN, shape.model_shape(), width=shape.widths[level - 1])
    # An int8 bank's blocks are the bf16 ones quantized: the same seed, the same weights.
    dtype = torch.bfloat16 if shape.dtype == INT8 else torch_dtype(shape.dtype)
    t = {name: _random_tensor(rng, s, dtype) for name, s in shapes.items()}
    return FFNBlock(t["gate"], t["up"], t["down"])


def random_block_bytes(shape: BankShape, level: int, node: int, seed: int) -> tuple[bytes, str]:
    """The encoded FFN block of (`level`, `node`) in the shape's dtype, and its sha256 hex
    digest."""
    block = _random_ffn_block(shape, level, block_rng(seed, level, node))
    data = encode_block(block, dtype=shape.dtype)
    return data, hashlib.sha256(data).hexdigest()


def random_generic_block(shape: BankShape, level: int, *, seed: int) -> FFNBlock:
    """The generic memory of `level` (seeded past every node id)."""
    return _random_ffn_block(shape, level, np.random.default_rng([seed, level, 1 << 40]))


def write_random_anchor(shape: BankShape, out_dir: Path, *, seed: int) -> None:
    """config.json and model.safetensors (HF Llama layout, the shape's anchor dtype), random
    values."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch_dtype(shape.anchor_dtype)
    with torch.device("meta"):
        model = Anchor(shape.anchor)
    rng = np.random.default_rng([seed, 0, 1 << 41])
    state = {}
    for name, p in model.state_dict().items():
        if shape.anchor.tie_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):  # RMSNorm weights start at 1
            state[name] = torch.ones(tuple(p.shape), dtype=dtype)
        else:
            state[name] = _random_tensor(rng, tuple(p.shape), dtype)
    config = shape.anchor.to_hf()
    config["torch_dtype"] = shape.anchor_dtype
    tmp = out_dir / "model.safetensors.tmp"
    # Written by us, not `save_file`, which makes its file private (0600): the serving user
    # reads the anchor too, as it reads the bank's other files.
    tmp.write_bytes(save(state, metadata={"format": "pt"}))
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _stdlib_sources(max_bytes: int) -> list[str]:
    """Python files of the standard library, in a fixed order, up to `max_bytes` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"test", "tests", "site-packages", "idlelib"} & set(p.relative_to(root).parts)
    )
    chosen, total = [], 0
    for p in files:
        if total >= max_bytes:
            break
        chosen.append(str(p))
        total += p.stat().st_size
    return chosen


def write_tokenizer(shape: BankShape, out_dir: Path) -> None:
    """tokenizer.json (byte-level BPE of `shape.tokenizer_vocab` tokens) and its config."""
    if shape.tokenizer_vocab > shape.anchor.vocab_size:
        raise ValueError(
            f"tokenizer_vocab {shape.tokenizer_vocab} > the anchor's vocab_size "
            f"{shape.anchor.vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.tokenizer_vocab,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # About 300 bytes of text per token learned: all of it (13 MB) for gpt-neox's 50,277.
    tok.train(_stdlib_sources(max(2_000_000, 300 * shape.tokenizer_vocab)), trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": shape.anchor.max_seq_len,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
