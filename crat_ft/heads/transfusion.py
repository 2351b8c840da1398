"""CRAT: cross-class gradient transfusing (docs/architecture.md#crat-as-implemented). Pure tensor code, no mmdet.

Shape legend (fixed throughout this module):

- ``P``: positive RoIs in the batch (matched to a ground-truth box);
- ``C``: foreground classes (mmdet's background index ``C`` never appears here:
  only positives carry box and mask losses);
- ``D``: width of the box feature, the input of ``fc_reg``;
- ``K``: channels of the mask feature, the input of the 1x1 ``conv_logits``;
- ``S``: mask side (28 in Mask R-CNN).

Names: ``labels`` (P,) are the positives' own classes ``y_n`` in [0, C);
``sample_fisher`` is the per-sample diagonal empirical Fisher of the task
layer slice of the sample's own class; ``stats`` is a :class:`FisherStats`.

The algorithm, in one paragraph: every positive n yields the squared gradient
F_n of its own-class loss w.r.t. its own class's layer slice (closed form, no
autograd loop). Class statistics Φ_c are an EMA of the F_n of class c. Sample n
then also trains the layer slices of the *other* seen classes c whose Φ_c looks
like F_n: with weight w_{n,c} = softmax_c(cos(F_n, Φ_c) / τ), it adds
w_{n,c} ℓ(p_{n,c}, t_n). A rare class thus receives training signal from the
samples of similar frequent classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crat_ft.heads.ft_config import DONORS

__all__ = [
    "box_sample_grad",
    "box_sample_fisher",
    "mask_sample_grad",
    "mask_sample_fisher",
    "normed_mask_sample_grad",
    "FisherStats",
    "transfusion_weights",
    "box_transfusion_loss",
    "mask_transfusion_loss",
    "reference_fisher",
    "sample_statistic",
    "mask_layer_sample_grad",
    "box_transfusion",
    "mask_transfusion",
    "gradient_mass_ratio",
]


def box_sample_grad(feats: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample gradient of the own-class L1 box loss w.r.t. the own-class regressor slice ``W_y``.

    For the linear layer ``p = W_y x + b_y`` and ``ℓ = Σ |p - t|`` it is the
    outer product ``r ⊗ x`` with ``r = sign(p - t)``.

    Args:
        feats: (P, D) inputs of ``fc_reg``.
        pred: (P, 4) own-class regression outputs ``p_{n, y_n}``.
        target: (P, 4) encoded regression targets.

    Returns:
        (P, 4, D), without gradient.
    """
    with torch.no_grad():
        return torch.sign(pred - target)[:, :, None] * feats[:, None, :]


