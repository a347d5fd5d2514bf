"""Tiny anchors and random memory blocks for the model tests."""

from __future__ import annotations

import torch

from server.model.anchor import Anchor
from server.model.config import PRESETS, AnchorConfig
from server.model.memory import FFNBlock, KVBlock, LoRABlock, MemoryBlock, MemoryType

CFG = PRESETS["test"]
LORA_DIMS = {
    "q": (CFG.d_model, CFG.n_heads * CFG.head_dim),
    "k": (CFG.d_model, CFG.n_kv_heads * CFG.head_dim),
    "v": (CFG.d_model, CFG.n_kv_heads * CFG.head_dim),
    "o": (CFG.n_heads * CFG.head_dim, CFG.d_model),
    "gate": (CFG.d_model, CFG.intermediate_size),
    "up": (CFG.d_model, CFG.intermediate_size),
    "down": (CFG.intermediate_size, CFG.d_model),
}


def anchor(config: AnchorConfig = CFG, seed: int = 0) -> Anchor:
    torch.manual_seed(seed)
    model = Anchor(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.8, 1.2)
    return model


def random_block(
    kind: MemoryType,
    width: int,
    *,
    seed: int,
    config: AnchorConfig = CFG,
    zero_out: bool = False,
    targets: tuple[str, ...] = ("q", "v", "gate", "down"),
) -> MemoryBlock:
    g = torch.Generator().manual_seed(seed)
    L, d = config.n_layers, config.d_model

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    if kind is MemoryType.FFN:
        down = torch.zeros(L, d, width) if zero_out else rnd(L, d, width)
        return FFNBlock(gate=rnd(L, width, d), up=rnd(L, width, d), down=down)
    if kind is MemoryType.LORA:
        a = {t: rnd(L, width, LORA_DIMS[t][0]) for t in targets}
        b = {
            t: torch.zeros(L, LORA_DIMS[t][1], width)
            if zero_out
            else rnd(L, LORA_DIMS[t][1], width)
            for t in targets
        }
        return LoRABlock(a=a, b=b)
    shape = (L, config.n_kv_heads, width, config.head_dim)
    return KVBlock(k=rnd(*shape), v=torch.zeros(shape) if zero_out else rnd(*shape))
