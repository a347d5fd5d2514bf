"""Open English text that packages install on this machine: what `hmem pretrain` trains on.

No text is downloaded. Each source is a package's files, read where the package puts them, and
each has a licence that allows training on it (`docs/pretrain.md` quotes them):

| source | what | package | licence |
| --- | --- | --- | --- |
| `python-stdlib` | the standard library's docstrings | the Python interpreter itself | PSF-2.0 |
| `python-docs` | the Python documentation's reStructuredText | Debian `python3-doc` | PSF-2.0 |
| `kjv` | the King James Bible, chapter by chapter | Debian `bible-kjv` | public domain |
| `wordnet` | WordNet's definitions and example phrases | Debian `wordnet-base` | WordNet 3.0 |

`python-stdlib` is always present, so a pretrain (and its tests) runs anywhere Python does; the
others are read when their package is installed. A directory of the user's own `.txt` and `.md`
files can be added as one more source (`text_dir`). Every source yields its documents in a fixed
order, so the same machine gives the same text and the same run.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class OpenTextError(ValueError):
    """A source cannot be read (not installed, empty); the message says how to get it."""


@dataclass(frozen=True)
class TextSource:
    name: str
    what: str
    package: str  # where it comes from
    licence: str
    install: str  # how to install it where it is missing
    locate: Callable[[], Path | None]  # its files' root (or program), None when not installed
    read: Callable[[Path], Iterator[str]]  # its documents, in a fixed order


# -- python-stdlib: the docstrings of the standard library's modules ----------------------------

# Test suites and demos: docstrings that describe test cases, not the library.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_MIN_DOCSTRING = 40  # characters: shorter ones are mostly "Return self." and the like


def _stdlib_root() -> Path | None:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root if (root / "os.py").is_file() else None


def _stdlib_docs(root: Path) -> Iterator[str]:
    """One document per module: its docstring, then its classes' and functions' in order."""
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately invalid (lib2to3's data, bad encodings)
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [
            doc
            for node in ast.walk(tree)
            if isinstance(node, nodes)
            and (doc := ast.get_docstring(node, clean=True)) is not None
            and len(doc) >= _MIN_DOCSTRING
        ]
        if docs:
            yield "\n\n".join(docs)


# -- python-docs: the documentation's reStructuredText sources -----------------------------------

_RST_DIRECTIVE = re.compile(
    r"^\s*(\.\. |:[a-z-]+:( |$))"
)  # `.. note::`, `.. _label:`, `:synopsis:`
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{3,}\s*$")  # a heading's line of marks
_RST_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")  # :func:`os.path.join`


def _python_docs_root() -> Path | None:
    # python3.11, python3.12, ...: other packages' folders (python3.11-venv) link to these.
    found = [
        (int(p.parent.parent.name.split(".")[1]), p)
        for p in Path("/usr/share/doc").glob("python3.*/html/_sources")
        if re.fullmatch(r"python3\.\d+", p.parent.parent.name)
    ]
    return max(found)[1] if found else None  # the newest Python's when several are installed


def _python_docs(root: Path) -> Iterator[str]:
    """One document per page, its markup reduced to the text a reader sees."""
    for path in sorted(root.rglob("*.rst.txt")):
        if path.name in ("license.rst.txt", "copyright.rst.txt", "contents.rst.txt"):
            continue
        lines = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if _RST_DIRECTIVE.match(line) or _RST_UNDERLINE.match(line):
                continue
            lines.append(_RST_ROLE.sub(r"\1", line).replace("``", "").rstrip())
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if text:
            yield text


# -- kjv: the King James Bible, as the `bible` program prints it --------------------------------

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")  # "1Co13:4 Charity suffereth long"


def _bible_program() -> Path | None:
    found = shutil.which("bible")
    return Path(found) if found else None


def _kjv(program: Path) -> Iterator[str]:
    """One document per chapter, its verses as running text."""
    out = subprocess.run(  # noqa: S603 (the installed `bible` program, fixed arguments)
        [str(program), "-f", "-l", "0", "Gen1:1-Rev22:21"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    chapter: tuple[str, str] | None = None
    verses: list[str] = []
    for line in out.splitlines():
        m = _VERSE.match(line.strip())
        if m is None:
            continue
        if (m[1], m[2]) != chapter and verses:
            yield " ".join(verses)
            verses = []
        chapter = (m[1], m[2])
        verses.append(m[4].strip())
    if verses:
        yield " ".join(verses)


# -- wordnet: definitions and examples ----------------------------------------------------------

_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_SYNSETS_PER_DOC = 40


def _wordnet_root() -> Path | None:
    root = Path("/usr/share/wordnet")
    return root if (root / "data.noun").is_file() else None


def _wordnet(root: Path) -> Iterator[str]:
    """Documents of 40 synsets, each a line: its words, a colon, its gloss."""
    for name in _WORDNET_FILES:
        entries: list[str] = []
        with (root / name).open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # the licence header
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                count = int(fields[3], 16)
                # Adjectives carry their position: "galore(ip)"; multi-word lemmas underscores.
                lemmas = fields[4 : 4 + 2 * count : 2]
                words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in lemmas]
                entries.append(f"{', '.join(words)}: {gloss.strip()}")
                if len(entries) == _SYNSETS_PER_DOC:
                    yield "\n".join(entries)
                    entries = []
        if entries:
            yield "\n".join(entries)


SOURCES: dict[str, TextSource] = {
    s.name: s
    for s in (
        TextSource(
            "python-stdlib", "the standard library's docstrings", "the Python interpreter",
            "PSF-2.0", "part of every Python installation", _stdlib_root, _stdlib_docs,
        ),
        TextSource(
            "python-docs", "the Python documentation", "Debian python3-doc", "PSF-2.0",
            "apt-get install python3-doc", _python_docs_root, _python_docs,
        ),
        TextSource(
            "kjv", "the King James Bible (1611)", "Debian bible-kjv", "public domain",
            "apt-get install bible-kjv", _bible_program, _kjv,
        ),
        TextSource(
            "wordnet", "WordNet's glosses", "Debian wordnet-base", "WordNet 3.0 (permissive)",
            "apt-get install wordnet-base", _wordnet_root, _wordnet,
        ),
    )
}  # fmt: skip


def _text_files(root: Path) -> Iterator[str]:
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield text


def text_dir_source(root: Path) -> TextSource:
    """The user's own `.txt` and `.md` files under `root`, as one more source."""
    return TextSource(
        f"text:{root}", f"the .txt and .md files under {root}", "the user", "the user's",
        "", lambda: root if root.is_dir() else None, _text_files,
    )  # fmt: skip


