"""Issue 19: objectives, off-target flags, robust quality and isolation that keeps the evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from leapcore import engine, results
from leapcore.config import load_config
from leapcore.entanglement import (
    entanglement,
    pair_entanglement,
    probe_reached,
    probed,
    relaxed_entanglement,
    relaxed_logits,
    share,
)
from leapcore.errors import ConfigError, InputError
from leapcore.faithfulness import deletion_insertion_auc
from leapcore.objectives import OBJECTIVES, get_objective

from .engine_support import run_digits, train_digits
from .marker_support import marker_mass, train_marker_model


# ---------------------------------------------------------------------------------------------- #
# Objectives
# ---------------------------------------------------------------------------------------------- #
def test_objectives_compose_and_logit_is_the_weighted_logit():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=gen)
    w = torch.zeros(4, 6)
    w[torch.arange(4), torch.tensor([0, 2, 5, 1])] = 1.0
    # 'logit' is exactly the expression the step used before objectives existed (bit for bit).
    assert torch.equal(OBJECTIVES["logit"](z, w), (z * w).sum(1))
    others = z.masked_fill(w != 0, float("-inf")).amax(1)
    torch.testing.assert_close(get_objective("margin")(z, w), (z * w).sum(1) - others)
    combined = 2 * get_objective("logit") + get_objective("log_softmax")
    torch.testing.assert_close(combined(z, w), 2 * (z * w).sum(1) + (z.log_softmax(1) * w).sum(1))


def test_unknown_objective_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'margin'"):
        load_config({"objective": "margn"})
    with pytest.raises(InputError, match="did you mean 'log_softmax'"):
        get_objective("logsoftmax")


@pytest.fixture(scope="session")
def digit_models(digits):
    """Three digit CNNs of different seeds and training lengths (55-94 % held-out accuracy)."""
    return [digits, train_digits(epochs=1, train_size=200, seed=1), train_digits(1, 400, seed=2)]


@pytest.fixture(scope="module")
def digit_audits(digit_models):
    """Ten prototypes per model with the default objective (fast schedule of the digits tests)."""
    return [run_digits(m, list(range(10)), max_steps=60, log_freq=30) for m in digit_models]


def test_default_prototypes_are_of_their_own_class(digit_audits):
    """With the default objective every prototype's top class is its target, on every model."""
    for audit in digit_audits:
        assert audit.config.objective == "margin"
        top, off, prob = audit.prototypes.flags()
        assert top.tolist() == list(range(10)), top
        assert not off.any()


# ---------------------------------------------------------------------------------------------- #
# Flags and quality in the results
# ---------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def unoptimised(digits, tmp_path_factory):
    """No steps: every prototype is the grey start image, so at most one target is its top class."""
    config = {
        "input_dim": [1, 32, 32],
        "max_steps": 0,
        "find_lr_steps": 0,
        "isolation": False,
        "output_dir": str(tmp_path_factory.mktemp("flags")),
    }
    return engine.generate(
        "flags", digits.model, digits.class_list, config, list(range(10)), digits.preprocessing
    )


def test_off_target_prototypes_are_flagged_in_table_and_frame(unoptimised):
    df, arrays = unoptimised
    table = arrays["tables"]["prototypes"]
    logits = torch.tensor(arrays["prototype_logits"])
    top = logits.argmax(1)
    assert table.column("top_class").to_pylist() == top.tolist()
    assert table.column("off_target").to_pylist() == (top != torch.arange(10)).tolist()
    assert sum(table.column("off_target").to_pylist()) >= 9
    probs = logits.softmax(1).diagonal()
    torch.testing.assert_close(
        torch.tensor(table.column("target_prob").to_pylist()), probs, atol=1e-6, rtol=0
    )
    robust = torch.tensor(table.column("target_prob_robust").to_pylist())
    assert ((robust >= 0) & (robust <= 1)).all()
    own = df[df["target_class"] == df["output_class"]]
    assert own["off_target"].tolist() == (top != torch.arange(10)).tolist()
    back = results.prototypes_from_arrow(table, arrays["tables"]["trajectories"])
    assert torch.equal(back.robust_probs, robust)


