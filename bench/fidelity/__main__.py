"""`python -m bench.fidelity`: runs the bench (`bench.fidelity.main`)."""

from bench.fidelity.main import main

if __name__ == "__main__":
    main()
