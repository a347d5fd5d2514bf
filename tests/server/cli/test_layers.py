"""The command line sits on top: no module below `server/cli/` imports it, at the top of a file
or inside a function, so a library (bank, training, cluster, tiers) never drags in the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_below_the_cli_imports_it() -> None:
    cli = ROOT / "server" / "cli"
    files = [p for pkg in ("server", "tiers") for p in (ROOT / pkg).rglob("*.py")]
    below = [p for p in files if cli not in p.parents]
    assert len(below) > 50  # the packages were found
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in imported_modules(p) if n == "server.cli" or n.startswith("server.cli.")
        )
        for p in below
    }
    assert {path: names for path, names in offenders.items() if names} == {}