def test_robust_probability_separates_trained_from_grey(digit_audits, unoptimised):
    robust = digit_audits[0].prototypes.robust_probs
    table = unoptimised[1]["tables"]["prototypes"]
    grey = torch.tensor(table.column("target_prob_robust").to_pylist())
    assert robust.mean() > 0.5 > grey.mean() + 0.2, (robust, grey)


# ---------------------------------------------------------------------------------------------- #
# Isolation that keeps the evidence
# ---------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def digit_isolation(digits):
    samples = digits.test_x[:6]
    return run_digits(digits, samples=samples, max_isolate_classes=1, isolation_steps=60)


def test_isolation_keeps_the_logit_on_a_small_share(digit_isolation):
    iso = digit_isolation.isolation
    assert (iso.kept >= 0.9).all(), iso.kept
    assert iso.coverage.mean() <= 0.3, iso.coverage
    table = results.isolations_to_arrow(iso, [str(d) for d in range(10)], "sample")
    for column in ("kept_logit", "kept_prob", "deletion_auc", "insertion_auc", "coverage"):
        assert column in table.column_names


def test_isolation_deletion_beats_a_random_map(digits, digit_isolation):
    iso = digit_isolation.isolation
    samples = digits.test_x[:6]
    gen = torch.Generator().manual_seed(0)
    random_maps = torch.rand(6, 32, 32, generator=gen)

    def logits(x):
        return digits.model(digits.preprocessing(x))

    random_deletion, _ = deletion_insertion_auc(
        logits, samples, random_maps, [c for _, c in iso.pairs]
    )
    assert iso.deletion_auc.mean() < random_deletion.mean() - 0.1, (
        iso.deletion_auc,
        random_deletion,
    )
    assert iso.insertion_auc.mean() > iso.deletion_auc.mean()


@pytest.fixture(scope="session")
def marker_model():
    return train_marker_model(size=6, position=(13, 13), value=0.0, seed=2)


def test_planted_marker_gets_most_of_the_mask(marker_model):
    m = marker_model
    audit = engine.run(
        m.model,
        m.class_list,
        {"input_dim": [1, 32, 32], "max_steps": 60, "log_freq": 30},
        [m.marker_class],
        m.preprocessing,
        samples=m.images[:6],
    )
    mass = marker_mass(audit.isolation.masks[:, 0], m.box)
    assert mass.mean() > 0.5, mass


@pytest.fixture(scope="module")
def saliency_audit(marker_model):
    """The marker model's default saliency map (``isolation_keep: 0``) on its first 6 images."""
    m = marker_model
    return engine.run(
        m.model,
        m.class_list,
        {"input_dim": [1, 32, 32], "max_steps": 60, "log_freq": 30, "isolation_keep": 0},
        [m.marker_class],
        m.preprocessing,
        samples=m.images[:6],
    )


def test_default_saliency_concentrates_on_the_planted_marker(marker_model, saliency_audit):
    """Issue 19: the saliency map itself (``isolation_keep: 0``), what the deletion / insertion AUCs
    rank and ``benchmarks/fidelity.py`` compares with captum, puts most of its mass on the marker.
    Measured on these 6 images: 0.57 with the default (``isolation_map: evidence``; 0.51 with the
    mask x logit evidence of before, 0.46-0.63 per image, deletion 0.22); the soft mask
    alone 0.39 after 100 steps at lr 0.1 (the default before) and 0.17 after the default 10 steps;
    captum's IntegratedGradients 0.31 (absolute) / 0.42 (signed), GradientShap 0.11 / 0.16."""
    iso = saliency_audit.isolation
    assert iso.masks.min() >= 0 and iso.masks.max() <= 1
    mass = marker_mass(iso.masks[:, 0], marker_model.box)
    assert mass.mean() > 0.45, mass
    # And it ranks: deleting its top pixels first removes the marker class far sooner than random.
    assert iso.deletion_auc.mean() < 0.5, iso.deletion_auc


