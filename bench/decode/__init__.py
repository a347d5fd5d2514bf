"""Decode at the hardware's limit: hmem in bf16 and int8 against the memory bandwidth, transformers
and llama.cpp (docs/results.md, "Decode at the hardware's limit")."""
