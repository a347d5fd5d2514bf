"""Reading a corpus: JSONL of `{"text": ...}` documents, text files, or a directory of both.

Every problem is reported with the file and line it is on, before any work starts. Long
documents are split into windows at word boundaries, so that each window gets its own cluster
path and fits the training sequence length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class CorpusError(ValueError):
    """The corpus cannot be used; the message names the file (and line) and the problem."""


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    source: str  # "file:line" for error messages and summaries


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path.name}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise CorpusError(f'{path.name}:{n}: expected an object with a "text" field')
            if not isinstance(obj["text"], str):
                raise CorpusError(f'{path.name}:{n}: "text" must be a string')
            if obj["text"].strip():
                docs.append(Document(obj["text"].strip(), f"{path.name}:{n}"))
    return docs


def _read_text(path: Path) -> list[Document]:
    # Paragraphs (blank-line separated) are documents.
    text = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = [p.strip() for p in text.split("\n\n")]
    return [Document(p, f"{path.name}:{i}") for i, p in enumerate(paragraphs, 1) if p]


def load_corpus(path: str | Path) -> list[Document]:
    """All documents of a JSONL file, a text file, or a directory of them (sorted by name)."""
    root = Path(path)
    if not root.exists():
        raise CorpusError(f"corpus {root} does not exist")
    if root.is_dir():
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".txt")
        )
        if not files:
            raise CorpusError(f"corpus directory {root} holds no .jsonl or .txt files")
    else:
        files = [root]
    docs: list[Document] = []
    for f in files:
        docs += _read_text(f) if f.suffix == ".txt" else _read_jsonl(f)
    if not docs:
        raise CorpusError(f"corpus {root} holds no documents")
    return docs


def split_windows(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most `max_chars`, cut at spaces where there is one."""
    if len(text) <= max_chars:
        return [text]
    out = []
    while len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        if cut <= max_chars // 2:
            cut = max_chars
        out.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        out.append(text)
    return [w for w in out if w]
