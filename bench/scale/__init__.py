"""Paper scale on one machine: a bank far larger than the RAM cache, on real tiers.

Run as `python -m bench.scale` (`--help` for its flags); `main` says what it measures.
`python -m bench.scale.profile` says where the time of a step with memory goes.
"""
