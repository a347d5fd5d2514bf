"""`python -m bench.soak`: runs the bench (`bench.soak.main`)."""

from bench.soak.main import main

if __name__ == "__main__":
    main()
