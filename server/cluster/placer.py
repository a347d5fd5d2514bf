"""What the ingress knows of a request before it is placed: the paths of its prompts.

The ingress reads the bank's manifest, router and tokenizer (no anchor, no tiers) and, for a
completion or a chat request, routes each prompt exactly as a replica's resolver would (the
same route text: a chat's user turns, a token prompt's decoded text; the same `Router`). The
first prompt's path places the request (`Placement.route`); every prompt's path travels with it
as a hint, so the replica does not embed the same text again.

It validates nothing it does not need: a body that does not parse, or a memory request that
names no path (mode `off`, `generic`), is placed anywhere, and the replica answers it, errors
included, as a single server would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial

from pydantic import ValidationError

from server.api.schemas.chat import ChatCompletionRequest
from server.api.schemas.completions import CompletionRequest
from server.api.schemas.memory import PathRequest
from server.bank.reader import Bank
from server.bank.router_file import ROUTER_NAME
from server.cluster.bridge import Path, Route
from server.model.checkpoint import read_config
from server.routing.tree import Router, node_ids
from server.serving.prompts import route_text
from server.tokenizer import AnchorTokenizer

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
PREFETCH = "/v1/memory/prefetch"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request should go: its first prompt's route, every prompt's path, streaming."""

    route: Route | None = None
    hints: dict[str, Path] = field(default_factory=dict)
    stream: bool = False


class Placer:
    """Routes the prompts of requests with the bank's own router."""

    def __init__(
        self, bank: Bank, router: Router, tokenizer: AnchorTokenizer, executor: Executor | None
    ) -> None:
        m = bank.manifest
        self.bank = bank
        self.router = router
        self.tokenizer = tokenizer
        self.branching = m.branching
        self.depth = m.levels
        self.memory_levels = list(m.memory_levels())
        self.fingerprint = bank.fingerprint()
        self.executor = executor

    @classmethod
    def open(cls, bank_path: str, *, executor: Executor | None = None) -> Placer:
        bank = Bank.open(bank_path, check_files=False)
        m = bank.manifest
        router = Router.load(
            bank.path / ROUTER_NAME, m.embedder, branching=m.branching, levels=m.levels
        )
        tokenizer = AnchorTokenizer.from_dir(bank.anchor_dir, read_config(bank.anchor_dir))
        return cls(bank, router, tokenizer, executor)

    def route_of(self, path: Sequence[int]) -> Route | None:
        """The (level, node) pairs of `path`'s memory levels; None if it is not a valid path."""
        if len(path) != self.depth or not all(0 <= i < self.branching for i in path):
            return None
        nodes = node_ids(path, self.branching)
        return tuple((level, nodes[level - 1]) for level in self.memory_levels)

    def subtrees(self, route: Route | None) -> int:
        """How many subtrees there are at the first level of `route` (0 without a route)."""
        return 0 if not route else int(self.branching ** route[0][0])

    async def _path(self, text: str) -> Path:
        if self.router.routes_sparsely:
            _, choices, _ = self.router.route_one(text)
        else:
            loop = asyncio.get_running_loop()
            _, choices, _ = await loop.run_in_executor(
                self.executor, partial(self.router.route_one, text)
            )
        return tuple(choices)

    async def place(self, url_path: str, body: bytes) -> Placement:
        """The placement of a request to `url_path` with JSON `body`."""
        if url_path == PREFETCH:
            try:
                return Placement(self.route_of(PathRequest.model_validate_json(body).path))
            except ValidationError:
                return Placement()
        texts: list[str]
        try:
            if url_path == COMPLETIONS:
                req = CompletionRequest.model_validate_json(body)
                texts = [
                    p if isinstance(p, str) else self.tokenizer.decode(list(p))
                    for p in req.prompts()
                ]
                memory, stream = req.memory.request(), req.stream
            elif url_path == CHAT:
                chat = ChatCompletionRequest.model_validate_json(body)
                texts = [route_text(chat.turns())]
                memory, stream = chat.memory.request(), chat.stream
            else:
                return Placement()
        except Exception:  # a body the replica will refuse (or a token id no text decodes to)
            return Placement()
        if memory.mode != "auto" or not self.memory_levels or not texts:
            return Placement(stream=stream)
        if memory.path is not None:
            return Placement(self.route_of(memory.path), stream=stream)
        hints: dict[str, Path] = {}
        for text in texts:
            if text not in hints:
                hints[text] = await self._path(text)
        return Placement(self.route_of(hints[texts[0]]), hints, stream)
