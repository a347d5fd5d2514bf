"""`fix_mmap_threshold`: block-sized buffers freed by the RAM cache go back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import sys
    from server.malloc import fix_mmap_threshold

    def anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))

    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold()
    big = bytearray(2 << 20)  # a 2 MB block, freed: glibc's default raises its threshold here
    del big
    base = anon()
    kept, blocks = [], [bytearray(430_080) for _ in range(500)]  # level-4 blocks, 215 MB
    for i, b in enumerate(blocks):
        b[::4096] = b"x" * len(b[::4096])  # touch every page
        if i % 10 == 0:
            kept.append(b)
    del blocks, b  # the cache evicts nine in ten
    print(anon() - base)
    """
)


def _grown(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_freed_block_buffers_leave_the_process_with_the_threshold_fixed() -> None:
    kept = 50 * 430_080
    grown = _grown("fixed")
    assert grown < kept + 20 * 2**20, f"grew {grown / 2**20:.0f} MiB, keeps {kept / 2**20:.0f}"


def test_glibc_default_keeps_freed_block_buffers_the_fix_is_for() -> None:
    # The control: without the fix the same frees leave most of the 215 MB in the process.
    assert _grown("default") > 100 * 2**20
