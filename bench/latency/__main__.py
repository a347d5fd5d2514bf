"""`python -m bench.latency`: runs the bench (`bench.latency.main`)."""

from bench.latency.main import main

if __name__ == "__main__":
    main()
