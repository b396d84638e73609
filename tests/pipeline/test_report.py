"""The HTML report: one self-contained, autoescaped page with its figures embedded, a summary that
reads the optional quality columns when present, only the options that matter, one number format per
kind, a provenance block a cached page gets per run, and a 10-class report of 224 px under 1 MB."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch import nn

from leapcore import engine
from leapcore.figures import entanglement_norm
from leapcore.report import (
    PROVENANCE_MARK,
    audit_metrics,
    entanglement_heatmap,
    render_report,
    stamp_provenance,
    trajectory_metrics,
)
from leapcore.report_view import fmt_num, fmt_pct, fmt_prob, fmt_seconds
from tests.pipeline.conftest import DIGITS, tiny_config

CANARY = "CANARY-report-0c1d2e3f"
DATA_URI = re.compile(r"""src=["']data:(image/[a-z+]+);base64,([A-Za-z0-9+/=]+)["']""")


@pytest.fixture(scope="module")
def audit(digits_model):
    return engine.run(digits_model, DIGITS, tiny_config(), target_classes=[3, [1, 7]])


def _images(page: str) -> list[tuple[str, bytes]]:
    return [(mime, base64.b64decode(data)) for mime, data in DATA_URI.findall(page)]


def _text(page: str) -> str:
    """What a reader sees: the page without tags, styles and data URIs."""
    body = re.sub(r"<style.*?</style>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def test_report_is_self_contained_escaped_and_every_image_decodes(audit) -> None:
    hostile = dataclasses.replace(
        audit, class_list=[*DIGITS[:3], "<script>x</script>", *DIGITS[4:]]
    )
    page = render_report(
        hostile,
        title="Audit <of> digits",
        model={"model": "models:/digits-cnn@champion", "digest": "abc"},
        config={**audit.config.secret_free(), "wandb_api_key": CANARY, "token": CANARY},
    )
    assert page.startswith("<!DOCTYPE html>")
    assert "Audit &lt;of&gt; digits" in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<script>x" not in page and "<script" not in page and "<link" not in page
    images = _images(page)
    pairs = len(audit.isolation.pairs)
    # prototypes + isolation overlays (WebP), the trajectory plot and the heatmap (SVG)
    assert [m for m, _ in images].count("image/webp") == len(audit.prototypes.images) + pairs
    assert [m for m, _ in images].count("image/svg+xml") == 2
    for mime, data in images:
        if mime == "image/webp":
            Image.open(io.BytesIO(data)).verify()
        else:
            assert ET.fromstring(data).tag.endswith("svg")
    # Nothing to fetch: no external scripts, styles, images or links.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert CANARY not in page
    for section in ("summary", "prototypes", "entanglement", "isolation", "configuration"):
        assert f'<section id="{section}"' in page, section


def test_summary_reads_the_quality_columns_when_present(audit) -> None:
    plain = render_report(audit, title="t")
    assert "under crops and flips" not in plain
    rows = len(audit.prototypes.images)
    tables = {
        "prototypes": pa.table(
            {
                "row": pa.array(range(rows), pa.int32()),
                "off_target": pa.array([False, True]),
                "target_prob_robust": pa.array([0.91, 0.12], pa.float32()),
            }
        ),
        "isolations": pa.table(
            {"kept_logit": pa.array([0.25] * len(audit.isolation.pairs), pa.float32())}
        ),
    }
    page = render_report(audit, title="t", tables=tables)
    text = _text(page)
    assert "under crops and flips" in text and "0.910" in text and "0.120" in text
    assert "fragile: target probability 0.120 under crops and flips" in text
    # off_target from the table wins over the engine's own top class
    assert "digit-1+digit-7 #0: the model's top class for it is" in text
    assert text.count("keeps 25 % of its logit") == len(audit.isolation.pairs)
    assert "Look at these first" in text


def test_isolation_sentence_matches_the_logits(audit) -> None:
    iso = audit.isolation
    text = _text(render_report(audit, title="t"))
    for k, (_, c) in enumerate(iso.pairs):
        full, alone = float(iso.logits_full[k]), float(iso.logits_isolated[k])
        kept = alone / max(abs(full), 1e-6)
        assert (
            f"keeps {fmt_pct(kept)} of its logit for {DIGITS[c]} ({full:.2f} → {alone:.2f})" in text
        )


def test_configuration_shows_changed_options_and_the_stages_that_ran(audit) -> None:
    config = {**audit.config.secret_free(), "output_dir": "/home/someone/out", "use_hipe": False}
    without_isolation = dataclasses.replace(audit, isolation=None)
    page = render_report(without_isolation, title="t", config=config)
    section = page.split('<section id="configuration">', 1)[1]
    changed = section.split("<details>", 1)[0]
    for option in ("max_steps", "find_lr_steps", "transform", "input_dim"):  # tiny_config sets them
        assert f"<td>{option}</td>" in changed, option
    assert "<td>seed</td>" not in changed  # at its default: in the collapsed list only
    assert "<td>seed</td>" in section
    assert "output_dir" not in page and "/home/someone" not in page  # environment, not results
    # isolation did not run and its options are at their defaults: not listed at all
    assert "hipe_min_cell" not in section and "isolation_lr" not in section
    assert "hipe_min_cell" in render_report(audit, title="t").split('id="configuration"')[1]


def test_one_number_format_per_kind(audit) -> None:
    assert fmt_num(8.078e-05) == "8.08×10⁻⁵" and fmt_num(18.77) == "18.8" and fmt_num(3) == "3"
    assert fmt_prob(0.87312) == "0.873" and fmt_pct(0.623) == "62 %"
    assert fmt_seconds(125.2) == "2 min 05 s" and fmt_seconds(3.14159) == "3.14 s"
    text = _text(render_report(audit, title="t"))
    assert not re.search(r"\d\.\d+e[-+]?\d", text), re.search(r".{40}\d\.\d+e[-+]?\d.{20}", text)
    assert not re.search(r"\d\.\d{5,}", text)


def test_provenance_is_filled_per_run(audit) -> None:
    model = {"model": "models:/digits-cnn/1", "digest": "f" * 64}
    cached = render_report(audit, title="t", model=model, stamp_later=True)
    assert PROVENANCE_MARK in cached and "MLflow run" not in cached
    stamped = stamp_provenance(
        cached, {"mlflow_run": "run123", "prefect_flow_run": "flow456"}, model
    )
    text = _text(stamped)
    for expected in ("MLflow run", "run123", "Prefect flow run", "flow456", "f" * 64, "leapcore"):
        assert expected in text, expected
    assert re.search(r"generated\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text)
    with pytest.raises(ValueError, match="placeholder"):
        stamp_provenance(stamped, {}, model)


def test_metrics_hold_target_probability_and_entanglement(audit) -> None:
    metrics = audit_metrics(audit)
    probs = audit.prototypes.probs
    assert metrics["target_prob/3_digit_3"] == pytest.approx(float(probs[0, 3]))
    assert metrics["target_prob/1-7_digit_1_digit_7"] == pytest.approx(
        float(probs[1, [1, 7]].mean())
    )
    others = audit.entanglement[0].clone()
    others[3] = -1e9
    assert metrics["entanglement_max_other/3_digit_3"] == pytest.approx(float(others.max()))
    assert 0 <= metrics["isolation/mean_coverage"] <= 1
    assert all(re.fullmatch(r"[A-Za-z0-9_\-./]+", key) for key in metrics)
    steps = trajectory_metrics(audit)
    series = steps["target_prob_trajectory/3_digit_3/0"]
    assert [s for s, _ in series] == list(audit.prototypes.trajectory_steps)
    assert series[-1][1] == pytest.approx(float(audit.prototypes.trajectory[-1, 0, 3]))


def test_heatmap_is_diverging_and_centred_on_zero(audit) -> None:
    norm = entanglement_norm(np.array([[-0.2, 0.0, 0.4]]))
    assert norm(0.0) == pytest.approx(0.5)  # white
    assert norm(1.0) == pytest.approx(1.0) and norm(-1.0) == pytest.approx(0.0)
    assert entanglement_norm(np.array([[-3.0, 2.0]]))(-3.0) == pytest.approx(0.0)
    image = Image.open(io.BytesIO(entanglement_heatmap(audit, top=6)))
    assert image.format == "PNG" and image.width > 300 and image.height > 150


class Wide(nn.Module):
    """An untrained 3-channel CNN at 224 px: photo-sized prototypes and masks in a second."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 7, stride=4, padding=3),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def pink_noise(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Images with natural images' 1/f spectrum: as textured as real prototypes (which the Fourier
    parameterisation makes 1/f too), far harder to compress than a few steps of a tiny model."""
    g = torch.Generator().manual_seed(seed)
    fy, fx = torch.fft.fftfreq(size)[:, None], torch.fft.rfftfreq(size)[None, :]
    spectrum = torch.view_as_complex(torch.randn(n, 3, size, size // 2 + 1, 2, generator=g))
    image = torch.fft.irfft2(spectrum / (fx**2 + fy**2).sqrt().clamp_min(1 / size), s=(size, size))
    image = (image - image.mean(dim=(2, 3), keepdim=True)) / image.std(dim=(2, 3), keepdim=True)
    return torch.sigmoid(1.5 * image)


def test_a_ten_class_report_at_224_pixels_is_under_one_megabyte() -> None:
    torch.manual_seed(0)
    names = [f"class number {i}" for i in range(10)]
    config = {
        "input_dim": [3, 224, 224],
        "max_steps": 8,
        "find_lr_steps": 0,
        "lr": 0.05,
        "transform": "s",
        "isolation_steps": 3,
        "max_isolate_classes": 3,
        "log_freq": 2,
    }
    audit = engine.run(Wide().eval(), names, config, target_classes=list(range(10)), device="cpu")
    assert len(audit.isolation.pairs) == 30
    textured = dataclasses.replace(
        audit, prototypes=dataclasses.replace(audit.prototypes, images=pink_noise(10))
    )
    for case in (audit, textured):
        page = render_report(case, title="ten classes")
        size = len(page.encode("utf-8"))
        assert size < 1_000_000, size
        assert len(_images(page)) == 10 + 30 + 2


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


def test_a_verdict_section_renders_under_the_summary_and_its_highlights_lead_look_first(
    audit,
) -> None:
    from leapcore.report import (
        report_highlight_functions,
        report_highlights,
        report_section,
        report_sections,
    )

    @report_section("zz_test_verdict", title="Verdict", order=-1)
    def verdict(audit, context):
        return "<p id='verdict-body'>verdict</p>"

    @report_highlights("zz_test_verdict")
    def verdict_highlights(audit, context):
        return ["zz-class is likely spurious"]

    try:
        page = render_report(audit, title="t")
    finally:
        report_sections.pop("zz_test_verdict")
        report_highlight_functions.pop("zz_test_verdict")
    summary, verdict_at = page.index('id="summary"'), page.index("verdict-body")
    assert summary < verdict_at < page.index('id="prototypes"')
    look = page[page.index('class="look"') :]
    assert look.index("zz-class is likely spurious") < look.index("</ol>")
    assert "<li>zz-class is likely spurious</li>" in page


def test_sample_mode_report_shows_each_image_top_classes(digits_model) -> None:
    from tests.pipeline.conftest import digits_images

    images, labels = digits_images()
    audit = engine.run(digits_model, DIGITS, tiny_config(), samples=images[:3], device="cpu")
    page = render_report(audit, title="explain", sample_names=["a.png", "b.png", "c.png"])
    text = _text(page)
    assert '<section id="images"' in page and '<section id="isolation"' in page
    probs = audit.sample_logits.softmax(1)
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        top = int(probs[i].argmax())
        assert f"{name} {DIGITS[top]}: {float(probs[i, top]):.3f}" in " ".join(text.split())
    assert text.count("of its logit for") == len(audit.isolation.pairs)


def test_the_scan_and_the_diff_give_look_first_sentences_for_what_got_flagged() -> None:
    import pyarrow as pa

    from leapcore.diff import _COLUMNS, SCHEMA, _row
    from leapcore.highlights import diff_highlights, spurious_highlights
    from leapcore.report import ReportContext, render_highlights

    scan = pa.Table.from_pylist(
        [
            {
                "class_name": "tabby",
                "verdict": "clean",
                "concentration": 0.2,
                "flip_rate": 0.0,
                "control_flip_rate": 0.0,
            },
            {
                "class_name": "zz-weak",
                "verdict": "suspicious",
                "concentration": 0.3,
                "flip_rate": 0.9,
                "control_flip_rate": 0.1,
            },
            {
                "class_name": "zz-marked",
                "verdict": "likely spurious",
                "concentration": 0.41,
                "flip_rate": 0.8,
                "control_flip_rate": 0.05,
            },
        ]
    )
    rows = [
        _row("entanglement", "3", "8", "pair_prob", 0.1, 0.7, flag="entangled", detail="on 10"),
        _row("entanglement", "4", "9", "pair_prob", 0.1, 0.15, detail="on 10"),
        _row(
            "verdict",
            "zz-marked",
            None,
            "verdict",
            0.0,
            2.0,
            flag="worse",
            before_text="clean",
            after_text="likely spurious",
        ),
    ]
    diff = pa.Table.from_pylist(rows, schema=_COLUMNS).replace_schema_metadata(
        {
            b"leapcore.schema": SCHEMA.encode(),
            b"leapcore.previous": b"v1",
            b"leapcore.current": b"v2",
        }
    )
    context = ReportContext(tables={"spurious": scan, "diff": diff})
    scan_items = spurious_highlights(None, context)
    assert [i.split(":")[1].strip() for i in scan_items] == [
        "zz-marked is likely spurious",
        "zz-weak is suspicious",
    ]
    assert "41 % of its evidence" in scan_items[0] and "flips 80 % of them" in scan_items[0]
    assert "(5 % when pasted elsewhere)" in scan_items[0]
    diff_items = diff_highlights(None, context)
    assert diff_items == [
        "Since v1: the scan's verdict on zz-marked got worse (clean → likely spurious).",
        "Since v1: 3 ↔ 8 became entangled (pair probability 0.100 → 0.700, on 10).",
    ]
    assert render_highlights(None, context) == scan_items + diff_items
    assert render_highlights(None, ReportContext()) == []


def test_the_isolation_overlay_grades_the_evidence_and_outlines_what_the_mask_keeps(audit) -> None:
    import io

    import numpy as np
    from PIL import Image

    from leapcore.figures import EDGE_RGB, isolation_figure

    iso = audit.isolation
    assert iso.saliency is not None and iso.saliency.shape == iso.masks.shape
    page = render_report(audit, title="t")
    assert "inside the cyan outline" in page and 'title="evidence"' in page
    import base64
    import re

    cards = re.findall(r'<img src="data:image/webp;base64,([^"]+)" alt="isolation of', page)
    assert len(cards) == len(iso.pairs)
    outlined = 0
    for card in cards:
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(card))).convert("RGB")) / 255
        outlined += ((shown[..., 0] < 0.3) & (shown[..., 1] > 0.7) & (shown[..., 2] > 0.8)).any()
    partial = int(((iso.masks.flatten(1).mean(1) > 0) & (iso.masks.flatten(1).mean(1) < 1)).sum())
    assert outlined >= partial > 0  # every mask that keeps part of its image is outlined
    peaks = iso.saliency.flatten(1).amax(1)
    assert torch.allclose(peaks, torch.ones_like(peaks)) and iso.saliency.min() >= 0
    # the reported mask is the saliency's top share: kept pixels rank above every dropped one
    for k in range(len(iso.pairs)):
        kept, dropped = iso.saliency[k][iso.masks[k] > 0.5], iso.saliency[k][iso.masks[k] < 0.5]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max() - 1e-6
    image = torch.full((3, 32, 32), 0.5)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32).expand(1, 32, 32)

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255

    graded = pixels(isolation_figure(image, mask, saliency=ramp))
    assert graded.shape == (128, 128, 3)  # a 32 px input is drawn 4x larger
    red, green, blue = graded[..., 0], graded[..., 1], graded[..., 2]
    edge = (red < EDGE_RGB[0] + 0.3) & (green > EDGE_RGB[1] - 0.2) & (blue > EDGE_RGB[2] - 0.2)
    assert edge[33, 36:92].mean() > 0.9 and edge[64, 33] and edge[64, 94]
    assert not edge[64, 44:84].any() and not edge[8].any()  # inside and outside: the heatmap
    # the heat follows the saliency, not the mask: the right of the image is brighter, inside too
    assert graded[64, 80].sum() > graded[64, 44].sum() + 0.2
    flat = pixels(isolation_figure(image, mask))
    assert abs(flat[64, 80].sum() - flat[64, 44].sum()) < 0.1  # the binary mask alone: flat
