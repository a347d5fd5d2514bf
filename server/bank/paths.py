"""Where things live inside a bank directory (bank format version 1)."""

from __future__ import annotations

ANCHOR_DIR = "anchor"
ANCHOR_REQUIRED = ("config.json", "model.safetensors")
# Copied when present: the tokenizer, and its Hugging Face config and chat template.
ANCHOR_FILES = (*ANCHOR_REQUIRED, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
BLOCKS_DIR = "blocks"
GENERIC_DIR = "generic"
SUFFIX = ".safetensors"


def block_relpath(level: int, node: int) -> str:
    return f"{BLOCKS_DIR}/L{level}/{node}{SUFFIX}"


def generic_relpath(level: int) -> str:
    return f"{GENERIC_DIR}/L{level}{SUFFIX}"
