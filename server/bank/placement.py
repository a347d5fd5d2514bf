"""Where a push or verify puts each level: a placement from `--tier LEVEL=URI` flags, checked.

A placement says which tiers hold each level (home first, then replicas). `hmem bank push` and
`hmem bank verify` take it from flags (`placement_from_flags`) or from the `[store]` settings;
`check_placement` refuses one that leaves a level of the bank without a tier. Every mistake is a
one-line `ConfigError` naming the flag.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

from pydantic import ValidationError

from server.bank.manifest import BankManifest
from tiers.config import (
    DiskTierSettings,
    LmdbTierSettings,
    S3TierSettings,
    StoreConfig,
    tier_from_uri,
)
from tiers.errors import ConfigError
from tiers.keys import BlockKey

AnyTierSettings = LmdbTierSettings | DiskTierSettings | S3TierSettings
TIER_NAMES = {"lmdb": "flash", "disk": "disk", "s3": "cloud"}  # tier kind -> name in flags mode
_LEVEL_RE = re.compile(r"[1-9][0-9]*")


def placement_from_flags(
    tier_flags: Sequence[str],
    *,
    bank_id: str,
    levels: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> StoreConfig:
    """A `StoreConfig` from `LEVEL=URI` flags (`1=lmdb:/data/flash`, `3=s3://bucket/prefix`).

    One URI named for several levels is one shared tier; a level named twice gets a home and a
    replica, in flag order. Tiers are named after their kind (`flash`, `disk`, `cloud`, then
    `disk2`, ...). S3 tiers get `endpoint_url` and `region`; credentials come from boto3's chain
    (AWS_ACCESS_KEY_ID etc.). With `levels`, a level past the bank's last is refused. Every
    mistake is a one-line `ConfigError` (a `ValueError`) naming the flag.
    """
    if not tier_flags:
        raise ConfigError("no tiers given: add --tier LEVEL=URI for each level of the bank")
    tiers: dict[str, AnyTierSettings] = {}
    placement: dict[int, list[str]] = {}
    for flag in tier_flags:
        level_text, sep, uri = flag.partition("=")
        level_text, uri = level_text.strip(), uri.strip()
        if not sep or not uri:
            raise ConfigError(f"--tier {flag!r}: expected LEVEL=URI, as in 1=lmdb:/data/flash")
        if _LEVEL_RE.fullmatch(level_text) is None:
            raise ConfigError(f"--tier {flag!r}: level {level_text!r} is not a number >= 1")
        level = int(level_text)
        if levels is not None and level > levels:
            raise ConfigError(f"--tier {flag!r}: bank {bank_id!r} has levels 1..{levels} only")
        settings = _tier_settings(flag, uri, endpoint_url=endpoint_url, region=region)
        name = next((n for n, s in tiers.items() if s == settings), None)
        if name is None:
            name = _fresh_name(TIER_NAMES[settings.kind], tiers)
            tiers[name] = settings
        names = placement.setdefault(level, [])
        if name in names:
            raise ConfigError(f"--tier {flag!r}: level {level} already has this tier")
        names.append(name)
    try:
        return StoreConfig.model_validate({"tiers": tiers, "placement": placement})
    except ValidationError as exc:  # pragma: no cover - the flags above are checked already
        raise ConfigError(f"--tier: {_one_line(exc)}") from None


def _tier_settings(
    flag: str, uri: str, *, endpoint_url: str | None, region: str | None
) -> AnyTierSettings:
    extra = {"endpoint_url": endpoint_url, "region": region} if uri.startswith("s3://") else {}
    try:
        settings = tier_from_uri(uri, **extra)
    except ConfigError as exc:
        raise ConfigError(f"--tier {flag!r}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"--tier {flag!r}: {_one_line(exc)}") from None
    # Normalised so that two spellings of one place (`./d`, `/abs/d`; `p`, `p/`) are one tier.
    if isinstance(settings, LmdbTierSettings):
        return settings.model_copy(update={"path": settings.path.expanduser().resolve()})
    if isinstance(settings, DiskTierSettings):
        return settings.model_copy(update={"root": settings.root.expanduser().resolve()})
    prefix = settings.prefix.strip("/")
    return settings.model_copy(update={"prefix": f"{prefix}/" if prefix else ""})


def _fresh_name(base: str, taken: Mapping[str, object]) -> str:
    n = 1
    while (name := base if n == 1 else f"{base}{n}") in taken:
        n += 1
    return name


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}"
        for e in exc.errors(include_url=False)
    )


def tier_location(settings: AnyTierSettings) -> str:
    """Where a tier is, as a URI without credentials or endpoint (for summaries)."""
    if isinstance(settings, LmdbTierSettings):
        return f"lmdb:{settings.path}"
    if isinstance(settings, DiskTierSettings):
        return str(settings.root)
    return f"s3://{settings.bucket}/{settings.prefix}"


def check_placement(
    manifest: BankManifest,
    placement: Mapping[int, Sequence[str]],
    tier_names: Collection[str],
    *,
    every_level: bool = True,
) -> None:
    """Every level with blocks has a tier, no level is past the bank's last, every tier is known.

    Checked before any tier is opened (the CLI) and again by `push_bank` and `verify_bank`.
    """
    for level, names in sorted(placement.items()):
        if not 1 <= level <= manifest.levels:
            raise ConfigError(
                f"placement.{level}: bank {manifest.bank_id!r} has levels 1..{manifest.levels}"
            )
        if not names:
            raise ConfigError(f"placement.{level}: name at least one tier")
        for name in names:
            if name not in tier_names:
                raise ConfigError(f"placement.{level}: unknown tier {name!r}")
    levels_with_blocks = sorted({BlockKey.parse(k).level for k in manifest.blocks})
    for level in levels_with_blocks if every_level else ():
        if level not in placement:
            raise ConfigError(
                f"level {level} of bank {manifest.bank_id!r} has blocks but no tier: "
                f"add --tier {level}=URI (or placement.{level} in the settings)"
            )
