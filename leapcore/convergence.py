"""When has an optimisation converged? Plateau rules checked every few steps, per group of rows.

Prototype optimisation (``stop_early``): every ``stop_check_every`` steps each row's *success
probability* is measured twice: on the clean image, and averaged over the step's own randomly
transformed views since the last check (a free robustness measure: the views were computed
anyway). The success probability is the target probability, or one minus it for an antitype
(``objective_weight`` < 0), so that it tends to 1 as the optimisation succeeds. A check *improves*
a row when either measure beats its best so far by more than ``stop_tolerance`` in log space (a
relative gain of ``stop_tolerance``; a row climbing from a tiny probability gains a lot in log space,
so a slow start is not a plateau, and a noisy dip of the transformed views is no improvement but no
reset either). A group (a target's prototypes, which the diversity penalty couples) stops after
``stop_patience`` checks in a row without improvement of any of its rows, once each of its rows has
a clean success probability of at least :data:`SUCCESS_FLOOR`: a row still below even odds runs to
``max_steps`` (measured on EfficientNet-Lite0: hard classes sit at target probability 0.01-0.1 for
a hundred steps, with noisy "plateaus", before they climb). Stopped rows leave the batch.

Only the check syncs with the host: between checks the window sums stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_FLOOR = 1e-12  # log of a probability that underflowed to 0
SUCCESS_FLOOR = 0.5  # a row below this clean success probability never counts as converged


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


def improved(best: torch.Tensor, now: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``[B]`` bool: the success probability beat its best by more than ``tolerance`` in log space."""
    return now.log() > best.log() + tolerance


@dataclass
class PlateauStop:
    """Per-group plateau stopping (see the module doc). Rows are global positions in the batch.

    Attributes:
        groups: ``[B]`` group id of every row (host list).
        every: steps between checks.
        tolerance: smallest gain over the best (in log space) that counts as an improvement.
        patience: checks in a row without improvement before a group stops.
        antitype: the objective minimises the target probability.
    """

    groups: list[int]
    every: int
    tolerance: float
    patience: int
    antitype: bool = False
    window: torch.Tensor | None = None  # [B] sum of the view scores since the last check (device)
    counted: int = 0
    best: tuple[torch.Tensor, torch.Tensor] | None = None  # [B] best (clean, view) success so far
    streak: dict[int, int] = field(default_factory=dict)
    stopped_at: dict[int, int] = field(default_factory=dict)  # row -> step it stopped at

    def add(self, view_score: torch.Tensor, rows: list[int]) -> None:
        """Add one step's ``[len(rows)]`` view scores of the rows stepped (no host sync)."""
        if self.window is None:
            self.window = torch.zeros(len(self.groups), device=view_score.device)
        index = torch.tensor(rows, dtype=torch.long, device=view_score.device)
        self.window.index_add_(0, index, view_score.detach().to(self.window.dtype))
        self.counted += 1

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int, clean: torch.Tensor, rows: list[int]) -> list[int]:
        """Compare the rows ``rows`` (their clean scores ``[len(rows)]``) with their best so far and
        return the rows that stop now (one host sync)."""
        if self.window is None or self.counted == 0:
            return []
        index = torch.tensor(rows, dtype=torch.long, device=clean.device)
        view = success(self.window[index] / self.counted, self.antitype)
        clean = success(clean.to(view.dtype), self.antitype)
        self.window.zero_()
        self.counted = 0
        if self.best is None:
            self.best = (torch.full_like(self.window, _FLOOR), torch.full_like(self.window, _FLOOR))
            first = True
        else:
            first = False
        best_clean, best_view = self.best
        gained = improved(best_clean[index], clean, self.tolerance) | improved(
            best_view[index], view, self.tolerance
        )
        best_clean[index] = torch.maximum(best_clean[index], clean)
        best_view[index] = torch.maximum(best_view[index], view)
        state = torch.stack([gained, clean >= SUCCESS_FLOOR]).tolist()  # the sync
        if first:  # the first check only sets the bests
            return []
        stopping: list[int] = []
        for g in sorted({self.groups[r] for r in rows}):
            members = [k for k, r in enumerate(rows) if self.groups[r] == g]
            flat = not any(state[0][k] for k in members)
            self.streak[g] = self.streak.get(g, 0) + 1 if flat else 0
            if self.streak[g] >= self.patience and all(state[1][k] for k in members):
                stopping += [rows[k] for k in members]
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
            0,
            torch.tensor(rows, dtype=torch.long, device=values.device),
            values.to(self.window.dtype),
        )
        self.counted += 1

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int, rows: list[int]) -> list[int]:
        """The rows of ``rows`` that stop now (one host sync)."""
        if self.window is None or self.counted == 0:
            return []
        index = torch.tensor(rows, dtype=torch.long, device=self.window.device)
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
