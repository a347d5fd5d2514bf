"""The anchor: a Llama-architecture decoder in plain PyTorch, with memories passed to `forward`.

Module and parameter names follow Hugging Face's `LlamaForCausalLM`, so a checkpoint's state
dict loads as it is. The switches of `AnchorConfig` make it the other common families
(`server.model.families`, docs/models.md): biases, head norms, sliding windows, Gemma's norms.
The model does no I/O: a batch's memory blocks arrive as a `MemoryBatch` argument (one per
forward, each sequence with its own blocks) and are applied inside the layers: FFN-memories
widen each SwiGLU, LoRA-memories patch projections, KV-memories add attended slots. A `KVCache`
holds keys and values at each token's position, so prefill, decode and sequences of different
lengths in one batch all use the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.config import AnchorConfig
from server.model.errors import ModelError
from server.model.kv_cache import CacheSlots, KVCache
from server.model.memory_batch import FFNMemoryBatch, KVMemoryBatch, LoRAMemoryBatch, MemoryBatch
from server.model.quant import Int8Weight, PackedWeight, ServingWeight, int8_matmul, linear
from server.model.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    """Llama's RMSNorm; with `unit_offset`, Gemma's: scaled by (1 + w) in float32, w from 0."""

    def __init__(self, dim: int, eps: float, *, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the model dtype, as the reference implementation does
        # (`F.rms_norm`: one call where the formula took five; on the CPU it is still several
        # kernels, docs/results.md "Decode at the hardware's limit").
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:  # Gemma scales before rounding to the model's dtype
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


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


def _fuse_linears(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """One weight tensor of the linears' rows (and one bias, when they have biases), each
    linear's weight now a view of its rows (so the state dict and the memory are as before: no
    second copy)."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(fused[start : start + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return fused, bias


def _biased(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu


def _release(*linears: nn.Linear) -> None:
    """Drop the float weights of linears now served from converted copies (int8 or packed)."""
    for lin in linears:
        lin.weight = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=c.o_bias)
        if c.qk_norm:  # Qwen3, Gemma 3: each head's queries and keys normalised before RoPE
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, unit_offset=c.gemma_norms)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, unit_offset=c.gemma_norms)
        self._qk_norm = c.qk_norm
        self._scale = c.attn_scale  # None: SDPA's head_dim ** -0.5
        self._softcap = c.attn_softcap
        self._qkv: ServingWeight | None = None  # set by `fuse`: q, k and v in one weight
        self._qkv_bias: Tensor | None = None
        self._o: ServingWeight | None = None  # set by `serve_from`
        self._splits = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim)  # q and k widths

    def fuse(self) -> None:
        """Serve q, k and v from one matmul: their weights become views of one tensor."""
        self._qkv, self._qkv_bias = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

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
        if self._qkv is not None and mem.lora is None and not self._qk_norm:
            # One matmul, one rotation of queries and keys together, views for the rest.
            qkv = _biased(linear(x, self._qkv), self._qkv_bias)
            qkv = qkv.view(B, T, H + 2 * Hkv, hd).transpose(1, 2)
            qk = apply_rope(qkv[:, : H + Hkv], cos, sin)  # [B, H + Hkv, T, hd]
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
        else:
            if self._qkv is None:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            else:
                nq, nk = self._splits
                qkv = _biased(linear(x, self._qkv), self._qkv_bias)
                q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
            q = _plus(q, mem.lora_delta("q", x))
            k = _plus(k, mem.lora_delta("k", x))
            v = _plus(v, mem.lora_delta("v", x))
            q = q.view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
            k = k.view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, hd]
            v = v.view(B, T, Hkv, hd).transpose(1, 2)
            if self._qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            slots, layer = cache
            k, v = slots.cache.write(layer, slots, k, v)  # [B, Hkv, S, hd]
        out = self._attend(q, k, v, mask)
        if mem.kv is not None:
            mk, mv, valid = mem.kv
            # Memory slots: no causal mask, no positions; padded slots masked out.
            extra = self._attend(q, mk, mv, valid[:, None, None, :])
            has_any = valid.any(dim=1)[:, None, None, None]
            out = out + torch.where(has_any, extra, torch.zeros_like(extra))
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*hd]
        o = self.o_proj(out) if self._o is None else _biased(linear(out, self._o), self.o_proj.bias)
        return _plus(o, mem.lora_delta("o", out))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if self._softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self._scale, enable_gqa=k.shape[1] != q.shape[1]
            )
        # Soft-capped scores (Gemma 2), which SDPA cannot express: written out, as its eager
        # reference computes them (softmax in float32).
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = self._scale if self._scale is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / self._softcap) * self._softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(weights, v)


