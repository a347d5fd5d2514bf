"""The anchor: a Llama-architecture decoder in plain PyTorch, with memories passed to `forward`.

Module and parameter names follow Hugging Face's `LlamaForCausalLM`, so a checkpoint's state
dict loads as it is. The model does no I/O: a batch's memory blocks arrive as a `MemoryBatch`
argument (one per forward, each sequence with its own blocks) and are applied inside the layers:
FFN-memories widen each SwiGLU, LoRA-memories patch projections, KV-memories add attended
slots. A `KVCache` holds keys and values at each token's position, so prefill, decode and
sequences of different lengths in one batch all use the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.config import AnchorConfig
from server.model.errors import ModelError
from server.model.memory_batch import FFNMemoryBatch, KVMemoryBatch, LoRAMemoryBatch, MemoryBatch
from server.model.quant import Int8Weight, PackedWeight, ServingWeight, int8_matmul, linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the model dtype, as the reference implementation does
        # (`F.rms_norm`: one call where the formula took five; on the CPU it is still several
        # kernels, docs/results.md "Decode at the hardware's limit").
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin of each position's rotation angles: [B, T, head_dim] each."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by the angles (halves layout, as in Hugging Face Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.addcmul(x * cos[:, None], rotated, sin[:, None])


# One layer's FFN memory: gate and up [B,2R,d], down [B,d,R]; for int8 ones also the scales of
# gate and up [B,2R] and of down [B,R], and the unit output scale [d] (else None, None, None).
FFNLayerMemory = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]


@dataclass(frozen=True, slots=True)
class LayerMemory:
    """One layer's slice of a `MemoryBatch`."""

    ffn: FFNLayerMemory | None = None
    lora: dict[str, tuple[Tensor, Tensor]] | None = None  # target -> a [B,R,in], b [B,out,R]
    kv: tuple[Tensor, Tensor, Tensor] | None = None  # k, v [B,n_kv,R,hd], valid [B,R]

    def lora_delta(self, target: str, x: Tensor) -> Tensor | None:
        if self.lora is None or target not in self.lora:
            return None
        a, b = self.lora[target]
        # x [B, T, in] -> [B, T, R] -> [B, T, out]
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


NO_MEMORY = LayerMemory()


def _plus(y: Tensor, delta: Tensor | None) -> Tensor:
    return y if delta is None else y + delta


def layer_memories(memory: MemoryBatch | None, n_layers: int) -> list[LayerMemory]:
    if memory is None:
        return [NO_MEMORY] * n_layers
    if isinstance(memory, FFNMemoryBatch):
        gs, ds, ones = memory.gate_up_scale, memory.down_scale, memory.ones
        return [
            LayerMemory(
                ffn=(
                    memory.gate_up[i],
                    memory.down[i],
                    None if gs is None else gs[i],
                    None if ds is None else ds[i],
                    ones,
                )
            )
            for i in range(n_layers)
        ]
    if isinstance(memory, LoRAMemoryBatch):
        return [
            LayerMemory(lora={t: (memory.a[t][i], memory.b[t][i]) for t in memory.a})
            for i in range(n_layers)
        ]
    assert isinstance(memory, KVMemoryBatch)
    return [LayerMemory(kv=(memory.k[i], memory.v[i], memory.valid)) for i in range(n_layers)]


