"""The values `TieredStore` speaks: what a block must be, how its bytes become a value, and what
a fetch of it returns.

Apart from the store so that the bank manifest, the chain walk (`tiers.walk`) and callers name
them without the store's machinery; `tiers.store` and `tiers` export them as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tiers.base import to_bytes
from tiers.errors import TierError
from tiers.keys import BlockKey

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class BlockDigest:
    """What a block must be: its size and sha256 (hex), from the bank manifest."""

    nbytes: int
    sha256: str


class BlockCodec(Protocol[V]):
    """Turns verified bytes into the value the cache holds, on the tier's worker thread."""

    def decode(self, view: memoryview) -> V: ...

    def nbytes(self, value: V) -> int: ...


class BytesCodec:
    """The identity codec: blocks stay bytes."""

    def decode(self, view: memoryview) -> bytes:
        return to_bytes(view)

    def nbytes(self, value: bytes) -> int:
        return len(value)


@dataclass(frozen=True, slots=True)
class StoredBlock(Generic[V]):
    """A decoded block in the RAM cache, with the tier it was read from."""

    value: V
    nbytes: int
    source: str
    corrupt: tuple[str, ...] = ()  # tiers whose copy failed verification in the load that read it


@dataclass(frozen=True, slots=True)
class Fetched(Generic[V]):
    """The outcome of fetching one block. `value` is None exactly when `error` is set."""

    key: BlockKey
    value: V | None
    tier: str | None  # the tier that served it ("ram" for a cache hit); None on failure
    cached: bool
    seconds: float
    error: TierError | None = None
    # Tiers whose copy failed verification during this load (repaired in the background when
    # another tier served a good copy); empty on RAM hits.
    corrupt: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None
