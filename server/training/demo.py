"""The demo bank: the synthetic long-tail corpus, built with fixed seeds by one command.

`hmem demo` writes the corpus and its facts under the data directory, builds the bank beside
them with `hmem build`'s defaults (resumable, atomic: see `pipeline`), and measures it with
`evaluate`: each fact asked as a completion of its query, and as a chat question answered
through the anchor's chat template. Besides its documents, the corpus holds one conversation per
fact in that template (`chat`), so that the demo converses. `docs/results.md` reports the
figures, so anyone can reproduce them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from server.defaults import default_data_dir
from server.training.chat import as_chat, chat_documents
from server.training.evaluate import EvalReport, evaluate
from server.training.pipeline import BuildSettings, BuildSummary, build_bank
from server.training.synth import SynthCorpus, generate_corpus

# The corpus: 118 elements + 2 x 300 invented entities, Zipf mentions, 800 filler documents,
# every fact stated in the words it is asked in, and a chat question and answer per mention:
# the corpus the shipped demo bank was built from (`server/demo_bank`). Facts in paraphrase are
# `hmem synth`'s default and the fidelity bench's.
DEMO_CORPUS = {"seed": 0, "invented_entities": 300, "filler_docs": 800, "phrasing": "query"}
# The build: `hmem build`'s defaults (a tiny anchor of 115k parameters that cannot hold every
# rare fact, pretrained, then frozen while memories of 27% of it on 8 x 64 clusters learn, routed
# by the default embedder), with the seed fixed. The bank this builds is shipped as
# `server/demo_bank`, which `hmem serve` serves by default.
DEMO_BUILD: dict[str, Any] = {"seed": 0}
# The modes the report's chat columns ask in: with the routed memory, and the anchor alone.
CHAT_MODES = ("memory", "anchor")


@dataclass
class DemoResult:
    bank: Path
    summary: BuildSummary
    # Completion modes as `evaluate` names them, then "chat memory" and "chat anchor".
    report: EvalReport


def demo_corpus() -> SynthCorpus:
    """The demo's documents and facts, with a conversation per mention shuffled in (seeded)."""
    corpus = generate_corpus(**DEMO_CORPUS)  # type: ignore[arg-type]
    texts = [d["text"] for d in corpus.documents]
    documents = corpus.documents + chat_documents(corpus.facts, texts)
    random.Random(f"hmem-demo:{DEMO_CORPUS['seed']}:chat").shuffle(documents)
    settings = corpus.settings | {"chat": "a conversation per mention"}
    return SynthCorpus(documents=documents, facts=corpus.facts, settings=settings)


def build_demo(
    root: Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: object,
) -> DemoResult:
    """Write the demo corpus and build and evaluate the demo bank under `root`.

    `overrides` replace build settings (tests use fewer steps); the demo itself uses none.
    """
    root = default_data_dir() if root is None else root
    corpus_dir = root / "demo-corpus"
    corpus = demo_corpus()
    corpus.write(corpus_dir)
    settings = BuildSettings(
        corpus=corpus_dir / "corpus.jsonl",
        out=root / "demo-bank",
        bank_id="demo",
        overwrite=overwrite,
        progress=progress,
        **(DEMO_BUILD | overrides),
    )
    summary = build_bank(settings)
    completions = evaluate(settings.out, corpus_dir / "facts.jsonl", progress=progress)
    chat = evaluate(
        settings.out, as_chat(corpus.facts), modes=CHAT_MODES, chat=True, progress=progress
    )
    report = EvalReport(
        bank=completions.bank,
        modes=(*completions.modes, *(f"chat {m}" for m in chat.modes)),
        predictions=[
            *completions.predictions,
            *(replace(p, mode=f"chat {p.mode}") for p in chat.predictions),
        ],
    )
    return DemoResult(settings.out, summary, report)
