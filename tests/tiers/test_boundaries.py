"""`tiers` stands alone: importing it (all of it) loads no torch and no server code."""

from __future__ import annotations

import subprocess
import sys


def test_tiers_imports_neither_torch_nor_server() -> None:
    code = (
        "import sys, pkgutil, importlib, tiers\n"
        "for m in pkgutil.walk_packages(tiers.__path__, 'tiers.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'server')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
