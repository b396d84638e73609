"""When has an optimisation converged? Plateau rules checked every few steps, per group of rows.

Prototype optimisation (``stop_early``): every ``stop_check_every`` steps each row's *success
probability* is measured twice: on the clean image, and averaged over the step's own randomly
transformed views since the last check (a free robustness measure: the views were computed
anyway). The success probability is the target probability, or one minus it for an antitype
(``objective_weight`` < 0), so that it tends to 1 as the optimisation succeeds. A row has
plateaued when both moved by at most ``stop_tolerance`` in log space since the previous check
(``|log s_now - log s_before|``): near success that is a relative change of ``stop_tolerance``, and a
row still climbing from a tiny probability moves a lot in log space, so a slow start is not mistaken
for a plateau. A group (a target's prototypes, which the diversity penalty couples) stops once every
row of it has plateaued ``stop_patience`` checks in a row; its rows leave the batch.

Only the check syncs with the host: between checks the window sums stay on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_FLOOR = 1e-12  # log of a probability that underflowed to 0


def as_rows(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """Row positions as a slice when contiguous (no gather), else an index tensor."""
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long, device=device)


def success(score: torch.Tensor, antitype: bool) -> torch.Tensor:
    """Target probability (or one minus it for an antitype), clamped away from 0 for the log."""
    prob = score.abs() if antitype else score
    s = 1 - prob if antitype else prob
    return s.clamp_min(_FLOOR)


def plateaued(before: torch.Tensor, now: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``[B]`` bool: the success probability moved by at most ``tolerance`` in log space."""
    return (now.log() - before.log()).abs() <= tolerance


@dataclass
class PlateauStop:
    """Per-group plateau stopping (see the module doc). Rows are global positions in the batch.

    Attributes:
        groups: ``[B]`` group id of every row (host list).
        every: steps between checks.
        tolerance: largest log change that counts as flat.
        patience: flat checks in a row before a group stops.
        antitype: the objective minimises the target probability.
    """

    groups: list[int]
    every: int
    tolerance: float
    patience: int
    antitype: bool = False
    window: torch.Tensor | None = None  # [B] sum of the view scores since the last check (device)
    counted: int = 0
    before: tuple[torch.Tensor, torch.Tensor] | None = None  # (clean, robust) at the last check
    streak: dict[int, int] = field(default_factory=dict)
    stopped_at: dict[int, int] = field(default_factory=dict)  # row -> step it stopped at

    def add(self, view_score: torch.Tensor, rows: list[int]) -> None:
        """Add one step's ``[len(rows)]`` view scores of the rows stepped (no host sync)."""
        if self.window is None:
            self.window = torch.zeros(len(self.groups), device=view_score.device)
        index = torch.tensor(rows, device=view_score.device)
        self.window.index_add_(0, index, view_score.detach().to(self.window.dtype))
        self.counted += 1

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int, clean: torch.Tensor, rows: list[int]) -> list[int]:
        """Compare the rows ``rows`` (their clean scores ``[len(rows)]``) with the last check and
        return the rows that stop now (one host sync)."""
        if self.window is None or self.counted == 0:
            return []
        index = torch.tensor(rows, device=clean.device)
        robust = success(self.window[index] / self.counted, self.antitype)
        clean = success(clean.to(robust.dtype), self.antitype)
        self.window.zero_()
        self.counted = 0
        full_clean = torch.full((len(self.groups),), math.nan, device=clean.device)
        full_robust = full_clean.clone()
        full_clean[index], full_robust[index] = clean, robust
        before, self.before = self.before, (full_clean, full_robust)
        if before is None:
            return []
        flat = plateaued(before[0][index], clean, self.tolerance) & plateaued(
            before[1][index], robust, self.tolerance
        )
        flat_rows = dict(zip(rows, flat.tolist()))  # the sync
        stopping: list[int] = []
        for g in sorted({self.groups[r] for r in rows}):
            members = [r for r in rows if self.groups[r] == g]
            self.streak[g] = self.streak.get(g, 0) + 1 if all(flat_rows[r] for r in members) else 0
            if self.streak[g] >= self.patience:
                stopping += members
        for r in stopping:
            self.stopped_at[r] = step
        return stopping


@dataclass
class MetricPlateau:
    """Per-row plateau of a few bounded metrics (isolation: kept logit share and coverage).

    Window means of each metric between checks; a row has plateaued when every metric's window
    mean moved by at most ``tolerance`` (absolute) since the previous check, and stops after
    ``patience`` such checks in a row. Rows are positions in the batch.
    """

    rows: int
    every: int
    tolerance: float
    patience: int
    window: torch.Tensor | None = None  # [rows, metrics] sums since the last check (device)
    counted: int = 0
    before: torch.Tensor | None = None  # [rows, metrics] window means of the previous check
    streak: dict[int, int] = field(default_factory=dict)
    stopped_at: dict[int, int] = field(default_factory=dict)

    def add(self, values: torch.Tensor, rows: list[int]) -> None:
        """Add one step's ``[len(rows), metrics]`` values of the rows stepped (no host sync)."""
        values = values.detach()
        if self.window is None:
            self.window = torch.zeros(self.rows, values.shape[1], device=values.device)
        self.window.index_add_(
            0, torch.tensor(rows, device=values.device), values.to(self.window.dtype)
        )
        self.counted += 1

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int, rows: list[int]) -> list[int]:
        """The rows of ``rows`` that stop now (one host sync)."""
        if self.window is None or self.counted == 0:
            return []
        index = torch.tensor(rows, device=self.window.device)
        means = self.window / self.counted
        self.window.zero_()
        self.counted = 0
        before, self.before = self.before, means
        if before is None:
            return []
        flat = ((means[index] - before[index]).abs() <= self.tolerance).all(1).tolist()
        done = []
        for r, ok in zip(rows, flat):
            self.streak[r] = self.streak.get(r, 0) + 1 if ok else 0
            if self.streak[r] >= self.patience:
                done.append(r)
                self.stopped_at[r] = step
        return done
