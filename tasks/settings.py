"""The pipeline's own settings beside the engine's config: where W&B logs (account and project).

:class:`~leapcore.config.EngineConfig` holds what the engine computes with; W&B's keys
(``wandb_api_key``, ``wandb_entity``) are accepted there only for leap-ie compatibility and kept
aside (``config.publisher_options``). :class:`WandbSettings` is what the publishers read: built
from those keys and the config's ``project_name``, or given directly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr

from leapcore.config import EngineConfig

DEFAULT_PROJECT = "leapcore"


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
