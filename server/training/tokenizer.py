"""A byte-level tokenizer for anchors hmem trains: 256 byte tokens plus three special tokens.

Bytes, not a BPE trained on the corpus: a small corpus's BPE makes every entity name a token of
its own, a private embedding row that stores the entity's facts inside the anchor and hides what
memories add (`docs/longtail.md`, finding 3). With bytes, facts live in shared weights.
Written as a `tokenizer.json` that `tokenizers` and `transformers` read.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


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
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    return tok
