"""`python -m bench.serve`: runs the bench (`bench.serve.main`)."""

from bench.serve.main import main

if __name__ == "__main__":
    main()
