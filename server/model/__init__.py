"""The memory-augmented language model, in pure PyTorch with no I/O."""
