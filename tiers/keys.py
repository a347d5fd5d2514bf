"""Block keys: which block (`BlockKey`), and the name its bytes have in every tier.

A block is `{bank_id}/L{level}/{node_id}` (`BlockKey`): what the cache, the router and the
blocklist speak of. In a tier, a block's copy is named after its content too:
`{bank_id}/L{level}/{node_id}.{sha256[:16]}` (`storage_key`). A rebuilt bank's blocks therefore
have new names, and a copy left by an earlier build is never read, trusted or counted as present
(docs/tiers.md). Tiers accept any key of slash-separated segments from a fixed character set.
Validation rejects everything that could escape a tier's root or confuse an S3 prefix: `..`,
absolute paths, empty segments, control characters, backslashes, and keys longer than
`MAX_KEY_BYTES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tiers.errors import InvalidKeyError

MAX_KEY_BYTES = 512
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_KEY_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_BANK_ID_RE = re.compile(_SEGMENT)
_BLOCK_RE = re.compile(
    rf"(?P<bank>{_SEGMENT})/L(?P<level>[1-9][0-9]?)/(?P<node>0|[1-9][0-9]{{0,11}})"
)
_STORED_RE = re.compile(rf"(?P<block>{_BLOCK_RE.pattern})\.(?P<content>[0-9a-f]{{16}})")
CONTENT_CHARS = 16  # hex digits of a block's sha256 in its storage name: 64 bits


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a safe block key, else raise `InvalidKeyError`."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"block key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("block key is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"block key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidKeyError("block key must be relative, not an absolute path")
    if _KEY_RE.fullmatch(key) is None:
        shown = key if len(key) <= 64 else key[:61] + "..."
        raise InvalidKeyError(
            f"invalid block key {shown!r}: use '/'-separated segments of letters, digits, "
            "'_', '.' and '-', each starting with a letter or digit (no '..', no empty segments)"
        )
    return key


@dataclass(frozen=True, slots=True, order=True)
class BlockKey:
    """The key of one cluster's memory block: bank, level (1 = coarsest) and node id."""

    bank_id: str
    level: int
    node: int

    def __post_init__(self) -> None:
        if _BANK_ID_RE.fullmatch(self.bank_id) is None:
            raise InvalidKeyError(f"invalid bank id {self.bank_id!r}")
        if not 1 <= self.level <= 99:
            raise InvalidKeyError(f"level must be in 1..99, got {self.level}")
        if self.node < 0:
            raise InvalidKeyError(f"node id must be >= 0, got {self.node}")

    def __str__(self) -> str:
        return f"{self.bank_id}/L{self.level}/{self.node}"

    @classmethod
    def parse(cls, key: str) -> BlockKey:
        """Parse `{bank_id}/L{level}/{node_id}`; raise `InvalidKeyError` on anything else."""
        m = _BLOCK_RE.fullmatch(validate_key(key))
        if m is None:
            raise InvalidKeyError(f"{key!r} is not a block key of the form bank/L<level>/<node>")
        return cls(m["bank"], int(m["level"]), int(m["node"]))


def storage_key(key: BlockKey | str, sha256: str | None) -> str:
    """The name of a block's copy in a tier: its key and the first 16 hex digits of its sha256.

    Without a digest (a store that verifies nothing, as benchmarks of raw tiers use), the name
    is the key itself.
    """
    if sha256 is None:
        return str(key)
    if len(sha256) < CONTENT_CHARS:
        raise InvalidKeyError(f"a sha256 of {len(sha256)} hex digits is too short for {key}")
    return f"{key}.{sha256[:CONTENT_CHARS].lower()}"


def parse_storage_key(name: str) -> tuple[BlockKey, str] | None:
    """(the block, its content prefix) of a storage name; None for any other name."""
    m = _STORED_RE.fullmatch(name)
    if m is None:
        return None
    return BlockKey(m["bank"], int(m["level"]), int(m["node"])), m["content"]
