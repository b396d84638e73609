"""What :class:`~leapcore.config.EngineConfig` checks beyond each option's type and range.

Checks of single values that need other modules (objective, entanglement-measure and
isolation-method names, start-image intensities), leap-ie's ``use_hipe`` alias of ``isolation_method``, checks across options, and the
routing of leap-ie's W&B keys (:data:`PUBLISHER_KEYS`) aside for the publishers. ``EngineConfig``
inherits them; its fields and their documentation stay in :mod:`leapcore.config`.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from leapcore.errors import ConfigError
from leapcore.secrets import is_secret_name

if TYPE_CHECKING:
    from leapcore.config import EngineConfig

#: Keys that leap-ie's ``generate`` takes for its W&B logging: ``{key: (publisher, meaning)}``. They
#: are not engine options: :class:`EngineConfig` accepts them and keeps them, untouched, for the
#: publisher that ``generate`` runs (:mod:`leapcore.publishers`; the pipeline reads them through
#: ``tasks.settings.WandbSettings``). The engine itself never reads them.
PUBLISHER_KEYS: dict[str, tuple[str, str]] = {
    "wandb_api_key": (
        "wandb",
        "W&B API key (a secret). With it (or WANDB_API_KEY) results are logged online; without, "
        "offline.",
    ),
    "wandb_entity": ("wandb", "W&B entity (team or user) for online logging."),
}


class ConfigChecks(BaseModel):
    """The validators of :class:`~leapcore.config.EngineConfig` (which adds the fields)."""

    _publisher: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _route_publisher_keys(
        cls, data: Any, handler: ModelWrapValidatorHandler[EngineConfig], info: ValidationInfo
    ) -> EngineConfig:
        """Take :data:`PUBLISHER_KEYS` out of the options before validation; keep them aside."""
        routed: dict[str, Any] = {}
        if isinstance(data, dict) and info.field_name is None:
            routed = {k: data[k] for k in PUBLISHER_KEYS if k in data}
            data = {k: v for k, v in data.items() if k not in PUBLISHER_KEYS}
        config = handler(data)
        if routed:
            config._publisher = _publisher_values(routed)
        return config

    @property
    def publisher_options(self) -> dict[str, Any]:
        """The :data:`PUBLISHER_KEYS` given (secrets as ``SecretStr``); the engine never reads them."""
        return dict(self._publisher)

    @field_validator("baseline_init", check_fields=False)
    @classmethod
    def _baseline_in_range(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else ([] if value == "r" else [value])
        for v in values:
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(
                    f"baseline_init values are pixel intensities in [0, 1]; got {v}. "
                    "Pass the training mean in pixel space (e.g. [0.485, 0.456, 0.406]) or 'r'."
                )
        return value

    @field_validator("objective", check_fields=False)
    @classmethod
    def _known_objective(cls, value: str) -> str:
        from leapcore.objectives import OBJECTIVES

        if value not in OBJECTIVES:
            close = difflib.get_close_matches(str(value), list(OBJECTIVES), n=1, cutoff=0.0)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown objective {value!r}{hint}; valid objectives: {', '.join(OBJECTIVES)}."
            )
        return value

    @field_validator("entanglement_measure", check_fields=False)
    @classmethod
    def _known_entanglement_measure(cls, value: str) -> str:
        from leapcore.entanglement import MEASURES, unknown_measure_message

        if value not in MEASURES:
            raise ValueError(unknown_measure_message(value))
        return value

    @field_validator("isolation_method", check_fields=False)
    @classmethod
    def _known_isolation_method(cls, value: str) -> str:
        from leapcore.isolation import ISOLATION_METHODS
        from leapcore.isolation_methods import unknown_method_message

        if value not in ISOLATION_METHODS:
            raise ValueError(unknown_method_message(value))
        return value

    @model_validator(mode="before")
    @classmethod
    def _use_hipe_is_an_alias(cls, data: Any, info: ValidationInfo) -> Any:
        """``use_hipe`` (leap-ie) and ``isolation_method`` say one thing: keep them in step.

        Given together they must agree; ``use_hipe: true`` alone selects ``hipe``; assigning either
        afterwards updates the other, so a dumped config loads back unchanged.
        """
        if not isinstance(data, dict):
            return data
        hipe, method = data.get("use_hipe"), data.get("isolation_method")
        if info.field_name == "use_hipe" and isinstance(hipe, bool):
            if hipe:
                return {**data, "isolation_method": "hipe"}
            return {**data, "isolation_method": "mask" if method == "hipe" else method}
        if info.field_name == "isolation_method" and isinstance(method, str):
            return {**data, "use_hipe": method == "hipe"}
        if info.field_name is not None:
            return data
        if not isinstance(hipe, bool):
            return {**data, "use_hipe": method == "hipe"} if isinstance(method, str) else data
        if isinstance(method, str):
            if hipe != (method == "hipe"):
                raise ValueError(
                    f"use_hipe={hipe} contradicts isolation_method={method!r}; give only "
                    "isolation_method (use_hipe is leap-ie's alias of isolation_method: 'hipe')."
                )
            return data
        return {**data, "isolation_method": "hipe"} if hipe else data

    @model_validator(mode="after")
    def _check_ranges(self) -> EngineConfig:
        if self.min_lr >= self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be below max_lr ({self.max_lr}).")
        if self.blur_min > self.blur_max:
            raise ValueError(
                f"blur_min ({self.blur_min}) must not exceed blur_max ({self.blur_max})."
            )
        if self.input_dim is not None and len(self.input_dim) not in (3, 4):
            raise ValueError(
                f"input_dim must be [C, H, W] or [1, C, H, W] (pt) / [H, W, C] (tf); got {self.input_dim}."
            )
        if self.output == "multilabel_logits":
            # Independent sigmoid classes: no coupling through a softmax, and by default none
            # through the margin either (the raw logit, per class).
            if self.objective == "log_softmax":
                raise ValueError(
                    "objective 'log_softmax' couples classes through a softmax, which "
                    "output 'multilabel_logits' has not: use 'logit' or 'margin'."
                )
            if "objective" not in self.model_fields_set:
                self.objective = "logit"
        return self


def _publisher_values(given: dict[str, Any]) -> dict[str, Any]:
    """Check the publisher keys' types (never echoing a value) and wrap secrets in ``SecretStr``."""
    values: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value if is_secret_name(key) else value.get_secret_value()
        elif not isinstance(value, str):
            raise ValueError(f"{key} must be a string, not {type(value).__name__}.")
        elif is_secret_name(key):
            value = SecretStr(value)
        values[key] = value
    return values


