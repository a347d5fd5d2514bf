"""Rotary position embeddings (RoPE) as Hugging Face's Llama family computes them: the
frequencies (with the linear and Llama 3 stretches of `RopeScaling`), each position's cos and
sin, and the rotation of queries and keys in the "halves" layout."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from server.model.config import RopeScaling


def rope_inv_freq(
    head_dim: int, base: float, scaling: RopeScaling | None, device: torch.device
) -> Tensor:
    """RoPE's frequencies [head_dim / 2], stretched as `scaling` says."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths divided by the factor, short ones kept, the band between blended.
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, scaled)


def rope_cos_sin(
    positions: Tensor,
    head_dim: int,
    base: float,
    dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin of each position's rotation angles: [B, T, head_dim] each."""
    inv_freq = rope_inv_freq(head_dim, base, scaling, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by the angles (halves layout, as in Hugging Face Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.addcmul(x * cos[:, None], rotated, sin[:, None])
