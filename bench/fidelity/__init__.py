"""The paper's findings on long-tail facts, reproduced at small scale by real builds.

Run as `python -m bench.fidelity` (`--help` for its flags); `main` says what it measures.
"""