def read_raw_config(config: dict | str | os.PathLike | None) -> dict[str, Any]:
    """The option names and values of a config given as a dict or a JSON file path (unchecked).

    Raises:
        ConfigError: the file is missing or not a JSON object, or ``config`` is of another type.
    """
    if config is None:
        raw: Any = {}
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; pass a dict or a JSON file path."
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"config file {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno}."
            ) from None
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        raise ConfigError(
            f"config must be a dict or a JSON file path, not {type(config).__name__}."
        )
    if not isinstance(raw, dict):
        raise ConfigError("config must hold a JSON object of option names and values.")
    # leap-ie's page spells one option with a stray backslash ("blur\\max").
    if "blur\\max" in raw:
        raw["blur_max"] = raw.pop("blur\\max")
    return raw


def describe_errors(err: ValidationError) -> str:
    """One message naming every wrong value (secrets shown as ``<secret>``)."""
    lines = []
    for item in err.errors():
        msg = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check across options: its input is the whole config, secrets too
            lines.append(msg)
            continue
        loc = ".".join(str(p) for p in item["loc"])
        shown = "<secret>" if is_secret_name(loc) else repr(item.get("input"))
        lines.append(f"config option {loc!r} = {shown}: {msg}")
    return "invalid config: " + "; ".join(lines)
