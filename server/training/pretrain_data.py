"""What `hmem pretrain` trains on: open text, a BPE tokenizer trained on it, packed windows.

The tokenizer is byte-level BPE (GPT-2's pre-tokenizer: no unknown token, any text encodes)
with hmem's special tokens at the ids hmem's byte tokenizer gives them (`<pad>` 0, `<s>` 1,
`</s>` 2), so whatever reads an hmem anchor's BOS, EOS and padding reads this one's alike; its
post-processor puts BOS first, as Hugging Face's Llama tokenizers do. Each document is packed
as `<s> text </s>` into one stream, cut into windows of `seq_len` tokens; a seeded share of the
windows is held out for the validation loss. All of it is written to the run's work directory
once and read back on every resume, so a resumed run trains on exactly the same tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from server.tokenizer import TOKENIZER
from server.training.opentext import OpenText
from server.training.tokenizer import BOS, BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

DATA, INFO = "data.safetensors", "data.json"


@dataclass
class PretrainData:
    tokenizer: Tokenizer
    train: torch.Tensor  # [N, T] long windows
    val: torch.Tensor  # [M, T] long, held out
    info: dict[str, Any]  # sources (with licences), missing sources, tokens, bytes per token


def train_tokenizer(documents: Sequence[str], *, vocab_size: int, progress: bool) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens, hmem's special tokens at ids 0-2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
    )  # fmt: skip
    tok.train_from_iterator(documents, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def load_prepared(work: Path) -> PretrainData | None:
    """The data an earlier run of the same settings prepared in `work`, if it finished."""
    files = (work / TOKENIZER, work / DATA, work / INFO)
    if not all(f.is_file() for f in files):
        return None
    tensors = load_file(str(work / DATA))
    return PretrainData(
        Tokenizer.from_file(str(work / TOKENIZER)), tensors["train"].long(),
        tensors["val"].long(), json.loads((work / INFO).read_text()),
    )  # fmt: skip


def prepare(
    text: OpenText,
    work: Path,
    *,
    vocab_size: int,
    seq_len: int,
    val_fraction: float,
    seed: int,
    progress: bool,
) -> PretrainData:
    """Train the tokenizer on `text`, pack its documents into windows, and save both in `work`
    (the info file last: it marks the data complete)."""
    documents = text.documents()
    tok = train_tokenizer(documents, vocab_size=vocab_size, progress=progress)
    stream: list[int] = []
    for enc in tok.encode_batch(documents, add_special_tokens=False):
        stream += [BOS_ID, *enc.ids, EOS_ID]
    n = len(stream) // seq_len
    if n < 2:
        raise ValueError(f"{len(stream)} tokens make fewer than 2 windows of {seq_len}")
    windows = torch.tensor(stream[: n * seq_len], dtype=torch.int32).view(n, seq_len)  # [N, T]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, min(1024, int(n * val_fraction)))
    val, train = windows[order[:n_val]], windows[order[n_val:]]
    content_tokens = len(stream) - 2 * len(documents)
    info = {
        "sources": [
            {"name": p.source.name, "what": p.source.what, "package": p.source.package,
             "licence": p.source.licence, "documents": len(p.documents), "chars": p.chars}
            for p in text.parts
        ],
        "missing": [{"name": m.name, "install": m.install} for m in text.missing],
        "tokens": len(stream),
        "bytes_per_token": sum(len(d.encode()) for d in documents) / max(1, content_tokens),
    }  # fmt: skip
    tok.save(str(work / TOKENIZER))
    save_file({"train": train.contiguous(), "val": val.contiguous()}, str(work / DATA))
    (work / INFO).write_text(json.dumps(info, indent=2))
    return PretrainData(tok, train.long(), val.long(), info)


__all__ = ["PretrainData", "load_prepared", "prepare", "train_tokenizer"]
