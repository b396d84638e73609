"""The HTML report is one self-contained file with every image embedded; metrics and heatmap."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from leapcore import engine
from leapcore.report import audit_metrics, entanglement_heatmap, render_report
from tests.pipeline.conftest import DIGITS, tiny_config

CANARY = "CANARY-report-0c1d2e3f"


@pytest.fixture(scope="module")
def audit(digits_model):
    return engine.run(digits_model, DIGITS, tiny_config(), target_classes=[3, [1, 7]])


def test_report_is_self_contained_with_every_image(audit) -> None:
    page = render_report(
        audit,
        title="Audit <of> digits",
        model={"model": "models:/digits-cnn@champion", "digest": "abc"},
        config={**audit.config.secret_free(), "wandb_api_key": CANARY, "token": CANARY},
    )
    assert page.startswith("<!DOCTYPE html>")
    assert "Audit &lt;of&gt; digits" in page  # escaped
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    heatmaps = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    pairs = len(audit.isolation.pairs)
    assert len(images) == len(audit.prototypes.images) + 2 * pairs
    assert len(heatmaps) == 1
    for data in images + heatmaps:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    # Nothing to fetch: no external scripts, styles, images or links.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<script" not in page and "<link" not in page
    assert CANARY not in page
    assert "digit-1+digit-7" in page and "Entanglement" in page and "Feature isolation" in page


def test_metrics_hold_target_probability_and_entanglement(audit) -> None:
    metrics = audit_metrics(audit)
    probs = audit.prototypes.probs
    assert metrics["target_prob.digit-3"] == pytest.approx(float(probs[0, 3]))
    assert metrics["target_prob.digit-1_digit-7"] == pytest.approx(float(probs[1, [1, 7]].mean()))
    others = audit.entanglement[0].clone()
    others[3] = -1e9
    assert metrics["entanglement.digit-3.max_other"] == pytest.approx(float(others.max()))
    assert 0 <= metrics["isolation.mean_coverage"] <= 1
    assert all(re.fullmatch(r"[A-Za-z0-9_\-. /]+", key) for key in metrics)


def test_heatmap_is_a_png_with_a_row_per_prototype(audit) -> None:
    image = Image.open(io.BytesIO(entanglement_heatmap(audit, top=6)))
    assert image.format == "PNG"
    assert image.width > 6 * 34 and image.height > 2 * 34


def test_registered_sections_render_in_order_and_none_leaves_a_section_out(audit) -> None:
    from leapcore.report import ReportContext, report_section, report_sections

    seen: list[ReportContext] = []

    @report_section("zz_test_late", title="Late <section>", order=200)
    def late(audit, context):
        seen.append(context)
        return "<p id='late-body'>late</p>"

    @report_section("zz_test_early", order=1)
    def early(audit, context):
        return f"<p id='early-body'>rows: {len(context.tables['t']['x'])}</p>"

    @report_section("zz_test_absent")
    def absent(audit, context):
        return None

    try:
        page = render_report(audit, title="t", tables={"t": {"x": [1, 2]}})
    finally:
        for name in ("zz_test_late", "zz_test_early", "zz_test_absent"):
            report_sections.pop(name)
    assert page.index("early-body") < page.index("late-body")
    assert "rows: 2" in page and "Late &lt;section&gt;" in page
    assert "zz_test_absent" not in page
    assert seen[0].class_list == list(audit.class_list) and seen[0].title == "t"
    with pytest.raises(ValueError, match="section name"):
        report_section("bad name")
