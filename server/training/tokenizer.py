"""A byte-level tokenizer for anchors hmem trains: 256 byte tokens plus three special tokens.

Bytes, not a BPE trained on the corpus: a small corpus's BPE makes every entity name a token of
its own, a private embedding row that stores the entity's facts inside the anchor and hides what
memories add (`docs/longtail.md`, finding 3). With bytes, facts live in shared weights.

Written in Hugging Face's layout, so that `transformers.AutoTokenizer.from_pretrained(anchor)`
gives the ids the server gives: `tokenizer.json` (its post-processor puts BOS first, as the
server does) and `tokenizer_config.json` (the special tokens, the context length and the chat
template). `hmem build` and the packaged demo bank write the same files from this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from server.tokenizer import TOKENIZER, TOKENIZER_CONFIG

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Role lines in the manner of Zephyr: a turn is `<|role|>\n`, its text, then EOS and a newline;
# the prompt ends with the assistant's line when a reply is wanted, and the reply ends at the
# EOS the model learnt to end documents with. BOS opens the text, so a chat prompt is encoded
# without adding another. Content given as OpenAI parts keeps its text parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator([], trainer)  # no merges: the alphabet is the vocabulary
    # BOS before each sequence, as Hugging Face's Llama tokenizers do.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def tokenizer_config(*, model_max_length: int) -> dict[str, Any]:
    """`tokenizer_config.json` of a byte-level anchor whose context is `model_max_length`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        # What tokenizer.json's post-processor does, for readers that look here instead.
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_byte_tokenizer(directory: Path, *, model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` of a byte-level anchor."""
    directory.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save(str(directory / TOKENIZER))
    text = json.dumps(tokenizer_config(model_max_length=model_max_length), indent=2)
    (directory / TOKENIZER_CONFIG).write_text(text + "\n", encoding="utf-8")