def _fuse_linears(*linears: nn.Linear) -> Tensor:
    """One weight tensor of the linears' rows, each linear's weight now a view of its rows (so
    the state dict and the memory are as before: no second copy)."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(fused[start : start + n], requires_grad=False)
        start += n
    return fused


def _release(*linears: nn.Linear) -> None:
    """Drop the float weights of linears now served from converted copies (int8 or packed)."""
    for lin in linears:
        lin.weight = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)


class KVCache:
    """Keys and values of every layer, stored at each token's position: [L, B, n_kv, S, hd]."""

    def __init__(
        self,
        config: AnchorConfig,
        *,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of batch rows start..stop-1: writes through it land in this cache."""
        view = object.__new__(KVCache)
        view.k = self.k[:, start:stop]
        view.v = self.v[:, start:stop]
        view.max_len = self.max_len
        return view

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions over row `dst` (compacting a batch)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def write(self, layer: int, at: CacheSlots, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, n_kv, T, hd] at `at`'s positions; return keys/values [:span]."""
        if k.shape[0] == 1:  # one row: a copy along the positions (cheaper than indexing)
            self.k[layer].index_copy_(2, at.positions[0], k)
            self.v[layer].index_copy_(2, at.positions[0], v)
        else:  # [B, S, n_kv, hd] views, indexed by (batch row, position)
            self.k[layer].transpose(1, 2)[at.rows, at.positions] = k.transpose(1, 2)
            self.v[layer].transpose(1, 2)[at.rows, at.positions] = v.transpose(1, 2)
        return self.k[layer, :, :, : at.span], self.v[layer, :, :, : at.span]


@dataclass(frozen=True, slots=True)
class CacheSlots:
    """Where one forward pass writes in a `KVCache`: the same for every layer, so made once."""

    cache: KVCache
    positions: Tensor  # [B, T]
    rows: Tensor  # [B, T]: each token's batch row
    span: int  # positions 0..span-1 are attended to

    @classmethod
    def of(cls, cache: KVCache, positions: Tensor, span: int) -> CacheSlots:
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        return cls(cache, positions, rows.expand_as(positions), span)


class Attention(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self._qkv: ServingWeight | None = None  # set by `fuse`: q, k and v in one weight
        self._o: ServingWeight | None = None  # set by `serve_from`
        self._splits = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim)  # q and k widths

    def fuse(self) -> None:
        """Serve q, k and v from one matmul: their weights become views of one tensor."""
        self._qkv = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def serve_from(self, convert: Callable[[Tensor], ServingWeight]) -> None:
        """Serve from `convert`ed weights (after `fuse`); the float weights are released."""
        assert isinstance(self._qkv, Tensor), "fuse before converting"
        self._qkv, self._o = convert(self._qkv), convert(self.o_proj.weight)
        _release(self.q_proj, self.k_proj, self.v_proj, self.o_proj)

    def forward(
        self,
        x: Tensor,
        *,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        mem: LayerMemory,
        cache: tuple[CacheSlots, int] | None,
    ) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self._qkv is not None and mem.lora is None:
            # One matmul, one rotation of queries and keys together, views for the rest.
            qkv = linear(x, self._qkv).view(B, T, H + 2 * Hkv, hd).transpose(1, 2)
            qk = apply_rope(qkv[:, : H + Hkv], cos, sin)  # [B, H + Hkv, T, hd]
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
        else:
            if self._qkv is None:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            else:
                nq, nk = self._splits
                qkv = linear(x, self._qkv)
                q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
            q = _plus(q, mem.lora_delta("q", x))
            k = _plus(k, mem.lora_delta("k", x))
            v = _plus(v, mem.lora_delta("v", x))
            q = q.view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
            k = k.view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, hd]
            v = v.view(B, T, Hkv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            slots, layer = cache
            k, v = slots.cache.write(layer, slots, k, v)  # [B, Hkv, S, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
        if mem.kv is not None:
            mk, mv, valid = mem.kv
            # Memory slots: no causal mask, no positions; padded slots masked out.
            extra = F.scaled_dot_product_attention(
                q, mk, mv, attn_mask=valid[:, None, None, :], enable_gqa=True
            )
            has_any = valid.any(dim=1)[:, None, None, None]
            out = out + torch.where(has_any, extra, torch.zeros_like(extra))
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*hd]
        o = self.o_proj(out) if self._o is None else linear(out, self._o)
        return _plus(o, mem.lora_delta("o", out))


class MLP(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.d_model, bias=False)
        self._gate_up: ServingWeight | None = None  # set by `fuse`
        self._down: ServingWeight | None = None  # set by `serve_from`
        self._inner = config.intermediate_size

    def fuse(self) -> None:
        """Serve gate and up from one matmul: their weights become views of one tensor."""
        self._gate_up = _fuse_linears(self.gate_proj, self.up_proj)

    def serve_from(self, convert: Callable[[Tensor], ServingWeight]) -> None:
        """Serve from `convert`ed weights (after `fuse`); the float weights are released."""
        assert isinstance(self._gate_up, Tensor), "fuse before converting"
        self._gate_up, self._down = convert(self._gate_up), convert(self.down_proj.weight)
        _release(self.gate_proj, self.up_proj, self.down_proj)

    def forward(self, x: Tensor, mem: LayerMemory) -> Tensor:
        if self._gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gu, n = linear(x, self._gate_up), self._inner
            gate, up = gu[..., :n], gu[..., n:]
        gate = _plus(gate, mem.lora_delta("gate", x))
        up = _plus(up, mem.lora_delta("up", x))
        h = F.silu(gate) * up
        y = self.down_proj(h) if self._down is None else linear(h, self._down)
        y = _plus(y, mem.lora_delta("down", h))
        if mem.ffn is not None:
            y = y + _ffn_memory(x, mem.ffn)
        return y


def _ffn_memory(x: Tensor, ffn: FFNLayerMemory) -> Tensor:
    """The memory's R neurons of each sequence: x [B,T,d] -> [B,T,2R] (gate and up in one
    matmul: at one token a step is mostly per-call cost) -> [B,T,R] -> [B,T,d]."""
    gate_up, down, gu_scale, down_scale, ones = ffn
    r = down.shape[-1]
    if gu_scale is None:
        if x.shape[0] == 1:  # one sequence: a plain matmul (bf16 bmm is 3-4x slower on CPUs)
            gu = F.linear(x, gate_up[0])
            return F.linear(F.silu(gu[..., :r]) * gu[..., r:], down[0])
        gu = torch.bmm(x, gate_up.transpose(1, 2))  # batched over sequences
        return torch.bmm(F.silu(gu[..., :r]) * gu[..., r:], down.transpose(1, 2))
    assert down_scale is not None
    assert ones is not None
    # int8: each sequence's own weights, read as int8 (one matmul per sequence and matrix).
    out = []
    for b in range(x.shape[0]):
        gu = int8_matmul(x[b], gate_up[b], gu_scale[b])  # [T, 2R]
        h = F.silu(gu[:, :r]) * gu[:, r:] * down_scale[b]  # down's scale is per neuron
        out.append(int8_matmul(h, down[b], ones))
    return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        *,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        mem: LayerMemory,
        cache: tuple[CacheSlots, int] | None,
    ) -> Tensor:
        attn: Tensor = self.self_attn(
            self.input_layernorm(x), cos=cos, sin=sin, mask=mask, mem=mem, cache=cache
        )
        x = x + attn
        ffn: Tensor = self.mlp(self.post_attention_layernorm(x), mem)
        return x + ffn


