"""The benches: one package per bench, each run from the repository root as
`python -m bench.<name> [--quick] ...` (`cluster`, `fidelity`, `hang`, `latency`, `routing`,
`scale`, `serve`, `soak`, `tiers`), writing its tables and plots under `bench/out/`. What they
share is in `bench.common`. Not part of the installed `hmem` package."""
