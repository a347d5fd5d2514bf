"""How the anchor's weights are held for serving: int8, or bf16 packed for oneDNN.

Weight-only int8: symmetric, one float scale per output channel, int8 values read as they are.

A weight `w [out, in]` is stored as `q = round(w / s)` clipped to [-127, 127], with `s = max|w| /
127` over each row: one scale per output channel (as gpt-fast's `quantize.py` and torchao's
int8 weight-only mode store it). Activations stay in the model's float dtype; a matmul reads the
int8 values and applies the scale to its output, so weights cost half the bytes of bf16 to hold
and to read, with no widened copy made.

On the CPU the matmul is `torch.ops.aten._weight_int8pack_mm`, the kernel gpt-fast uses. It
needs the reduced dimension to be a multiple of 16 (other widths crash or return garbage in torch
2.13, docs/results.md "Decode at the hardware's limit"): callers pad to `INT8_K_ALIGN`, and a
weight that cannot be padded (an anchor projection of odd width) is widened per call instead.
On float32 activations it is 10-15x slower than on bf16 ones, so a float32 model's activations
are rounded to bf16 for it (the answers move as little as bf16's do: docs/results.md).

bf16 weights on the CPU are packed once into oneDNN's blocked layout (`PackedWeight`, the
layout `torch.compile`'s freezing pass gives linear layers): a one-token matmul then reads
1.3-1.6x faster than `F.linear` on the plain row-major weight at the 160M shape's sizes. float32
is left as it is (packed, it measured slower) and so is float16 (oneDNN needs AVX512-FP16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

INT8_MAX = 127
INT8_K_ALIGN = 16  # `_weight_int8pack_mm`'s reduced dimension must be a multiple of this


def quantize_int8(w: Tensor, *, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of `w` with one scale per slice along every dimension but `dim`.

    `dim` is the reduced (input) dimension: for `w [out, in]`, `dim=-1` gives a scale per output
    row. Returns `(q, scale)`: `q` int8 of `w`'s shape, `scale` float32 of `w`'s shape without
    `dim`. A slice of zeros gets scale 1 (its values stay 0).
    """
    w32 = w.detach().float()
    absmax = w32.abs().amax(dim=dim)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    q = torch.round(w32 / scale.unsqueeze(dim)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, *, dim: int = -1, dtype: torch.dtype) -> Tensor:
    """The float weight `q * scale` (scale broadcast along `dim`), in `dtype`."""
    return (q.float() * scale.float().unsqueeze(dim)).to(dtype)


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """`x @ (q * scale[:, None]).T` for `x [..., in]`, `q [out, in]` int8, `scale [out]` in x's
    dtype: the int8 values are read as they are (no float copy of the weight)."""
    k = q.shape[-1]
    if (
        k % INT8_K_ALIGN
        or x.device.type != "cpu"  # the CUDA kernel is untested here (no GPU): widen
        or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)
    ):
        return F.linear(x, q.to(x.dtype)) * scale
    flat = x.reshape(-1, k)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if x.dtype is torch.float32 and x.device.type == "cpu":
        # The kernel is 10-15x slower on float32 activations than on bf16 ones (torch 2.13):
        # round the activations to bf16 for it, as a bf16 model would have them.
        low: Tensor = torch.ops.aten._weight_int8pack_mm(flat.bfloat16(), q, scale.bfloat16())
        return low.float().view(*x.shape[:-1], q.shape[0])
    out: Tensor = torch.ops.aten._weight_int8pack_mm(flat, q, scale)
    return out.view(*x.shape[:-1], q.shape[0])


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """A linear layer's weight in int8: `q [out, in]` and `scale [out]` in the model's dtype."""

    q: Tensor
    scale: Tensor

    @classmethod
    def of(cls, w: Tensor) -> Int8Weight:
        q, scale = quantize_int8(w)
        return cls(q.contiguous(), scale.to(w.dtype))

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def __call__(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.q, self.scale)

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` as floats in the scale's dtype (an embedding lookup of a tied table)."""
        return self.q[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A bf16 weight `[out, in]` in oneDNN's blocked layout (an opaque tensor only
    `torch.ops.mkldnn._linear_pointwise` reads)."""

    packed: Tensor
    out_features: int

    @staticmethod
    def available(w: Tensor) -> bool:
        return (
            w.device.type == "cpu"
            and w.dtype is torch.bfloat16
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        )

    @classmethod
    def of(cls, w: Tensor) -> PackedWeight:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 1)
        return cls(packed, int(w.shape[0]))

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return out


ServingWeight = Tensor | Int8Weight | PackedWeight


def linear(x: Tensor, w: ServingWeight) -> Tensor:
    """`F.linear` for a plain float weight, an `Int8Weight` or a `PackedWeight`."""
    if isinstance(w, Tensor):
        return F.linear(x, w)
    return w(x)
