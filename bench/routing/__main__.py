"""`python -m bench.routing`: runs the bench (`bench.routing.main`)."""

from bench.routing.main import main

if __name__ == "__main__":
    main()
