"""`hmem build --anchor DIR` on random checkpoints of two families that `transformers` makes, each
with a tokenizer of its own kind: Qwen2's (no BOS before a prompt, EOS `<|endoftext|>`) and
Gemma 3's (`<bos>` first, `<eos>` last). The bank serves through the app, its memories change the
logits, and its anchor is the input's files byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from server.api.app import create_app
from server.bank import Bank
from server.model.checkpoint import load_anchor
from server.model.memory_batch import build_memory_batch
from server.routing import Router
from server.settings import load_settings
from server.training.pipeline import Framing, build_bank
from tests.server.training.test_build import TOPICS, tiny

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _tokenizer(specials: list[str], *, bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(TOPICS * 20, trainer)
    if bos is None:  # Qwen's: the byte-level post-processor, which adds nothing
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:  # Gemma's: BOS before every prompt
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def checkpoint(kind: str, directory: Path) -> Path:
    """A random `transformers` checkpoint of `kind` with its tokenizer files."""
    small: dict[str, Any] = {
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    }  # fmt: skip
    if kind == "qwen2":
        tok = _tokenizer(["<|endoftext|>", "<|im_end|>"], bos=None)
        eot = tok.token_to_id("<|endoftext|>")
        config: Any = transformers.Qwen2Config(
            **small, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True
        )
        model: Any = transformers.Qwen2ForCausalLM(config)
        tok_config = {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False}
    else:
        tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>")
        config = transformers.Gemma3TextConfig(
            **small, head_dim=16, sliding_window=8, bos_token_id=tok.token_to_id("<bos>"),
            eos_token_id=tok.token_to_id("<eos>"), pad_token_id=tok.token_to_id("<pad>"),
        )  # fmt: skip
        model = transformers.Gemma3ForCausalLM(config)
        tok_config = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                      "add_bos_token": True}  # fmt: skip
    torch.manual_seed(0)
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **tok_config,
                # tokenizer.json as it is (Gemma's own class would re-wrap it as SentencePiece)
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": ("" if kind == "qwen2" else "{{ bos_token }}") + TEMPLATE,
            }
        )
    )
    return directory


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_memories_trained_post_hoc_on_a_family_checkpoint_serve(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = checkpoint(kind, tmp_path / "anchor")
    settings = tiny(tmp_path, anchor_dir=src, freeze_anchor=True, memory_steps=30, progress=True)
    summary = build_bank(settings)
    # Before it starts, the stage says how long it will take.
    assert re.search(r"memories: 30 steps at [0-9.]+ s each: about \d+ s", capsys.readouterr().err)
    bank = Bank.open(summary.bank)
    bank.verify()

    # The frozen anchor is the input, byte for byte.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (bank.anchor_dir / name).read_bytes() == (src / name).read_bytes(), name
    # Sized by the anchor's widths.
    assert bank.manifest.model.d_model == 64
    assert bank.manifest.model.intermediate_size == 128

    # The memories of a routed path change the logits.
    m = bank.manifest
    router = Router.load(bank.path / "router.safetensors", m.embedder, branching=m.branching,
                         levels=m.levels)  # fmt: skip
    route = router.route_texts([TOPICS[0]])
    blocks = [bank.read_block(f"bank/L{lvl + 1}/{int(n)}")
              for lvl, n in enumerate(route.node_ids[0])]  # fmt: skip
    model = load_anchor(bank.anchor_dir)
    framing = Framing.of_checkpoint(bank.anchor_dir, model.config)
    tokens = torch.tensor([framing.ids(TOPICS[0])])
    with torch.no_grad():
        alone = model(tokens)
        with_memory = model(tokens, memory=build_memory_batch([blocks], dtype=torch.float32))
    assert (with_memory - alone).abs().max() > 1e-3

    # And the app serves it: completions and chat through the checkpoint's own template.
    settings = load_settings(bank=summary.bank, data_dir=tmp_path / "state", warmup=False)
    with TestClient(create_app(settings)) as client:
        body = client.post("/v1/completions", json={"prompt": TOPICS[1], "max_tokens": 4})
        assert body.status_code == 200, body.text
        assert len(body.json()["memory"]["path"]) == 2
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": TOPICS[2]}], "max_tokens": 4},
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_training_windows_are_framed_as_the_checkpoints_tokenizer_frames_prompts(
    tmp_path: Path, kind: str
) -> None:
    """Qwen: no BOS, `<|endoftext|>` after; Gemma: `<bos>` first, `<eos>` after. Never the byte
    tokenizer's ids 1 and 2, which are ordinary tokens of these vocabularies."""
    src = checkpoint(kind, tmp_path / "anchor")
    framing = Framing.of_checkpoint(src, load_anchor(src).config)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    body = tok.encode("iron is a metal", add_special_tokens=False).ids
    if kind == "qwen2":
        expected = [*body, tok.token_to_id("<|endoftext|>")]
    else:
        expected = [tok.token_to_id("<bos>"), *body, tok.token_to_id("<eos>")]
    assert framing.ids("iron is a metal") == expected
    # `transformers` frames a prompt the same way (its tokenizer from the same files).
    hf = transformers.AutoTokenizer.from_pretrained(src)
    assert hf("iron is a metal")["input_ids"] == expected[:-1]
