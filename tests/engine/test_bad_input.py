"""Bad input gets a clear error that says what was wrong (issue 2, 'Bad input'); each message checked."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leapcore import engine
from leapcore.errors import ConfigError, InputError, ModelOutputError, NonFiniteError

from .engine_support import EXACT, fast_config, run_digits


class Softmaxed(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


class DictOutput(nn.Module):
    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: self.model(x), "features": x.mean((2, 3))}


class NaNAfter(nn.Module):
    """Logits turn NaN from the ``bad``-th forward pass that needs gradients (= optimisation step)."""

    def __init__(self, model: nn.Module, bad: int):
        super().__init__()
        self.model, self.bad, self.calls = model, bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.bad:
                logits = logits * float("nan")
        return logits


class ModeRecorder(nn.Module):
    """Records ``self.training`` at every forward; raises at the forward number ``fail_at`` if set."""

    def __init__(self, model: nn.Module, fail_at: int | None = None):
        super().__init__()
        self.model, self.fail_at, self.modes = model, fail_at, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        if self.fail_at is not None and len(self.modes) >= self.fail_at:
            raise RuntimeError("boom inside the model")
        return self.model(x)


def _run(digits, model=None, config=None, targets=(3,), class_list=None, samples=None, device=None):
    return engine.run(
        model if model is not None else digits.model,
        class_list if class_list is not None else digits.class_list,
        fast_config(**{"max_steps": 4, "log_freq": 2, **(config or {})}),
        list(targets) if targets is not None else None,
        digits.preprocessing,
        samples,
        device,
    )


# ---------------------------------------------------------------------------------------------- #
# Model outputs
# ---------------------------------------------------------------------------------------------- #
def test_probabilities_instead_of_logits(digits):
    with pytest.raises(
        ModelOutputError,
        match=r"returns probabilities \(rows in \[0, 1\] summing to 1\), not logits",
    ):
        _run(digits, Softmaxed(digits.model))


def test_dict_output_without_logits(digits):
    with pytest.raises(
        ModelOutputError, match=r"dict with keys \['features', 'scores'\] and no 'logits' key"
    ):
        _run(digits, DictOutput(digits.model, "scores"))


def test_dict_output_with_logits_is_unwrapped(digits):
    plain = _run(digits, device=EXACT)
    wrapped = _run(digits, DictOutput(digits.model, "logits"), device=EXACT)
    torch.testing.assert_close(wrapped.prototypes.images, plain.prototypes.images, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.prototypes.logits, plain.prototypes.logits, rtol=0, atol=0)


def test_output_width_differs_from_class_list(digits):
    names = [*digits.class_list, "eleven"]
    with pytest.raises(ModelOutputError, match="returns 10 outputs but class_list has 11 names"):
        _run(digits, class_list=names)


def test_empty_class_list(digits):
    with pytest.raises(InputError, match="class_list is empty"):
        _run(digits, class_list=[])


def test_class_list_must_be_a_list(digits):
    with pytest.raises(InputError, match="class_list must be a list of class names"):
        _run(digits, class_list="0123456789")


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            [10],
            r"target class index 10 is out of range: the model has 10 classes \(valid indices 0..9\)",
        ),
        ([-1], "target class index -1 is out of range"),
        ([[2, 12]], "target class index 12 is out of range"),
        ([], "target_classes must be a non-empty list"),
        ([[]], "a nested target in target_classes is empty"),
        (["3"], "target_classes holds '3'; class indices must be integers"),
        ([1.0], "target_classes holds 1.0; class indices must be integers"),
    ],
)
def test_bad_target_classes(digits, targets, message):
    with pytest.raises(InputError, match=message):
        _run(digits, targets=targets)


# ---------------------------------------------------------------------------------------------- #
# Samples
# ---------------------------------------------------------------------------------------------- #
def test_samples_channels_last(digits):
    samples = digits.test_x[:2].permute(0, 2, 3, 1)  # [2, 32, 32, 1]
    with pytest.raises(
        InputError,
        match=r"model takes 1 channels first.*look channels-last: use samples.permute\(0, 3, 1, 2\)",
    ):
        _run(digits, targets=None, samples=samples)


def test_samples_wrong_number_of_dimensions(digits):
    with pytest.raises(
        InputError, match=r"samples must have shape \[N, C, H, W\] \(pt\).*got \[2, 1, 1, 32, 32\]"
    ):
        _run(digits, targets=None, samples=digits.test_x[:2, None])


def test_samples_wrong_channel_count(digits):
    samples = digits.test_x[:2].repeat(1, 3, 1, 1)
    with pytest.raises(
        InputError, match=r"samples have shape \[2, 3, 32, 32\] but the model takes 1 channels"
    ):
        _run(digits, targets=None, samples=samples)


def test_samples_in_0_255(digits):
    with pytest.raises(InputError, match=r"pass pixel values in \[0, 1\] \(divide by 255\)"):
        _run(digits, targets=None, samples=digits.test_x[:2] * 255)


def test_samples_normalised_already(digits):
    with pytest.raises(
        InputError, match="before normalisation; the preprocessing argument is applied inside"
    ):
        _run(digits, targets=None, samples=digits.preprocessing(digits.test_x[:2]))


def test_samples_not_a_tensor(digits):
    with pytest.raises(InputError, match="samples must be a tensor or array, not str"):
        _run(digits, targets=None, samples="digits.png")


# ---------------------------------------------------------------------------------------------- #
# Config
# ---------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_step": 5}, r"unknown config option 'max_step' \(did you mean 'max_steps'\?\)"),
        ({"lerning_rate": 0.1}, "unknown config option 'lerning_rate'"),
        ({"isolaton_lr": 0.1}, r"'isolaton_lr' \(did you mean 'isolation_lr'\?\)"),
        ({"lr": 0}, "config option 'lr' = 0: Input should be greater than 0"),
        ({"lr": -0.1}, "config option 'lr' = -0.1: Input should be greater than 0"),
        ({"lr": "fast"}, "config option 'lr' = 'fast': Input should be a valid number"),
        (
            {"max_steps": -1},
            "config option 'max_steps' = -1: Input should be greater than or equal to 0",
        ),
        ({"max_steps": 2.5}, "config option 'max_steps' = 2.5: Input should be a valid integer"),
        (
            {"transform": "xxl"},
            "config option 'transform' = 'xxl': Input should be 's', 'm', 'l' or 'xl'",
        ),
        ({"parameterisation": "wavelet"}, "config option 'parameterisation' = 'wavelet'"),
        (
            {"equalise": 1.5},
            "config option 'equalise' = 1.5: Input should be less than or equal to 1",
        ),
        ({"baseline_init": 2}, r"baseline_init values are pixel intensities in \[0, 1\]; got 2"),
        ({"min_lr": 0.5, "max_lr": 0.1}, r"min_lr \(0.5\) must be below max_lr \(0.1\)"),
        ({"blur_min": 2.0, "blur_max": 1.0}, r"blur_min \(2.0\) must not exceed blur_max \(1.0\)"),
    ],
)
def test_bad_config(digits, config, message):
    with pytest.raises(ConfigError, match=message):
        _run(digits, config=config)


def test_baseline_init_per_channel_needs_one_value_per_channel(digits):
    with pytest.raises(
        InputError, match="baseline_init has 3 values but the model takes 1 channels"
    ):
        _run(digits, config={"baseline_init": [0.1, 0.2, 0.3]})


def test_secret_values_never_appear_in_config_errors():
    with pytest.raises(ConfigError) as err:
        engine.run(nn.Identity(), ["a", "b"], {"wandb_api_key": 12345, "lr": 0})
    assert "12345" not in str(err.value)


@pytest.mark.parametrize(
    "config",
    [
        {"min_lr": 2.0},  # a check across options: pydantic hands it the whole config as input
        {"use_hipe": True, "isolation_method": "mask"},
    ],
)
def test_secrets_stay_out_of_errors_about_several_options(config):
    secrets = {"wandb_api_key": "wb-secret-4711", "leap_api_key": "leap-secret-0815"}
    with pytest.raises(ConfigError) as err:
        engine.run(nn.Identity(), ["a", "b"], {**secrets, **config})
    assert "secret-4711" not in str(err.value) and "secret-0815" not in str(err.value)
    assert "must be below" in str(err.value) or "contradicts" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass a dict or a JSON file path"):
        engine.run(nn.Identity(), ["a", "b"], str(tmp_path / "nope.json"))


def test_config_file_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{max_steps: 3")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        engine.run(nn.Identity(), ["a", "b"], str(path))


# ---------------------------------------------------------------------------------------------- #
# NaN / Inf during optimisation
# ---------------------------------------------------------------------------------------------- #
def test_nan_stops_names_the_step_and_keeps_the_last_finite_result(digits):
    model = NaNAfter(digits.model, bad=7)
    with pytest.raises(NonFiniteError, match="became NaN/Inf at step 7") as err:
        _run(digits, model, {"max_steps": 20, "log_freq": 5}, device=EXACT)
    error = err.value
    assert error.step == 7
    assert error.last_finite_step == 5
    assert error.last_finite.shape == (1, 1, 32, 32)
    assert torch.isfinite(error.last_finite).all()
    # It is the prototype as it was at step 5: rerunning with 5 steps reproduces it exactly.
    clean = _run(digits, config={"max_steps": 5, "log_freq": 5}, device=EXACT)
    torch.testing.assert_close(error.last_finite, clean.prototypes.images, rtol=0, atol=0)


def test_inf_in_gradients_is_caught_too(digits):
    class InfGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = digits.model  # a submodule, so that the engine moves it to its device

        def forward(self, x):
            logits = self.net(x)
            if torch.is_grad_enabled():
                logits = logits + (x * 0).sum() * float("inf")
            return logits

    with pytest.raises(NonFiniteError, match="at step 1") as err:
        _run(digits, InfGrad(), {"max_steps": 4, "log_freq": 2})
    assert err.value.step == 1 and torch.isfinite(err.value.last_finite).all()


def test_nan_in_isolation_masks(digits):
    # The first pass with gradients is the evidence gradient at the image (it also gives the full
    # logits); the mask steps follow, so the 4th such pass is step 3.
    model = NaNAfter(digits.model, bad=4)
    with pytest.raises(NonFiniteError, match="feature isolation: .* at step 3") as err:
        _run(
            digits,
            model,
            {"isolation_steps": 6, "log_freq": 2},
            targets=None,
            samples=digits.test_x[:2],
        )
    assert err.value.step == 3
    assert torch.isfinite(err.value.last_finite).all()


# ---------------------------------------------------------------------------------------------- #
# Train / eval mode
# ---------------------------------------------------------------------------------------------- #
def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_train_mode_model_runs_in_eval_and_is_restored(digits):
    recorder = ModeRecorder(copy.deepcopy(digits.model))
    recorder.train()
    recorder.model.features[-1].eval()  # a mixed state must come back exactly as it was
    before = _modes(recorder)
    stats = recorder.model.features[1].running_mean.clone()
    # Unfolded, so that the user's model itself runs (a folded copy would run in its place).
    _run(digits, recorder, config={"fold_batchnorm": False})
    assert recorder.modes and not any(recorder.modes)
    assert _modes(recorder) == before
    assert all(p.requires_grad for p in recorder.parameters())
    # Batch norm ran in eval mode: its running statistics never moved.
    assert torch.equal(recorder.model.features[1].running_mean, stats)


def test_train_mode_is_restored_when_the_run_raises(digits):
    recorder = ModeRecorder(copy.deepcopy(digits.model), fail_at=3)
    recorder.train()
    before = _modes(recorder)
    with pytest.raises(RuntimeError, match="boom inside the model"):
        _run(digits, recorder, config={"fold_batchnorm": False})
    assert recorder.modes and not any(recorder.modes)
    assert _modes(recorder) == before
    assert all(p.requires_grad for p in recorder.parameters())


def test_train_mode_is_restored_after_a_validation_error(digits):
    model = copy.deepcopy(digits.model).train()
    with pytest.raises(InputError):
        _run(digits, model, targets=[99])
    assert all(m.training for m in model.modules())


def test_run_digits_helper_defaults(digits):
    """The helper the option tests use really runs the FAST settings."""
    audit = run_digits(digits)
    assert audit.config.max_steps == 30 and audit.prototypes.images.shape == (1, 1, 32, 32)


class Detached(nn.Module):
    """Returns logits that no gradient can flow through (e.g. a model run under no_grad)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).detach()


@pytest.mark.parametrize("config", [{"find_lr_steps": 0}, {"find_lr_steps": 10, "max_steps": 0}])
def test_model_output_detached_from_its_input(digits, config):
    with pytest.raises(InputError, match="the model's output does not depend on its input"):
        _run(digits, Detached(digits.model), {**config, "num_lr_windows": 5})
