"""What a hung cloud endpoint costs a burst of block fetches.

Run as `python -m bench.hang` (`--help` for its flags); `main` says what it measures.
"""
