"""Every config key leap-ie documents is accepted, and docs/leap-ie-compat.md lists each one."""

from __future__ import annotations

import re
from pathlib import Path

from tests.compat.conftest import GENERATE, README, code_blocks, need_reference

COMPAT = Path(__file__).resolve().parents[2] / "docs" / "leap-ie-compat.md"


def documented_keys() -> set[str]:
    need_reference()
    (listing,) = [c for h, c in code_blocks() if h == "Config" and "alpha_mask" in c]
    keys = set(re.findall(r"^\s+(\w+):", listing, re.M))
    readme = README.read_text()
    config_section = readme[readme.index("## Config") : readme.index("## FAQ")]
    keys |= set(re.findall(r"^- \*\*(\w+)\*\* \(`", config_section, re.M))
    text = GENERATE.read_text()
    config_part = text[text.index("Here are all of the config options") : text.index("Returns")]
    keys |= set(re.findall(r"^(\w+) \($", config_part, re.M))
    keys.discard("blur")  # "blur\max" on the page; its own test below
    return keys


def test_every_documented_config_key_is_accepted() -> None:
    from leapcore.config import PUBLISHER_KEYS, load_config

    keys = documented_keys()
    assert {"alpha_mask", "blur_min", "objective_weight", "wandb_entity", "max_steps"} <= keys
    generate_args = {"project_name", "samples", "mode"}
    for key in sorted(keys - generate_args - set(PUBLISHER_KEYS)):
        value = getattr(load_config({}), key)
        assert getattr(load_config({key: value}), key) == value, key
    # W&B's keys are accepted and kept for the publisher, not as engine options.
    given = load_config({"wandb_entity": "team", "wandb_api_key": "k" * 40}).publisher_options
    assert given["wandb_entity"] == "team" and given["wandb_api_key"].get_secret_value() == "k" * 40
    assert {"wandb_api_key", "wandb_entity"} <= keys and set(PUBLISHER_KEYS) <= keys
    assert load_config({"blur\\max": 0.5}).blur_max == 0.5


def test_the_compatibility_table_names_every_documented_key() -> None:
    text = COMPAT.read_text()
    missing = [k for k in sorted(documented_keys()) if f"`{k}`" not in text]
    assert not missing, f"docs/leap-ie-compat.md does not list {missing}"
    for status in ("same", "extended", "differs"):
        assert f"| {status}" in text
