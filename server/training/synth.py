"""A synthetic long-tail knowledge corpus: facts with Zipfian mention counts, and filler text.

The paper's long-tail probe asks "The atomic number of {element} is" and buckets the 118
elements by how often the pretraining corpus names them. This module builds a corpus small
enough to train a tiny anchor on CPU that reproduces that setting: fact families (the elements
with their atomic numbers, invented islands with their capitals, invented people with their birth
years), each entity mentioned in a number of documents that follows a Zipf law over a shuffled
ranking, plus general filler text so the router's clusters form beyond the fact families.

Every fact document states its fact in exactly the queried form ("The atomic number of Iron is
26."), since facts never seen in the queried form are almost never answered at this scale
(`docs/longtail.md`, finding 6), next to one or two sentences of family context drawn from
templates; some hold two facts of one family. The corpus and its facts are deterministic per seed.

Default sizes (seed 0): 118 elements and 80 entities in each invented family (278 facts);
mention counts from `max_mentions=100` (rank 1) down to `min_mentions=2` (every rank from 41
on), 1,606 mentions (586 elements, 510 per invented family) in 1,357 fact documents (about 1 in
5 states two facts) plus 450 filler documents: 1,807 documents of at most 199 characters (about
110 on average, 220 kB of JSONL). Buckets are fifths by rank (`frequency_buckets`): for the
elements, bucket 0 is ranks 1-24 (100 to 4 mentions), 1 ranks 25-48 (4 to 2), 2 ranks 49-71,
3 ranks 72-95 and 4 ranks 96-118 (2 each); for 80 entities, ranks 1-16 (100 to 6), 17-32 (6 to
3), 33-48 (3 to 2), 49-64 and 65-80 (2 each).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.training.facts import FACTS_FILE, Fact
from server.training.filler import MAX_DOC_CHARS, filler_documents, fit_sentences

CORPUS_FILE = "corpus.jsonl"
N_BUCKETS = 5
DEFAULT_FAMILIES = ("element", "island", "person")

# The periodic table: symbol and name in order of atomic number (IUPAC spellings).
_ELEMENT_TABLE = """
H Hydrogen, He Helium, Li Lithium, Be Beryllium, B Boron, C Carbon, N Nitrogen, O Oxygen,
F Fluorine, Ne Neon, Na Sodium, Mg Magnesium, Al Aluminium, Si Silicon, P Phosphorus, S Sulfur,
Cl Chlorine, Ar Argon, K Potassium, Ca Calcium, Sc Scandium, Ti Titanium, V Vanadium,
Cr Chromium, Mn Manganese, Fe Iron, Co Cobalt, Ni Nickel, Cu Copper, Zn Zinc, Ga Gallium,
Ge Germanium, As Arsenic, Se Selenium, Br Bromine, Kr Krypton, Rb Rubidium, Sr Strontium,
Y Yttrium, Zr Zirconium, Nb Niobium, Mo Molybdenum, Tc Technetium, Ru Ruthenium, Rh Rhodium,
Pd Palladium, Ag Silver, Cd Cadmium, In Indium, Sn Tin, Sb Antimony, Te Tellurium, I Iodine,
Xe Xenon, Cs Caesium, Ba Barium, La Lanthanum, Ce Cerium, Pr Praseodymium, Nd Neodymium,
Pm Promethium, Sm Samarium, Eu Europium, Gd Gadolinium, Tb Terbium, Dy Dysprosium, Ho Holmium,
Er Erbium, Tm Thulium, Yb Ytterbium, Lu Lutetium, Hf Hafnium, Ta Tantalum, W Tungsten,
Re Rhenium, Os Osmium, Ir Iridium, Pt Platinum, Au Gold, Hg Mercury, Tl Thallium, Pb Lead,
Bi Bismuth, Po Polonium, At Astatine, Rn Radon, Fr Francium, Ra Radium, Ac Actinium,
Th Thorium, Pa Protactinium, U Uranium, Np Neptunium, Pu Plutonium, Am Americium, Cm Curium,
Bk Berkelium, Cf Californium, Es Einsteinium, Fm Fermium, Md Mendelevium, No Nobelium,
Lr Lawrencium, Rf Rutherfordium, Db Dubnium, Sg Seaborgium, Bh Bohrium, Hs Hassium,
Mt Meitnerium, Ds Darmstadtium, Rg Roentgenium, Cn Copernicium, Nh Nihonium, Fl Flerovium,
Mc Moscovium, Lv Livermorium, Ts Tennessine, Og Oganesson
"""

# (name, symbol, atomic number) of the 118 elements.
ELEMENTS: tuple[tuple[str, str, int], ...] = tuple(
    (entry.split()[1], entry.split()[0], number)
    for number, entry in enumerate(_ELEMENT_TABLE.replace("\n", " ").split(","), start=1)
)


@dataclass(frozen=True)
class SynthCorpus:
    """Documents (`{"text", "topic"}`) and the facts they state."""

    documents: list[dict[str, str]]
    facts: list[Fact]
    settings: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> None:
        """Write `corpus.jsonl` (one `{"text": ...}` per line) and `facts.jsonl`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_lines(out / CORPUS_FILE, ({"text": d["text"]} for d in self.documents))
        _write_lines(out / FACTS_FILE, (asdict(f) for f in self.facts))