def box_sample_fisher(feats: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample diagonal Fisher of the own-class box regressor slice, for an L1 loss.

    The square of :func:`box_sample_grad`, ``r² ⊗ x²``. The loss scale
    (avg_factor, loss_weight) is irrelevant: only cosines of these are used.

    Args:
        feats: (P, D) inputs of ``fc_reg``.
        pred: (P, 4) own-class regression outputs ``p_{n, y_n}``.
        target: (P, 4) encoded regression targets.

    Returns:
        (P, 4, D) non-negative, without gradient.
    """
    return box_sample_grad(feats, pred, target).square()


def mask_sample_grad(feats: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample gradient of the own-class mean pixel BCE w.r.t. the own-class 1x1 conv weights ``w_y``.

    For ``z = w_y · X + b_y`` at every pixel it is ``Σ_pixels (σ(z) - m) X / S²``.

    Args:
        feats: (P, K, S, S) inputs of ``conv_logits``.
        logits: (P, S, S) own-class mask logits ``z_{n, y_n}``.
        target: (P, S, S) binary mask targets.

    Returns:
        (P, K), without gradient.
    """
    with torch.no_grad():
        s2 = logits.shape[-1] * logits.shape[-2]
        resid = torch.sigmoid(logits.float()) - target.float()
        return torch.einsum("pij,pkij->pk", resid, feats.float()) / s2


def normed_mask_sample_grad(
    feats: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Tensor,
    *,
    temperature: float,
    power: float = 1.0,
    eps: float = 1e-6,
) -> Tensor:
    """Per-sample gradient of the own-class mean pixel BCE w.r.t. the own-class row of a *normalised* 1x1 conv.

    mmdet's ``NormedConv2d`` computes ``z = T · (w/s) · (x/(‖x‖^p + ε)) + b`` at
    every pixel, with ``s = ‖w‖^p + ε`` (norms over the K channels). With
    ``r = Σ_pixels (σ(z) − m) · T x/(‖x‖^p + ε) / S²`` (the gradient w.r.t. the
    normalised row ``w/s``), the chain rule through the normalisation gives,
    in closed form,

        g = r / s − (r · w) · p ‖w‖^(p−2) · w / s².

    Args:
        feats: (P, K, S, S) inputs of ``conv_logits`` (before its normalisation).
        logits: (P, S, S) own-class mask logits ``z_{n, y_n}``.
        target: (P, S, S) binary mask targets.
        weight: (P, K) the raw weight row of each sample's own class.
        temperature, power, eps: the layer's ``tempearture``, ``power`` and ``eps``.

    Returns:
        (P, K), without gradient.
    """
    with torch.no_grad():
        x = feats.float()
        x_hat = x / (x.norm(dim=1, keepdim=True).pow(power) + eps) * temperature
        s2 = logits.shape[-1] * logits.shape[-2]
        resid = torch.sigmoid(logits.float()) - target.float()
        r = torch.einsum("pij,pkij->pk", resid, x_hat) / s2
        w = weight.float()
        norm = w.norm(dim=1, keepdim=True)
        s = norm.pow(power) + eps
        return r / s - (r * w).sum(1, keepdim=True) * power * norm.pow(power - 2) * w / s.square()


def mask_sample_fisher(feats: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample diagonal Fisher of the own-class mask predictor slice: the square of :func:`mask_sample_grad`.

    Args:
        feats: (P, K, S, S) inputs of ``conv_logits``.
        logits: (P, S, S) own-class mask logits ``z_{n, y_n}``.
        target: (P, S, S) binary mask targets.

    Returns:
        (P, K) non-negative, without gradient.
    """
    return mask_sample_grad(feats, logits, target).square()


class FisherStats(nn.Module):
    """Class Fisher statistics: an EMA of per-sample Fisher over training steps.

    Buffers (saved in checkpoints, restored on resume):
        fisher: (C, *shape) the EMA Φ_c, zero for unseen classes.
        seen: (C,) bool, True once a class has been updated.

    Args:
        num_classes: C.
        shape: shape of one sample's Fisher, e.g. ``(4, D)`` or ``(K,)``.
        momentum: α of ``Φ_c ← (1 - α) Φ_c + α mean_{n: y_n = c} F_n``.
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...] | list[int] | int, momentum: float = 0.01) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if num_classes < 1:
            raise ValueError(f"FisherStats.num_classes should be >= 1, but got {num_classes}")
        if not 0 < momentum <= 1:
            raise ValueError(f"FisherStats.momentum should be in (0, 1], but got {momentum}")
        self.momentum = momentum
        self.register_buffer("fisher", torch.zeros(num_classes, *shape))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.fisher.shape[0]

    @torch.no_grad()
    def update(self, sample_fisher: Tensor, labels: Tensor) -> None:
        """Fold a batch in: only classes present in ``labels`` change.

        Args:
            sample_fisher: (P, *shape).
            labels: (P,) int64 classes in [0, C).
        """
        if labels.numel() == 0:
            return
        flat = sample_fisher.reshape(labels.shape[0], -1).to(self.fisher.dtype)
        c = self.num_classes
        sums = torch.zeros(c, flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, labels, flat)
        counts = torch.bincount(labels, minlength=c).to(flat.dtype)
        present = counts > 0
        means = sums[present] / counts[present, None]
        view = self.fisher.view(c, -1)
        view[present] = (1 - self.momentum) * view[present] + self.momentum * means
        self.seen |= present

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Average the statistics over DDP ranks (``seen``: OR). No-op without a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        dist.all_reduce(self.fisher, op=dist.ReduceOp.SUM)
        self.fisher /= dist.get_world_size()
        seen = self.seen.to(torch.int32)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        self.seen.copy_(seen.bool())


