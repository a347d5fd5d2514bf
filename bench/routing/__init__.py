"""Routing agreement: how often a fact's query reaches a leaf holding its documents.

Run as `python -m bench.routing` (`--help` for its flags); `main` says what it measures.
"""
