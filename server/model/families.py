"""The Hugging Face model families hmem runs as anchors, read from their config.json.

Each family is the Llama decoder with a few switches (docs/models.md has the table): Qwen2
adds biases to q, k and v; Qwen3 normalises each head's queries and keys; Mistral and Phi-3
may attend through a sliding window; Phi-3 stores q/k/v and gate/up as one tensor each;
Gemma 2 and 3 scale the embeddings, use (1 + w) norms around both sublayers, GELU, their own
attention scale, and (Gemma 3) a second RoPE base for the sliding layers. `read_config` maps a
config.json onto `AnchorConfig`'s switches and refuses, by key, whatever changes the math in a
way the anchor does not implement; `to_checkpoint_names` and `from_checkpoint_names` map a
family's tensor names onto the anchor's (only Phi-3's differ).

Both spellings of RoPE settings are read: `rope_theta` + `rope_scaling` (checkpoints on the
Hub) and `rope_parameters` (what `transformers` >= 5 writes), per layer type for Gemma 3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from server.model.config import AnchorConfig, RopeScaling
from server.model.errors import UnsupportedArchitectureError

FULL, SLIDING = "full_attention", "sliding_attention"

# model_type -> (the architectures name, what differs from Llama): docs/models.md.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "the base: RMSNorm, RoPE, SwiGLU, GQA"),
    "mistral": ("MistralForCausalLM", "sliding-window attention when sliding_window is set"),
    "qwen2": ("Qwen2ForCausalLM", "biases on q, k and v; sliding window on upper layers"),
    "qwen3": ("Qwen3ForCausalLM", "RMSNorm of each head's queries and keys"),
    "phi3": ("Phi3ForCausalLM", "q/k/v and gate/up stored fused; sliding window"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma norms and scaling, soft-capped attention and logits"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma norms and scaling, head norms, two RoPE bases"),
}
_BY_ARCH = {arch: family for family, (arch, _) in FAMILIES.items()}
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# Families whose `attention_bias` puts a bias on q, k, v and o (Qwen2 has q/k/v biases always).
_ATTENTION_BIAS = ("llama", "qwen3", "gemma2", "gemma3_text")


def read_config(cfg: Mapping[str, Any]) -> AnchorConfig:
    """The anchor of a parsed Hugging Face config.json; `UnsupportedArchitectureError` names
    the key (or the model_type) it cannot run."""
    family = _family(cfg)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in (*required, "intermediate_size") if k not in cfg]
    if missing:
        raise UnsupportedArchitectureError(f"config.json is missing {missing}")
    if cfg.get("pretraining_tp") not in (1, None):
        raise UnsupportedArchitectureError(
            f"config.json pretraining_tp={cfg['pretraining_tp']!r} is not supported (expected 1)"
        )
    gemma = family in ("gemma2", "gemma3_text")
    act_key = "hidden_activation" if gemma and cfg.get("hidden_activation") else "hidden_act"
    act = cfg.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    if act not in _ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"config.json {act_key}={act!r} is not supported (expected one of {_ACTIVATIONS})"
        )
    n_layers = int(cfg["num_hidden_layers"])
    layer_types = _layer_types(family, cfg, n_layers)
    window = cfg.get("sliding_window") if SLIDING in layer_types else None
    theta, scaling, local_theta = _rope(family, cfg)
    bias = bool(cfg.get("attention_bias") or False)
    if family == "phi3" and float(cfg.get("partial_rotary_factor") or 1.0) != 1.0:
        raise UnsupportedArchitectureError(
            f"config.json partial_rotary_factor={cfg['partial_rotary_factor']!r} is not "
            "supported (expected 1.0)"
        )
    attn_softcap = cfg.get("attn_logit_softcapping") if gemma else None
    final_softcap = cfg.get("final_logit_softcapping") if gemma else None
    scalar = cfg.get("query_pre_attn_scalar") if gemma else None
    return AnchorConfig(
        vocab_size=int(cfg["vocab_size"]),
        d_model=int(cfg["hidden_size"]),
        n_layers=n_layers,
        n_heads=int(cfg["num_attention_heads"]),
        n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]),
        head_dim=int(cfg.get("head_dim") or 0),
        rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        family=family,
        hidden_act=act,
        qkv_bias=family == "qwen2" or (bias and family in _ATTENTION_BIAS),
        o_bias=bias and family in _ATTENTION_BIAS,
        mlp_bias=bool(cfg.get("mlp_bias") or False) and family == "llama",
        qk_norm=family in ("qwen3", "gemma3_text"),
        rope_scaling=scaling,
        sliding_window=None if window is None else int(window),
        sliding_layers=tuple(i for i, t in enumerate(layer_types) if t == SLIDING)
        if window is not None
        else (),
        local_rope_theta=local_theta,
        gemma_norms=gemma,
        attn_scale=None if scalar is None else float(scalar) ** -0.5,
        attn_softcap=None if attn_softcap is None else float(attn_softcap),
        final_softcap=None if final_softcap is None else float(final_softcap),
        hf=dict(cfg),
    )


def _family(cfg: Mapping[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type in FAMILIES:
        return str(model_type)
    for arch in cfg.get("architectures") or []:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    known = ", ".join(FAMILIES)
    raise UnsupportedArchitectureError(
        f"unsupported model_type {model_type!r}: hmem runs {known} checkpoints"
    )


def _layer_types(family: str, cfg: Mapping[str, Any], n_layers: int) -> list[str]:
    """Each layer's attention: "full_attention" or "sliding_attention", as `transformers` reads
    the config (`layer_types` when written, else the family's rule)."""
    given = cfg.get("layer_types")
    if given is not None:
        if len(given) != n_layers or any(t not in (FULL, SLIDING) for t in given):
            raise UnsupportedArchitectureError(
                f"config.json layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                f"{n_layers} layers"
            )
        return list(given)
    window = cfg.get("sliding_window")
    if family in ("mistral", "phi3"):
        return [SLIDING if window is not None else FULL] * n_layers
    if family in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window") or window is None:
            return [FULL] * n_layers
        first = int(cfg.get("max_window_layers", n_layers))
        return [SLIDING if i >= first else FULL for i in range(n_layers)]
    if family == "gemma2":
        return [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
    if family == "gemma3_text":
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    return [FULL] * n_layers


def _rope(family: str, cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None, float | None]:
    """(base of the full layers, their scaling, base of the sliding layers or None)."""
    params = cfg.get("rope_parameters")
    if family == "gemma3_text":
        per_type = params if isinstance(params, Mapping) and FULL in params else {}
        full = dict(per_type.get(FULL) or {})
        local = dict(per_type.get(SLIDING) or {})
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        if cfg.get("rope_scaling"):
            full.update(cfg["rope_scaling"])
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        if _scaling(local, "rope_parameters.sliding_attention") is not None:
            raise UnsupportedArchitectureError(
                "config.json scales RoPE on the sliding layers, which is not supported"
            )
        return (
            float(full["rope_theta"]),
            _scaling(full, "rope_parameters"),
            float(local["rope_theta"]),
        )
    spec = dict(params) if isinstance(params, Mapping) else {}
    spec.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if cfg.get("rope_scaling"):
        spec.update(cfg["rope_scaling"])
        source = "rope_scaling"
    else:
        source = "rope_parameters"
    return float(spec["rope_theta"]), _scaling(spec, source), None


def _scaling(spec: Mapping[str, Any], source: str) -> RopeScaling | None:
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(spec["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(spec["factor"]),
            low_freq_factor=float(spec["low_freq_factor"]),
            high_freq_factor=float(spec["high_freq_factor"]),
            original_max_position_embeddings=int(spec["original_max_position_embeddings"]),
        )
    raise UnsupportedArchitectureError(
        f"config.json {source} rope_type={kind!r} is not supported "
        "(expected 'default', 'linear' or 'llama3')"
    )


# Phi-3 stores q, k, v as one `qkv_proj` and gate, up as one `gate_up_proj`.
_FUSED = {"self_attn.qkv_proj.weight": "qkv", "mlp.gate_up_proj.weight": "gate_up"}


def from_checkpoint_names(
    config: AnchorConfig, name: str, read: Callable[[], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The anchor's tensors for the checkpoint tensor `name` (read by `read` when needed)."""
    if config.family != "phi3":
        return {name: read()}
    for suffix, kind in _FUSED.items():
        if name.endswith(suffix):
            prefix = name[: -len(suffix)]
            t = read()
            if kind == "qkv":
                q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
                parts = dict(zip(("q", "k", "v"), torch.split(t, [q, kv, kv]), strict=True))
                return {f"{prefix}self_attn.{p}_proj.weight": w for p, w in parts.items()}
            gate, up = torch.split(t, config.intermediate_size)
            return {f"{prefix}mlp.gate_proj.weight": gate, f"{prefix}mlp.up_proj.weight": up}
    return {name: read()}


def checkpoint_shapes(
    config: AnchorConfig, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes for the anchor's `shapes`."""
    return {name: t.shape for name, t in to_checkpoint_names(config, _meta(shapes)).items()}


def to_checkpoint_names(
    config: AnchorConfig, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The anchor's state dict under the family's checkpoint names."""
    if config.family != "phi3":
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        for proj, fused, parts in (
            ("self_attn.q_proj.weight", "self_attn.qkv_proj.weight", ("q", "k", "v")),
            ("mlp.gate_proj.weight", "mlp.gate_up_proj.weight", ("gate", "up")),
        ):
            if name.endswith(proj):
                prefix, module = name[: -len(proj)], proj.split(".")[0]
                out[prefix + fused] = torch.cat(
                    [state[f"{prefix}{module}.{p}_proj.weight"] for p in parts]
                )
                break
        else:
            if not name.endswith(
                ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")
            ):
                out[name] = t
    return out


def _meta(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
