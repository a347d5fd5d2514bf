"""Facts as chat: the conversations the demo corpus holds are, as a build trains on them, the
token ids the chat template gives the same turns, so the anchor learns the prompt it is served."""

from __future__ import annotations

from pathlib import Path

from server.model.config import AnchorConfig
from server.tokenizer import AnchorTokenizer
from server.training.chat import as_chat, chat_documents, question, reply
from server.training.facts import Fact
from server.training.synth import generate_corpus
from server.training.tokenizer import (
    BOS_ID,
    EOS_ID,
    VOCAB_SIZE,
    byte_tokenizer,
    write_byte_tokenizer,
)


def _anchor_tokenizer(directory: Path) -> AnchorTokenizer:
    """The tokenizer `hmem build` writes beside an anchor, read as the server reads it."""
    write_byte_tokenizer(directory, model_max_length=512)
    config = AnchorConfig(
        vocab_size=VOCAB_SIZE, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1,
        intermediate_size=8, max_seq_len=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    return AnchorTokenizer.from_dir(directory, config)


def test_a_conversation_trains_on_the_ids_the_chat_template_serves(tmp_path: Path) -> None:
    corpus = generate_corpus(invented_entities=5, filler_docs=0, phrasing="query")
    facts = corpus.facts
    documents = [d["text"] for d in corpus.documents]
    tok = _anchor_tokenizer(tmp_path)
    docs = chat_documents(facts, documents)
    # One conversation per mention: each fact's, followed by each document that mentions it.
    assert len(docs) == sum(f.mentions for f in facts)
    asked = iter(docs)
    for fact in facts:
        for doc in (next(asked) for _ in range(fact.mentions)):
            _check(tok, fact, doc, documents)
    thulium = next(f for f in facts if f.entity == "Thulium")
    (asked_in_chat,) = as_chat([thulium])
    assert asked_in_chat.query == "What is the atomic number of Thulium?"
    assert asked_in_chat.answer == "69"
    assert (asked_in_chat.bucket, asked_in_chat.family) == (thulium.bucket, thulium.family)


def _check(tok: AnchorTokenizer, fact: Fact, doc: dict[str, str], documents: list[str]) -> None:
    """`doc` opens with `fact`'s question as a served chat prompt, then its reply and a document
    that states the fact."""
    # What the build trains on: BOS, the document's ids (special tokens as their ids), EOS.
    trained = [BOS_ID, *byte_tokenizer().encode(doc["text"], add_special_tokens=False).ids]
    trained.append(EOS_ID)
    rendered = tok.render_chat([{"role": "user", "content": question(fact)}])
    served = tok.encode(rendered, add_bos=False)
    assert trained[: len(served)] == served
    # The reply, ended as a served reply ends (at EOS), then a document that states the fact.
    end = trained.index(EOS_ID, len(served))
    assert tok.decode(trained[len(served) : end]) == reply(fact) + "."
    after = tok.decode(trained[end + 1 : -1])
    assert after.startswith("\n")
    assert after.strip() in documents
    assert fact.statement in after
