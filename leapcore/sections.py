"""The report's optional sections, registered with :func:`leapcore.report.report_section`.

- ``model_kind``: what the probabilities and logits are for multi-label and segmentation models.
- ``quality``: off-target prototypes, clean / robust / transferred target probabilities, and each
  isolation's kept ratio, coverage and RISE AUCs (:func:`leapcore.quality.quality_section`).
- ``attributions``: the attribution maps of an ``attributions`` table, methods side by side with
  their faithfulness scores (:func:`leapcore.attribution.report.attribution_section`).
"""

from __future__ import annotations

from typing import Any

from leapcore.quality import quality_section
from leapcore.report import ReportContext, report_section


@report_section("model_kind", title="What the numbers are", order=0)
def model_kind(audit: Any, context: ReportContext) -> str | None:
    """Multi-label (sigmoid probabilities) or segmentation (logits pooled over a region) models."""
    import html

    from leapcore.outputs import describe_output

    text = describe_output(audit)
    return f"<p class='model-kind'>{html.escape(text)}</p>" if text else None


@report_section("quality", title="Quality of prototypes and isolations", order=10)
def quality(audit: Any, context: ReportContext) -> str | None:
    return quality_section(audit, context)


@report_section("attributions", title="Attributions", order=50)
def attributions(audit: Any, context: ReportContext) -> str | None:
    table = context.tables.get("attributions")
    if table is None:
        return None
    from leapcore.attribution.report import attribution_section

    return attribution_section(
        audit,
        {"attributions": table, "images": audit.samples, "relmax": context.tables.get("relmax")},
    )
