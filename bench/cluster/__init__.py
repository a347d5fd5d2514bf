"""Residency routing against Ray Serve's default routing, N engine replicas side by side.

Run as `python -m bench.cluster` (`--help` for its flags); `main` says what it measures.
"""
