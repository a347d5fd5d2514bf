"""`python -m bench.tiers`: runs the bench (`bench.tiers.main`)."""

from bench.tiers.main import main

if __name__ == "__main__":
    main()
