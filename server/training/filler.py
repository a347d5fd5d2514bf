"""Filler for generated corpora: short everyday documents that state no facts.

They give the router's clusters something to form beside the fact families, as general text
does in a real corpus. Each is 2-3 template sentences of one topic (`{"text", "topic"}`).
"""

from __future__ import annotations

import random

MAX_DOC_CHARS = 199  # generated documents are short: a few sentences


def fit_sentences(facts: list[str], context: list[str], rng: random.Random) -> str:
    """Shuffle the sentences together, dropping context until the document is short enough."""
    while True:
        sentences = facts + context
        rng.shuffle(sentences)
        text = " ".join(sentences)
        if len(text) <= MAX_DOC_CHARS or not context:
            return text
        context = context[:-1]


# topic -> (sentence templates, slot -> choices)
_FILLER: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "weather": (
        ("The morning was {adj} and the wind came from the {dir}.",
         "By noon the clouds over the {place} had cleared.", "Rain is expected again {when}.",
         "A {adj} breeze kept the {place} cool all day.",
         "Forecasters warned of fog over the {place} {when}."),
        {"adj": ("cold", "mild", "grey", "bright", "damp", "windy"),
         "dir": ("north", "south", "east", "west"),
         "place": ("valley", "hills", "bay", "city", "fields"),
         "when": ("tomorrow", "next week", "tonight", "on Sunday")}),
    "cooking": (
        ("Chop the {veg} and fry it gently in butter.",
         "Add a pinch of {spice} before the soup boils.",
         "Bake the bread until the crust turns golden.",
         "Serve the {veg} warm with a little {spice}.",
         "Let the {dish} rest for ten minutes before eating."),
        {"veg": ("onion", "carrot", "leek", "cabbage", "pumpkin", "spinach"),
         "spice": ("salt", "pepper", "cumin", "nutmeg", "thyme"),
         "dish": ("stew", "pie", "roast", "risotto", "cake")}),
    "travel": (
        ("The train to the {place} leaves early in the morning.",
         "Pack a light {item} for the long walk.",
         "The old road winds through the {place} for hours.",
         "Tickets for the night bus sold out {when}.",
         "We stopped at a small inn near the {place}."),
        {"place": ("coast", "mountains", "border", "lakes", "old town"),
         "item": ("coat", "bag", "blanket", "map", "lunch"),
         "when": ("quickly", "by noon", "last week", "on Friday")}),
    "sport": (
        ("The {team} team won the match after extra time.",
         "The runners trained on the track every {when}.",
         "Fans waved flags as the {team} side scored.",
         "The coach asked the players to rest before the final.",
         "A late goal gave the {team} club the cup."),
        {"team": ("home", "visiting", "young", "local", "city"),
         "when": ("morning", "evening", "weekend", "day")}),
    "music": (
        ("The orchestra played a slow piece for {instrument}.",
         "She practised the {instrument} for an hour each day.",
         "The concert hall was full on {day} night.",
         "A quiet song on the {instrument} closed the show.",
         "The choir sang three songs before the break."),
        {"instrument": ("violin", "piano", "flute", "cello", "guitar"),
         "day": ("Friday", "Saturday", "Sunday", "Monday")}),
    "gardening": (
        ("Plant the {plant} in rich soil after the last frost.",
         "Water the {plant} in the evening when the sun is low.",
         "Snails ate most of the {plant} this spring.",
         "A layer of mulch keeps the beds moist in {season}.",
         "The {plant} bloomed early this {season}."),
        {"plant": ("tomatoes", "roses", "beans", "tulips", "lettuce", "herbs"),
         "season": ("summer", "spring", "autumn")}),
    "home": (
        ("The kitchen window needs a new coat of paint.",
         "We moved the {thing} closer to the fireplace.",
         "The old {thing} creaks whenever someone sits on it.",
         "Clean the {room} before the guests arrive.", "A lamp in the {room} stayed on all night."),
        {"thing": ("chair", "sofa", "table", "bookcase", "bed"),
         "room": ("hall", "kitchen", "attic", "study", "porch")}),
    "books": (
        ("The library added a shelf of {genre} novels.",
         "He read the {genre} story twice in one week.",
         "The author signed copies at the bookshop {when}.",
         "A worn copy of the book lay on the {thing}.",
         "Readers praised the slow and careful ending."),
        {"genre": ("mystery", "adventure", "detective", "travel", "history"),
         "when": ("on Saturday", "last night", "in the spring"),
         "thing": ("desk", "bench", "windowsill", "table")}),
}  # fmt: skip


def filler_documents(count: int, rng: random.Random) -> list[dict[str, str]]:
    """`count` documents of 2-3 template sentences on everyday topics, stating no facts."""
    topics = sorted(_FILLER)
    docs = []
    for _ in range(count):
        topic = rng.choice(topics)
        templates, slots = _FILLER[topic]
        chosen = rng.sample(templates, rng.choice((2, 3)))
        sentences = [t.format(**{k: rng.choice(v) for k, v in slots.items()}) for t in chosen]
        docs.append({"text": fit_sentences([], sentences, rng), "topic": topic})
    return docs