def test_default_saliency_ranks_the_whole_marker_first(marker_model, saliency_audit):
    """Issue 19: deletion removes the top pixels first, so the whole marker, not only its edges,
    must rank near the top. The first-order evidence ranks the inside of a uniform patch low (its
    gradient is small or negative); the default map fills such gaps from their neighbours
    (:mod:`leapcore.evidence_fill`). Measured on these 6 images: 0.94 of the marker's pixels among
    the map's top 64 (a sixteenth of the image, the first deletion budget), RISE deletion 0.126;
    without the fill 0.70-0.72 and 0.225; captum's Occlusion (226 forwards per image) deleted 0.168
    on 30 images of this model."""
    m = marker_model
    images = m.images[:6]
    maps = saliency_audit.isolation.masks[:, 0]
    top, left, bottom, right = m.box
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    first = maps.flatten(1).argsort(dim=1, descending=True, stable=True)[:, :64]
    share = inside.flatten()[first].float().sum(1) / inside.sum()
    assert share.mean() > 0.85, share

    def logits(x):
        return m.model(m.preprocessing(x))

    deletion, _ = deletion_insertion_auc(logits, images, maps, [m.marker_class] * len(images))
    assert deletion.mean() < 0.17, deletion


# ---------------------------------------------------------------------------------------------- #
# Transfer to reference models
# ---------------------------------------------------------------------------------------------- #
def test_reference_model_of_another_width_is_refused_before_any_stage(digits):
    with pytest.raises(InputError, match="1000 outputs.*10 classes"):
        run_digits(digits, [3], reference_models=["efficientnet_lite0"], max_steps=1000)


def test_transfer_probs_on_the_model_itself_and_a_twin(digit_audits, digit_models):
    from leapcore.quality import transfer_target_probs

    p = digit_audits[0].prototypes
    nets = [
        ("self", torch.nn.Sequential(digit_models[0].preprocessing, digit_models[0].model)),
        ("weak", torch.nn.Sequential(digit_models[1].preprocessing, digit_models[1].model)),
    ]
    transfer = transfer_target_probs(nets, p.images, p.targets, p.per_target, 10, 16)
    assert transfer.shape == (10, 2)
    _, _, own = p.flags()
    torch.testing.assert_close(transfer[:, 0], own, atol=1e-4, rtol=0)
    assert not torch.allclose(transfer[:, 1], own, atol=1e-2)


def test_quality_section_names_off_target_prototypes(digits, digit_isolation):
    from leapcore.quality import quality_metrics, quality_section, quality_tags

    audit = engine.run(
        digits.model,
        digits.class_list,
        {"input_dim": [1, 32, 32], "max_steps": 0, "find_lr_steps": 0, "isolation": False},
        list(range(10)),
        digits.preprocessing,
    )
    fragment = quality_section(audit)
    assert "off target" in fragment and "classified as another class" in fragment
    metrics = quality_metrics(audit)
    assert metrics["prototypes/off_target"] >= 9
    assert quality_tags(metrics)["leapcore.off_target_prototypes"].count(",") >= 8
    iso_fragment = quality_section(digit_isolation)
    assert "deletion AUC" in iso_fragment


# ---------------------------------------------------------------------------------------------- #
# Entanglement against held-out confusion
# ---------------------------------------------------------------------------------------------- #
def confusion_rho(pairs: torch.Tensor | np.ndarray, confusion: np.ndarray) -> float:
    """Spearman over the 45 unordered pairs of a symmetric score and the symmetrised confusion."""
    upper = np.triu_indices(10, 1)
    pairs = pairs.numpy() if isinstance(pairs, torch.Tensor) else pairs
    return float(spearmanr(pairs[upper], ((confusion + confusion.T) / 2)[upper]).statistic)


