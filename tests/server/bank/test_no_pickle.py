"""Only JSON and safetensors are ever read: no pickle, no `torch.load`, in source or at run time."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import server.bank
from server.bank import Bank, BankBlockCodec, write_random_bank

FORBIDDEN = re.compile(
    r"^\s*(?:import|from)\s+(?:c?pickle|dill|joblib|cloudpickle)\b"
    r"|\bc?pickle\.[A-Za-z_]|torch\.load\(|\bnp\.load\(|numpy\.load\("
)


def test_no_pickle_in_the_bank_source() -> None:
    root = Path(server.bank.__file__).parent
    offenders = [
        f"{path.name}:{n}"
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if FORBIDDEN.search(line)
    ]
    assert offenders == []


def test_writing_and_reading_a_bank_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("pickle or torch.load was called")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    write_random_bank(tmp_path / "bank")
    bank = Bank.open(tmp_path / "bank", require_anchor=False)
    bank.verify()
    codec = BankBlockCodec(bank.manifest)
    codec.decode(memoryview(bytes(bank.block_bytes("tiny/L1/0"))))