@dataclass
class SourceText:
    source: TextSource
    documents: list[str]
    chars: int


@dataclass
class OpenText:
    """The documents gathered, per source, and the sources that were asked for but missing."""

    parts: list[SourceText] = field(default_factory=list)
    missing: list[TextSource] = field(default_factory=list)

    def documents(self) -> list[str]:
        return [d for p in self.parts for d in p.documents]

    @property
    def chars(self) -> int:
        return sum(p.chars for p in self.parts)


def _capped(docs: Iterable[str], max_chars: int | None) -> tuple[list[str], int]:
    """The documents up to `max_chars` characters in all (the last one cut short)."""
    out: list[str] = []
    total = 0
    for doc in docs:
        if max_chars is not None and total + len(doc) > max_chars:
            rest = max_chars - total
            if rest > 0:
                out.append(doc[:rest])
                total += rest
            break
        out.append(doc)
        total += len(doc)
    return out, total


def resolve_sources(names: Sequence[str], *, text_dir: Path | None = None) -> list[TextSource]:
    """The sources `names` asks for ("auto": every known one); refuses an unknown name."""
    unknown = [n for n in names if n != "auto" and n not in SOURCES]
    if unknown:
        raise OpenTextError(
            f"unknown text source(s) {', '.join(unknown)}: choose from auto, {', '.join(SOURCES)}"
        )
    chosen = list(SOURCES.values()) if "auto" in names else [SOURCES[n] for n in names]
    if text_dir is not None:
        if not text_dir.is_dir():
            raise OpenTextError(f"--text {text_dir} is not a directory")
        chosen.append(text_dir_source(text_dir))
    return chosen


def gather(
    sources: Sequence[TextSource], *, required: bool, max_chars_per_source: int | None = None
) -> OpenText:
    """Read each source that is installed. A missing one is an error when `required` (the user
    named it), else it is listed in `missing`; so is having no text at all."""
    text = OpenText()
    for source in sources:
        root = source.locate()
        if root is None:
            if required:
                raise OpenTextError(
                    f"text source {source.name} ({source.what}) is not installed here: "
                    f"{source.install}"
                )
            text.missing.append(source)
            continue
        documents, chars = _capped(source.read(root), max_chars_per_source)
        if not documents:
            raise OpenTextError(f"text source {source.name} at {root} holds no text")
        text.parts.append(SourceText(source, documents, chars))
    if not text.parts:
        raise OpenTextError("no text source is installed: " + "; ".join(
            f"{s.name}: {s.install}" for s in text.missing
        ))  # fmt: skip
    return text


__all__ = [
    "SOURCES",
    "OpenText",
    "OpenTextError",
    "SourceText",
    "TextSource",
    "gather",
    "resolve_sources",
    "text_dir_source",
]
