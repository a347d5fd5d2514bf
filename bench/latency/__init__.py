"""Fetch latency of a prompt's memory: a hierarchical bank against a flat one.

Run as `python -m bench.latency` (`--help` for its flags); `main` says what it measures.
"""
