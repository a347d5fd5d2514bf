"""The serving layer: between the HTTP routes and the runtime.

A route hands its parsed request to one service call and formats what comes back; it never sees
the `Runtime`. `CompletionService` (`completions.py`) serves completions, chat and the tokenizer
endpoints over narrow inputs: the tokenizer, the memory resolver, the engine, the limits slice
of the settings (`limits.py`) and the model's name. `MemoryService` (`memory.py`) owns routing
a text, prefetch, block-and-evict, residency, cache statistics and the tiers' health. `Services`
(`services.py`) builds both from an open `Runtime`. Layer order: docs/architecture.md.
"""
