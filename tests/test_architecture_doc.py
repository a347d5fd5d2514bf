"""docs/architecture.md and docs/serving.md stay true to the tree: every module they name
exists, and every package of the server is in the architecture's tables and its layer contract."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/architecture.md", "docs/serving.md")
NAMED = re.compile(r"`((?:server|tiers)/[A-Za-z0-9_./]+)`")


def test_every_module_the_docs_name_exists() -> None:
    named = {(doc, m) for doc in DOCS for m in NAMED.findall((ROOT / doc).read_text())}
    assert len(named) > 30  # the pattern finds the docs' paths
    assert sorted((doc, m) for doc, m in named if not (ROOT / m.rstrip("/")).exists()) == []


def packages() -> list[str]:
    return sorted(
        p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "server").glob("*/__init__.py")
    )


def test_every_server_package_is_described_and_layered() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "server/serving" in packages()
    assert [p for p in packages() if f"`{p}/`" not in text] == []
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    dotted = {p.replace("/", ".") for p in packages()}
    assert sorted(dotted - layered) == []
    # ... and so is every top-level module of the server but its package marker.
    modules = {f"server.{p.stem}" for p in (ROOT / "server").glob("*.py") if p.stem != "__init__"}
    assert sorted(modules - layered) == []