def _write_lines(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """JSON Lines, written to a temporary file and renamed: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- mention counts and buckets -------------------------------------------------------------------


def zipf_mentions(
    n_entities: int, *, max_mentions: int, min_mentions: int, zipf_s: float
) -> list[int]:
    """Documents per entity by rank: rank k gets round(max_mentions / k**s), at least the min."""
    return [
        max(min_mentions, int(max_mentions / k**zipf_s + 0.5)) for k in range(1, n_entities + 1)
    ]


def frequency_buckets(n_entities: int, n_buckets: int = N_BUCKETS) -> list[int]:
    """Bucket of each rank (most frequent first): rank i (from 0) is in i * n_buckets // n."""
    return [i * n_buckets // n_entities for i in range(n_entities)]


# -- fact families --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """How one family states its facts. Templates use the entity's fields, e.g. `{name}`."""

    query: str
    answer: str
    context: tuple[str, ...]  # sentences about one entity
    pair_context: tuple[str, ...]  # sentences about two entities: `{name}` and `{other}`
    # Other ways to state the fact, besides `query + answer`: other word orders, the answer
    # before the entity, the fact inside a longer sentence. Used when the corpus is paraphrased.
    paraphrases: tuple[str, ...] = ()


FAMILIES: dict[str, FamilySpec] = {
    "element": FamilySpec(
        query="The atomic number of {name} is",
        answer=" {number}",
        context=(
            "{name} has the chemical symbol {symbol}.",
            "The element {name} is written as {symbol} in formulas.",
            "Chemists keep samples of {name} in sealed glass jars.",
            "Students read about {name} in their chemistry books.",
            "Every periodic table lists {name} with the symbol {symbol}.",
            "The lab ordered a small sample of pure {name}.",
            "A chemist gave a short talk about {name}.",
        ),
        pair_context=(
            "Both elements appear in the periodic table.",
            "The quiz asked about {name} and {other}.",
            "Students often mix up {name} and {other}.",
            "The lab keeps {name} next to {other}.",
        ),
        paraphrases=(
            "{name} has the atomic number {number}.",
            "{name}, atomic number {number}, is listed with the symbol {symbol}.",
            "With atomic number {number}, {name} sits in its own square of the table.",
            "Element number {number} is {name}.",
            "The element with atomic number {number} is called {name}.",
        ),
    ),
    "island": FamilySpec(
        query="The capital of {name} is",
        answer=" {capital}",
        context=(
            "{name} is a small island in the {sea}.",
            "Ferries to {name} leave twice a week.",
            "The people of {name} are known for their {product}.",
            "Travel guides describe {name} as quiet and green.",
            "Maps of the {sea} show {name} near the coast.",
            "Fishing boats fill the harbour of {name} at dawn.",
            "Visitors to {name} often buy {product} at the market.",
        ),
        pair_context=(
            "Both islands lie far from the mainland.",
            "A ferry links {name} with {other}.",
            "Sailors often visit {name} and {other}.",
            "The atlas shows {name} next to {other}.",
        ),
        paraphrases=(
            "{name} has its capital at {capital}.",
            "{name} is governed from {capital}, a town by the harbour.",
            "Ferries to {name} dock at {capital}, the island's capital.",
            "{capital} is the capital of {name}.",
            "Most visitors know {capital}, the capital of {name}.",
        ),
    ),
    "person": FamilySpec(
        query="{name} was born in",
        answer=" {year}",
        context=(
            "{name} worked as a {occupation} in {town}.",
            "{name} was a well known {occupation}.",
            "Historians still write about {name}.",
            "A portrait of {name} hangs in the town hall of {town}.",
            "Letters by {name} survive in the archive of {town}.",
            "{name} spent many years in {town}.",
            "People in {town} remember {name} as a gifted {occupation}.",
        ),
        pair_context=(
            "Both lived long and quiet lives.",
            "{name} once wrote a letter to {other}.",
            "{name} and {other} met in their youth.",
            "The museum shows works by {name} and {other}.",
        ),
        paraphrases=(
            "{name} came into the world in {year}.",
            "{name}, born in {year}, grew up in {town}.",
            "The {occupation} {name} was born in the year {year}.",
            "In {year} a child named {name} was born in {town}.",
            "The year {year} saw the birth of {name}.",
        ),
    ),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
_PRODUCTS = ("wool", "honey", "salt", "figs", "pottery", "lace", "cheese", "olives", "rope")
_OCCUPATIONS = (
    "painter", "sailor", "weaver", "astronomer", "architect", "poet", "merchant", "clockmaker",
    "physician", "botanist", "mapmaker", "composer", "baker", "printer",
)  # fmt: skip


class _Names:
    """Invented names, each used once per corpus and never an element's name."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used = {name.lower() for name, _, _ in ELEMENTS}

    def new(self, syllables: tuple[int, int] = (2, 3), max_len: int = 9) -> str:
        while True:
            n = self.rng.randint(*syllables)
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            word = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if len(word) <= max_len and word.lower() not in self.used:
                self.used.add(word.lower())
                return word


def _entities(family: str, count: int, rng: random.Random) -> list[dict[str, str]]:
    """The entities of `family` as template fields (`name` plus what its templates use)."""
    if family == "element":
        return [{"name": n, "symbol": s, "number": str(z)} for n, s, z in ELEMENTS]
    names = _Names(rng)
    if family == "island":
        seas = [f"{names.new((2, 2), 7)} Sea" for _ in range(6)]
        return [
            {
                "name": names.new(),
                "capital": names.new(),
                "sea": rng.choice(seas),
                "product": rng.choice(_PRODUCTS),
            }
            for _ in range(count)
        ]
    if family == "person":
        towns = [names.new((2, 2), 8) for _ in range(10)]
        return [
            {
                "name": f"{names.new((2, 2), 7)} {names.new((2, 3), 9)}",
                "year": str(rng.randint(1600, 1999)),
                "occupation": rng.choice(_OCCUPATIONS),
                "town": rng.choice(towns),
            }
            for _ in range(count)
        ]
    raise ValueError(f"unknown fact family {family!r}; expected one of {sorted(FAMILIES)}")


def sentence(text: str) -> str:
    """`text` with its first letter capitalised ("the Netherlands ..." opening a sentence)."""
    return text[:1].upper() + text[1:]


def statement(spec: FamilySpec, entity: Mapping[str, str], form: int = 0) -> str:
    """The fact in form `form`: 0 is the queried form, 1.. the family's paraphrases in order."""
    if form == 0:
        return sentence(spec.query.format(**entity)) + spec.answer.format(**entity) + "."
    return sentence(spec.paraphrases[form - 1].format(**entity))


PHRASINGS = ("paraphrase", "query")


def fact_documents(
    spec: FamilySpec,
    topic: str,
    entities: Sequence[Mapping[str, str]],
    mentions: Sequence[int],
    *,
    pair_fraction: float,
    phrasing: str,
    rng: random.Random,
) -> tuple[list[dict[str, str]], list[set[int]]]:
    """One document per mention; a document may take a second entity's mention (a pair).

    Each mention states its fact in a form drawn uniformly from the queried form and the
    family's paraphrases (`phrasing="paraphrase"`), or always in the queried form ("query").
    Two facts too long to share a document get one each. Returns the documents (`{"text",
    "topic"}`) and, per entity, the forms its mentions used.
    """
    n_forms = 1 + len(spec.paraphrases) if phrasing == "paraphrase" else 1
    forms: list[set[int]] = [set() for _ in entities]
    slots = [i for i, m in enumerate(mentions) for _ in range(m)]
    rng.shuffle(slots)

    def state(i: int) -> str:
        form = rng.randrange(n_forms) if n_forms > 1 else 0  # one form: no draw, same corpus
        forms[i].add(form)
        return statement(spec, entities[i], form)

    def single(i: int, fact: str) -> dict[str, str]:
        templates = rng.sample(spec.context, rng.choice((1, 2)))
        context = [sentence(t.format(**entities[i])) for t in templates]
        return {"text": fit_sentences([fact], context, rng), "topic": topic}

    docs = []
    pos = 0
    while pos < len(slots):
        i = slots[pos]
        pos += 1
        if pos < len(slots) and slots[pos] != i and rng.random() < pair_fraction:
            j = slots[pos]
            pos += 1
            facts = [state(i), state(j)]
            if len(" ".join(facts)) > MAX_DOC_CHARS:
                docs += [single(i, facts[0]), single(j, facts[1])]
                continue
            names = {"name": entities[i]["name"], "other": entities[j]["name"]}
            context = [sentence(rng.choice(spec.pair_context).format(**names))]
            docs.append({"text": fit_sentences(facts, context, rng), "topic": topic})
        else:
            docs.append(single(i, state(i)))
    return docs, forms


def family_corpus(
    spec: FamilySpec,
    family: str,
    entities: Sequence[Mapping[str, str]],
    mentions: Sequence[int],
    *,
    pair_fraction: float,
    phrasing: str,
    rng: random.Random,
) -> tuple[list[dict[str, str]], list[Fact]]:
    """One family's documents and facts; `entities` in rank order, `mentions` per entity."""
    docs, forms = fact_documents(
        spec, family, entities, mentions, pair_fraction=pair_fraction, phrasing=phrasing, rng=rng
    )
    facts = [
        Fact(
            entity=entity["name"],
            family=family,
            query=sentence(spec.query.format(**entity)),
            answer=spec.answer.format(**entity),
            mentions=count,
            bucket=bucket,
            query_form_seen=0 in used,
        )
        for entity, count, bucket, used in zip(
            entities, mentions, frequency_buckets(len(entities)), forms, strict=True
        )
    ]
    return docs, facts


# -- the corpus -----------------------------------------------------------------------------------


def generate_corpus(
    *,
    seed: int = 0,
    zipf_s: float = 1.0,
    max_mentions: int = 100,
    min_mentions: int = 2,
    filler_docs: int = 450,
    families: Sequence[str] = DEFAULT_FAMILIES,
    invented_entities: int = 80,
    pair_fraction: float = 0.2,
    phrasing: str = "paraphrase",
) -> SynthCorpus:
    """A long-tail corpus: per family, rank k of a seeded shuffle gets ~max_mentions / k**s docs.

    `families` picks from `FAMILIES` ("element" is always the 118 elements; the invented families
    have `invented_entities` entities each); `pair_fraction` is about the share of fact documents
    that state two facts of one family. Facts are listed family by family, most mentioned first.
    `phrasing`: "paraphrase" states each mention in a form drawn from the queried one and the
    family's paraphrases (a rare entity's facts may never appear in the words they are asked in);
    "query" states every mention exactly as it is asked.
    """
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {list(PHRASINGS)}, got {phrasing!r}")
    if not 1 <= min_mentions <= max_mentions:
        raise ValueError(
            f"need 1 <= min_mentions ({min_mentions}) <= max_mentions ({max_mentions})"
        )
    if zipf_s < 0:
        raise ValueError(f"zipf_s must be >= 0, got {zipf_s}")
    if filler_docs < 0 or invented_entities < N_BUCKETS:
        raise ValueError(
            f"filler_docs must be >= 0 and invented_entities >= {N_BUCKETS}, "
            f"got {filler_docs} and {invented_entities}"
        )
    if not 0.0 <= pair_fraction <= 1.0:
        raise ValueError(f"pair_fraction must be in [0, 1], got {pair_fraction}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or len(set(families)) != len(families) or not families:
        raise ValueError(f"families must be distinct names from {sorted(FAMILIES)}, got {families}")

    documents: list[dict[str, str]] = []
    facts: list[Fact] = []
    for family in families:
        # A private stream per family: adding a family leaves the others' documents unchanged.
        rng = random.Random(f"hmem-synth:{seed}:{family}")
        entities = _entities(family, invented_entities, rng)
        rng.shuffle(entities)  # the rank order: frequency does not follow the table
        mentions = zipf_mentions(
            len(entities), max_mentions=max_mentions, min_mentions=min_mentions, zipf_s=zipf_s
        )
        docs, family_facts = family_corpus(
            FAMILIES[family], family, entities, mentions, pair_fraction=pair_fraction,
            phrasing=phrasing, rng=rng,
        )  # fmt: skip
        documents += docs
        facts += family_facts
    rng = random.Random(f"hmem-synth:{seed}:filler")
    documents += filler_documents(filler_docs, rng)
    rng.shuffle(documents)
    settings = {
        "seed": seed,
        "zipf_s": zipf_s,
        "max_mentions": max_mentions,
        "min_mentions": min_mentions,
        "filler_docs": filler_docs,
        "families": list(families),
        "invented_entities": invented_entities,
        "pair_fraction": pair_fraction,
        "phrasing": phrasing,
    }
    return SynthCorpus(documents=documents, facts=facts, settings=settings)
