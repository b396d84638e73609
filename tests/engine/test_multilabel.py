"""Multi-label classifiers (issue 17): per-class sigmoid logits, no softmax coupling."""

from __future__ import annotations

import pytest
import torch

from leapcore import engine
from leapcore.errors import ModelOutputError

from .engine_support import fast_config
from .kinds_support import MULTI_NAMES, Sigmoided, train_multilabel_digits

EVEN = MULTI_NAMES.index("even")
LARGE = MULTI_NAMES.index("large")


@pytest.fixture(scope="session")
def multi():
    return train_multilabel_digits()


@pytest.fixture(scope="session")
def multi_run(multi, tmp_path_factory):
    config = fast_config(
        output="multilabel_logits",
        max_steps=60,
        output_dir=str(tmp_path_factory.mktemp("multi")),
    )
    return engine.generate(
        "multi", multi.model, multi.class_list, config, [EVEN, LARGE], multi.preprocessing
    )


def test_prototypes_reach_their_label_with_sigmoid_probabilities(multi_run):
    """Quality: each prototype makes its label's independent probability high, and the reported
    probabilities are per-class sigmoids (a row sums to anything, not 1)."""
    df, results = multi_run
    logits = torch.from_numpy(results["prototype_logits"])
    probs = torch.from_numpy(results["prototype_probs"])
    assert torch.allclose(probs, torch.sigmoid(logits), atol=1e-6)
    assert float(probs[0, EVEN]) > 0.9 and float(probs[1, LARGE]) > 0.9
    assert (probs - logits.softmax(1)).abs().max() > 0.05  # not a softmax
    assert "sigmoid" in df.attrs["probability"] and df.attrs["output"] == "multilabel_logits"
    meta = results["tables"]["prototypes"].schema.metadata
    assert meta[b"leapcore.output"] == b"multilabel_logits"
    assert b"sigmoid" in meta[b"leapcore.probability"]


def test_entanglement_is_each_class_gain_over_the_target_gain(multi_run):
    """No max over classes: the target scores exactly 1 and a class that gained more than the
    target scores above 1 (the softmax-era formula caps every class at 1)."""
    df, results = multi_run
    ent = torch.from_numpy(results["entanglement"])
    logits = torch.from_numpy(results["prototype_logits"])
    base = torch.from_numpy(results["tables"]["entanglement"].column("baseline_logit").to_numpy())
    base = base.view(2, -1)
    for row, target in enumerate([EVEN, LARGE]):
        gain = logits[row] - base[row]
        assert torch.allclose(ent[row], gain / gain[target], atol=1e-4)
        assert abs(float(ent[row, target]) - 1.0) < 1e-5


def test_sigmoid_outputs_are_refused_with_the_fix(multi):
    model = Sigmoided(multi.model)
    config = fast_config(output="multilabel_logits", max_steps=2)
    with pytest.raises(ModelOutputError, match="Remove the final sigmoid"):
        engine.run(model, multi.class_list, config, [EVEN], multi.preprocessing)


def test_sample_mode_reports_sigmoid_probabilities(multi):
    config = fast_config(output="multilabel_logits", isolation_steps=5)
    samples = multi.test_x[:2]
    audit = engine.run(
        multi.model, multi.class_list, config, [EVEN], multi.preprocessing, samples=samples
    )
    from leapcore.results import audit_frame

    paths = {"isolated": [""] * 2, "masks": [""] * 2}
    df = audit_frame(audit, paths)
    expected = torch.sigmoid(audit.sample_logits[:, EVEN])
    assert torch.allclose(
        torch.tensor(df["probs"].to_numpy(), dtype=torch.float32), expected, atol=1e-6
    )


def test_report_says_probabilities_are_sigmoids(multi_run, multi):
    from leapcore.report import render_report

    config = fast_config(output="multilabel_logits", max_steps=4)
    audit = engine.run(multi.model, multi.class_list, config, [EVEN], multi.preprocessing)
    page = render_report(audit, title="multi")
    assert "Multi-label model: probabilities are per-class sigmoids" in page
