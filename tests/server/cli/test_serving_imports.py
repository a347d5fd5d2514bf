"""Serving never loads the training package: `hmem serve` imports what it serves with only."""

from __future__ import annotations

import json
import subprocess
import sys

# The serving entry points, then everything the CLI loads for `hmem serve`.
PROBE = """
import json, sys
from server.cli import main
try:
    main(["serve", "--help"])
except SystemExit:
    pass
import server.api.app, server.runtime, server.api.server, server.cli.serve
print(json.dumps(sorted(sys.modules)))
"""


def test_serving_imports_no_training_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    modules = json.loads(out.splitlines()[-1])
    assert "server.runtime" in modules
    assert [m for m in modules if m.startswith("server.training")] == []
    # torch itself imports `torch.distributions.constraint*`, which only spell "train".
    assert [m for m in modules if "train" in m and not m.startswith("torch.")] == []
