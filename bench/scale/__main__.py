"""`python -m bench.scale`: runs the bench (`bench.scale.main`)."""

from bench.scale.main import main

if __name__ == "__main__":
    raise SystemExit(main())
