"""int8 banks made by `hmem bank convert` and `hmem bank generate --dtype int8`, pushed and read.

The demo bank (float32, with its anchor and tokenizer) converted to int8 is a new bank of the
same id, tree, router and anchor whose blocks dequantize to within half a quantization step of
the source's; `hmem bank push` and `verify` take it as any bank, and the tiers' codec reads its
copies. A generated int8 bank is the bf16 one quantized, at the exact analytic share of its bytes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from server.bank import Bank, BankBlockCodec, decode_block, write_random_bank
from server.bank.convert import CONVERT_RECORD, convert_bank
from server.bank.generate import PLAN, generate_bank
from server.bank.placement import placement_from_flags, tier_location
from server.bank.push import stored_name
from server.bank.shapes import SHAPES
from server.bank.synthetic import random_block_bytes
from server.defaults import DEMO_BANK
from server.model.memory import FFNBlock, MemoryType, dequantize_block, quantize_block
from tests.server.bank.helpers import assert_within_half_a_step, tensor_bytes
from tests.server.bank.placement import run_cli
from tiers import ConfigError, StoreConfig, open_tier

SMALL = SHAPES["small"]


def flags(root: Path, levels: int = 2) -> list[str]:
    """Level 1 on LMDB, the rest on a directory."""
    return [f"--tier=1=lmdb:{root / 'flash'}"] + [
        f"--tier={level}={root / 'disk'}" for level in range(2, levels + 1)
    ]


async def tier_copies(bank: Bank, config: StoreConfig) -> dict[str, bytes]:
    """Every block's copy in its level's home tier, by block key."""
    out: dict[str, bytes] = {}
    tiers = {name: open_tier(name, s) for name, s in config.tiers.items()}
    try:
        for key in bank.block_keys():
            home = tiers[config.placement[key.level][0]]
            (data,) = await home.get_many([stored_name(bank, key)])
            assert data is not None, key
            out[str(key)] = bytes(data)
    finally:
        for tier in tiers.values():
            await tier.aclose()
    return out


def config_of(bank: Bank, root: Path) -> StoreConfig:
    return placement_from_flags(
        [f.removeprefix("--tier=") for f in flags(root, bank.manifest.levels)],
        bank_id=bank.manifest.bank_id,
        levels=bank.manifest.levels,
    )


# -- convert -------------------------------------------------------------------------------------


def test_convert_writes_the_demo_bank_in_int8_and_push_and_verify_take_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    argv = ["bank", "convert", str(DEMO_BANK), str(out), "--dtype", "int8", "--no-progress"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert f"converted 72 blocks of {DEMO_BANK} to int8 in {out}" in printed
    assert f"push it: hmem bank push {out}" in printed

    source, converted = Bank.open(DEMO_BANK), Bank.open(out)  # the anchor came too
    s, c = source.manifest, converted.manifest
    assert c.dtype == "int8"
    same = {"dtype", "blocks", "generic"}
    assert c.model_dump(exclude=same) == s.model_dump(exclude=same)  # id, tree, model, embedder
    assert set(c.blocks) == set(s.blocks)
    assert not {e.sha256 for e in c.blocks.values()} & {e.sha256 for e in s.blocks.values()}
    for name in ("router.safetensors", *(f"anchor/{p.name}" for p in source.anchor_dir.iterdir())):
        assert (out / name).read_bytes() == (DEMO_BANK / name).read_bytes(), name
    for key in source.block_keys():
        block, original = converted.read_block(key), source.read_block(key)
        assert isinstance(block, FFNBlock)
        assert isinstance(original, FFNBlock)
        assert_within_half_a_step(block, original)
    for level in s.memory_levels():
        generic, original = converted.generic(level), source.generic(level)
        assert isinstance(generic, FFNBlock)
        assert isinstance(original, FFNBlock)
        assert_within_half_a_step(generic, original)
    # float32 -> int8: (d + 4) / 4d of the tensor bytes (d = 64), exactly.
    assert c.bank_bytes() * 4 * 64 == s.bank_bytes() * 68
    assert json.loads((out / CONVERT_RECORD).read_text()) == {
        "source_bank_id": s.bank_id,
        "source_fingerprint": source.fingerprint(),
        "source_dtype": "float32",
        "dtype": "int8",
    }

    # The same command again: nothing to do.
    before = (out / "manifest.json").read_bytes()
    assert run_cli(argv) == 0
    assert "already holds this build of" in capsys.readouterr().out
    assert (out / "manifest.json").read_bytes() == before

    # Pushed and verified as any bank; the tiers' codec reads every copy as an int8 block.
    tier_flags = flags(tmp_path)
    assert run_cli(["bank", "push", str(out), *tier_flags, "--no-progress"]) == 0
    assert "72 blocks written, 0 repaired" in capsys.readouterr().out
    assert run_cli(["bank", "verify", str(out), *tier_flags, "--no-progress"]) == 0
    assert "verify ok" in capsys.readouterr().out
    codec = BankBlockCodec(c)
    copies = asyncio.run(tier_copies(converted, config_of(converted, tmp_path)))
    for key, data in copies.items():
        block = codec.decode(memoryview(data))
        assert isinstance(block, FFNBlock)
        assert block.quantized
        assert codec.nbytes(block) == c.fetch_bytes([int(key.split("/L")[1].split("/")[0])])


def test_convert_to_a_float_dtype_casts_and_int8_dequantizes(tmp_path: Path) -> None:
    convert_bank(DEMO_BANK, tmp_path / "bf16", dtype="bfloat16", progress=False)
    convert_bank(tmp_path / "bf16", tmp_path / "int8", dtype="int8", progress=False)
    report = convert_bank(tmp_path / "int8", tmp_path / "back", dtype="float32", progress=False)
    assert report.blocks == 72
    source = Bank.open(DEMO_BANK)
    bf16, int8, back = (Bank.open(tmp_path / n) for n in ("bf16", "int8", "back"))
    key = source.block_keys(2)[5]
    original = source.read_block(key)
    for name, t in bf16.read_block(key).tensors().items():
        assert torch.equal(t, original.tensors()[name].bfloat16()), name
    quantized = int8.read_block(key)
    assert torch.equal(
        int8.read_block(key).tensors()["gate"], quantize_block(bf16.read_block(key)).gate
    )
    for name, t in back.read_block(key).tensors().items():
        assert torch.equal(t, dequantize_block(quantized, torch.float32).tensors()[name]), name


def test_convert_refuses_what_it_cannot_convert_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_random_bank(
        tmp_path / "lora", memory_type=MemoryType.LORA, lora_targets=["q", "v"], dtype="bfloat16"
    )
    argv = ["bank", "convert", str(tmp_path / "lora"), str(tmp_path / "out"), "--dtype", "int8"]
    assert run_cli(argv) == 2
    assert "dtype: int8 storage is for ffn memories only, not lora" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no OUT, no partial one

    assert run_cli(["bank", "convert", str(DEMO_BANK), str(tmp_path / "x"), "--dtype=float32"]) == 2
    assert "its blocks are already float32; nothing to convert" in capsys.readouterr().err
    assert run_cli(["bank", "convert", str(DEMO_BANK), str(DEMO_BANK), "--dtype=int8"]) == 2
    assert "is the source bank" in capsys.readouterr().err

    # Another bank at OUT is replaced only with --overwrite.
    argv = ["bank", "convert", str(DEMO_BANK), str(tmp_path / "lora"), "--dtype=int8"]
    assert run_cli([*argv, "--no-progress"]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert run_cli([*argv, "--no-progress", "--overwrite"]) == 0
    assert Bank.open(tmp_path / "lora").manifest.dtype == "int8"

    # A generated bank keeps its blocks in its tiers only.
    generated = tmp_path / "generated"
    generated.mkdir()
    (generated / "manifest.json").write_bytes((DEMO_BANK / "manifest.json").read_bytes())
    assert run_cli(["bank", "convert", str(generated), str(tmp_path / "g8"), "--dtype=int8"]) == 2
    assert "generate it again with --dtype instead" in capsys.readouterr().err


def test_push_dtype_converts_into_out_then_pushes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_random_bank(tmp_path / "bank", levels=2, widths=(8, 4), dtype="bfloat16")
    push = ["bank", "push", str(tmp_path / "bank"), *flags(tmp_path), "--no-progress"]
    assert run_cli([*push, "--dtype", "int8"]) == 2
    assert "--dtype needs --out OUT" in capsys.readouterr().err
    assert run_cli([*push, "--dtype", "int8", "--out", str(tmp_path / "int8")]) == 0
    printed = capsys.readouterr().out
    assert "converted 20 blocks of" in printed
    assert "20 blocks written" in printed
    # Run again: the conversion is done and every copy is there.
    assert run_cli([*push, "--dtype", "int8", "--out", str(tmp_path / "int8")]) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed
    assert "0 blocks written, 0 repaired (0.00 MiB), 20 checked good" in printed
    verify = ["bank", "verify", str(tmp_path / "int8"), *flags(tmp_path), "--no-progress"]
    assert run_cli(verify) == 0


# -- generate --dtype int8 -----------------------------------------------------------------------


def test_generate_int8_writes_the_bf16_bank_quantized_at_its_analytic_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, int8 = tmp_path / "bank", SMALL.with_dtype("int8")
    tier_flags = flags(tmp_path, levels=4)
    argv = ["bank", "generate", str(out), "--shape=small", "--dtype=int8", *tier_flags]
    assert run_cli([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(int8.summary() + "\n")
    assert "blocks in int8 (+float32 scales)" in printed
    assert json.loads((out / PLAN).read_text())["dtype"] == "int8"
    assert json.loads((out / "anchor" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert int8.anchor_bytes() == SMALL.anchor_bytes()

    bank = Bank.open(out, check_files=False)
    m = bank.manifest
    assert m.dtype == "int8"
    copies = asyncio.run(tier_copies(bank, config_of(bank, tmp_path)))
    codec = bank.codec()
    L, d = SMALL.anchor.n_layers, SMALL.anchor.d_model
    for level, r in enumerate(SMALL.widths, start=1):
        blobs = {k: b for k, b in copies.items() if k.startswith(f"small/L{level}/")}
        assert len(blobs) == SMALL.n_nodes(level)
        tensors = sum(tensor_bytes(b) for b in blobs.values())
        # int8 weights and float32 scales: 3 L r (d + 4) bytes a block, (d + 4) / 2d of bf16's.
        assert tensors == int8.level_bytes(level) == SMALL.n_nodes(level) * 3 * L * r * (d + 4)
        assert int8.level_bytes(level) * 2 * d == SMALL.level_bytes(level) * (d + 4)
        assert m.fetch_bytes([level]) == int8.block_bytes(level)
        key, blob = next(iter(blobs.items()))
        node = int(key.rsplit("/", 1)[1])
        block = codec.decode(memoryview(blob))
        bf16 = decode_block(
            random_block_bytes(SMALL, level, node, 0)[0], memory_type=MemoryType.FFN
        )
        for name, t in quantize_block(bf16).tensors().items():
            assert torch.equal(block.tensors()[name], t), (key, name)
    assert int8.bank_bytes() * 128 == SMALL.bank_bytes() * 68
    assert int8.fetch_bytes() * 128 == SMALL.fetch_bytes() * 68

    # The finished generation is left alone; a bf16 one over it is refused by its dtype.
    assert run_cli([*argv, "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out
    config = config_of(bank, tmp_path)
    with pytest.raises(ConfigError, match=r"different dtype \('int8', now 'bfloat16'\)"):
        asyncio.run(generate_bank(out, SMALL, config, progress=False))


def test_a_plan_from_before_dtype_resumes_as_bf16_only(tmp_path: Path) -> None:
    out = tmp_path / "bank"
    config = placement_from_flags(
        [f.removeprefix("--tier=") for f in flags(tmp_path, levels=4)], bank_id="small", levels=4
    )
    out.mkdir()
    plan = {  # generate.json as hmem wrote it before --dtype
        "shape": "small",
        "bank_id": "small",
        "seed": 0,
        "placement": {
            str(level): [tier_location(config.tiers[n]) for n in names]
            for level, names in sorted(config.placement.items())
        },
    }
    (out / PLAN).write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=r"different dtype \('bfloat16', now 'int8'\)") as info:
        asyncio.run(generate_bank(out, SMALL.with_dtype("int8"), config, progress=False))
    assert "placement" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == [PLAN]
