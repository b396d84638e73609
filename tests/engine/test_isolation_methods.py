"""The isolation-method registry: a string option picks the method, leap-ie's ``use_hipe`` is its
alias, and a new method is one decorated function away."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from leapcore import engine
from leapcore.config import EngineConfig, load_config
from leapcore.errors import ConfigError, InputError
from leapcore.isolation import ISOLATION_METHODS, isolate_features
from leapcore.isolation_methods import (
    ISOLATION_TITLES,
    IsolationResult,
    class_logits,
    get_isolation_method,
    isolation_method,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).eval()


def _images() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_the_built_in_methods_are_registered_under_their_config_names():
    assert {"mask", "hipe"} <= set(ISOLATION_METHODS)
    assert ISOLATION_TITLES["hipe"] == "hierarchical perturbation"
    assert ISOLATION_TITLES["mask"] == "mask optimisation"


@pytest.mark.parametrize(
    ("given", "method"),
    [
        ({}, "mask"),
        ({"use_hipe": True}, "hipe"),
        ({"use_hipe": False}, "mask"),
        ({"isolation_method": "hipe"}, "hipe"),
        ({"isolation_method": "hipe", "use_hipe": True}, "hipe"),
        ({"isolation_method": "mask", "use_hipe": False}, "mask"),
    ],
)
def test_use_hipe_is_an_alias_and_a_dumped_config_loads_back(given, method):
    config = load_config(given)
    assert config.isolation_method == method
    assert config.use_hipe == (method == "hipe")
    again = load_config(config.model_dump(mode="json", exclude={"samples"}))
    assert (again.isolation_method, again.use_hipe) == (method, method == "hipe")


def test_assigning_either_name_updates_the_other():
    config = EngineConfig()
    config.use_hipe = True
    assert config.isolation_method == "hipe"
    config.isolation_method = "mask"
    assert config.use_hipe is False
    config.isolation_method = "hipe"
    config.use_hipe = False
    assert config.isolation_method == "mask"


@pytest.mark.parametrize(
    "given",
    [
        {"use_hipe": True, "isolation_method": "mask"},
        {"use_hipe": False, "isolation_method": "hipe"},
    ],
)
def test_contradicting_answers_are_refused_naming_both(given):
    with pytest.raises(ConfigError, match="use_hipe=.* contradicts isolation_method="):
        load_config(given)


def test_an_unknown_method_names_the_closest_valid_one():
    with pytest.raises(
        ConfigError, match=r"unknown isolation method 'hipee' \(did you mean 'hipe'\?\)"
    ):
        load_config({"isolation_method": "hipee"})
    with pytest.raises(InputError, match=r"did you mean 'mask'\?"):
        get_isolation_method("maks")


def test_use_hipe_gives_the_same_bits_as_isolation_method_hipe():
    net, images = _net(), _images()
    runs = [
        isolate_features(net, images, [[0, 1], [2]], load_config({**cfg, "hipe_min_cell": 4}), 8)
        for cfg in ({"use_hipe": True}, {"isolation_method": "hipe"})
    ]
    assert runs[0].method == runs[1].method == "hipe"
    for name in ("masks", "isolated", "logits_isolated", "kept_prob", "deletion_auc"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name


@pytest.fixture
def centre_method():
    """A third method, registered the way a plug-in would: keep the image's central quarter."""

    @isolation_method("centre", title="central quarter")
    def centre(model, images, classes, config, chunk_size, image_keys=None):
        began = time.perf_counter()
        pairs = [(i, c) for i, cs in enumerate(classes) for c in cs]
        source = images[torch.tensor([p[0] for p in pairs])]
        cls = torch.tensor([p[1] for p in pairs])
        mask = torch.zeros_like(source[:, :1])
        h, w = source.shape[-2:]
        mask[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
        full = class_logits(model, source, cls, chunk_size)
        return IsolationResult.from_masks(
            model, pairs, source, cls, mask, torch.zeros_like(source), full, "centre", began, 8
        )

    yield centre
    ISOLATION_METHODS.pop("centre")
    ISOLATION_TITLES.pop("centre")


def test_a_registered_method_is_chosen_by_name_through_the_engine(centre_method):
    audit = engine.run(
        _net(),
        ["a", "b", "c"],
        {"input_dim": [1, 16, 16], "isolation_method": "centre", "max_isolate_classes": 1},
        samples=_images(),
        device="cpu",
    )
    iso = audit.isolation
    assert iso.method == "centre"
    assert torch.allclose(iso.coverage, torch.full((2,), 0.25))
    with pytest.raises(ValueError, match="registered twice"):
        isolation_method("centre")(lambda *a: None)