def soft_confusion(digits) -> np.ndarray:
    """Mean predicted probability of each class on the held-out digits of each class."""
    with torch.no_grad():
        probs = digits.model(digits.preprocessing(digits.test_x)).softmax(1).numpy()
    return np.stack([probs[digits.test_y.numpy() == c].mean(0) for c in range(10)])


def test_default_entanglement_tracks_held_out_confusion_on_every_model(digit_models, digit_audits):
    """The default (``relaxed`` with the guarded probe) tracks confusion on three models; leap's
    does not.

    Soft confusion (mean predicted probability) is the better-defined target: its split-half
    reliability is 0.81-1.00 where hard confusion's is 0.27-0.95 (benchmarks/entanglement.py).
    Measured here (60 steps): soft 0.76 / 0.79 / 0.65, hard 0.69 / 0.38 / 0.35; without the
    probe soft 0.75 / 0.72 / 0.62; share on the same prototypes 0.52 / 0.72 / 0.60; leap 0.31 /
    0.45 / 0.11. Twelve models in the benchmark (full defaults): 0.71 (worst 0.58) soft, 0.67
    (0.53) without the probe.
    """
    soft, hard, share_soft, leap_soft = [], [], [], []
    for model, audit in zip(digit_models, digit_audits, strict=True):
        assert audit.config.entanglement_measure == "relaxed"
        pairs = pair_entanglement(audit.entanglement)
        soft.append(confusion_rho(pairs, soft_confusion(model)))
        hard.append(confusion_rho(pairs, model.confusion()))
        base, logits = audit.baseline.logits, audit.prototypes.logits
        share_pairs = pair_entanglement(entanglement(base, logits, measure="share"))
        share_soft.append(confusion_rho(share_pairs, soft_confusion(model)))
        leap = entanglement(base, logits, measure="leap")
        leap_soft.append(confusion_rho((leap + leap.T) / 2, soft_confusion(model)))
    assert min(soft) > 0.62 and np.mean(soft) > 0.69, (soft, share_soft, leap_soft)
    assert min(hard) > 0.28 and np.mean(hard) > 0.42, hard
    # What the default replaced misses on the same prototypes.
    assert np.mean(soft) > np.mean(share_soft) + 0.08, (soft, share_soft)
    assert min(leap_soft) < 0.55, leap_soft


def test_the_probe_reaches_every_digit_target_and_is_used(digit_models, digit_audits):
    """On trained digit CNNs every probe passes its prototype's target logit (by 1.6-70 logits in
    the benchmark), so the default score is the geometric mean of both shares on every row."""
    for model, audit in zip(digit_models[:2], digit_audits[:2], strict=True):
        net = torch.nn.Sequential(model.preprocessing, model.model).eval()
        mask = audit.prototypes.target_mask()
        shown, _ = engine.isolation_inputs(
            audit.prototypes, [], audit.config, 10, torch.device("cpu")
        )
        relaxed = relaxed_logits(net, shown, mask)
        probe = probed(net, audit.baseline.image, mask, audit.config.entanglement_probe_steps)
        assert audit.config.entanglement_probe_steps == 20
        assert probe_reached(probe, [relaxed, audit.prototypes.logits], mask).all()
        expected = (share(relaxed, mask) * share(probe, mask)).sqrt()
        torch.testing.assert_close(audit.entanglement, expected, rtol=1e-4, atol=1e-6)


