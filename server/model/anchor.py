"""The anchor: a Llama-architecture decoder in plain PyTorch, with memories passed to `forward`.

Module and parameter names follow Hugging Face's `LlamaForCausalLM`, so a checkpoint's state
dict loads as it is. The model does no I/O: a batch's memory blocks arrive as a `MemoryBatch`
argument (one per forward, each sequence with its own blocks) and are applied inside the layers:
FFN-memories widen each SwiGLU, LoRA-memories patch projections, KV-memories add attended
slots. A `KVCache` holds keys and values at each token's position, so prefill, decode and
sequences of different lengths in one batch all use the same path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.config import AnchorConfig
from server.model.errors import ModelError
from server.model.memory_batch import FFNMemoryBatch, KVMemoryBatch, LoRAMemoryBatch, MemoryBatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the model dtype, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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
    return x * cos[:, None] + rotated * sin[:, None]


@dataclass(frozen=True, slots=True)
class LayerMemory:
    """One layer's slice of a `MemoryBatch`."""

    ffn: tuple[Tensor, Tensor] | None = None  # gate and up [B,2R,d], down [B,d,R]
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
        return [LayerMemory(ffn=(memory.gate_up[i], memory.down[i])) for i in range(n_layers)]
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

    def write(
        self, layer: int, positions: Tensor, k: Tensor, v: Tensor, span: int
    ) -> tuple[Tensor, Tensor]:
        """Store k, v [B, n_kv, T, hd] at `positions` [B, T]; return keys/values [:span]."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(positions)
        # [B, S, n_kv, hd] views, indexed by (batch row, position)
        self.k[layer].transpose(1, 2)[rows, positions] = k.transpose(1, 2)
        self.v[layer].transpose(1, 2)[rows, positions] = v.transpose(1, 2)
        return self.k[layer, :, :, :span], self.v[layer, :, :, :span]


class Attention(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self._qkv: Tensor | None = None  # set by `fuse`: q, k and v weights in one tensor

    def fuse(self) -> None:
        """Serve q, k and v from one matmul: their weights become views of one tensor."""
        self._qkv = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: Tensor,
        *,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        mem: LayerMemory,
        cache: tuple[KVCache, int, Tensor, int] | None,
    ) -> Tensor:
        B, T, _ = x.shape
        if self._qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            qkv, nq, nk = F.linear(x, self._qkv), self.q_proj.out_features, self.k_proj.out_features
            q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
        q = _plus(q, mem.lora_delta("q", x))
        k = _plus(k, mem.lora_delta("k", x))
        v = _plus(v, mem.lora_delta("v", x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            store, layer, positions, span = cache
            k, v = store.write(layer, positions, k, v, span)  # [B, Hkv, S, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        if mem.kv is not None:
            mk, mv, valid = mem.kv
            # Memory slots: no causal mask, no positions; padded slots masked out.
            extra = F.scaled_dot_product_attention(
                q, mk, mv, attn_mask=valid[:, None, None, :], enable_gqa=True
            )
            has_any = valid.any(dim=1)[:, None, None, None]
            out = out + torch.where(has_any, extra, torch.zeros_like(extra))
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*hd]
        return _plus(self.o_proj(out), mem.lora_delta("o", out))


class MLP(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.d_model, bias=False)
        self._gate_up: Tensor | None = None  # set by `fuse`

    def fuse(self) -> None:
        """Serve gate and up from one matmul: their weights become views of one tensor."""
        self._gate_up = _fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: Tensor, mem: LayerMemory) -> Tensor:
        if self._gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gu, n = F.linear(x, self._gate_up), self.gate_proj.out_features
            gate, up = gu[..., :n], gu[..., n:]
        gate = _plus(gate, mem.lora_delta("gate", x))
        up = _plus(up, mem.lora_delta("up", x))
        h = F.silu(gate) * up
        y = _plus(self.down_proj(h), mem.lora_delta("down", h))
        if mem.ffn is not None:
            gate_up, md = mem.ffn
            # The memory's R neurons: x [B,T,d] -> [B,T,2R] (gate and up in one matmul: at one
            # token a step is mostly per-call cost) -> [B,T,R] -> [B,T,d], batched per sequence.
            gu, r = torch.bmm(x, gate_up.transpose(1, 2)), md.shape[-1]
            y = y + torch.bmm(F.silu(gu[..., :r]) * gu[..., r:], md.transpose(1, 2))
        return y


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
        mask: Tensor,
        mem: LayerMemory,
        cache: tuple[KVCache, int, Tensor, int] | None,
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

    def fuse_projections(self) -> Anchor:
        """For serving: q/k/v and gate/up each computed by one matmul (fewer, larger matrix
        products: at one token a step is mostly the per-call cost of reading small weights).
        Same outputs; the weights become views of the fused tensors and stop requiring grad."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

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
        x = self.model.embed_tokens(tokens)  # [B, T, d]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
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
                cache=None if cache is None else (cache, i, positions, span),
            )
        logits: Tensor = self.lm_head(self.model.norm(x))  # [B, T, vocab]
        return logits
