"""The prototype objective over a whole batch, and one optimisation step of it.

A :class:`PrototypeProblem` holds everything the step loop needs: the model, the target weights (one
row per prototype), the parameterisation, the augmenter and the penalties. ``step`` draws the random
transforms for the whole batch, runs the model over chunks of rows (so a memory budget never changes
the result), accumulates gradients and applies one Adam update; it returns device tensors and never
synchronises with the host. The learning-rate finder and the prototype optimisation both drive it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leapcore.config import EngineConfig
from leapcore.convergence import as_rows
from leapcore.errors import InputError
from leapcore.objectives import ImageView, build_objective
from leapcore.optim import BatchedAdam
from leapcore.parameterisation import Parameterisation, create_parameterisation
from leapcore.rng import RowKey, RowStreams, Stream
from leapcore.transforms import DRAW_COLUMNS, Augmenter, NoiseBank, create_augmenter

TargetSet = list[int]


def target_weights(
    targets: list[TargetSet],
    num_classes: int,
    objective_weight: float,
    per_target: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per prototype: weights over classes (hybrids share the weight) and the target index.

    Returns:
        ``(weights [B, K], group [B])`` with rows ordered target-major: all prototypes of target 0 first.
    """
    rows = []
    for classes in targets:
        row = torch.zeros(num_classes, device=device)
        row[torch.tensor(classes, device=device)] = objective_weight / len(classes)
        rows.extend([row] * per_target)
    group = torch.arange(len(targets), device=device).repeat_interleave(per_target)
    return torch.stack(rows), group


def row_keys(targets: list[TargetSet], per_target: int) -> list[RowKey]:
    """The random-stream key of every prototype row: its target classes and prototype index, so a
    class's prototypes come out the same whichever other classes share the batch."""
    return [(tuple(sorted(classes)), k) for classes in targets for k in range(per_target)]


@dataclass
class StepOutput:
    loss: torch.Tensor  # [] total loss of the step (device)
    finite: torch.Tensor  # [] bool: loss and gradients finite (device)
    grad_max: torch.Tensor  # [] largest absolute gradient (device)
    row_score: torch.Tensor | None = None  # [rows stepped] mean target probability of the views


