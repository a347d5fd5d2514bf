"""Writing and reading banks: atomic commits, verified reads, errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from server.bank import (
    TINY_MODEL,
    Bank,
    BankError,
    BankExistsError,
    BankFileMissingError,
    BankFormatError,
    BankWriter,
    BlockFormatError,
    BlockIntegrityError,
    BlockNotInBankError,
    write_random_bank,
)
from server.model.memory import FFNBlock, KVBlock, LoRABlock, MemoryType
from tests.server.bank.helpers import make_block, targets_for


def writer_args(memory_type: MemoryType = MemoryType.FFN, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "bank_id": "tiny",
        "memory_type": memory_type,
        "levels": 2,
        "branching": 2,
        "widths": (4, 2),
        "dtype": "bfloat16",
        "model": TINY_MODEL,
        "embedder": {"kind": "hashed-tfidf", "dim": 8},
        "lora_targets": targets_for(memory_type),
    }
    return {**args, **over}


def router() -> dict[str, torch.Tensor]:
    return {"centroids.L1": torch.randn(2, 8), "centroids.L2": torch.randn(4, 8)}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("memory_type", list(MemoryType))
def test_blocks_read_back_equal_to_what_was_written(
    tmp_path: Path, memory_type: MemoryType
) -> None:
    out = tmp_path / "bank"
    blocks = {(1, n): make_block(memory_type, width=4, seed=n) for n in range(2)}
    blocks.update({(2, n): make_block(memory_type, width=2, seed=10 + n) for n in range(4)})
    generic = make_block(memory_type, width=2, seed=99)
    with BankWriter(out, **writer_args(memory_type)) as writer:
        for (level, node), block in blocks.items():
            writer.write_block(level, node, block)
        writer.write_generic(2, generic)
        writer.write_router({**router(), "embedder.idf": torch.ones(8)})
        manifest = writer.commit()

    bank = Bank.open(out, require_anchor=False)
    assert bank.manifest == manifest
    assert [str(k) for k in bank.block_keys()] == [f"tiny/L{lv}/{n}" for lv, n in sorted(blocks)]
    for key, block in bank.iter_blocks():
        want = blocks[(key.level, key.node)].tensors()
        for name, t in block.tensors().items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, want[name].to(torch.bfloat16)), (key, name)
    got_generic = bank.generic(2)
    assert got_generic is not None
    assert bank.generic(1) is None
    for name, t in generic.tensors().items():
        assert torch.equal(got_generic.tensors()[name], t.to(torch.bfloat16))
    assert set(bank.router_tensors()) == {"centroids.L1", "centroids.L2", "embedder.idf"}
    bank.verify()
    assert siblings(out) == ["bank"]  # no partial or old directories left


def test_an_exception_inside_the_writer_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bank"

    def build() -> None:
        with BankWriter(out, **writer_args()) as writer:
            writer.write_router(router())
            writer.write_block(1, 0, make_block(MemoryType.FFN, width=4))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build()
    assert siblings(out) == []


def test_a_crash_before_commit_leaves_nothing_that_looks_like_a_bank(tmp_path: Path) -> None:
    out = tmp_path / "bank"
    writer = BankWriter(out, **writer_args())
    writer.write_router(router())
    writer.write_block(1, 0, make_block(MemoryType.FFN, width=4))
    # The process dies here: no commit, no abort.
    assert not out.exists()
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".bank.partial-")
    assert not (partial / "manifest.json").exists()
    with pytest.raises(BankFileMissingError):
        Bank.open(partial, require_anchor=False)


def test_a_clean_exit_commits(tmp_path: Path) -> None:
    with BankWriter(tmp_path / "bank", **writer_args()) as writer:
        writer.write_router(router())
    assert Bank.open(tmp_path / "bank", require_anchor=False).manifest.blocks == {}


def test_commit_without_a_router_is_refused_and_cleans_up(tmp_path: Path) -> None:
    writer = BankWriter(tmp_path / "bank", **writer_args())
    with pytest.raises(BankFormatError, match=r"router.safetensors was not written"):
        writer.commit()
    assert siblings(tmp_path / "bank") == []
    with pytest.raises(BankError, match="aborted"):
        writer.write_router(router())


def test_an_existing_bank_is_refused_without_overwrite_and_replaced_with_it(tmp_path: Path) -> None:
    out = tmp_path / "bank"
    first = write_random_bank(out, seed=1)
    with pytest.raises(BankExistsError, match="pass overwrite=True") as info:
        write_random_bank(out, seed=2)
    assert isinstance(info.value, FileExistsError)
    assert Bank.open(out, require_anchor=False).manifest == first
    second = write_random_bank(out, seed=2, overwrite=True)
    assert second.blocks != first.blocks
    assert Bank.open(out, require_anchor=False).manifest == second
    assert siblings(out) == ["bank"]


def test_a_directory_that_is_not_a_bank_is_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(BankExistsError, match="not a bank"):
        write_random_bank(out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_random_bank(empty)  # an empty directory is no bank to protect
    assert (empty / "manifest.json").is_file()


def test_writer_checks_blocks_against_the_manifest(tmp_path: Path) -> None:
    with BankWriter(tmp_path / "bank", **writer_args()) as writer:
        shape_error = r"tiny/L1/0: .*'gate': shape \[2, 2, 32\], expected \[2, 4, 32\]"
        with pytest.raises(BlockFormatError, match=shape_error):
            writer.write_block(1, 0, make_block(MemoryType.FFN, width=2))
        with pytest.raises(BankFormatError, match="a kv block in a ffn bank"):
            writer.write_block(1, 0, make_block(MemoryType.KV, width=4))
        with pytest.raises(BankFormatError, match="node 2 out of range for level 1"):
            writer.write_block(1, 2, make_block(MemoryType.FFN, width=4))
        with pytest.raises(BankFormatError, match=r"level must be in 1\.\.2"):
            writer.write_generic(3, make_block(MemoryType.FFN, width=4))
        writer.write_block(1, 1, make_block(MemoryType.FFN, width=4))
        with pytest.raises(BankFormatError, match="'tiny/L1/1' was already written"):
            writer.write_block(1, 1, make_block(MemoryType.FFN, width=4))
        with pytest.raises(BankFormatError, match=r"'centroids.L2' is torch.float32 \[3, 8\]"):
            writer.write_router(
                {"centroids.L1": torch.zeros(2, 8), "centroids.L2": torch.zeros(3, 8)}
            )
        with pytest.raises(BankFormatError, match=r"missing tensor 'centroids\.L2'"):
            writer.write_router({"centroids.L1": torch.zeros(2, 8)})
        writer.write_router(router())


def test_writer_arguments_are_validated_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(BankFormatError, match="widths: 1 widths given for 2 levels"):
        BankWriter(tmp_path / "bank", **writer_args(widths=(4,)))
    with pytest.raises(BankFormatError, match="lora_targets"):
        BankWriter(tmp_path / "bank", **writer_args(MemoryType.LORA, lora_targets=None))
    assert siblings(tmp_path / "bank") == []


def test_copy_anchor_copies_the_hugging_face_files(tmp_path: Path) -> None:
    anchor = tmp_path / "anchor-src"
    anchor.mkdir()
    (anchor / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(2)}, anchor / "model.safetensors")
    (anchor / "tokenizer.json").write_text("{}")
    write_random_bank(tmp_path / "bank", anchor_dir=anchor)
    bank = Bank.open(tmp_path / "bank")
    names = sorted(p.name for p in bank.anchor_dir.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]

    (anchor / "model.safetensors").unlink()
    with pytest.raises(BankFileMissingError, match=r"anchor-src/model\.safetensors"):
        write_random_bank(tmp_path / "bank2", anchor_dir=anchor)
    assert not (tmp_path / "bank2").exists()


def test_open_names_the_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "bank"
    write_random_bank(out)
    with pytest.raises(BankFileMissingError, match=r"anchor/config\.json"):
        Bank.open(out)
    (out / "blocks" / "L2" / "7.safetensors").unlink()
    with pytest.raises(BankFileMissingError, match=r"blocks/L2/7\.safetensors"):
        Bank.open(out, require_anchor=False)
    bank = Bank.open(out, require_anchor=False, check_files=False)
    with pytest.raises(BankFileMissingError, match=r"blocks/L2/7\.safetensors"):
        bank.read_block("tiny/L2/7")
    (out / "generic" / "L1.safetensors").unlink()
    with pytest.raises(BankFileMissingError, match=r"generic/L1\.safetensors"):
        Bank.open(out, require_anchor=False, check_files=False)
    (out / "router.safetensors").unlink()
    with pytest.raises(BankFileMissingError, match=r"router\.safetensors"):
        Bank.open(out, require_anchor=False, check_files=False)


def test_a_tampered_block_is_refused_naming_its_file(tmp_path: Path) -> None:
    out = tmp_path / "bank"
    write_random_bank(out)
    bank = Bank.open(out, require_anchor=False)
    path = out / "blocks" / "L1" / "2.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(data)
    with pytest.raises(BlockIntegrityError, match=r"blocks/L1/2.safetensors.*sha256"):
        bank.read_block("tiny/L1/2")
    path.write_bytes(data[:-1])
    with pytest.raises(BlockIntegrityError, match=r"blocks/L1/2.safetensors.*bytes, the manifest"):
        bank.read_block("tiny/L1/2")
    with pytest.raises(BlockIntegrityError, match=r"blocks/L1/2\.safetensors"):
        bank.verify()
    bank.read_block("tiny/L1/3")  # the others are fine


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "bank")
    bank = Bank.open(tmp_path / "bank", require_anchor=False)
    for key in ("tiny/L1/9", "other/L1/0", "../etc/passwd"):
        with pytest.raises(BlockNotInBankError):
            bank.read_block(key)


@pytest.mark.parametrize("memory_type", list(MemoryType))
def test_random_banks_are_deterministic_per_seed(tmp_path: Path, memory_type: MemoryType) -> None:
    args: dict[str, Any] = {"memory_type": memory_type, "lora_targets": targets_for(memory_type)}
    a = write_random_bank(tmp_path / "a", seed=3, **args)
    b = write_random_bank(tmp_path / "b", seed=3, **args)
    c = write_random_bank(tmp_path / "c", seed=4, **args)
    assert a.to_json() == b.to_json()
    assert a.blocks.keys() == c.blocks.keys()
    assert a.blocks != c.blocks
    assert len(a.blocks) == 4 + 16
    ra = Bank.open(tmp_path / "a", require_anchor=False).router_tensors()
    rb = Bank.open(tmp_path / "b", require_anchor=False).router_tensors()
    assert all(torch.equal(ra[n], rb[n]) for n in ra)
    norms = ra["centroids.L2"].norm(dim=1)
    assert ra["centroids.L2"].shape == (16, 64)
    assert torch.allclose(norms, torch.ones(16))


@pytest.mark.parametrize(
    ("memory_type", "zeroed"),
    [(MemoryType.FFN, "down"), (MemoryType.LORA, ".b"), (MemoryType.KV, "v")],
)
def test_zero_down_zeroes_what_a_fresh_memory_starts_at(
    tmp_path: Path, memory_type: MemoryType, zeroed: str
) -> None:
    write_random_bank(
        tmp_path / "bank", memory_type=memory_type, lora_targets=targets_for(memory_type),
        zero_down=True, dtype="bfloat16",
    )  # fmt: skip
    bank = Bank.open(tmp_path / "bank", require_anchor=False)
    block = bank.read_block("tiny/L1/0")
    assert isinstance(block, FFNBlock | LoRABlock | KVBlock)
    for name, t in block.tensors().items():
        if name.endswith(zeroed):
            assert not t.any(), name
        else:
            assert 0.005 < t.float().std().item() < 0.05, name
