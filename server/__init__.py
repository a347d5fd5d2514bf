"""server: everything of hmem that knows tensors and HTTP (model, bank, engine, API, CLI)."""

__version__ = "0.1.0"