class PrototypeProblem:
    """Maximise weighted target logits of a batch of images under random transforms, with penalties."""

    def __init__(
        self,
        model: torch.nn.Module,
        start: torch.Tensor,
        weights: torch.Tensor,
        group: torch.Tensor,
        config: EngineConfig,
        chunk_size: int,
        seed: int,
        keys: list[RowKey] | None = None,
    ):
        self.model = model
        self.weights = weights
        self.group = group
        self.config = config
        self.batch = weights.shape[0]
        self.chunk_size = max(1, chunk_size)
        self.samples = config.transform_samples
        self.objective = build_objective(config)
        self.augmenter: Augmenter = create_augmenter(
            config.transform, (config.blur_min, config.blur_max)
        )
        self.shape = tuple(start.shape[1:])
        device, dtype = start.device, start.dtype
        self.colour = create_parameterisation(config.parameterisation, start, self.batch)
        self.alpha: Parameterisation | None = None
        if config.use_alpha or config.alpha_only:
            full = torch.full((1, 1, *self.shape[1:]), 0.9, device=device, dtype=dtype)
            self.alpha = create_parameterisation("pixel", full, self.batch)
        trainable = [] if config.alpha_only else list(self.colour.params)
        if self.alpha is not None:
            trainable += self.alpha.params
        self.params = trainable
        self.optimiser = BatchedAdam(self.params)
        # Every row draws from its own stream (keys: see ``row_keys``; default its position).
        self.keys = list(range(self.batch)) if keys is None else list(keys)
        if len(self.keys) != self.batch:
            raise ValueError(f"{len(self.keys)} row keys for a batch of {self.batch} rows")
        self.streams = RowStreams(seed, self.keys, device)
        self.bank = NoiseBank(seed + Stream.NOISE_BANK, self.shape, device, dtype)
        # A fixed background for evaluating alpha prototypes, so reported logits are repeatable.
        eval_gen = torch.Generator(device=device).manual_seed(seed + Stream.TRANSFORMS)
        self.eval_background = torch.rand(
            (1, *self.shape), generator=eval_gen, device=device, dtype=dtype
        )

    # -- rendering -------------------------------------------------------------------------------
    def images(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.colour.render(rows)

    def alphas(self, rows: slice = slice(None)) -> torch.Tensor | None:
        return None if self.alpha is None else self.alpha.render(rows)

    def composite(self, rows: slice, background: torch.Tensor) -> torch.Tensor:
        image = self.images(rows)
        alpha = self.alphas(rows)
        return image if alpha is None else image * alpha + background * (1 - alpha)

    # -- objective -------------------------------------------------------------------------------
    def penalty(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """Per-row penalties that need no model: the objective's image terms (smoothness, alpha
        size, diversity), evaluated once per step on the batch's ``rows``."""
        view = ImageView(lambda: self.images(rows), self.alphas(rows), self.group[rows])
        return self.objective.penalty(view)

    def step(self, lr: float | torch.Tensor, active: list[int] | None = None) -> StepOutput:
        """One Adam step on every row (or on the rows ``active``, in order; the others stay as they
        are, Adam moments included); returns device tensors only (no host sync).

        A row's step does not depend on which other rows are active: its draws come from its own
        stream, its penalties from its own group (stop whole groups, see ``leapcore.convergence``).
        """
        full = active is None or len(active) == self.batch
        chosen = list(range(self.batch)) if full else list(active)
        b, t = len(chosen), self.samples
        like = self.weights
        n = b * t
        # Local row r's copy k is draw k * b + r; column DRAW_COLUMNS picks the alpha background.
        draw = background = None
        if not self.augmenter.is_identity or self.alpha is not None:
            u = self.streams.rand((t, DRAW_COLUMNS + 1), like.dtype, None if full else chosen)
            u = u.transpose(0, 1).reshape(n, -1)
            draw = self.augmenter.draw(u, self.bank)
            if self.alpha is not None:
                background = self.bank.pick(u[:, DRAW_COLUMNS])
        loss_total = torch.zeros((), device=like.device)
        pen = self.penalty(slice(None) if full else as_rows(chosen, like.device)).sum()
        if pen.requires_grad:
            pen.backward()
        loss_total = loss_total + pen.detach()
        scores = []
        for start in range(0, b, self.chunk_size):
            local = slice(start, min(start + self.chunk_size, b))
            rows = local if full else as_rows(chosen[local], like.device)
            m = local.stop - local.start
            index = self._draw_rows(local, b)
            image = self.images(rows)
            alpha = self.alphas(rows)
            view = image.repeat(t, 1, 1, 1) if t > 1 else image
            if alpha is not None:
                alpha = alpha.repeat(t, 1, 1, 1) if t > 1 else alpha
                view = view * alpha + background[index] * (1 - alpha)
            if not self.augmenter.is_identity:
                view = self.augmenter.apply(view, draw.rows(index))
            logits = self.model(view)
            with torch.no_grad():
                scores.append(self.view_score(logits, rows).view(t, m).mean(0))
            objective = self.objective(logits, self.weights[rows].repeat(t, 1)).view(t, m).mean(0)
            loss = -objective.sum()
            if not loss.requires_grad:
                raise InputError(
                    "the model's output does not depend on its input: no gradient reaches the image, "
                    "so there is nothing to optimise. Check that the model uses its input and does "
                    "not detach it or run under torch.no_grad()."
                )
            loss.backward()
            loss_total = loss_total + loss.detach()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        grad_max = torch.zeros((), device=like.device)
        for g in grads:  # the max norm propagates NaN and inf, so it also tells finiteness
            grad_max = torch.maximum(grad_max, torch.linalg.vector_norm(g, ord=float("inf")))
        finite = torch.isfinite(loss_total) & torch.isfinite(grad_max)
        self.optimiser.step(grads, lr, None if full else torch.tensor(chosen, device=like.device))
        for p in self.params:
            p.grad = None
        return StepOutput(loss_total, finite, grad_max, torch.cat(scores) if scores else None)

    def view_score(self, logits: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        """Mean target probability of each view (``t`` copies of ``rows``, copy-major)."""
        probs = self.probabilities(logits.detach())
        mask = (self.weights[rows] != 0).to(probs.dtype).repeat(self.samples, 1)
        return (probs * mask).sum(1) / mask.sum(1).clamp_min(1)

    def _draw_rows(self, rows: slice, b: int | None = None) -> slice | torch.Tensor:
        """Which rows of the step's draws belong to a chunk: copy ``k`` of (local) row ``r`` of a
        step over ``b`` rows is draw ``k * b + r``. A slice (no gather) when the rows are contiguous."""
        b, t = self.batch if b is None else b, self.samples
        if t == 1:
            return rows
        if rows.start == 0 and rows.stop == b:
            return slice(0, b * t)
        device = self.weights.device
        return (
            torch.arange(t, device=device)[:, None] * b
            + torch.arange(rows.start, rows.stop, device=device)[None]
        ).reshape(-1)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, active: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean images (alpha composited on a fixed background) and their logits, chunked; of
        every row, or of the rows ``active`` in that order."""
        views, logits = [], []
        count = self.batch if active is None else len(active)
        for start in range(0, count, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, count))
            if active is not None:
                rows = as_rows(active[rows], self.weights.device)
            view = self.composite(rows, self.eval_background)
            views.append(view)
            logits.append(self.model(view))
        return torch.cat(views), torch.cat(logits)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's class probabilities (``LogitsModel.probabilities``; softmax for a bare model)."""
        own = getattr(self.model, "probabilities", None)
        return own(logits) if callable(own) else logits.softmax(dim=1)

    def target_score(
        self, logits: torch.Tensor, rows: slice | torch.Tensor = slice(None)
    ) -> torch.Tensor:
        """Per row (of ``rows``): mean probability of its target classes, signed by the objective's
        direction."""
        probs = self.probabilities(logits)
        mask = (self.weights[rows] != 0).to(probs.dtype)
        mean = (probs * mask).sum(1) / mask.sum(1).clamp_min(1)
        return mean if self.config.objective_weight >= 0 else -mean
