"""Rebalanced classifier losses that mmdet does not ship (docs/architecture.md#rebalanced-classifier).

Softmax CE, Seesaw and EQLv2 are mmdet's own (``CrossEntropyLoss``,
``SeesawLoss``, ``EQLV2Loss``); this module adds group softmax (BAGS, Li et al.
2020) as an mmdet-registered loss, so a detector whose config names it (with
``custom_imports=dict(imports=['crat_ft.losses'])``) trains, predicts and
evaluates in plain mmdet, and :class:`DualSoftmaxScores`, which mixes the
retrained and the original classifier's scores at inference (SimCal's dual
head; written by ``crat-ft export --combine-original``).

Shape legend: ``N`` RoIs, ``C`` foreground classes (background label ``C``),
``G`` non-empty foreground groups.

Classifier channels (``C + 2 + G``)::

    [0, C)        one logit per foreground class
    C             background          } group 0: background vs. foreground
    C + 1         "foreground"        }
    C + 2 + j     "others" of foreground group j

Classes are grouped by training instance count (``group_bounds``, LVIS-style
bins 1–9, 10–99, 100–999, 1000+ by default). Each group has its own softmax
over its classes plus "others". A RoI is a positive of its class's group and
"others" in every other group; background RoIs are background in group 0 and
"others" everywhere else. To keep rare groups from being drowned by "others"
(BAGS samples them), each group weights its "others" RoIs so that they count
at most ``others_ratio`` times its own RoIs (at least ``others_ratio`` RoIs'
worth when the batch has none of the group). The weighting is deterministic,
so a resumed run reproduces an uninterrupted one.

Inference: ``p(c) = p_0(foreground) · p_g(c)(c)`` with ``g(c)`` the class's
group, ``p(background) = p_0(background)``.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor, nn

DEFAULT_GROUP_BOUNDS = (10, 100, 1000)
CRAT_LOSSES = ("GroupSoftmaxLoss", "DualSoftmaxScores")  # registered below; configs naming them import this module


def _reduce(per_sample: Tensor, weight: Tensor | None, reduction: str, avg_factor: float | None) -> Tensor:
    """mmdet's loss reduction of per-sample losses: optional weights, then 'none', 'sum' or 'mean' over ``avg_factor`` (default N)."""
    if weight is not None:
        per_sample = per_sample * weight.float()
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "mean":
        total = total / (avg_factor if avg_factor is not None else max(per_sample.shape[0], 1))
    return total


def class_groups(
    class_instance_count: Sequence[int], group_bounds: Sequence[int] = DEFAULT_GROUP_BOUNDS
) -> list[list[int]]:
    """Classes of each non-empty foreground group, groups in increasing count order."""
    bounds = sorted(int(b) for b in group_bounds)
    bins: dict[int, list[int]] = {}
    for c, n in enumerate(class_instance_count):
        bins.setdefault(bisect.bisect_right(bounds, int(n)), []).append(c)
    return [bins[k] for k in sorted(bins)]


