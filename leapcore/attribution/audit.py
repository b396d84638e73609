"""Attributions inside an audit: what each prototype and user sample is explained for, and the table.

- Prototypes are explained as the model saw them (alpha prototypes on the audit's fixed background,
  as isolation sees them, :func:`leapcore.engine.isolation_inputs`), each for the classes of its own
  target (a hybrid's classes one by one). Their image names are ``prototype <class>`` (``+`` between
  a hybrid's classes; `` #k`` after it when there are several prototypes per target).
- User samples are explained for their **top audited class**: the audited class with the largest
  logit in that image. The audit asks about those classes, so a sample's row answers "where in this
  image does the evidence for the audited class come from", side by side with that class's
  prototype, at one map per sample and method whatever the number of targets (its top class overall
  may be a class nobody audited; ``leap explain`` answers that question).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from leapcore.attribution.arrow import attributions_to_arrow, faithfulness_scores
from leapcore.attribution.core import attribute
from leapcore.errors import InputError


@dataclass
class Explained:
    """Images to explain, their names and the classes to explain in each.

    Attributes:
        images: ``[N, C, H, W]`` in [0, 1], as the model sees them.
        names: one name per image.
        targets: one list of class indices per image.
    """

    images: torch.Tensor
    names: list[str]
    targets: list[list[int]]

    def __add__(self, other: Explained) -> Explained:
        return Explained(
            torch.cat([self.images, other.images.to(self.images.device)]),
            self.names + other.names,
            self.targets + other.targets,
        )


def prototype_inputs(
    prototypes: Any, class_list: Sequence[str], config: Any, device: torch.device
) -> Explained:
    """The prototypes of a :class:`~leapcore.prototypes.PrototypeResult`, each for its own target."""
    from leapcore.engine import isolation_inputs

    shown, _ = isolation_inputs(prototypes, None, config, len(class_list), device)
    names, targets = [], []
    for row in range(len(shown)):
        classes = [int(c) for c in prototypes.targets[prototypes.row_target(row)]]
        name = "prototype " + "+".join(class_list[c] for c in classes)
        if prototypes.per_target > 1:
            name += f" #{prototypes.row_index(row)}"
        names.append(name)
        targets.append(classes)
    return Explained(shown, names, targets)


def sample_inputs(
    images: torch.Tensor,
    names: Sequence[str],
    logits: torch.Tensor,
    audited: Sequence[Sequence[int]],
) -> Explained:
    """User samples, each for its top audited class (see the module docstring)."""
    classes = sorted({int(c) for group in audited for c in group})
    if not classes:
        raise InputError("no audited classes to explain the samples for.")
    if len(names) != len(images) or len(logits) != len(images):
        raise InputError(f"{len(images)} samples but {len(names)} names and {len(logits)} logits.")
    chosen = torch.tensor(classes, device=logits.device)[logits[:, classes].argmax(1)]
    return Explained(images, list(names), [[int(c)] for c in chosen.tolist()])


def explain_table(
    model: Any,
    explained: Explained,
    methods: Sequence[str],
    class_list: Sequence[str],
    options: dict[str, Any] | None = None,
) -> pa.Table:
    """The ``attributions`` table of ``explained``: maps, faithfulness scores and the pictures."""
    result = attribute(model, explained.images, explained.targets, methods, **(options or {}))
    scores = faithfulness_scores(model, explained.images, result)
    return attributions_to_arrow(
        result, list(class_list), explained.names, scores, images=explained.images.cpu()
    )
