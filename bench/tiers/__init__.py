"""Read overhead of `TieredStore` over each tier's raw client read.

Run as `python -m bench.tiers` (`--help` for its flags); `main` says what it measures.
"""
