"""`AnchorConfig`: the anchor's architecture, read from (and written to) Hugging Face config.json.

The architecture always comes from the checkpoint, never from the environment. The anchor is a
Llama-architecture decoder (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, tied or
untied embeddings) with the switches the common families need (`server.model.families` reads
them from a config.json; docs/models.md has the table). Anything else is refused with an error
that names the key, so a checkpoint is never run with the wrong math.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from server.model.errors import UnsupportedArchitectureError


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """How RoPE's frequencies are stretched past the trained context: "linear" divides them
    all by `factor`; "llama3" divides only the low ones and blends the middle band (Llama 3.1+)."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class AnchorConfig:
    """A Llama-style decoder. Field names follow the paper's notation; `families.read_config`
    reads one from a config.json."""

    vocab_size: int
    d_model: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads (GQA when < n_heads)
    intermediate_size: int  # the SwiGLU inner dimension d_f
    head_dim: int = 0  # 0: d_model // n_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 2048  # max_position_embeddings
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # The switches of the other families (`server.model.families`); the defaults are Llama's.
    family: str = "llama"  # config.json's model_type
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys, before RoPE
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # keys within this many positions, on `sliding_layers`
    sliding_layers: tuple[int, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of the sliding layers when it differs
    gemma_norms: bool = False  # (1 + w) norms around both sublayers, embeddings times sqrt(d)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # attention scores through c * tanh(s / c)
    final_softcap: float | None = None  # logits through c * tanh(l / c)
    # The config.json this was read from, written back unchanged by `to_hf`.
    hf: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise UnsupportedArchitectureError(
                    f"hidden_size {self.d_model} is not divisible by num_attention_heads "
                    f"{self.n_heads}; set head_dim"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, name) <= 0:
                raise UnsupportedArchitectureError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.intermediate_size <= 0:
            raise UnsupportedArchitectureError("intermediate_size must be > 0")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedArchitectureError(
                f"num_attention_heads {self.n_heads} must be a multiple of "
                f"num_key_value_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedArchitectureError(
                f"head_dim must be even for RoPE, got {self.head_dim}"
            )

    def to_hf(self) -> dict[str, Any]:
        """A config.json that `transformers` and this anchor both read as this architecture:
        the one it was read from, else a Llama one (the family of the anchors hmem trains)."""
        if self.hf is not None:
            return dict(self.hf)
        if self.family != "llama":
            raise UnsupportedArchitectureError(f"no config.json to write for {self.family!r}")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            **({} if self.rope_scaling is None else {"rope_scaling": self._rope_scaling_hf()}),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    def _rope_scaling_hf(self) -> dict[str, Any]:
        r = self.rope_scaling
        assert r is not None
        spec: dict[str, Any] = {"rope_type": r.kind, "factor": r.factor}
        if r.kind == "llama3":
            spec["low_freq_factor"] = r.low_freq_factor
            spec["high_freq_factor"] = r.high_freq_factor
            spec["original_max_position_embeddings"] = r.original_max_position_embeddings
        return spec

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("hf")
        return out

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and layer in self.sliding_layers

    def n_params(self) -> int:
        d, f, L = self.d_model, self.intermediate_size, self.n_layers
        attn = d * self.n_heads * self.head_dim * 2 + d * self.n_kv_heads * self.head_dim * 2
        per_layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * per_layer + embed + d


PRESETS: dict[str, AnchorConfig] = {
    # Tests: a few thousand parameters, GQA on.
    "test": AnchorConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
        max_seq_len=128,
    ),
    # The demo anchor for CPU builds (2.4M parameters with a 4k vocabulary).
    "demo": AnchorConfig(
        vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, intermediate_size=512,
        max_seq_len=512, tie_embeddings=True,
    ),
}  # fmt: skip
