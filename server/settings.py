"""Settings of an hmem process: one pydantic-settings class, built by the CLI and passed in.

Sources, strongest first: values given by the caller (CLI flags), `HMEM_*` environment variables
(`__` separates nested groups: `HMEM_STORE__DEADLINE_S=0.5`), an optional TOML or JSON file,
then defaults. Nothing is built at import time.

A name that is not a setting is refused, never ignored: an `HMEM_*` environment variable or a
settings-file key that names no field stops start-up with one line that names the nearest valid
one (a typo such as `HMEM_API_KEY` for `HMEM_API_KEYS` would otherwise start a server without
its keys).
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from server.chat_template import ChatTemplate
from tiers import StoreConfig
from tiers.errors import ConfigError

MemoryMode = Literal["auto", "off", "generic"]
MEMORY_MODES: tuple[MemoryMode, ...] = ("auto", "off", "generic")


class KeyPolicy(BaseModel):
    """What one API key may do with memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modes: list[MemoryMode] = Field(
        default_factory=lambda: list(MEMORY_MODES), description="memory modes allowed"
    )
    levels: list[int] | None = Field(None, description="levels it may use; None: every level")
    explicit_path: bool = Field(True, description="may it name a cluster path itself")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HMEM_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # What is served. No bank: the demo bank, its blocks on the embedded default tiers.
    bank: Path | None = Field(None, description="bank directory; None serves the demo bank")
    data_dir: Path | None = Field(
        None, description="state: default tiers, blocklist; None: $HMEM_DATA_DIR or XDG"
    )
    model_name: str | None = Field(None, description="model id in the API; None: the bank id")
    store: StoreConfig | None = Field(None, description="tiers and placement; None: embedded")
    cloud_endpoint: str | None = Field(
        None, description="S3 endpoint for the embedded default's deepest level (else disk)"
    )
    cloud_bucket: str = Field("hmem", min_length=3, max_length=63)
    seed_verify_max_bytes: ByteSize = Field(
        ByteSize(1 << 30),
        description="embedded default: at start, copies already in the tiers are read back "
        "and sha256-checked when the bank's blocks total at most this; above, name and size",
    )

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_request_bytes: ByteSize = Field(
        ByteSize(4 << 20),
        gt=0,
        description="a request body over this is refused with 413 before it is read further",
    )

    # The engine.
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    weights: Literal["float", "int8"] = Field(
        "float",
        description="the anchor's projection and output weights: in `dtype`, or int8 with a "
        "scale per output channel (half the bytes held and read per token; docs/serving.md)",
    )
    max_batch: int = Field(16, ge=1, le=1024, description="sequences decoded together")
    context_length: int | None = Field(
        None,
        ge=2,
        description="tokens a sequence may hold, prompt and completion (at least one of each); "
        "sizes the KV cache: 2 x n_layers x max_batch x n_kv_heads x context_length x head_dim "
        "x dtype bytes. None: the model's max_position_embeddings; more is refused at start",
    )
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot; beyond: 429")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask")
    max_n: int = Field(8, ge=1, le=128, description="largest n (choices per prompt)")
    max_prompts: int = Field(32, ge=1, description="largest list of prompts in one request")
    fallback: Literal["generic", "none"] = Field(
        "generic", description="what replaces a blocked, disabled or late level"
    )
    memory_deadline_s: float | None = Field(
        None, gt=0, description="wait for a path's blocks; None: the store's deadline"
    )
    warmup: bool = True
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="the model thread's torch threads; None: every usable core"
    )
    chat_template: Path | None = Field(
        None, description="Jinja2 chat template file; None: the anchor's own (tokenizer_config)"
    )

    # Access.
    api_keys: dict[Annotated[str, Field(min_length=8)], KeyPolicy] = Field(
        default_factory=dict, description="bearer key -> memory policy; empty: no auth"
    )
    admin_key: SecretStr | None = Field(
        None, min_length=8, description="bearer key of the admin endpoints"
    )
    blocklist_file: Path | None = Field(
        None,
        description="blocked clusters, persisted; None: blocklists/{bank}-{build}.json "
        "in data_dir, one per bank build",
    )

    @field_validator("chat_template")
    @classmethod
    def _chat_template_parses(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        if not path.is_file():
            raise ValueError(f"chat template file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"chat template file {path} cannot be read: {exc}") from None
        ChatTemplate(text, origin=str(path))  # a syntax error: ChatTemplateError, a ValueError
        return path


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags, environment and `config_file`; errors name the field to fix."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"settings file {config_file} does not exist")
    check_environment(os.environ)

    class _Sourced(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [init_settings, env_settings]
            if config_file is not None:
                if config_file.suffix == ".json":
                    sources.append(JsonConfigSettingsSource(settings_cls, json_file=config_file))
                else:
                    sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            return tuple(sources)

    try:
        return Settings.model_validate(_Sourced(**overrides).model_dump())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        kind = "JSON" if config_file is not None and config_file.suffix == ".json" else "TOML"
        raise ConfigError(f"settings file {config_file} is not valid {kind}: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(f"settings file {config_file} is a directory") from None
    except SettingsError as exc:  # a value that is not the JSON its field needs, and the like
        raise ConfigError(f"invalid settings: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc


def _problem(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "settings"
    if error["type"] == "extra_forbidden" and error["loc"]:
        return (
            f"{where}: not a setting{_nearest(str(error['loc'][-1]), _field_names(error['loc']))}"
        )
    return f"{where}: {error['msg']}"


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """The valid names beside the last element of `loc` (a key of Settings, or of a group)."""
    model: type[BaseModel] | None = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model and isinstance(part, str) else None
        model = None if field is None else _group(field.annotation)
    return [] if model is None else list(model.model_fields)


def _group(annotation: Any) -> type[BaseModel] | None:
    """The settings group (a pydantic model) a field holds, `X | None` included; else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _nearest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse an `HMEM_*` variable that names no setting, naming the nearest that does."""
    groups = {
        name.upper(): [f.upper() for f in group.model_fields]
        for name, field in Settings.model_fields.items()
        if (group := _group(field.annotation)) is not None
    }
    settings = [f"HMEM_{name.upper()}" for name in Settings.model_fields]
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith("HMEM_"):
            continue
        top, _, rest = upper.removeprefix("HMEM_").partition("__")
        if f"HMEM_{top}" not in settings:
            raise ConfigError(
                f"unknown environment variable {key}: not a setting{_nearest(upper, settings)}"
            )
        if rest and (top not in groups or rest.split("__")[0] not in groups[top]):
            valid = [f"HMEM_{top}__{f}" for f in groups.get(top, [])]
            raise ConfigError(
                f"unknown environment variable {key}: not a setting{_nearest(upper, valid)}"
            )
