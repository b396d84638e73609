"""Every option has a behavioural test on the digits CNN (issue 2, 'Options'): what it changes, not 'it ran'."""

from __future__ import annotations

import json
import math
import warnings
from functools import partial

import pytest
import torch
from torch import nn

from leapcore import engine, penalties
from leapcore.errors import InputError
from leapcore.transforms import DRAW_COLUMNS, NoiseBank, create_augmenter, list_transforms

from .engine_support import EXACT, RowWise, mean_pairwise_cosine, run_digits


def target_prob(audit, target: int = 3) -> torch.Tensor:
    return audit.prototypes.probs[:, target]


class ConstantLogits(nn.Module):
    """Ignores its input (the output still depends on it with gradient zero): a flat loss."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.linspace(-1, 1, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 10) + 0 * x.mean((1, 2, 3))[:, None]


class Gray(nn.Module):
    """The digits CNN on 3-channel input (channel mean), for per-channel options."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.mean(1, keepdim=True))


# ---------------------------------------------------------------------------------------------- #
# Learning-rate finder
# ---------------------------------------------------------------------------------------------- #
def test_lr_finder_picks_a_rate_in_range(digits):
    audit = run_digits(
        digits, find_lr_steps=40, num_lr_windows=10, min_lr=1e-3, max_lr=1.0, max_steps=10
    )
    found = audit.lr
    assert not found.fell_back, found.reason
    assert 1e-3 <= found.lr <= 1.0
    assert found.lr in found.rates
    # Windows are log-spaced from min_lr upwards; the prototypes used the chosen rate.
    ratios = [b / a for a, b in zip(found.rates, found.rates[1:])]
    assert found.rates[0] == pytest.approx(1e-3)
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)
    assert audit.prototypes.lr == found.lr
    assert all(math.isfinite(loss) for loss in found.losses)


def test_lr_finder_falls_back_with_a_warning_when_the_loss_never_falls(digits):
    with pytest.warns(
        UserWarning, match=r"learning-rate finder fell back to lr=0.03: the loss only rose"
    ):
        audit = engine.run(
            ConstantLogits(),
            digits.class_list,
            {
                "input_dim": [1, 32, 32],
                "find_lr_steps": 20,
                "num_lr_windows": 5,
                "lr": 0.03,
                "max_steps": 0,
                "isolation": False,
            },
            [3],
        )
    assert audit.lr.fell_back and audit.lr.lr == 0.03
    assert audit.prototypes.lr == 0.03


