"""W&B's settings live beside the engine's config, not in it: ``EngineConfig`` accepts leap-ie's
keys, keeps them aside for the publishers, and no dump, error or parameter shows the key."""

from __future__ import annotations

import pytest

from leapcore.config import PUBLISHER_KEYS, EngineConfig, load_config
from leapcore.errors import ConfigError
from leapcore.publishers import requested
from tasks.redaction import secret_values
from tasks.settings import DEFAULT_PROJECT, WandbSettings, wandb_settings
from tasks.wandb_publish import run_label, wandb_mode

KEY = "local-" + "f" * 40


@pytest.fixture
def no_wandb_env(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)


def test_the_engine_config_has_no_wandb_option_but_accepts_leap_ies_keys():
    assert set(PUBLISHER_KEYS) == {"wandb_api_key", "wandb_entity"}
    assert not set(EngineConfig.model_fields) & set(PUBLISHER_KEYS)
    config = load_config({"wandb_api_key": KEY, "wandb_entity": "team", "project_name": "p"})
    settings = WandbSettings.from_config(config)
    assert settings.api_key.get_secret_value() == KEY
    assert (settings.entity, settings.project) == ("team", "p")
    assert wandb_settings(config) == settings and wandb_settings(settings) is settings
    # The key reaches no dump, parameter set, repr or copy in clear.
    for text in (config.model_dump_json(), str(config.secret_free()), repr(config), str(config)):
        assert KEY not in text and "team" not in text
    assert config.model_copy(update={"lr": 0.2}).publisher_options == config.publisher_options


def test_wrong_types_are_refused_without_echoing_the_value():
    with pytest.raises(ConfigError, match="wandb_api_key must be a string, not int") as err:
        load_config({"wandb_api_key": 424242424242})
    assert "424242" not in str(err.value)
    with pytest.raises(ConfigError, match=r"did you mean 'wandb_entity'\?"):
        load_config({"wandb_entty": "team"})


def test_redaction_finds_the_key_kept_aside():
    config = load_config({"wandb_api_key": KEY})
    assert KEY in secret_values(config)
    assert KEY in secret_values({"config": config})


def test_the_publishers_and_the_pipeline_read_the_same_settings(no_wandb_env):
    assert requested(load_config({})) == []
    assert requested(load_config({"wandb_entity": "team"})) == ["wandb"]
    assert requested(load_config({"wandb_api_key": KEY})) == ["wandb"]
    assert wandb_mode(load_config({})) == "offline"
    assert wandb_mode(load_config({"wandb_entity": "team"})) == "online"
    assert wandb_mode(WandbSettings(api_key=KEY)) == "online"
    assert run_label(load_config({"wandb_entity": "team"}), None, "r1") == (
        f"team/{DEFAULT_PROJECT}/r1"
    )
    assert run_label(WandbSettings(project="p"), None, "r1") == "p/r1"
