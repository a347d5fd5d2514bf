"""`python -m bench.cluster`: runs the bench (`bench.cluster.main`)."""

from bench.cluster.main import main

if __name__ == "__main__":
    raise SystemExit(main())
