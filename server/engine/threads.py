"""Worker threads for torch work off the event loop that do not slow the model thread.

With torch's OpenMP backend every thread that runs a parallel op gets its own team of
`torch.get_num_threads()` threads. A second team (one per executor thread that ever embedded a
prompt) competes with the model thread's: on a 2-core machine one batched forward pass became
5x slower after a worker thread had run a single parallel op (0.37 ms against 1.84 ms for the
demo anchor's 29-token prefill; `docs/results.md`). `torch.set_num_threads` is per thread under
OpenMP, so these workers, and the event loop's thread (which routes hashed TF-IDF prompts
inline), run torch single-threaded and leave the cores to the model thread.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity): the model thread's default threads."""
    return len(os.sched_getaffinity(0))


def single_threaded_torch() -> None:
    """Run this thread's torch ops on one thread (a per-thread setting under OpenMP)."""
    torch.set_num_threads(1)


def cpu_executor(workers: int = 2) -> ThreadPoolExecutor:
    """A pool for embedding, routing and loading: torch runs single-threaded in its threads."""
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="hmem-cpu", initializer=single_threaded_torch
    )