def test_probe_is_the_start_image_stepped_up_its_target():
    """``probed`` steps the start image (one for every row) up each row's targets; the relaxed
    score is the geometric mean of the two shares where the probe reached the row's target
    logit, the relaxed share elsewhere, the targets exactly 1."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    start = torch.full((1, 3, 2, 2), 0.5)
    targets = torch.zeros(3, 4, dtype=torch.bool)
    targets[torch.arange(3), torch.tensor([0, 2, 3])] = True
    probe = probed(net, start, targets, steps=5, step=0.05)
    torch.testing.assert_close(
        probe, relaxed_logits(net, start.repeat(3, 1, 1, 1), targets, 5, 0.05)
    )
    with torch.no_grad():
        flat = net(start)[0]
    rows = torch.arange(3)
    assert (probe[rows, [0, 2, 3]] > flat[[0, 2, 3]]).all()
    # Other non-target logits than the probe's; row 0's probe passes the relaxed target logit,
    # row 1's ties it (reached), row 2's falls short.
    relaxed = torch.where(targets, probe, probe + torch.randn(3, 4))
    relaxed[0, 0] -= 1.0
    relaxed[2, 3] += 1.0
    scores = entanglement(
        torch.zeros(1, 4), relaxed, targets=targets, measure="relaxed", probe_logits=probe
    )
    both = (share(relaxed, targets) * share(probe, targets)).sqrt()
    torch.testing.assert_close(scores[:2], both[:2])
    torch.testing.assert_close(scores[2], share(relaxed, targets)[2])
    assert not torch.allclose(both[2], share(relaxed, targets)[2], atol=1e-3)
    assert (scores[targets] == 1).all()
    with pytest.raises(ValueError, match="1 or 3 start images"):
        probed(net, start.repeat(2, 1, 1, 1), targets)


def test_probe_guard_falls_back_where_the_probe_falls_short():
    """A linear model, provably: from grey, 5 probe steps of 0.05 add ``0.25 * sum|w_t|`` to the
    target logit. A prototype already at the pixel bounds that raise it (``0.5 * sum|w_t|`` above
    grey) is out of the probe's reach, so its row keeps the relaxed share; a grey prototype
    relaxed by 10 steps of 0.02 (``0.2 * sum|w_t|``) is within it, so its row uses the probe."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    targets = torch.zeros(2, 4, dtype=torch.bool)
    targets[0, 1] = targets[1, 2] = True
    grey = torch.full((1, 3, 2, 2), 0.5)
    saturated = (net[1].weight[1] > 0).float().reshape(1, 3, 2, 2)
    shown = torch.cat([saturated, grey])
    with torch.no_grad():
        own = net(shown)
    config = load_config({"entanglement_probe_steps": 5, "entanglement_probe_step": 0.05})
    scores, used = relaxed_entanglement(net, shown, own, targets, config, grey)
    relaxed = relaxed_logits(net, shown, targets)
    probe = probed(net, grey, targets, 5, 0.05)
    assert probe_reached(probe, [relaxed, own], targets).tolist() == [False, True]
    assert used.tolist() == [False, True]  # what the audit reports as the rows the probe entered
    torch.testing.assert_close(scores[0], share(relaxed, targets)[0])
    both = (share(relaxed, targets) * share(probe, targets)).sqrt()
    torch.testing.assert_close(scores[1], both[1])
    assert not torch.allclose(scores[1], share(relaxed, targets)[1], atol=1e-3)
    with pytest.raises(ValueError, match="needs the audit's start image"):
        relaxed_entanglement(net, shown, own, targets, config, None)


