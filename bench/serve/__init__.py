"""Serving: time to first token and decode rate, with memory and without.

Run as `python -m bench.serve` (`--help` for its flags); `main` says what it measures.
"""
