"""The build's torch thread count: one for the anchors trained here, the free cores otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.training.threads import SMALL_ANCHOR_PARAMS, build_threads, idle_cores, usable_cores


def test_small_anchors_train_on_one_thread_and_a_request_wins() -> None:
    assert build_threads(None, SMALL_ANCHOR_PARAMS - 1) == 1
    assert build_threads(3, 10) == 3
    larger = build_threads(None, SMALL_ANCHOR_PARAMS)  # the free cores, which vary with load
    assert larger >= 1
    assert larger <= usable_cores()
    with pytest.raises(ValueError, match="--threads"):
        build_threads(0, 10)


def test_idle_cores_leave_out_what_the_load_average_holds() -> None:
    load = os.getloadavg()[0]
    assert idle_cores() == max(1, usable_cores() - int(load + 0.5))
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_hmem_build_help_shows_the_thread_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "build", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    flat = " ".join(out.split())
    assert "--threads THREADS torch threads (default: 1 for the anchor sizes" in flat
    for default in ("(default: 5000)", "(default: 32)", "(default: tiny)", "(default: 0)"):
        assert default in flat
