"""Settings of an hmem process: one pydantic-settings class, built by the CLI and passed in.

Sources, strongest first: values given by the caller (CLI flags), `HMEM_*` environment variables
(`__` separates nested groups: `HMEM_STORE__DEADLINE_S=0.5`), an optional TOML or JSON file,
then defaults. Nothing is built at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tiers import StoreConfig
from tiers.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HMEM_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    store: StoreConfig | None = None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags, environment and `config_file`; errors name the field to fix."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"settings file {config_file} does not exist")

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
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
