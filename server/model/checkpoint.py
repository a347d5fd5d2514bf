"""Anchor checkpoints in Hugging Face layout: `config.json` + `model.safetensors` (or shards).

An existing checkpoint of a supported family (`server.model.families`: Llama, Mistral, Qwen2,
Qwen3, Phi-3, Gemma 2 and 3) on disk can be the anchor, and the anchors hmem trains are written
so that `transformers` reads them too. Only JSON and
safetensors are read. Every tensor the architecture needs must be present with its exact shape;
a missing, extra or misshapen tensor is refused with its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from server.model.anchor import Anchor
from server.model.config import AnchorConfig
from server.model.errors import CheckpointError
from server.model.families import (
    checkpoint_shapes,
    from_checkpoint_names,
    to_checkpoint_names,
)
from server.model.families import read_config as read_hf_config

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some exporters include that are derived, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(directory: Path) -> AnchorConfig:
    path = directory / CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} has no {CONFIG}: not a Hugging Face checkpoint"
        ) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return read_hf_config(raw)


def _weight_files(directory: Path) -> list[Path]:
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shards listed in {INDEX} are missing: {missing}")
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds only pickle weights (.bin/.pt), which hmem never loads; "
            "convert the checkpoint to safetensors"
        )
    raise CheckpointError(f"{directory} has no {WEIGHTS}")


class _SkipInit(TorchFunctionMode):
    """Skips `torch.nn.init` while a model is built on the meta device, where it means nothing.

    `normal_` on a meta tensor (nn.Embedding's init) goes through a reference implementation
    that imports torch._dynamo and sympy: seconds of start-up and about 70 MB of memory kept
    for as long as the process runs, for a value that is never there.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # each init fills `tensor` in place
        return func(*args, **kwargs)


def load_anchor(
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Anchor:
    """Build the anchor from a Hugging Face checkpoint directory of a supported family.

    The model is built on the meta device (no memory, no random init) and each tensor read from
    the file goes straight into it as its parameter: the peak is one copy of the weights plus
    one tensor being cast, not two copies. Tensors are read into memory the process owns
    (`pread`, not a file mapping), so a checkpoint rewritten on disk never changes the weights
    under a running model, and a tensor stored in `dtype` on the CPU is used as it was read.
    """
    directory = Path(directory)
    config = read_config(directory)
    with torch.device("meta"), _SkipInit():
        model = Anchor(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    stored = checkpoint_shapes(config, expected)  # the names and shapes the family stores
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in stored:
                    if config.tie_embeddings and name == "lm_head.weight":
                        continue  # a tied checkpoint that also stores the head
                    raise CheckpointError(f"unexpected tensor {name!r} in {file.name}")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != stored[name]:
                    raise CheckpointError(
                        f"tensor {name!r} has shape {shape}, config.json implies {stored[name]}"
                    )
                # No copy when the tensor is stored in `dtype` and `device` is the CPU.
                for key, t in from_checkpoint_names(config, name, _reader(f, name)).items():
                    tensors[key] = t.to(dtype=dtype, device=device)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"checkpoint {directory} is missing tensors: {shown}")
    # assign=True: the read tensors become the parameters (keeping each parameter's
    # requires_grad) instead of being copied into allocated ones.
    result = model.load_state_dict(tensors, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        assert result.missing_keys == ["lm_head.weight"], result
        model.lm_head.weight = model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    return model.eval()


def _reader(f: Any, name: str) -> Callable[[], torch.Tensor]:
    return lambda: f.get_tensor(name)


def save_anchor(model: Anchor, directory: str | Path) -> None:
    """Write config.json and model.safetensors in Hugging Face layout, under the family's
    tensor names and with the config.json the anchor was read from (Llama's for anchors hmem
    trains)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    state = to_checkpoint_names(model.config, state)
    config = model.config.to_hf()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
