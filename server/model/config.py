"""`AnchorConfig`: the anchor's architecture, read from (and written to) Hugging Face config.json.

The architecture always comes from the checkpoint, never from the environment. Only what this
anchor implements is accepted: a Llama-architecture decoder (RMSNorm, rotary embeddings with a
configurable base, SwiGLU, grouped-query attention, tied or untied embeddings). Anything else
(a different architecture, rope scaling, attention or MLP biases, another activation) is refused
with an error that names the key, so a checkpoint is never run with the wrong math.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from server.model.errors import UnsupportedArchitectureError

_SUPPORTED_ARCHS = ("LlamaForCausalLM",)
# Keys whose values change the math in ways this anchor does not implement, with the value
# (or values) that keep it on the path it does implement.
_MUST_BE = {
    "hidden_act": ("silu",),
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
    "rope_scaling": (None,),
    "pretraining_tp": (1, None),
}


@dataclass(frozen=True, slots=True)
class AnchorConfig:
    """A Llama-style decoder. Field names follow the paper's notation; see `from_hf`."""

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

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> AnchorConfig:
        """Read a Hugging Face Llama config.json (already parsed)."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type != "llama" and not any(a in _SUPPORTED_ARCHS for a in archs):
            raise UnsupportedArchitectureError(
                f"unsupported architecture {archs or model_type!r}: hmem runs Llama-architecture "
                "checkpoints (model_type 'llama', LlamaForCausalLM)"
            )
        for key, allowed in _MUST_BE.items():
            if cfg.get(key) not in allowed:
                raise UnsupportedArchitectureError(
                    f"config.json {key}={cfg.get(key)!r} is not supported (expected {allowed[0]!r})"
                )
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5 groups RoPE settings here
        if rope.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(
                f"config.json rope_parameters.rope_type={rope['rope_type']!r} is not supported "
                "(expected 'default')"
            )
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in (*required, "intermediate_size") if k not in cfg]
        if missing:
            raise UnsupportedArchitectureError(f"config.json is missing {missing}")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            head_dim=int(cfg.get("head_dim") or 0),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json that `transformers` and this anchor both read as this architecture."""
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

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
