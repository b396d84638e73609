"""How a target is named in metric keys, file names and table columns.

One module below the report and the quality metrics, which both build keys from it.
"""

from __future__ import annotations

import re

_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """Lower-case letters and digits joined by ``_`` (``"golden retriever"`` -> ``golden_retriever``)."""
    return _SLUG.sub("_", str(text).lower()).strip("_") or "class"


def target_key(classes: list[int], class_list: list[str]) -> str:
    """``3_digit_3``, ``1-7_digit_1_digit_7``: a target's class indices and a slug of its names."""
    return "-".join(map(str, classes)) + "_" + "_".join(slug(class_list[c]) for c in classes)