class MLP(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.d_model, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.d_model, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.d_model, bias=bias)
        self.act = _activation(config.hidden_act)
        self._gate_up: ServingWeight | None = None  # set by `fuse`
        self._gate_up_bias: Tensor | None = None
        self._down: ServingWeight | None = None  # set by `serve_from`
        self._inner = config.intermediate_size

    def fuse(self) -> None:
        """Serve gate and up from one matmul: their weights become views of one tensor."""
        self._gate_up, self._gate_up_bias = _fuse_linears(self.gate_proj, self.up_proj)

    def serve_from(self, convert: Callable[[Tensor], ServingWeight]) -> None:
        """Serve from `convert`ed weights (after `fuse`); the float weights are released."""
        assert isinstance(self._gate_up, Tensor), "fuse before converting"
        self._gate_up, self._down = convert(self._gate_up), convert(self.down_proj.weight)
        _release(self.gate_proj, self.up_proj, self.down_proj)

    def forward(self, x: Tensor, mem: LayerMemory) -> Tensor:
        if self._gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gu, n = _biased(linear(x, self._gate_up), self._gate_up_bias), self._inner
            gate, up = gu[..., :n], gu[..., n:]
        gate = _plus(gate, mem.lora_delta("gate", x))
        up = _plus(up, mem.lora_delta("up", x))
        h = self.act(gate) * up
        y = self.down_proj(h) if self._down is None else _biased(linear(h, self._down),
                                                                 self.down_proj.bias)  # fmt: skip
        y = _plus(y, mem.lora_delta("down", h))
        if mem.ffn is not None:
            y = y + _ffn_memory(x, mem.ffn, self.act)
        return y


def _ffn_memory(x: Tensor, ffn: FFNLayerMemory, act: Callable[[Tensor], Tensor]) -> Tensor:
    """The memory's R neurons of each sequence: x [B,T,d] -> [B,T,2R] (gate and up in one
    matmul: at one token a step is mostly per-call cost) -> [B,T,R] -> [B,T,d]. The neurons
    use the anchor's own activation: they widen its FFN."""
    gate_up, down, gu_scale, down_scale, ones = ffn
    r = down.shape[-1]
    if gu_scale is None:
        if x.shape[0] == 1:  # one sequence: a plain matmul (bf16 bmm is 3-4x slower on CPUs)
            gu = F.linear(x, gate_up[0])
            return F.linear(act(gu[..., :r]) * gu[..., r:], down[0])
        gu = torch.bmm(x, gate_up.transpose(1, 2))  # batched over sequences
        return torch.bmm(act(gu[..., :r]) * gu[..., r:], down.transpose(1, 2))
    assert down_scale is not None
    assert ones is not None
    # int8: each sequence's own weights, read as int8 (one matmul per sequence and matrix).
    out = []
    for b in range(x.shape[0]):
        gu = int8_matmul(x[b], gate_up[b], gu_scale[b])  # [T, 2R]
        h = act(gu[:, :r]) * gu[:, r:] * down_scale[b]  # down's scale is per neuron
        out.append(int8_matmul(h, down[b], ones))
    return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        d, eps, gemma = config.d_model, config.rms_norm_eps, config.gemma_norms
        self.input_layernorm = RMSNorm(d, eps, unit_offset=gemma)
        # Llama: the norm before the FFN. Gemma: the norm of the attention's output, with two
        # more around the FFN.
        self.post_attention_layernorm = RMSNorm(d, eps, unit_offset=gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(d, eps, unit_offset=True)
            self.post_feedforward_layernorm = RMSNorm(d, eps, unit_offset=True)
        self._sandwich = gemma

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
        if self._sandwich:
            x = x + self.post_attention_layernorm(attn)
            ffn: Tensor = self.mlp(self.pre_feedforward_layernorm(x), mem)
            out: Tensor = x + self.post_feedforward_layernorm(ffn)
            return out
        x = x + attn
        ffn = self.mlp(self.post_attention_layernorm(x), mem)
        return x + ffn


class LlamaModel(nn.Module):
    def __init__(self, config: AnchorConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps, unit_offset=config.gemma_norms)


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
        if c.gemma_norms:  # Gemma scales the embeddings by sqrt(d), rounded to the dtype
            x = x * torch.tensor(c.d_model**0.5, dtype=x.dtype)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype, c.rope_scaling)
        local = (
            rope_cos_sin(positions, c.head_dim, c.local_rope_theta, x.dtype)
            if c.local_rope_theta is not None and c.sliding_layers
            else (cos, sin)
        )
        slots = None if cache is None else CacheSlots.of(cache, positions, span)
        mask: Tensor | None
        window_mask: Tensor | None = None
        if cache is not None and T == 1 and B == 1:
            mask = None  # one token of one sequence attends to every cached position
            if c.sliding_window is not None and span > c.sliding_window:
                window_mask = (
                    torch.arange(span, device=tokens.device) > span - 1 - c.sliding_window
                )[None, None, None, :]
        else:
            if cache is not None:
                key_pos = torch.arange(span, device=tokens.device)[None, None, :]  # [1, 1, S]
            else:
                key_pos = positions[:, None, :]  # [B, 1, T]
            query_pos = positions[:, :, None]  # [B, T, 1]
            mask = (key_pos <= query_pos)[:, None]  # [B, 1, T, S]
            if c.sliding_window is not None:
                window_mask = mask & (key_pos > query_pos - c.sliding_window)[:, None]
        for i, (layer, mem) in enumerate(
            zip(self.model.layers, layer_memories(memory, c.n_layers), strict=True)
        ):
            sliding = c.is_sliding(i)
            x = layer(
                x,
                cos=local[0] if sliding else cos,
                sin=local[1] if sliding else sin,
                mask=window_mask if sliding and window_mask is not None else mask,
                mem=mem,
                cache=None if slots is None else (slots, i),
            )
        h = self.model.norm(x)
        logits: Tensor = self.lm_head(h) if self._head is None else linear(h, self._head)
        if c.final_softcap is not None:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits  # [B, T, vocab]
