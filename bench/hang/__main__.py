"""`python -m bench.hang`: runs the bench (`bench.hang.main`)."""

from bench.hang.main import main

if __name__ == "__main__":
    main()
