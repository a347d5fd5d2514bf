"""`manifest.json`: what a bank holds, validated field by field (bank format version 1).

The manifest names the bank, its memory type and shape (levels, branching, widths per level, the
anchor dimensions blocks must fit, the storage dtype), the router's embedder spec, and an index of
every block and generic-memory file with its size and sha256. Tiers verify every read against
that index (`digests()`), so the manifest is the bank's root of trust. It is only ever read as
JSON; every problem raises `BankFormatError` naming the field.

The storage dtype `int8` (FFN banks only) came after the first banks and needed no new version:
a float bank's manifest reads as before, and an older hmem refuses `dtype: "int8"` by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.bank.errors import BankFileMissingError, BankFormatError
from server.bank.layout import (
    FLOAT_DTYPES,
    INT8,
    BankDType,
    ModelShape,
    Shape,
    block_shapes,
    payload_bytes,
)
from server.model.memory import LORA_TARGETS, MemoryType
from tiers.errors import InvalidKeyError
from tiers.keys import BlockKey
from tiers.store import BlockDigest

FORMAT = "hmem-bank"
VERSION = 1
MANIFEST_NAME = "manifest.json"
BANK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_GENERIC_RE = re.compile(r"L([1-9][0-9]*)")


class BlockEntry(BaseModel):
    """One file of the bank: its size in bytes and sha256 (64 lowercase hex digits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bytes: Annotated[int, Field(strict=True, ge=0)]
    sha256: Annotated[str, Field(strict=True)]

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if _SHA256_RE.fullmatch(value) is None:
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value

    def digest(self) -> BlockDigest:
        return BlockDigest(self.bytes, self.sha256)


class BankManifest(BaseModel):
    """The contents of `manifest.json` (bank format version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["hmem-bank"]
    version: Literal[1]
    bank_id: Annotated[str, Field(strict=True)]
    memory_type: MemoryType
    levels: Annotated[int, Field(strict=True, ge=1, le=8)]
    branching: Annotated[int, Field(strict=True, ge=2, le=256)]
    widths: list[Annotated[int, Field(strict=True, ge=0)]]  # r per level; 0: no memory
    dtype: BankDType
    model: ModelShape
    lora_targets: list[str] | None = None
    embedder: dict[str, Any]  # owned by the router; "kind" and "dim" are all the bank needs
    generic: dict[str, BlockEntry] = Field(default_factory=dict)  # "L{level}" -> file
    blocks: dict[str, BlockEntry] = Field(default_factory=dict)  # block key -> file

    # -- validation -----------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _format_and_version_first(cls, data: Any) -> Any:
        # A future version may have different fields: say so before listing them as extra.
        if isinstance(data, Mapping):
            if "format" in data and data["format"] != FORMAT:
                raise ValueError(f"format: {data['format']!r} is not {FORMAT!r}")
            version = data.get("version", VERSION)
            if version != VERSION or type(version) is not int:
                raise ValueError(
                    f"version: unsupported bank format version {version!r}; "
                    f"this hmem reads version {VERSION}"
                )
        return data

    @field_validator("bank_id")
    @classmethod
    def _bank_id(cls, value: str) -> str:
        if BANK_ID_RE.fullmatch(value) is None:
            raise ValueError(
                f"invalid bank id {value!r}: 1-128 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("embedder")
    @classmethod
    def _embedder(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("kind"), str) or not value["kind"]:
            raise ValueError("embedder.kind must be a non-empty string")
        dim = value.get("dim")
        if type(dim) is not int or dim <= 0:
            raise ValueError(f"embedder.dim must be an integer > 0, got {dim!r}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"embedder must be plain JSON: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BankManifest:
        if len(self.widths) != self.levels:
            raise ValueError(
                f"widths: {len(self.widths)} widths given for {self.levels} levels "
                "(one width r per level, 0 for a level without memory)"
            )
        self._check_lora_targets()
        if self.dtype == INT8 and self.memory_type is not MemoryType.FFN:
            raise ValueError(
                f"dtype: int8 storage is for ffn memories only, not {self.memory_type}; store a "
                f"{self.memory_type} bank in {', '.join(FLOAT_DTYPES)}"
            )
        for name in self.generic:
            m = _GENERIC_RE.fullmatch(name)
            if m is None or not 1 <= int(m[1]) <= self.levels:
                raise ValueError(f"generic: key {name!r} must be L1..L{self.levels}")
            if self.widths[int(m[1]) - 1] == 0:
                raise ValueError(f"generic: {name} has width 0, so it has no generic memory")
        for key in self.blocks:
            self._check_block_key(key)
        return self

    def _check_lora_targets(self) -> None:
        targets = self.lora_targets
        if self.memory_type is not MemoryType.LORA:
            if targets is not None:
                raise ValueError(f"lora_targets: must be null for a {self.memory_type} bank")
            return
        if not targets:
            raise ValueError(f"lora_targets: a lora bank needs targets from {list(LORA_TARGETS)}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora_targets: unknown {unknown}; expected from {LORA_TARGETS}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora_targets: duplicates in {targets}")

    def _check_block_key(self, key: str) -> None:
        try:
            parsed = BlockKey.parse(key)
        except InvalidKeyError as exc:
            raise ValueError(f"blocks: key {key!r}: {exc}") from None
        if parsed.bank_id != self.bank_id:
            raise ValueError(f"blocks: key {key!r} is not in bank {self.bank_id!r}")
        if parsed.level > self.levels:
            raise ValueError(f"blocks: key {key!r}: level {parsed.level} > levels {self.levels}")
        if self.widths[parsed.level - 1] == 0:
            raise ValueError(f"blocks: key {key!r}: level {parsed.level} has width 0, no blocks")
        n_nodes = self.n_nodes(parsed.level)
        if parsed.node >= n_nodes:
            raise ValueError(
                f"blocks: key {key!r}: node {parsed.node} out of range for level "
                f"{parsed.level} (branching {self.branching}: 0..{n_nodes - 1})"
            )

    # -- helpers --------------------------------------------------------------------------------

    def n_nodes(self, level: int) -> int:
        """Clusters at `level`: node ids are 0..branching**level - 1."""
        return int(self.branching**level)

    def width(self, level: int) -> int:
        self._check_level(level)
        return self.widths[level - 1]

    def memory_levels(self) -> list[int]:
        """The levels that hold memory (width > 0)."""
        return [lvl for lvl, r in enumerate(self.widths, start=1) if r > 0]

    def block_key(self, level: int, node: int) -> BlockKey:
        self._check_level(level)
        if not 0 <= node < self.n_nodes(level):
            raise BankFormatError(
                f"node {node} out of range for level {level} (0..{self.n_nodes(level) - 1})"
            )
        return BlockKey(self.bank_id, level, node)

    def digests(self) -> dict[str, BlockDigest]:
        """Block key -> expected size and sha256, for `tiers.TieredStore`."""
        return {key: entry.digest() for key, entry in self.blocks.items()}

    def shapes_for_width(self, width: int) -> dict[str, Shape]:
        """Tensor shapes of a block of this bank with width (r) `width`, as stored (an int8
        bank's with their scales)."""
        return block_shapes(
            self.memory_type,
            self.model,
            width=width,
            lora_targets=self.lora_targets,
            dtype=self.dtype,
        )

    def block_shapes(self, level: int) -> dict[str, Shape]:
        """Tensor name -> shape of a block (or the generic memory) of `level`."""
        width = self.width(level)
        if width == 0:
            raise BankFormatError(f"level {level} has width 0: it holds no memory")
        return self.shapes_for_width(width)

    def fetch_bytes(self, path_levels: Iterable[int] | None = None) -> int:
        """Tensor bytes fetched for one path over `path_levels` (all levels by default)."""
        levels = range(1, self.levels + 1) if path_levels is None else path_levels
        total = 0
        for level in levels:
            if self.width(level) > 0:
                total += payload_bytes(self.block_shapes(level), self.dtype)
        return total

    def bank_bytes(self) -> int:
        """Tensor bytes of a complete bank: every node of every level with memory."""
        return sum(
            self.n_nodes(level) * payload_bytes(self.block_shapes(level), self.dtype)
            for level in self.memory_levels()
        )

    def _check_level(self, level: int) -> None:
        if not 1 <= level <= self.levels:
            raise BankFormatError(f"level must be in 1..{self.levels}, got {level}")

    def to_json(self) -> str:
        """The manifest as JSON: one line per field and per file entry, blocks in key order."""
        data = self.model_dump(mode="json")
        data["blocks"] = dict(sorted(data["blocks"].items(), key=lambda kv: _sort_key(kv[0])))
        data["generic"] = dict(sorted(data["generic"].items(), key=lambda kv: int(kv[0][1:])))
        fields = []
        for name, value in data.items():
            if name in ("blocks", "generic") and value:
                entries = ",\n".join(
                    f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()
                )
                fields.append(f" {json.dumps(name)}: {{\n{entries}\n }}")
            else:
                fields.append(f" {json.dumps(name)}: {json.dumps(value)}")
        return "{\n" + ",\n".join(fields) + "\n}\n"


def _sort_key(key: str) -> tuple[int, int]:
    parsed = BlockKey.parse(key)
    return parsed.level, parsed.node


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the field (dotted path) it is about."""
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" if field else msg)
    return f"invalid bank manifest {source}: " + "; ".join(lines)


def parse_manifest(
    data: Mapping[str, Any] | str | bytes, *, source: str = MANIFEST_NAME
) -> BankManifest:
    """Validate a manifest given as parsed JSON or JSON text; `BankFormatError` names the field."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankFormatError(f"bank manifest {source} is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise BankFormatError(f"bank manifest {source} must be a JSON object")
    try:
        return BankManifest.model_validate(data)
    except ValidationError as exc:
        raise BankFormatError(format_validation_error(exc, source)) from None


def load_manifest(path: str | Path) -> BankManifest:
    """Read and validate `manifest.json` (or `<bank dir>/manifest.json`). JSON only."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise BankFileMissingError(path, "its manifest") from None
    return parse_manifest(text, source=str(path))
