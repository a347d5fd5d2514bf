"""How many threads a build gives torch: few enough that a busy machine does not stall training.

Under OpenMP, torch's parallel ops run on a team of `torch.get_num_threads()` threads that wait
for one another at the end of every op. When other processes hold some of the cores, a team as
wide as the machine waits each op for its slowest thread to be scheduled: on a busy 2-core
machine the default build ran about 19x slower than with one thread (1.2-10 s per step instead
of about 0.1 s). The anchors hmem trains from scratch are small enough that a second thread buys
little even on an idle machine (`docs/results.md`, build threads), so `auto` uses one thread for
them, and for a larger checkpoint (`--anchor DIR`) the cores that the load average leaves free.
"""

from __future__ import annotations

import os

import torch

# Below this many anchor parameters a build trains on one thread (measured: `docs/results.md`).
SMALL_ANCHOR_PARAMS = 5_000_000


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores() -> int:
    """Usable cores minus the 1-minute load average (other work), at least 1."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, usable_cores() - int(load + 0.5))


def build_threads(requested: int | None, anchor_params: int) -> int:
    """The thread count for a build: `requested`, or the `auto` choice for this anchor."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    if anchor_params < SMALL_ANCHOR_PARAMS:
        return 1
    return idle_cores()


def use_threads(n: int) -> None:
    """Run this process's torch ops (intra-op) on `n` threads."""
    torch.set_num_threads(n)


__all__ = ["SMALL_ANCHOR_PARAMS", "build_threads", "idle_cores", "usable_cores", "use_threads"]
