"""Publishers that ``generate`` calls after a run, found at run time through the entry-point group
``leapcore.publishers`` (the engine imports no tracking library).

A publisher is ``publish(project_name, audit, results, config) -> dict`` registered as an entry point;
leapcore's own ``wandb`` publisher (``tasks.wandb_publish:publish_generate``) is installed with the
package. A publisher runs when its config keys ask for it: ``wandb`` when ``wandb_api_key`` or
``wandb_entity`` is set (as in leap-ie). Those keys are not engine options: ``EngineConfig`` keeps
them aside (:data:`~leapcore.config.PUBLISHER_KEYS`, ``config.publisher_options``) for the publisher. A failing publisher never loses the results: the error is
logged and returned under ``results["publications"][name]["error"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from pydantic import SecretStr

from leapcore.config import PUBLISHER_KEYS, EngineConfig
from leapcore.secrets import redact

log = logging.getLogger(__name__)

GROUP = "leapcore.publishers"


def requested(config: EngineConfig) -> list[str]:
    """The publishers the config asks for."""
    given = config.publisher_options
    return sorted({PUBLISHER_KEYS[key][0] for key, value in given.items() if value})


def find_publisher(name: str) -> Callable[..., dict[str, Any]] | None:
    """The publisher registered under ``name`` in the entry-point group, loaded, or None."""
    for point in entry_points(group=GROUP):
        if point.name == name:
            return point.load()
    return None


def publish_all(
    project_name: str, audit: Any, results: dict[str, Any], config: EngineConfig
) -> dict[str, dict[str, Any]]:
    """Run every requested publisher; ``{name: its result, or {"error": message}}``."""
    done: dict[str, dict[str, Any]] = {}
    secrets = [
        value.get_secret_value()
        for value in (*config.publisher_options.values(), config.leap_api_key)
        if isinstance(value, SecretStr)
    ]
    for name in requested(config):
        try:
            publisher = find_publisher(name)
        except Exception as err:  # a broken installation must not lose the results
            publisher, reason = None, f"{type(err).__name__}: {err}"
        else:
            reason = "no publisher is installed under that name"
        if publisher is None:
            message = (
                f"the config asks for {name!r} logging but entry point {GROUP}:{name} cannot be "
                f"loaded ({reason}); install leapcore with its pipeline dependencies."
            )
            log.warning(message)
            done[name] = {"error": message}
            continue
        try:
            done[name] = dict(publisher(project_name, audit, results, config))
        except Exception as err:
            message = redact(f"{name} publishing failed: {type(err).__name__}: {err}", secrets)
            log.warning(message)
            done[name] = {"error": message}
    return done
