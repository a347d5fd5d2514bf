"""Manifest validation: every bad field is refused with an error that names it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from server.bank import (
    BankFileMissingError,
    BankFormatError,
    BankManifest,
    ModelShape,
    load_manifest,
    parse_manifest,
)
from server.model.memory import MemoryType
from tiers import BlockDigest

SHA = "ab" * 32
MODEL = {
    "n_layers": 2,
    "d_model": 32,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,  # n_heads * head_dim != d_model, as some Llamas have
    "intermediate_size": 64,
}


def valid() -> dict[str, Any]:
    return {
        "format": "hmem-bank",
        "version": 1,
        "bank_id": "tiny",
        "memory_type": "ffn",
        "levels": 3,
        "branching": 4,
        "widths": [8, 4, 0],
        "dtype": "bfloat16",
        "model": dict(MODEL),
        "lora_targets": None,
        "embedder": {"kind": "hashed-tfidf", "dim": 64},
        "generic": {"L1": {"bytes": 10, "sha256": SHA}},
        "blocks": {
            "tiny/L1/0": {"bytes": 10, "sha256": SHA},
            "tiny/L1/3": {"bytes": 10, "sha256": SHA},
            "tiny/L2/15": {"bytes": 12, "sha256": SHA},
        },
    }


def test_a_valid_manifest_round_trips_through_json(tmp_path: Path) -> None:
    manifest = parse_manifest(valid())
    assert manifest.memory_type is MemoryType.FFN
    assert manifest.memory_levels() == [1, 2]
    text = manifest.to_json()
    assert parse_manifest(text) == manifest
    assert list(json.loads(text)["blocks"]) == ["tiny/L1/0", "tiny/L1/3", "tiny/L2/15"]
    (tmp_path / "manifest.json").write_text(text)
    assert load_manifest(tmp_path) == load_manifest(tmp_path / "manifest.json") == manifest
    assert manifest.digests()["tiny/L2/15"] == BlockDigest(12, SHA)


def test_the_manifest_is_frozen() -> None:
    manifest = parse_manifest(valid())
    with pytest.raises(ValidationError, match="frozen"):
        manifest.levels = 2  # type: ignore[misc]


def setter(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            data = data[p]
        data[last] = value

    return apply


def add_block(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: data["blocks"].update({key: {"bytes": 1, "sha256": SHA}})


BAD: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "version 2": (
        setter("version", 2),
        "version: unsupported bank format version 2; this hmem reads version 1",
    ),
    "version as text": (setter("version", "1"), "unsupported bank format version '1'"),
    "format": (setter("format", "gguf"), "format: 'gguf' is not 'hmem-bank'"),
    "bank_id with dots": (setter("bank_id", "../x"), "bank_id: .*invalid bank id '../x'"),
    "bank_id with slash": (setter("bank_id", "a/b"), "bank_id"),
    "memory type": (setter("memory_type", "moe"), "memory_type: Input should be"),
    "levels": (setter("levels", 9), "levels: .*less than or equal to 8"),
    "levels as bool": (setter("levels", True), "levels"),
    "branching": (setter("branching", 1), "branching: .*greater than or equal to 2"),
    "widths length": (setter("widths", [8, 4]), "widths: 2 widths given for 3 levels"),
    "negative width": (setter("widths", [8, -1, 0]), r"widths\.1: .*greater than or equal to 0"),
    "dtype": (setter("dtype", "int4"), "dtype: Input should be"),
    "int8 lora": (
        lambda d: d.update(memory_type="lora", lora_targets=["q"], dtype="int8"),
        "dtype: int8 storage is for ffn memories only, not lora; store a lora bank in float32, "
        "bfloat16, float16",
    ),
    "int8 kv": (
        lambda d: d.update(memory_type="kv", dtype="int8"),
        "dtype: int8 storage is for ffn memories only, not kv",
    ),
    "model field": (setter("model.d_model", 0), r"model\.d_model: .*greater than 0"),
    "model gqa": (setter("model.n_kv_heads", 3), "n_kv_heads .* must divide n_heads"),
    "model extra": (setter("model.vocab", 5), r"model\.vocab: Extra inputs"),
    "extra field": (setter("notes", "x"), "notes: Extra inputs are not permitted"),
    "embedder kind": (setter("embedder", {"dim": 4}), "embedder: .*embedder.kind"),
    "embedder dim": (setter("embedder.dim", 0), "embedder: .*embedder.dim must be an integer > 0"),
    "lora without targets": (setter("memory_type", "lora"), "lora_targets: a lora bank needs"),
    "lora empty targets": (
        lambda d: d.update(memory_type="lora", lora_targets=[]),
        "lora_targets: a lora bank needs",
    ),
    "lora unknown target": (
        lambda d: d.update(memory_type="lora", lora_targets=["q", "w9"]),
        r"lora_targets: unknown \['w9'\]",
    ),
    "targets on ffn": (setter("lora_targets", ["q"]), "lora_targets: must be null for a ffn"),
    "node out of range": (
        add_block("tiny/L1/4"),
        r"blocks: key 'tiny/L1/4': node 4 out of range for level 1 \(branching 4: 0..3\)",
    ),
    "level out of range": (add_block("tiny/L4/0"), "blocks: key 'tiny/L4/0': level 4 > levels 3"),
    "width-0 level": (add_block("tiny/L3/0"), "blocks: key 'tiny/L3/0': level 3 has width 0"),
    "other bank": (add_block("other/L1/0"), "blocks: key 'other/L1/0' is not in bank 'tiny'"),
    "not a block key": (add_block("tiny/x/0"), "blocks: key 'tiny/x/0'"),
    "bad sha256": (
        setter("blocks", {"tiny/L1/0": {"bytes": 1, "sha256": "AB" * 32}}),
        r"blocks\.tiny/L1/0\.sha256: .*64 lowercase hex",
    ),
    "short sha256": (
        setter("blocks", {"tiny/L1/0": {"bytes": 1, "sha256": "ab"}}),
        r"blocks\.tiny/L1/0\.sha256",
    ),
    "negative bytes": (
        setter("blocks", {"tiny/L1/0": {"bytes": -1, "sha256": SHA}}),
        r"blocks\.tiny/L1/0\.bytes",
    ),
    "generic key": (setter("generic", {"L9": {"bytes": 1, "sha256": SHA}}), "generic: key 'L9'"),
    "generic width 0": (
        setter("generic", {"L3": {"bytes": 1, "sha256": SHA}}),
        "generic: L3 has width 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_field_is_named(case: str) -> None:
    mutate, match = BAD[case]
    data = copy.deepcopy(valid())
    mutate(data)
    with pytest.raises(BankFormatError, match=match):
        parse_manifest(data)


def test_a_missing_field_is_named() -> None:
    data = valid()
    del data["widths"]
    with pytest.raises(BankFormatError, match="widths: Field required"):
        parse_manifest(data)


def test_load_manifest_reads_json_only(tmp_path: Path) -> None:
    with pytest.raises(BankFileMissingError, match="manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b"\x80\x04K\x01.")  # a pickle, never unpickled
    with pytest.raises(BankFormatError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BankFormatError, match="must be a JSON object"):
        load_manifest(tmp_path)


def test_block_shapes_follow_the_memory_layout() -> None:
    ffn = parse_manifest(valid())
    assert ffn.block_shapes(1) == {"gate": (2, 8, 32), "up": (2, 8, 32), "down": (2, 32, 8)}
    with pytest.raises(BankFormatError, match="level 3 has width 0"):
        ffn.block_shapes(3)
    with pytest.raises(BankFormatError, match=r"level must be in 1\.\.3"):
        ffn.block_shapes(4)

    lora = parse_manifest(
        {
            **valid(),
            "memory_type": "lora",
            "lora_targets": ["q", "k", "v", "o", "gate", "up", "down"],
        }
    )
    assert lora.block_shapes(2) == {
        "q.a": (2, 4, 32), "q.b": (2, 64, 4),  # d -> n_heads * head_dim
        "k.a": (2, 4, 32), "k.b": (2, 32, 4),  # d -> n_kv_heads * head_dim
        "v.a": (2, 4, 32), "v.b": (2, 32, 4),
        "o.a": (2, 4, 64), "o.b": (2, 32, 4),  # n_heads * head_dim -> d
        "gate.a": (2, 4, 32), "gate.b": (2, 64, 4),  # d -> intermediate
        "up.a": (2, 4, 32), "up.b": (2, 64, 4),
        "down.a": (2, 4, 64), "down.b": (2, 32, 4),  # intermediate -> d
    }  # fmt: skip

    kv = parse_manifest({**valid(), "memory_type": "kv"})
    assert kv.block_shapes(1) == {"k": (2, 2, 8, 16), "v": (2, 2, 8, 16)}


def test_fetch_bytes_sums_the_levels_of_a_path() -> None:
    manifest = parse_manifest(valid())  # bfloat16, ffn, widths (8, 4, 0), L=2, d=32
    level1, level2 = 3 * 2 * 8 * 32 * 2, 3 * 2 * 4 * 32 * 2
    assert manifest.fetch_bytes([1]) == level1
    assert manifest.fetch_bytes() == manifest.fetch_bytes([1, 2, 3]) == level1 + level2


def test_paper_config_fetch_and_bank_size() -> None:
    # OpenLM-160M with (256, 64, 16, 0), branching 16: 18.1M fetched, a 4.6B bank
    # (docs/paper.md §4).
    shape = ModelShape(
        n_layers=35, d_model=512, n_heads=12, n_kv_heads=12, head_dim=32, intermediate_size=2048
    )
    manifest = BankManifest(
        format="hmem-bank", version=1, bank_id="paper", memory_type=MemoryType.FFN, levels=4,
        branching=16, widths=[256, 64, 16, 0], dtype="bfloat16", model=shape,
        embedder={"kind": "minilm", "dim": 384},
    )  # fmt: skip
    c0 = 3 * 35 * 512  # parameters per unit of r
    assert manifest.fetch_bytes() // 2 == (256 + 64 + 16) * c0 == 18_063_360
    assert manifest.bank_bytes() // 2 == (16 * 256 + 256 * 64 + 4096 * 16) * c0
    assert 4.6e9 < manifest.bank_bytes() / 2 < 4.7e9
