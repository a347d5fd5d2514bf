"""`Bank.fingerprint`: a bank build's identity, from its block index and its router file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from server.bank import ROUTER_NAME, Bank, write_random_bank


def fingerprint(path: Path) -> str:
    return Bank.open(path, require_anchor=False).fingerprint()


def test_the_same_build_has_the_same_short_fingerprint(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "a", seed=3)
    write_random_bank(tmp_path / "b", seed=3)  # byte-identical files, elsewhere
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(tmp_path / "a"))
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")


def test_a_rebuild_with_other_weights_is_another_bank(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "bank", seed=0)
    before = fingerprint(tmp_path / "bank")
    write_random_bank(tmp_path / "bank", seed=1, overwrite=True)  # same bank id, new build
    assert fingerprint(tmp_path / "bank") != before


def test_new_clusters_alone_make_another_bank(tmp_path: Path) -> None:
    """Same blocks, another router (centroids): cluster (1, 2) is no longer the same cluster."""
    write_random_bank(tmp_path / "bank", seed=0)
    shutil.copytree(tmp_path / "bank", tmp_path / "moved")
    router = tmp_path / "moved" / ROUTER_NAME
    data = bytearray(router.read_bytes())
    data[-1] ^= 0x01  # one value of the router's tensors
    router.write_bytes(data)
    assert fingerprint(tmp_path / "moved") != fingerprint(tmp_path / "bank")


def test_another_bank_id_is_another_bank(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "a", bank_id="alpha")
    write_random_bank(tmp_path / "b", bank_id="beta")
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")
