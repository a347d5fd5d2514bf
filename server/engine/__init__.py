"""The engine: where tiers meet the model (memory resolution, batching, sampling)."""