def test_zero_lr_steps_uses_lr_as_given(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audit = run_digits(digits, find_lr_steps=0, lr=0.07, max_steps=2)
    assert audit.lr.lr == 0.07 and audit.lr.rates == [] and not audit.lr.fell_back


def test_input_independent_model_is_reported_not_run_for_max_steps(digits):
    with pytest.raises(
        InputError, match="gradient of the objective is exactly zero at the start image"
    ):
        engine.run(
            ConstantLogits(),
            digits.class_list,
            {"input_dim": [1, 32, 32], "find_lr_steps": 0, "max_steps": 50, "isolation": False},
            [3],
        )


# ---------------------------------------------------------------------------------------------- #
# Baseline
# ---------------------------------------------------------------------------------------------- #
def test_baseline_init_number(digits):
    audit = run_digits(digits, baseline_init=0.3, max_steps=0)
    assert torch.all(audit.baseline.image == 0.3)
    # Prototypes start from the baseline exactly (up to the sigmoid/logit round trip).
    torch.testing.assert_close(
        audit.prototypes.images, torch.full((1, 1, 32, 32), 0.3), atol=1e-6, rtol=0
    )


def test_baseline_init_per_channel(digits):
    audit = engine.run(
        Gray(digits.model),
        digits.class_list,
        {
            "input_dim": [3, 32, 32],
            "baseline_init": [0.2, 0.5, 0.8],
            "max_steps": 0,
            "find_lr_steps": 0,
            "isolation": False,
        },
        [3],
        digits.preprocessing,
    )
    image = audit.baseline.image
    assert image.shape == (1, 3, 32, 32)
    for channel, value in enumerate([0.2, 0.5, 0.8]):
        assert torch.allclose(image[:, channel], torch.tensor(value))


def test_baseline_init_random(digits):
    audit = run_digits(digits, [1, 2], baseline_init="r", max_steps=0, seed=4)
    image = audit.baseline.image
    assert image.shape == (2, 1, 32, 32)  # one noise image per prototype
    assert not torch.equal(image[0], image[1])
    assert image.min() >= 0 and image.max() <= 1
    assert abs(float(image.mean()) - 0.5) < 0.05
    again = run_digits(digits, [1, 2], baseline_init="r", max_steps=0, seed=4)
    assert torch.equal(image, again.baseline.image)


def test_use_baseline_makes_the_start_equidistant(digits):
    still = {"max_steps": 0, "transform": None, "blur_min": 0.0, "blur_max": 0.0}
    plain = run_digits(digits, **still)
    flat = run_digits(digits, use_baseline=True, baseline_steps=100, **still)
    assert flat.baseline.steps > 0
    assert flat.baseline.spread < plain.baseline.spread / 2, (
        plain.baseline.spread,
        flat.baseline.spread,
    )
    assert not torch.equal(flat.baseline.image, plain.baseline.image)


# ---------------------------------------------------------------------------------------------- #
# Transforms
# ---------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("preset", ["s", "m", "l", "xl", None])
def test_each_transform_preset_raises_the_target(digits, preset):
    audit = run_digits(digits, transform=preset, max_steps=30)
    trajectory = audit.prototypes.trajectory[:, 0, 3]
    assert trajectory[-1] > 3 * trajectory[0], trajectory
    if preset in ("s", "m", None):  # the milder presets reach the target within 30 steps
        assert trajectory[-1] > 0.5, trajectory


def test_transform_presets_grow_in_strength():
    """How far a vertical ramp moves grows s < m < l < xl; None without blur is the identity.

    The ramp is mirror-symmetric, so horizontal flips (in every preset) leave it unchanged and only
    rotation, translation, scale and the noise fill out of frame show.
    """
    assert list_transforms() == ["l", "m", "s", "xl"]
    ramp = torch.linspace(0, 1, 32)[:, None].expand(32, 32)
    image = ramp[None, None].repeat(256, 1, 1, 1)
    change = []
    for preset in ["s", "m", "l", "xl"]:
        augmenter = create_augmenter(preset)
        u = torch.rand(256, DRAW_COLUMNS, generator=torch.Generator().manual_seed(0))
        out = augmenter.apply(
            image, augmenter.draw(u, NoiseBank(0, (1, 32, 32), "cpu", image.dtype))
        )
        change.append(float((out - image).abs().mean()))
    assert change == sorted(change) and change[0] > 0, change
    identity = create_augmenter(None, (0.0, 0.0))
    assert identity.is_identity


def test_no_transform_and_no_blur_makes_the_seed_irrelevant(digits):
    first = run_digits(digits, transform=None, blur_max=0.0, blur_min=0.0, seed=1)
    second = run_digits(digits, transform=None, blur_max=0.0, blur_min=0.0, seed=2)
    assert torch.equal(first.prototypes.images, second.prototypes.images)
    moved = run_digits(digits, transform="s", seed=2)
    assert not torch.equal(first.prototypes.images, moved.prototypes.images)


def test_transform_samples_average_several_draws(digits):
    one = run_digits(digits, transform_samples=1)
    three = run_digits(digits, transform_samples=3)
    assert not torch.equal(one.prototypes.images, three.prototypes.images)
    assert target_prob(three) > 0.5


# ---------------------------------------------------------------------------------------------- #
# Penalties and alpha
# ---------------------------------------------------------------------------------------------- #
def test_hf_weight_lowers_high_frequencies(digits):
    rough = run_digits(digits, parameterisation="pixel", hf_weight=0.0)
    smooth = run_digits(digits, parameterisation="pixel", hf_weight=10.0)
    hf_rough = float(penalties.high_frequency(rough.prototypes.images))
    hf_smooth = float(penalties.high_frequency(smooth.prototypes.images))
    assert hf_smooth < 0.85 * hf_rough, (hf_rough, hf_smooth)


def test_use_alpha_adds_an_alpha_channel(digits):
    plain = run_digits(digits)
    audit = run_digits(digits, use_alpha=True)
    alpha = audit.prototypes.alphas
    assert plain.prototypes.alphas is None
    assert alpha.shape == (1, 1, 32, 32)
    assert alpha.min() >= 0 and alpha.max() <= 1 and alpha.std() > 0
    assert target_prob(audit) > 0.5


def test_alpha_weight_shrinks_alpha(digits):
    means = [
        float(run_digits(digits, use_alpha=True, alpha_weight=w).prototypes.alphas.mean())
        for w in (0.0, 3.0, 10.0)
    ]
    assert means[0] > means[1] > means[2], means


def test_alpha_only_keeps_the_colour_of_the_start(digits):
    audit = run_digits(digits, alpha_only=True, baseline_init="r", seed=1)
    result = audit.prototypes
    # Equal up to the logit/sigmoid round trip of the parameterisation (start clamped to 1e-4).
    torch.testing.assert_close(result.images, audit.baseline.image, atol=1e-4, rtol=0)
    assert result.alphas.std() > 0.01
    trajectory = result.trajectory[:, 0, 3]
    assert trajectory[-1] > trajectory[0], trajectory


def test_alpha_mask_favours_the_centre(digits):
    def edge_to_centre(audit) -> float:
        alpha = audit.prototypes.alphas[0, 0]
        edge = torch.ones(32, 32, dtype=torch.bool)
        edge[6:26, 6:26] = False
        return float(alpha[edge].mean() / alpha[12:20, 12:20].mean())

    plain = run_digits(digits, use_alpha=True, alpha_weight=5.0)
    masked = run_digits(digits, use_alpha=True, alpha_weight=5.0, alpha_mask=True)
    assert edge_to_centre(masked) < edge_to_centre(plain) - 0.01


# ---------------------------------------------------------------------------------------------- #
# Several prototypes, objective direction, hybrids, equalise
# ---------------------------------------------------------------------------------------------- #
def test_several_prototypes_per_class_and_diversity(digits):
    similarity = []
    for weight in (0.0, 1.0, 10.0):
        audit = run_digits(digits, prototypes_per_class=3, diversity_weight=weight)
        assert audit.prototypes.images.shape == (3, 1, 32, 32)
        similarity.append(mean_pairwise_cosine(audit.prototypes.images))
    assert similarity[0] > similarity[1] > similarity[2], similarity


def test_prototypes_of_several_targets_are_target_major(digits):
    audit = run_digits(digits, [2, 5], prototypes_per_class=2)
    probs = audit.prototypes.probs
    assert probs.argmax(1).tolist() == [2, 2, 5, 5]


def test_objective_weight_minus_one_lowers_the_target(digits):
    audit = run_digits(digits, objective_weight=-1.0)
    trajectory = audit.prototypes.trajectory[:, 0, 3]
    assert trajectory[-1] < trajectory[0] / 2, trajectory
    assert float(audit.prototypes.probs[0, 3]) == pytest.approx(float(trajectory.min()))


def test_nested_targets_make_one_hybrid_prototype(digits, tmp_path):
    base = run_digits(digits, [[1, 7]], max_steps=0)
    audit = run_digits(digits, [[1, 7]], max_steps=40)
    assert audit.prototypes.images.shape[0] == 1
    probs, start = audit.prototypes.probs[0], base.prototypes.probs[0]
    assert probs[1] > start[1] and probs[7] > start[7]
    assert probs[1] + probs[7] > 0.8, probs
    df, _ = engine.generate(
        "hybrid",
        digits.model,
        digits.class_list,
        {
            **audit.config.model_dump(exclude={"leap_api_key", "wandb_api_key"}),
            "output_dir": str(tmp_path),
        },
        [[1, 7]],
        digits.preprocessing,
    )
    assert set(df["target_class"]) == {"1+7"}
    assert df.loc[df["output_class"].isin(["1", "7"]), "input"].notna().all()


def test_equalise_spreads_the_histogram(digits):
    plain = run_digits(digits, equalise=0.0, device=EXACT)  # three runs, one optimisation
    full = run_digits(digits, equalise=1.0, device=EXACT)
    half = run_digits(digits, equalise=0.5, device=EXACT)
    values = full.prototypes.images.flatten().sort().values
    torch.testing.assert_close(values, torch.linspace(0, 1, 32 * 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        half.prototypes.images,
        (plain.prototypes.images + full.prototypes.images) / 2,
        atol=1e-6,
        rtol=0,
    )
    # The reported logits are those of the equalised image.
    with torch.no_grad():
        logits = digits.model(digits.preprocessing(full.prototypes.images))
    torch.testing.assert_close(full.prototypes.logits, logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- #
# Trajectories, isolation choices, parameterisation, batching
# ---------------------------------------------------------------------------------------------- #
def test_log_freq_records_the_trajectory(digits):
    audit = run_digits(digits, [3, 8], max_steps=25, log_freq=10)
    result = audit.prototypes
    assert result.trajectory_steps == [0, 10, 20, 25]
    assert result.trajectory.shape == (4, 2, 10)
    torch.testing.assert_close(result.trajectory.sum(2), torch.ones(4, 2))
    target = result.trajectory[:, [0, 1], [3, 8]]
    assert (target[-1] > target[0] + 0.3).all(), target
    assert (target[1:] >= target[:1]).all()


def test_max_isolate_classes_picks_the_top_logits(digits):
    audit = run_digits(digits, [3, 8], isolation=True, isolation_steps=5, max_isolate_classes=2)
    top = audit.prototypes.logits.topk(2, dim=1).indices.tolist()
    assert audit.isolation.pairs == [(0, top[0][0]), (0, top[0][1]), (1, top[1][0]), (1, top[1][1])]
    assert audit.isolation.masks.shape == (4, 1, 32, 32)


def test_isolate_classes_per_target_and_flat(digits):
    audit = run_digits(
        digits, [3, 8], isolation=True, isolation_steps=5, isolate_classes=[[1, 2], [5]]
    )
    assert audit.isolation.pairs == [(0, 1), (0, 2), (1, 5)]
    flat = run_digits(digits, [3, 8], isolation=True, isolation_steps=5, isolate_classes=[4])
    assert flat.isolation.pairs == [(0, 4), (1, 4)]
    per_prototype = run_digits(
        digits,
        [3],
        prototypes_per_class=2,
        isolation=True,
        isolation_steps=5,
        isolate_classes=[[6]],
    )
    assert per_prototype.isolation.pairs == [(0, 6), (1, 6)]


def test_isolate_classes_of_the_wrong_length(digits):
    with pytest.raises(
        InputError, match="isolate_classes has 3 lists but there are 2 images/targets"
    ):
        run_digits(
            digits, [3, 8], isolation=True, isolation_steps=5, isolate_classes=[[1], [2], [3]]
        )


def test_isolate_classes_out_of_range(digits):
    with pytest.raises(InputError, match=r"isolate_classes names class 12, outside 0..9"):
        run_digits(digits, [3], isolation=True, isolation_steps=5, isolate_classes=[12])


def test_sample_mode_isolates_targets_or_the_top_three(digits):
    samples = digits.test_x[:2]
    top = run_digits(digits, samples=samples, isolation_steps=5)
    with torch.no_grad():
        expected = digits.model(digits.preprocessing(samples)).topk(3, dim=1).indices.tolist()
    assert top.isolation.pairs == [(i, c) for i in range(2) for c in expected[i]]
    chosen = run_digits(digits, [[4, 1]], samples=samples, isolation_steps=5)
    assert chosen.isolation.pairs == [(0, 1), (0, 4), (1, 1), (1, 4)]
    assert top.prototypes is None and top.sample_logits.shape == (2, 10)


def test_isolation_masks_keep_the_class_and_shrink(digits):
    """The optimised soft masks (``isolation_keep: 0`` reports the saliency uncalibrated, and
    ``isolation_map: mask`` makes it the soft mask alone)."""
    samples = digits.test_x[:4]
    audit = run_digits(
        digits,
        samples=samples,
        max_isolate_classes=1,
        isolation_steps=60,
        isolation_keep=0,
        isolation_map="mask",
    )
    iso = audit.isolation
    assert iso.method == "mask"
    assert (iso.masks >= 0).all() and (iso.masks <= 1).all()
    assert iso.kept.mean() > 0.6, iso.kept
    heavier = run_digits(
        digits,
        samples=samples,
        max_isolate_classes=1,
        isolation_steps=60,
        isolation_alpha_weight=4.0,
        isolation_keep=0,
        isolation_map="mask",
    )
    assert heavier.isolation.coverage.mean() < iso.coverage.mean()


def test_isolation_hf_weight_smooths_masks(digits):
    samples = digits.test_x[:4]
    rough = run_digits(
        digits,
        samples=samples,
        max_isolate_classes=1,
        isolation_steps=40,
        isolation_hf_weight=0.0,
        isolation_keep=0,
        isolation_map="mask",
    )
    smooth = run_digits(
        digits,
        samples=samples,
        max_isolate_classes=1,
        isolation_steps=40,
        isolation_hf_weight=20.0,
        isolation_keep=0,
        isolation_map="mask",
    )
    assert float(penalties.high_frequency(smooth.isolation.masks).mean()) < float(
        penalties.high_frequency(rough.isolation.masks).mean()
    )


def test_hipe_on_digits(digits):
    samples = digits.test_x[:3]
    audit = run_digits(
        digits, samples=samples, use_hipe=True, hipe_min_cell=2, max_isolate_classes=1
    )
    iso = audit.isolation
    assert iso.method == "hipe" and iso.masks.shape == (3, 1, 32, 32)
    assert (iso.masks >= 0).all()  # where HiPE's saliency lands: tests/engine/test_hipe.py


def test_parameterisations_differ_and_fourier_moves_low_frequencies(digits):
    def low_share(audit) -> float:
        delta = audit.prototypes.images[0, 0] - audit.baseline.image[0, 0]
        power = torch.fft.fft2(delta).abs() ** 2
        freq = torch.sqrt(torch.fft.fftfreq(32)[:, None] ** 2 + torch.fft.fftfreq(32)[None] ** 2)
        return float(power[freq < 0.15].sum() / power.sum())

    pixel = run_digits(digits, parameterisation="pixel")
    fourier = run_digits(digits, parameterisation="fourier")
    assert target_prob(pixel) > 0.5 and target_prob(fourier) > 0.5
    assert not torch.equal(pixel.prototypes.images, fourier.prototypes.images)
    assert low_share(fourier) > low_share(pixel) + 0.1


@pytest.mark.parametrize("samples", [1, 2])
def test_max_batch_size_chunks_give_identical_results(digits, samples):
    """With a model whose rows cannot depend on the batch size, chunking changes nothing at all."""
    options = {
        "transform": "m",
        "transform_samples": samples,
        "use_alpha": True,
        "isolation": True,
        "isolation_steps": 5,
        "max_isolate_classes": 2,
        "model": RowWise(digits.model),
    }
    whole = run_digits(digits, [0, 3, 5, 8, 9], device=EXACT, **options)
    chunked = run_digits(digits, [0, 3, 5, 8, 9], max_batch_size=2, device=EXACT, **options)
    assert torch.equal(chunked.prototypes.images, whole.prototypes.images)
    assert torch.equal(chunked.prototypes.alphas, whole.prototypes.alphas)
    assert torch.equal(chunked.prototypes.logits, whole.prototypes.logits)
    # Also on an AVX-512 CPU, where torch.sigmoid rounded a mask row differently in a batch of one
    # than in a batch of two (leapcore.rowwise): this test failed there before rowwise.sigmoid.
    assert torch.equal(chunked.isolation.masks, whole.isolation.masks)


@pytest.mark.parametrize("hipe", [False, True])
def test_a_class_gets_the_same_prototype_and_isolation_whatever_else_is_audited(digits, hipe):
    """Random draws follow the row's target and prototype index, not its position in the batch."""
    options = {
        "transform": "m",
        "transform_samples": 2,
        "use_alpha": True,
        "prototypes_per_class": 2,
        "diversity_weight": 0.5,
        "isolation": True,
        "isolation_steps": 5,
        "max_isolate_classes": 2,
        "use_hipe": hipe,
        "model": RowWise(digits.model),
    }
    alone = run_digits(digits, [3], device=EXACT, **options)
    among = run_digits(digits, [0, 3, 5], device=EXACT, **options)
    rows = slice(2, 4)  # the two prototypes of class 3
    assert torch.equal(among.prototypes.images[rows], alone.prototypes.images)
    assert torch.equal(among.prototypes.alphas[rows], alone.prototypes.alphas)
    assert torch.equal(among.prototypes.logits[rows], alone.prototypes.logits)
    mine = [k for k, (i, _) in enumerate(among.isolation.pairs) if i in (2, 3)]
    assert torch.equal(among.isolation.masks[mine], alone.isolation.masks)
    # The two prototypes of one class still differ from each other.
    assert not torch.equal(alone.prototypes.images[0], alone.prototypes.images[1])


def test_chunking_a_batched_model_keeps_the_outcome(digits):
    """A batched CPU convolution rounds differently per batch size; the prototypes still agree."""
    whole = run_digits(digits, [0, 3, 5])
    chunked = run_digits(digits, [0, 3, 5], max_batch_size=1)
    torch.testing.assert_close(chunked.prototypes.probs, whole.prototypes.probs, atol=0.05, rtol=0)


def test_memory_budget_chunks_give_identical_results(digits):
    model = RowWise(digits.model)
    whole = run_digits(digits, [0, 3, 5], model=model, device=EXACT)
    tight = run_digits(digits, [0, 3, 5], model=model, memory_budget_mb=0.05, device=EXACT)
    assert torch.equal(tight.prototypes.images, whole.prototypes.images)


# ---------------------------------------------------------------------------------------------- #
# Config plumbing
# ---------------------------------------------------------------------------------------------- #
def test_config_as_a_json_file(digits, tmp_path):
    path = tmp_path / "config.json"
    options = {
        "input_dim": [1, 32, 32],
        "max_steps": 7,
        "find_lr_steps": 0,
        "log_freq": 3,
        "isolation": False,
        "transform": "s",
        "seed": 2,
    }
    path.write_text(json.dumps(options))
    run = partial(engine.run, digits.model, digits.class_list, device=EXACT)
    from_file = run(str(path), [3], digits.preprocessing)
    from_dict = run(options, [3], digits.preprocessing)
    assert from_file.config == from_dict.config
    assert from_file.prototypes.trajectory_steps == [0, 3, 6, 7]
    assert torch.equal(from_file.prototypes.images, from_dict.prototypes.images)
    # A pathlib.Path works too.
    assert (
        engine.run(
            digits.model, digits.class_list, path, [3], digits.preprocessing
        ).config.max_steps
        == 7
    )


def test_leap_api_key_is_accepted_and_ignored(digits, tmp_path):
    key = "leap-secret-key-123"
    plain = run_digits(digits, max_steps=5, device=EXACT)
    keyed = run_digits(digits, max_steps=5, leap_api_key=key, device=EXACT)
    assert torch.equal(plain.prototypes.images, keyed.prototypes.images)
    assert key not in json.dumps(keyed.config.secret_free())
    assert key not in repr(keyed.config)
    df, arrays = engine.generate(
        "keyed",
        digits.model,
        digits.class_list,
        {
            "input_dim": [1, 32, 32],
            "max_steps": 3,
            "find_lr_steps": 0,
            "isolation": False,
            "leap_api_key": key,
            "output_dir": str(tmp_path),
        },
        [3],
        digits.preprocessing,
    )
    assert key not in df.to_csv()
    for table in arrays["tables"].values():
        assert key.encode() not in repr(table.schema.metadata).encode()
