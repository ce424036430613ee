"""One objective per task, written once: used by training, by the fold-in of new users and
as the reference any analytic gradient path is tested against.

- ``explicit``: mean squared error in standardised rating units, ((prediction - rating) /
  scale)^2 with ``scale`` the train ratings' std (the models predict ``mean + scale *
  network``), so learning rates and L2 carry over between rating scales.
- ``implicit``: binary cross-entropy on logits, each positive with ``n_negatives`` items the
  user has not interacted with, drawn uniformly and vectorised (``dataset.sample_negatives``).
  Optionally weighted per positive (``--recency``: ``dataset.pair_recency_weights``), each
  negative carrying its positive's weight; the weighted mean keeps the step's scale.
- the row L2 shared by both: ``reg`` times the squared norm of every embedding row a sample
  looks up, divided by the samples in the batch (``RowL2``).

A family with its own likelihood (a closed form, a VAE) brings its own ``Objective``
subclass through the same seam. Each objective also knows what its scores mean (for stage
70's output) and how the task is evaluated (``evaluation.py`` asks it for the metrics).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .dataset import KeySet, sample_negatives


class Objective:
    """What a model is fitted to on one task."""

    task = ""
    samples_per_positive = 1
    needs_ratings = False          # its targets are ratings (data without them is refused)
    weighs_pairs = False           # takes one loss weight per observed pair (sample_weights)

    @property
    def draws_negatives(self) -> bool:
        """Each positive comes with sampled negatives (which read the train keys)."""
        return self.samples_per_positive > 1

    def expand(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
               keyset: KeySet | None, n_items: int, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training samples (users, items, targets) of a batch of observed pairs."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss of model outputs ``out`` against ``target``."""
        raise NotImplementedError

    def score_label(self, rating_scale: tuple[float, float]) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """What is fitted, in words (for the fold-in's message)."""
        raise NotImplementedError


class ExplicitMSE(Objective):
    """Squared error in standardised units: ((out - rating) / scale)^2, averaged."""

    task = "explicit"
    needs_ratings = True

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def expand(self, users, items, ratings, keyset=None, n_items=0, generator=None):
        return users, items, ratings

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) / self.scale).square().mean()

    def score_label(self, rating_scale: tuple[float, float]) -> str:
        lo, hi = rating_scale
        return f"score = predicted rating (scale {lo:g}-{hi:g}, not clipped)"

    def describe(self) -> str:
        return "squared error on the given ratings"


class ImplicitBCE(Objective):
    """Binary cross-entropy on logits with sampled negatives."""

    task = "implicit"
    weighs_pairs = True

    def __init__(self, n_negatives: int = 4):
        self.n_negatives = int(n_negatives)
        self.samples_per_positive = 1 + self.n_negatives

    def expand(self, users, items, ratings, keyset, n_items, generator):
        neg = sample_negatives(users, n_items, self.n_negatives, keyset, generator)
        uu = torch.cat([users, users.repeat_interleave(self.n_negatives)])
        ii = torch.cat([items, neg.reshape(-1)])
        y = torch.cat([torch.ones_like(users, dtype=torch.float32),
                       torch.zeros(neg.numel(), device=users.device)])
        return uu, ii, y

    def sample_weights(self, weight: torch.Tensor) -> torch.Tensor:
        """The weights of ``expand``'s samples from one weight per positive: each negative
        carries its positive's."""
        return torch.cat([weight, weight.repeat_interleave(self.n_negatives)])

    def loss(self, out: torch.Tensor, target: torch.Tensor,
             weight: torch.Tensor | None = None,
             total: torch.Tensor | None = None) -> torch.Tensor:
        """The mean BCE; with ``weight`` (``sample_weights``), sum(w * bce) / sum(w), so a
        batch of old interactions does not take a smaller step than one of recent ones.
        ``total``: the denominator instead of sum(w) (under torchrun, a rank's share of the
        global batch's weight, so that the ranks' gradients add up to one process's)."""
        if weight is None:
            return nn.functional.binary_cross_entropy_with_logits(out, target)
        each = nn.functional.binary_cross_entropy_with_logits(out, target, reduction="none")
        return (each * weight).sum() / (weight.sum() if total is None else total)

    def score_label(self, rating_scale: tuple[float, float]) -> str:
        return "score = the model's logit for an interaction"

    def describe(self) -> str:
        return (f"the given items as positives plus {self.n_negatives} sampled negatives each "
                f"(binary cross-entropy)")


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "explicit": lambda scale=1.0, n_negatives=4: ExplicitMSE(scale),
    "implicit": lambda scale=1.0, n_negatives=4: ImplicitBCE(n_negatives),
}


def for_task(task: str, scale: float = 1.0, n_negatives: int = 4) -> Objective:
    """The objective of ``task`` ("explicit" or "implicit")."""
    if task not in OBJECTIVES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[task](scale=scale, n_negatives=n_negatives)


class RowL2:
    """Collects the rows a model looks up in ``tables`` during forward (``family.look``
    appends them to ``table.captured``), so the loss adds L2 on exactly the rows each sample
    used, without a second lookup: ``reg * take(n_samples)``."""

    def __init__(self, tables: list[nn.Embedding]):
        self.outs: list[torch.Tensor] = []
        self.tables = list(tables)
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        self._active = bool(on)
        for m in self.tables:
            m.captured = self.outs if on else None

    def take(self, n_samples: int) -> torch.Tensor:
        """Sum of squares of the captured rows, divided by the samples in the batch."""
        total = sum(o.float().square().sum() for o in self.outs)
        self.outs.clear()
        return total / max(1, n_samples)

    def close(self) -> None:
        self.active = False