def test_relaxed_logits_raise_the_target_and_keep_the_model():
    """Ten steps of 0.02 move every pixel by at most 0.2 and raise each row's target logit."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    before = [p.detach().clone() for p in net.parameters()]
    images = torch.rand(3, 3, 2, 2)
    targets = torch.zeros(3, 4, dtype=torch.bool)
    targets[torch.arange(3), torch.tensor([0, 2, 3])] = True
    with torch.no_grad():
        start = net(images)
    relaxed = relaxed_logits(net, images, targets, steps=10, step=0.02, chunk_size=2)
    rows = torch.arange(3)
    assert (relaxed[rows, [0, 2, 3]] > start[rows, [0, 2, 3]]).all()
    torch.testing.assert_close(relaxed_logits(net, images, targets, steps=0), start)
    with torch.no_grad():  # a caller's no_grad block does not stop the steps
        torch.testing.assert_close(relaxed_logits(net, images, targets, 10, 0.02, 2), relaxed)
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q) and p.grad is None
    # A linear model: each step adds exactly 0.02 * |w_t| summed over pixels (until the clamp).
    w = net[1].weight
    inside = torch.full((1, 3, 2, 2), 0.5)
    gain = relaxed_logits(net, inside, targets[:1], steps=10, step=0.02)[0, 0] - net(inside)[0, 0]
    torch.testing.assert_close(gain, 0.2 * w[0].abs().sum().detach(), rtol=1e-4, atol=1e-5)


def test_unknown_entanglement_measure_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'relaxed'"):
        load_config({"entanglement_measure": "relax"})
    with pytest.raises(ValueError, match="did you mean 'share'"):
        entanglement(torch.zeros(1, 3), torch.zeros(1, 3), measure="shar")


def test_share_entanglement_rows():
    logits = torch.tensor([[4.0, 1.0, 1.0, -30.0], [0.0, 2.0, 0.0, 2.0]])
    targets = torch.tensor([[True, False, False, False], [False, True, False, False]])
    scores = entanglement(torch.zeros(1, 4), logits, targets=targets)
    torch.testing.assert_close(scores[0], torch.tensor([1.0, 0.5, 0.5, 0.0]), atol=1e-6, rtol=0)
    rest = 2 + np.exp(2.0)
    expected = torch.tensor([1 / rest, 1.0, 1 / rest, np.exp(2.0) / rest], dtype=torch.float32)
    torch.testing.assert_close(scores[1], expected)
    pairs = pair_entanglement(torch.tensor([[1.0, 0.4], [0.1, 1.0]]))
    torch.testing.assert_close(pairs, torch.tensor([[1.0, 0.2], [0.2, 1.0]]))


# ---------------------------------------------------------------------------------------------- #
# Both kept probabilities in the report, and isolations that lost the logit
# ---------------------------------------------------------------------------------------------- #
def test_isolation_cards_show_both_probabilities_and_flag_a_lost_logit(digits, digit_isolation):
    """Each card names the class probability on the whole and on the isolated image (the model's
    own softmax of each), not only their ratio; an isolation whose logit is gone is flagged."""
    import copy
    import html as html_lib

    from leapcore.report import render_report

    iso = digit_isolation.isolation
    with torch.no_grad():
        probs = digits.model(digits.preprocessing(iso.isolated)).softmax(1)
    for k, (_, c) in enumerate(iso.pairs):
        assert float(iso.prob_isolated[k]) == pytest.approx(float(probs[k, c]), abs=1e-4)
        ratio = float(iso.prob_isolated[k]) / float(iso.prob_full[k])
        assert float(iso.kept_prob[k]) == pytest.approx(ratio, rel=1e-4)
    tables = results.audit_tables(digit_isolation)
    page = html_lib.unescape(render_report(digit_isolation, title="t", tables=tables))
    for k, (_, c) in enumerate(iso.pairs):
        name = digits.class_list[c]
        assert (
            f"probability of {name}: {float(iso.prob_full[k]):.3f} on the whole image, "
            f"{float(iso.prob_isolated[k]):.3f} on the isolated pixels"
        ) in page
    assert "lost the logit" not in page  # calibrated masks keep >= 90 % of it
    lost = copy.copy(digit_isolation)
    lost.isolation = copy.copy(iso)
    lost.isolation.logits_isolated = iso.logits_isolated.clone()
    lost.isolation.logits_isolated[0] = -abs(float(iso.logits_full[0]))
    page = html_lib.unescape(render_report(lost, title="t", tables=None))
    assert page.count("lost the logit") >= 2  # the card and "look at these first"
