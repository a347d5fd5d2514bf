"""The engine tests' fixtures: the tiny random anchor, and a factory of started engines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch

from server.engine.engine import Engine
from server.model.anchor import Anchor
from tests.server.engine.engine_helpers import CFG


@pytest.fixture(scope="module")
def model() -> Anchor:
    torch.manual_seed(0)
    anchor = Anchor(CFG).eval()
    with torch.no_grad():
        for name, p in anchor.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.1)
    return anchor


@pytest.fixture
async def engines(model: Anchor) -> AsyncIterator[Callable[..., Engine]]:
    """A factory of started engines on the test anchor, all closed at the end."""
    made: list[Engine] = []

    def make(**kwargs: Any) -> Engine:
        engine = Engine(model, **kwargs)
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.close()
