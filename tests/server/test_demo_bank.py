"""The demo bank shipped in the package: complete, every block matching its manifest digest, and
built as `hmem demo` builds it: with `hmem build`'s defaults, its embedder among them."""

from __future__ import annotations

from pathlib import Path

from server.bank import Bank
from server.defaults import DEMO_BANK
from server.routing import make_embedder
from server.training.demo import DEMO_BUILD
from server.training.pipeline import BuildSettings


def test_the_packaged_demo_bank_is_whole_and_verified() -> None:
    bank = Bank.open(DEMO_BANK)  # every file the manifest names exists
    bank.verify()  # every block and generic block matches its size and sha256
    m = bank.manifest
    built = BuildSettings(corpus=Path("corpus.jsonl"), out=Path("demo-bank"), **DEMO_BUILD)
    assert m.bank_id == "demo"
    assert m.levels == built.levels
    assert m.branching == built.branching
    assert tuple(m.widths) == built.widths
    # The default embedder's spec (its fitted weights live in the router file, not the spec).
    default = make_embedder(built.embedder, ["a fact"], dim=built.embed_dim, seed=built.seed)
    assert m.embedder == default.spec
    assert len(m.blocks) == 8 + 64
