"""Soak: the real server under load and faults, and how it came back.

Run as `python -m bench.soak` (`--help` for its flags); `main` says what it measures.
"""
