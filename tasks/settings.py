"""The pipeline's own settings beside the engine's config: where W&B logs (account, project
and mode).

:class:`~leapcore.config.EngineConfig` holds what the engine computes with; W&B's keys
(``wandb_api_key``, ``wandb_entity``) are accepted there only for leap-ie compatibility and kept
aside (``config.publisher_options``). :class:`WandbSettings` is what the publishers read: built
from those keys and the config's ``project_name``, or given directly.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr

from leapcore.config import EngineConfig

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "leapcore"
_KEY = re.compile(r"^(?:[A-Za-z0-9_]+-)?[A-Za-z0-9_]{40,}$")


class WandbSettings(BaseModel):
    """Where and as whom W&B logs.

    Attributes:
        api_key: the W&B API key (never logged; ``WANDB_API_KEY`` works too).
        entity: team or user for online logging.
        project: the W&B project (default :data:`DEFAULT_PROJECT`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: SecretStr | None = None
    entity: str | None = None
    project: str | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> WandbSettings:
        """The settings a config carries (leap-ie's keys, its ``project_name``)."""
        given = config.publisher_options
        return cls(
            api_key=given.get("wandb_api_key"),
            entity=given.get("wandb_entity"),
            project=config.project_name,
        )

    @property
    def configured(self) -> bool:
        """Whether an account is named (a key or an entity)."""
        return self.api_key is not None or bool(self.entity)

    def project_or(self, project: str | None) -> str:
        """``project`` when given, else this project, else :data:`DEFAULT_PROJECT`."""
        return project or self.project or DEFAULT_PROJECT


def wandb_settings(source: EngineConfig | WandbSettings | Any) -> WandbSettings:
    """:class:`WandbSettings` from settings or a config (what the publishers take either way)."""
    if isinstance(source, WandbSettings):
        return source
    if isinstance(source, EngineConfig):
        return WandbSettings.from_config(source)
    raise TypeError(f"expected EngineConfig or WandbSettings, not {type(source).__name__}")


# ---------------------------------------------------------------------------------------------- #
# The mode a run logs in
# ---------------------------------------------------------------------------------------------- #
def wandb_mode(config: EngineConfig | WandbSettings, mode: str | None = None) -> str:
    """``online`` when an account is configured, else ``offline``; ``mode``/``WANDB_MODE`` win."""
    explicit = mode or os.environ.get("WANDB_MODE")
    if explicit:
        return "offline" if explicit == "dryrun" else explicit
    configured = (
        wandb_settings(config).configured
        or bool(os.environ.get("WANDB_API_KEY"))
        or bool(os.environ.get("WANDB_ENTITY"))
    )
    return "online" if configured else "offline"


def plausible_key(key: str | None) -> bool:
    """Whether ``key`` can be a W&B API key (40+ word characters, optionally prefixed), so that a
    placeholder such as ``"YOUR_WANDB_API_KEY"`` never reaches the network."""
    return bool(key) and bool(_KEY.match(key or ""))


def init_settings(wandb: Any, config: EngineConfig | WandbSettings, chosen: str) -> Any:
    settings: dict[str, Any] = {
        "console": "off",
        "silent": True,
        "x_disable_stats": True,
        "x_disable_meta": True,
        "x_disable_machine_info": True,
        "disable_git": True,
        "save_code": False,
        "x_save_requirements": False,
        "disable_job_creation": True,
    }
    key = wandb_settings(config).api_key
    if chosen == "online" and key is not None:
        settings["api_key"] = key.get_secret_value()
    return wandb.Settings(**settings)


def generate_mode(config: EngineConfig | WandbSettings) -> str:
    """``generate``'s W&B mode: ``WANDB_MODE`` wins; else online only with a key that can work."""
    if os.environ.get("WANDB_MODE"):
        return wandb_mode(config)
    secret = wandb_settings(config).api_key
    key = (secret.get_secret_value() if secret is not None else None) or os.environ.get(
        "WANDB_API_KEY"
    )
    if not plausible_key(key):
        log.warning(
            "W&B: %s; logging offline.",
            "no wandb_api_key" if not key else "wandb_api_key is not a W&B API key",
        )
        return "offline"
    return "online"