def transfusion_weights(
    sample_fisher: Tensor,
    stats: FisherStats,
    labels: Tensor,
    temperature: float,
    *,
    top_k: int | None = None,
    allowed: Tensor | None = None,
    donors: str = "fisher",
) -> Tensor:
    """Transfusion weights ``w`` (P, C): softmax of Fisher cosines over other seen classes.

    ``w_{n,c} = softmax_c(cos(F_n, Φ_c) / τ)`` over the seen classes ``c ≠ y_n``;
    ``w_{n, y_n} = 0``; unseen classes get 0 and are excluded before the
    softmax. A row with no eligible class is all zero. Constants (no gradient).

    ``donors`` (the ablation's controls): ``"fisher"`` as above; ``"uniform"``: equal weights over the
    eligible classes (τ → ∞); ``"permuted"``: class c is scored by the statistics of class π(c), π one
    fixed random permutation of the classes (seed 0), so the weights keep their sharpness but go to
    random receivers.

    Args:
        sample_fisher: (P, *shape) per-sample Fisher.
        stats: class statistics (C, *shape).
        labels: (P,) own classes.
        temperature: τ > 0.
        top_k: keep only the k largest weights per row, renormalised.
        allowed: optional (P, C) bool, further restricting the receivers
            (e.g. a frequency gate: only classes rarer than the donor).

    Returns:
        (P, C) rows summing to 1, or all zero.
    """
    if temperature <= 0:
        raise ValueError(f"temperature should be > 0, but got {temperature}")
    with torch.no_grad():
        p, c = labels.shape[0], stats.num_classes
        if p == 0:
            return sample_fisher.new_zeros(0, c)
        if donors not in DONORS:
            raise ValueError(f"donors should be one of {DONORS}, but got {donors!r}")
        f = F.normalize(sample_fisher.reshape(p, -1).float(), dim=1)
        phi = F.normalize(stats.fisher.reshape(c, -1).float(), dim=1)
        if donors == "permuted":
            phi = phi[torch.randperm(c, generator=torch.Generator().manual_seed(0)).to(phi.device)]
        logits = f @ phi.T / temperature
        if donors == "uniform":
            logits = torch.zeros_like(logits)
        eligible = stats.seen[None, :].expand(p, c).clone()
        eligible[torch.arange(p, device=labels.device), labels] = False
        if allowed is not None:
            eligible &= allowed
        logits = logits.masked_fill(~eligible, float("-inf"))
        if top_k is not None and top_k < c:
            kth = logits.topk(top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        has_any = eligible.any(dim=1, keepdim=True)
        # rows without an eligible class would softmax to NaN: give them zeros
        w = torch.softmax(logits.masked_fill(~has_any, 0.0), dim=1)
        return torch.where(has_any & eligible, w, torch.zeros_like(w))


def box_transfusion_loss(pred_all: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``Σ_n Σ_c w_{n,c} Σ_coords |p_{n,c} - t_n|`` (unweighted by λ_box).

    Args:
        pred_all: (P, C, 4) regression outputs of every class for each positive.
        target: (P, 4) the positive's encoded regression target.
        weights: (P, C) transfusion weights (constants).

    Returns:
        A scalar; for P = 0 a zero that keeps the graph alive (so DDP sees
        gradients for every parameter).
    """
    if pred_all.shape[0] == 0:
        return pred_all.sum() * 0.0
    l1 = (pred_all - target[:, None, :]).abs().sum(dim=2)  # (P, C)
    return (weights.to(l1.dtype) * l1).sum()


def mask_transfusion_loss(logits_all: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``Σ_n Σ_c w_{n,c} mean_pixels BCE(z_{n,c}, m_n)`` (unweighted by λ_mask).

    Only the (n, c) pairs with ``w > 0`` are evaluated.

    Args:
        logits_all: (P, C, S, S) mask logits of every class for each positive.
        target: (P, S, S) binary mask targets.
        weights: (P, C) transfusion weights (constants).

    Returns:
        A scalar; for P = 0 (or no positive weight) a zero that keeps the graph alive.
    """
    n_idx, c_idx = torch.nonzero(weights > 0, as_tuple=True)
    if n_idx.numel() == 0:
        return logits_all.sum() * 0.0
    z = logits_all[n_idx, c_idx]  # (Q, S, S)
    bce = F.binary_cross_entropy_with_logits(z, target[n_idx].to(z.dtype), reduction="none").mean(dim=(1, 2))
    return (weights[n_idx, c_idx].to(bce.dtype) * bce).sum()


# -- one step of each branch, as the decoupled heads and the mmdet plugin both run it -------------


def reference_fisher(labels: Tensor, num_classes: int, grads: Tensor) -> Tensor:
    """``fisher='reference'``: every sample gets its class's squared *batch-summed* gradient.

    Args:
        grads: (P, *shape) per-sample gradients (not squared).
    """
    flat = grads.reshape(grads.shape[0], -1)
    sums = torch.zeros(num_classes, flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, labels, flat)
    return sums.square()[labels].reshape(grads.shape)


def sample_statistic(labels: Tensor, num_classes: int, grads: Tensor, fisher: str) -> Tensor:
    """What a sample contributes to its class statistics, from its (P, *shape) per-sample gradients:
    ``'sample'``: their square (the diagonal Fisher); ``'reference'``: :func:`reference_fisher`;
    ``'signed'``: the gradients themselves. Signed, a class statistic is the EMA of its samples' gradients
    (the direction its layer is being pulled), and the weights favour classes whose residuals point the
    same way as the donor's; with an L1 box loss the squared gradient ``1 ⊗ x²`` keeps no residual at all."""
    if fisher == "reference":
        return reference_fisher(labels, num_classes, grads)
    return grads if fisher == "signed" else grads.square()


def mask_layer_sample_grad(layer: nn.Module, feats: Tensor, z_own: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    """(P, K) per-sample gradients w.r.t. the own-class rows of a 1x1 mask predictor ``layer``:
    a plain convolution, or mmdet's ``NormedConv2d`` (through its normalisation)."""
    if type(layer).__name__ == "NormedConv2d":
        return normed_mask_sample_grad(
            feats.detach(), z_own.detach(), target, layer.weight.detach().flatten(1)[labels],
            temperature=layer.tempearture, power=layer.power, eps=layer.eps,
        )  # fmt: skip
    return mask_sample_grad(feats.detach(), z_own.detach(), target)


def box_transfusion(
    feats: Tensor,
    pred_all: Tensor,
    pred_own: Tensor,
    target: Tensor,
    labels: Tensor,
    stats: FisherStats,
    *,
    temperature: float,
    fisher: str = "sample",
    top_k: int | None = None,
    allowed: Tensor | None = None,
    donors: str = "fisher",
) -> Tensor:
    """One step of the box branch: per-sample Fisher → update (and all-reduce) Φ → weights → loss.

    Args:
        feats: (P, D) inputs of ``fc_reg`` for the positives.
        pred_all: (P, C, 4) every class's regression output.
        pred_own: (P, 4) the own class's.
        target: (P, 4) encoded targets.
        labels: (P,) own classes.
        stats: the box :class:`FisherStats` (updated in place).
        fisher: ``'sample'`` (per-sample Fisher), ``'reference'`` (the class's batch-summed gradient, squared)
            or ``'signed'`` (the per-sample gradient itself, which keeps the sign of the residual).

    Returns:
        The unweighted box transfusion loss (:func:`box_transfusion_loss`).
    """
    if fisher == "sample":
        sample = box_sample_fisher(feats.detach(), pred_own.detach(), target)
    else:
        grads = box_sample_grad(feats.detach(), pred_own.detach(), target)
        sample = reference_fisher(labels, stats.num_classes, grads) if fisher == "reference" else grads
    w = _update_and_weigh(sample, labels, stats, temperature, top_k, allowed, donors)
    return box_transfusion_loss(pred_all, target, w)


def mask_transfusion(
    layer: nn.Module,
    feats: Tensor,
    logits_all: Tensor,
    z_own: Tensor,
    target: Tensor,
    labels: Tensor,
    stats: FisherStats,
    *,
    temperature: float,
    fisher: str = "sample",
    top_k: int | None = None,
    allowed: Tensor | None = None,
    donors: str = "fisher",
) -> Tensor:
    """One step of the mask branch with the mask statistics (see :func:`box_transfusion`).

    Args:
        layer: the mask predictor (``conv_logits``), for its per-sample gradient.
        feats: (P, K, S, S) its inputs; ``logits_all`` (P, C, S, S) its outputs;
            ``z_own`` (P, S, S) the own class's logits; ``target`` (P, S, S).
    """
    grads = mask_layer_sample_grad(layer, feats, z_own, target, labels)
    sample = sample_statistic(labels, stats.num_classes, grads, fisher)
    w = _update_and_weigh(sample, labels, stats, temperature, top_k, allowed, donors)
    return mask_transfusion_loss(logits_all, target, w)


def gradient_mass_ratio(own: Tensor, transfused: Tensor, weight: Tensor) -> Tensor:
    """``‖∂transfused/∂W‖ / ‖∂own/∂W‖`` for a class-wise layer's weight ``W`` (both losses as weighted in
    the total): how much gradient transfusion adds to the layer, next to its own-class loss. A detached
    scalar, 0 where there is no gradient (no positive). For ``crat.log_mass`` (the ablation's loss-mass control)."""
    zero = weight.new_zeros(())
    if not (torch.is_grad_enabled() and own.requires_grad and transfused.requires_grad):
        return zero
    (g_own,) = torch.autograd.grad(own, weight, retain_graph=True, allow_unused=True)
    (g_tr,) = torch.autograd.grad(transfused, weight, retain_graph=True, allow_unused=True)
    if g_own is None or g_tr is None or float(g_own.norm()) == 0:
        return zero
    return (g_tr.norm() / g_own.norm()).detach()


def _update_and_weigh(sample, labels, stats: FisherStats, temperature, top_k, allowed, donors="fisher") -> Tensor:
    """Both branches' middle step: Φ updated with the step's Fisher (and all-reduced), then the weights."""
    stats.update(sample, labels)
    stats.all_reduce()
    return transfusion_weights(sample, stats, labels, temperature, top_k=top_k, allowed=allowed, donors=donors)