class LlamaModel(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)


class Anchor(nn.Module):
    """The anchor language model. `forward` returns logits [B, T, vocab]."""

    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._head: ServingWeight | None = None  # set by `quantize_int8` or `pack_weights`
        self._table: Int8Weight | None = None  # the int8 embedding table, when tied

    def fuse_projections(self) -> Anchor:
        """For serving: q/k/v and gate/up each computed by one matmul (fewer, larger matrix
        products: at one token a step is mostly the per-call cost of reading small weights).
        Same outputs; the weights become views of the fused tensors and stop requiring grad."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def quantize_int8(self) -> Anchor:
        """For serving from int8 weights (`server.model.quant`): every projection of every
        layer and the output table, one scale per output channel. The embedding table, when tied
        to the output, is that same int8 table (a lookup widens only the rows it reads); norms
        stay float. Fuses the projections first; the float weights are released, so the model
        holds about half the bytes and a decode step reads about half."""
        if self._head is not None:
            raise ModelError("the weights are already converted for serving")
        self._serve_layers_from(Int8Weight.of)
        self._head = Int8Weight.of(self.lm_head.weight)
        if self.config.tie_embeddings:
            self._table = self._head
            embed = self.model.embed_tokens
            embed.weight = nn.Parameter(embed.weight.new_empty(0, self.config.d_model), False)
        self.lm_head.weight = nn.Parameter(self.lm_head.weight.new_empty(0), requires_grad=False)
        return self

    def pack_weights(self) -> Anchor:
        """For serving bf16 on the CPU: every projection and the output layer packed into
        oneDNN's layout (`PackedWeight`: the same products, read faster at one token). A no-op
        where that does not apply (another dtype or device, no oneDNN). The projections' float
        weights are released; a tied embedding table stays, for lookups."""
        if self._head is not None:
            raise ModelError("the weights are already converted for serving")
        if not PackedWeight.available(self.lm_head.weight):
            return self
        self._serve_layers_from(PackedWeight.of)
        self._head = PackedWeight.of(self.lm_head.weight)
        if not self.config.tie_embeddings:
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.new_empty(0), False)
        return self

    def _serve_layers_from(self, convert: Callable[[Tensor], ServingWeight]) -> None:
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            if layer.self_attn._qkv is None:
                layer.self_attn.fuse()
                layer.mlp.fuse()
            layer.self_attn.serve_from(convert)
            layer.mlp.serve_from(convert)

    @property
    def quantized(self) -> bool:
        return isinstance(self._head, Int8Weight)

    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        memory: MemoryBatch | None = None,
    ) -> Tensor:
        """tokens [B, T]; positions [B, T] (default 0..T-1); memory: this batch's blocks.

        With a cache, each token's key and value are stored at its position and attend to the
        cache's entries at positions up to their own: pass the prompt (right-padded, padded
        outputs ignored) then one token per sequence at its next position.
        """
        B, T = tokens.shape
        c = self.config
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if positions.shape != tokens.shape:
            raise ModelError(f"positions {tuple(positions.shape)} must match tokens {(B, T)}")
        span = int(positions.max()) + 1
        limit = cache.max_len if cache is not None else c.max_seq_len
        if span > limit:
            raise ModelError(f"position {span - 1} is past the context length {limit}")
        x = self.model.embed_tokens(tokens) if self._table is None else self._table.rows(tokens)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        slots = None if cache is None else CacheSlots.of(cache, positions, span)
        mask: Tensor | None
        if cache is not None and T == 1 and B == 1:
            mask = None  # one token of one sequence attends to every cached position
        else:
            if cache is not None:
                key_pos = torch.arange(span, device=tokens.device)[None, None, :]  # [1, 1, S]
            else:
                key_pos = positions[:, None, :]  # [B, 1, T]
            mask = (key_pos <= positions[:, :, None])[:, None]  # [B, 1, T, S]
        for i, (layer, mem) in enumerate(
            zip(self.model.layers, layer_memories(memory, c.n_layers), strict=True)
        ):
            x = layer(
                x,
                cos=cos,
                sin=sin,
                mask=mask,
                mem=mem,
                cache=None if slots is None else (slots, i),
            )
        h = self.model.norm(x)
        logits: Tensor = self.lm_head(h) if self._head is None else linear(h, self._head)
        return logits  # [B, T, vocab]