@MODELS.register_module()
class GroupSoftmaxLoss(nn.Module):
    """Group softmax classifier loss (BAGS).

    Args:
        num_classes: C.
        class_instance_count: (C,) training instances per class; defines the groups.
        group_bounds: instance-count bin edges.
        others_ratio: the most "others" RoIs a group counts per own RoI.
        loss_weight: multiplier of the loss.
        reduction: 'mean' (divide by ``avg_factor``, default N), 'sum' or 'none'.
    """

    custom_cls_channels = True
    custom_activation = True
    custom_accuracy = True

    def __init__(
        self,
        num_classes: int,
        class_instance_count: Sequence[int],
        group_bounds: Sequence[int] = DEFAULT_GROUP_BOUNDS,
        others_ratio: float = 8.0,
        loss_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if len(class_instance_count) != num_classes:
            raise ValueError(
                f"GroupSoftmaxLoss: class_instance_count has {len(class_instance_count)} entries, num_classes is {num_classes}"
            )
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"GroupSoftmaxLoss: reduction should be 'mean', 'sum' or 'none', got {reduction!r}")
        self.num_classes = num_classes
        self.groups = class_groups(class_instance_count, group_bounds)
        self.others_ratio = float(others_ratio)
        self.loss_weight = loss_weight
        self.reduction = reduction
        # position of each class inside its group's softmax, and its group
        group_of = torch.empty(num_classes, dtype=torch.long)
        pos_in = torch.empty(num_classes, dtype=torch.long)
        for j, members in enumerate(self.groups):
            group_of[members] = j
            pos_in[members] = torch.arange(len(members))
        self.register_buffer("group_of", group_of, persistent=False)
        self.register_buffer("pos_in_group", pos_in, persistent=False)
        for j, members in enumerate(self.groups):
            self.register_buffer(f"members_{j}", torch.tensor(members, dtype=torch.long), persistent=False)

    def get_cls_channels(self, num_classes: int) -> int:
        return num_classes + 2 + len(self.groups)

    def _group_logits(self, cls_score: Tensor, j: int) -> Tensor:
        """(N, n_j + 1): the group's class logits then its "others" logit."""
        c = self.num_classes
        members = getattr(self, f"members_{j}")
        return torch.cat([cls_score[:, members], cls_score[:, c + 2 + j : c + 3 + j]], dim=1)

    def forward(
        self,
        cls_score: Tensor,
        label: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        """Sum over groups of the (weighted) group cross-entropies."""
        c = self.num_classes
        reduction = reduction_override or self.reduction
        fg = label < c
        per_sample = F.cross_entropy(cls_score[:, c : c + 2], fg.long(), reduction="none")
        label_fg = label.clamp(max=c - 1)
        for j in range(len(self.groups)):
            own = fg & (self.group_of[label_fg] == j)
            target = torch.where(own, self.pos_in_group[label_fg], torch.full_like(label, len(self.groups[j])))
            n_own, n_others = float(own.sum()), float((~own).sum())
            others_w = min(1.0, self.others_ratio * max(n_own, 1.0) / n_others) if n_others else 1.0
            gw = torch.where(own, 1.0, others_w)
            per_sample = per_sample + F.cross_entropy(self._group_logits(cls_score, j), target, reduction="none") * gw
        return self.loss_weight * _reduce(per_sample, weight, reduction, avg_factor)

    def get_activation(self, cls_score: Tensor) -> Tensor:
        """(N, C + 1) probabilities, background last, as mmdet's bbox head expects."""
        c = self.num_classes
        p0 = F.softmax(cls_score[:, c : c + 2], dim=1)
        scores = cls_score.new_zeros(cls_score.shape[0], c + 1)
        for j in range(len(self.groups)):
            pj = F.softmax(self._group_logits(cls_score, j), dim=1)
            scores[:, getattr(self, f"members_{j}")] = pj[:, :-1] * p0[:, 1:2]
        scores[:, c] = p0[:, 0]
        return scores

    def get_accuracy(self, cls_score: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Foreground/background accuracy (group 0) and class accuracy on the foreground RoIs."""
        from mmdet.models.losses import accuracy

        c = self.num_classes
        fg = labels < c
        acc_objectness = accuracy(cls_score[:, c : c + 2], fg.long())
        acc_classes = accuracy(self.get_activation(cls_score)[fg, :c], labels[fg])
        return {"acc_objectness": acc_objectness, "acc_classes": acc_classes}


@MODELS.register_module()
class DualSoftmaxScores(nn.Module):
    """Scores of two softmax classifiers mixed, SimCal-style (Wang et al. 2020).

    ``crat-ft export --combine-original A`` stacks the retrained (recalibrated)
    classifier and the detector's original one into one ``fc_cls`` of
    ``2(C + 1)`` rows, retrained first, and names this loss in the written
    config so mmdet predicts with ``p = (1 - A)·softmax(retrained) + A·softmax(original)``.

    As a training loss (end-to-end use) it is the softmax cross-entropy of
    each half, summed.

    Args:
        num_classes: C.
        original_weight: A, the original classifier's share of the scores.
        loss_weight: multiplier of the loss.
    """

    custom_cls_channels = True
    custom_activation = True
    custom_accuracy = True

    def __init__(self, num_classes: int, original_weight: float = 0.5, loss_weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= original_weight <= 1.0:
            raise ValueError(f"DualSoftmaxScores: original_weight should be in [0, 1], got {original_weight}")
        self.num_classes = num_classes
        self.original_weight = float(original_weight)
        self.loss_weight = loss_weight

    def get_cls_channels(self, num_classes: int) -> int:
        return 2 * (num_classes + 1)

    def _halves(self, cls_score: Tensor) -> tuple[Tensor, Tensor]:
        k = self.num_classes + 1
        return cls_score[:, :k], cls_score[:, k:]

    def forward(self, cls_score, label, weight=None, avg_factor=None, reduction_override=None) -> Tensor:
        new, orig = self._halves(cls_score)
        per_sample = F.cross_entropy(new, label, reduction="none") + F.cross_entropy(orig, label, reduction="none")
        return self.loss_weight * _reduce(per_sample, weight, reduction_override or "mean", avg_factor)

    def get_activation(self, cls_score: Tensor) -> Tensor:
        """(N, C + 1) mixed probabilities, background last."""
        new, orig = self._halves(cls_score)
        a = self.original_weight
        return (1 - a) * F.softmax(new, dim=1) + a * F.softmax(orig, dim=1)

    def get_accuracy(self, cls_score: Tensor, labels: Tensor) -> dict[str, Tensor]:
        from mmdet.models.losses import accuracy

        return {"acc": accuracy(self.get_activation(cls_score), labels)}
