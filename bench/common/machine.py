"""What every bench prints and stores beside its figures: the machine it ran on and the command
that ran it."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model, cores, Python and platform: printed and stored beside every figure."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores, python = os.cpu_count(), platform.python_version()
    return {"cpu": model, "cores": cores, "python": python, "platform": platform.platform()}


def command_line() -> str:
    """The command line that ran this bench, as it can be typed again: `python -m bench.<name>
    ARGS` (`sys.argv[0]` is the path of the package's `__main__.py` under `-m`)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:  # run by path, not with -m
        return shlex.join(["python", *sys.argv])
    module = spec.name.removesuffix(".__main__")
    return shlex.join(["python", "-m", module, *sys.argv[1:]])
