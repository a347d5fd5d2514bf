"""The demo bank shipped in the package: complete, every block matching its manifest digest, and
routed with the squared-IDF embedder whose figures docs/results.md reports."""

from __future__ import annotations

from server.bank import Bank
from server.defaults import DEMO_BANK
from server.training.demo import DEMO_BUILD


def test_the_packaged_demo_bank_is_whole_and_verified() -> None:
    bank = Bank.open(DEMO_BANK)  # every file the manifest names exists
    bank.verify()  # every block and generic block matches its size and sha256
    m = bank.manifest
    assert m.bank_id == "demo"
    assert m.levels == DEMO_BUILD["levels"]
    assert m.branching == DEMO_BUILD["branching"]
    assert tuple(m.widths) == DEMO_BUILD["widths"]
    assert m.embedder["kind"] == "hashed-tfidf"
    assert m.embedder["idf_power"] == 2.0
    assert len(m.blocks) == 8 + 64
