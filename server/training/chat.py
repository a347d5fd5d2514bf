"""Facts as chat: each fact's question, and a question-and-answer document in the chat template.

An anchor trained on documents alone answers a chat prompt with noise: it has never seen the
template's role lines. The demo corpus therefore also holds, for every fact, a one-turn
conversation rendered with the byte tokenizer's own chat template (`tokenizer.CHAT_TEMPLATE`):
the user asks the fact's question, the assistant gives the answer alone ("What is the atomic
number of Thulium?" -> "69."). Two things the first demo build with these conversations showed
(`docs/results.md`, "The demo converses"):

- A reply that restates the fact ("The atomic number of Thulium is 69.") makes the tiny anchor
  copy the entity's name from the question, and it miscopies rare names ("Chlorine" becomes
  "Calcium", and the number follows the wrong name). The answer alone has nothing to copy.
- Conversations alone, all in one template, are closer to each other than to their entities'
  documents: the clustering put the elements' conversations in one leaf, and every element's
  query, asked either way, was routed there, to one block that cannot hold 118 facts. So each
  conversation is followed, after its closing EOS, by a document of the corpus that states the
  fact: the text is then routed and clustered with its entity's documents, and the conversation
  still opens the text, right after the BOS, as a served chat prompt does.

A build puts each document between BOS and EOS, so a conversation is stored without the BOS its
rendering opens with: trained on, its first tokens are exactly the ids the chat template gives
the same turns, and its reply ends at the EOS that ends a served reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from server.chat_template import ChatTemplate
from server.training.facts import Fact
from server.training.tokenizer import BOS, CHAT_TEMPLATE, EOS

# What a user asks about each synthetic family's fact (`synth.FAMILIES`), the entity as {entity}.
QUESTIONS = {
    "element": "What is the atomic number of {entity}?",
    "island": "What is the capital of {entity}?",
    "person": "In which year was {entity} born?",
}
CHAT_TOPIC = "chat"
_SENTENCE = re.compile(r"[^.!?]*[.!?]")


def question(fact: Fact) -> str:
    """The question a user asks for `fact`; a ValueError for a family without one."""
    template = QUESTIONS.get(fact.family)
    if template is None:
        raise ValueError(f"no chat question for the family {fact.family!r}; have {list(QUESTIONS)}")
    return template.format(entity=fact.entity)


def reply(fact: Fact) -> str:
    """The assistant's answer: the fact's answer alone ("69"), without the closing period."""
    return fact.answer.strip()


def as_chat(facts: Sequence[Fact]) -> list[Fact]:
    """`facts` asked as chat questions: each query is the question, each answer the reply."""
    return [replace(f, query=question(f), answer=reply(f)) for f in facts]


def chat_documents(facts: Sequence[Fact], documents: Sequence[str]) -> list[dict[str, str]]:
    """A conversation for each mention of each fact: its question and its answer, followed by
    the document of `documents` that mentions it (`{"text", "topic"}`), as the build stores a
    document: without the rendering's opening BOS, the document after the closing EOS."""
    template = ChatTemplate(CHAT_TEMPLATE, origin="the byte tokenizer's chat template")
    context = {"bos_token": BOS, "eos_token": EOS}
    stating = _stating(facts, documents)
    docs = []
    for fact in facts:
        messages = [
            {"role": "user", "content": question(fact)},
            {"role": "assistant", "content": reply(fact) + "."},
        ]
        text = template.render(
            messages, add_generation_prompt=False, tools=None, documents=None, context=context
        )
        assert text.startswith(BOS), text
        assert text.endswith(EOS + "\n"), text
        for doc in stating.get(fact.statement, [""]):
            docs.append({"text": text[len(BOS) :] + doc, "topic": CHAT_TOPIC})
    return docs


def _stating(facts: Sequence[Fact], documents: Sequence[str]) -> dict[str, list[str]]:
    """The documents that state each fact in its query's words, by the fact's statement."""
    wanted = {f.statement for f in facts}
    found: dict[str, list[str]] = {}
    for doc in documents:
        for sentence in dict.fromkeys(s.strip() for s in _SENTENCE.findall(doc)):
            if sentence in wanted:
                found.setdefault(sentence, []).append(doc)
    return found
