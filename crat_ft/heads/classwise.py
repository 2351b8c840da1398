"""The retrainable class-wise heads over cached features (an mmengine ``BaseModel``).

Shape legend: ``N`` RoIs in a batch (positives and background), ``P`` of them
positive, ``M`` cached masks in the batch, ``C`` foreground classes
(background label = ``C``, mmdet's convention), ``D`` box feature width (input
of ``fc_cls``/``fc_reg``), ``K`` mask channels (input of ``conv_logits``), ``S``
mask side.

Layers, initialised from the detector checkpoint (mmdet names):
``fc_cls`` (C+1 or loss-specific width, D), ``fc_reg`` (4C, D),
``conv_logits`` (C, K, 1, 1). With a cache at level ``roi`` the layers before
them are retrained too: ``box_trunk`` is the detector's bbox head and
``mask_trunk`` its mask head, built by mmdet and loaded from the checkpoint,
with their class-wise layers replaced by identities (so they output the
inputs of ``fc_cls``/``fc_reg`` and of ``conv_logits``). Losses: the
classifier loss chosen in config (mmdet's CrossEntropyLoss, SeesawLoss or
EQLV2Loss, or crat-ft's GroupSoftmaxLoss), the own-class L1 box loss and mask
BCE as mmdet's heads compute them, and, with CRAT on, the transfusion losses
of :mod:`crat_ft.heads.transfusion`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch import Tensor, nn

from crat_ft.common.errors import UserError
from crat_ft.heads.ft_config import CratConfig
from crat_ft.heads.transfusion import (
    FisherStats,
    box_sample_fisher,
    box_sample_grad,
    box_transfusion,
    gradient_mass_ratio,
    mask_transfusion,
    mask_transfusion_loss,
    transfusion_weights,
)


def donor_group_ids(groups: dict[str, str] | None, class_names: list[str] | None, num_classes: int) -> list[int]:
    """Group index of each class from ``crat.donor_groups``' content ``{class name: group}``; all 0 without one.

    Args:
        groups: the groups as the run recorded them (:func:`crat_ft.heads.ft_config.read_donor_groups`).
        class_names: (C,) the cache's class names.
    """
    if groups is None:
        return [0] * num_classes
    if class_names is None or len(class_names) != num_classes:
        raise UserError("crat.donor_groups needs the cache's class names; re-extract the cache with this crat-ft")
    missing = [n for n in class_names if n not in groups]
    if missing:
        raise UserError(
            f"crat.donor_groups: the file has no group for class {missing[0]!r} ({len(missing)} missing); "
            "give every class of the cache a group"
        )
    ids = {g: i for i, g in enumerate(sorted({str(groups[n]) for n in class_names}))}
    return [ids[str(groups[n])] for n in class_names]


class ClasswiseHeads(BaseModel):
    """fc_cls, fc_reg and conv_logits retrained from cached features.

    Args:
        num_classes: C.
        box_feat_dim: D.
        mask_channels: K (0: no mask branch).
        bbox_coder: mmdet bbox coder config (the detector's), to encode targets.
        loss_cls: mmdet classifier loss config.
        loss_bbox_weight: weight of the own-class L1 box loss.
        loss_mask_weight: weight of the own-class mask BCE.
        crat: CRAT settings.
        class_instance_count: (C,) training instances per class (frequency gate).
        class_names: (C,) class names (``donor_groups`` maps them to groups).
        donor_groups: ``{class name: group}``, the content of ``crat.donor_groups`` as the run
            recorded it: transfusion only between classes of one group; None: between all classes.
        reinit_cls: re-initialise fc_cls instead of loading it (cRT).
        box_trunk: module mapping cached ``roi`` box features to ``(x_cls, x_reg)``
            (see :func:`build_trunk`); None for ``fc`` caches.
        mask_trunk: module mapping cached ``roi`` mask features to the
            (M, K, S, S) input of conv_logits; None for ``logits`` caches.
        reg_class_agnostic: the detector's box regressor is class-agnostic
            (Cascade R-CNN): it is not retrained, and CRAT has no box branch.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        box_feat_dim: int,
        mask_channels: int,
        bbox_coder: dict,
        loss_cls: dict,
        loss_bbox_weight: float = 1.0,
        loss_mask_weight: float = 1.0,
        crat: CratConfig = CratConfig(),
        class_instance_count: list[int] | None = None,
        class_names: list[str] | None = None,
        reinit_cls: bool = False,
        box_trunk: nn.Module | None = None,
        mask_trunk: nn.Module | None = None,
        cls_predictor_cfg: dict | None = None,
        reg_predictor_cfg: dict | None = None,
        mask_predictor_cfg: dict | None = None,
        reg_class_agnostic: bool = False,
        donor_groups: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        from mmdet.registry import MODELS, TASK_UTILS

        from crat_ft.detector.frozen import check_predictors

        predictors = {"classifier": dict(cls_predictor_cfg or dict(type="Linear"))}
        if not reg_class_agnostic:
            predictors["box regressor"] = dict(reg_predictor_cfg or dict(type="Linear"))
        if reg_class_agnostic and not mask_channels:
            raise UserError(
                "the detector regresses boxes class-agnostically and has no mask head: there is no class-wise box or "
                "mask layer for CRAT; crat-ft needs class-wise regression or a mask head"
            )
        if reg_class_agnostic and crat.enable and crat.mask_weights == "box":
            raise UserError(
                "crat.mask_weights='box' weighs mask transfusion by the box regressor's Fisher, but this detector's "
                "regressor is class-agnostic; set crat.mask_weights=mask"
            )
        if mask_channels:
            predictors["mask predictor"] = dict(mask_predictor_cfg or dict(type="Conv"))
        check_predictors(predictors)

        self.num_classes = num_classes
        self.loss_cls = MODELS.build(loss_cls)
        cls_channels = (
            self.loss_cls.get_cls_channels(num_classes)
            if getattr(self.loss_cls, "custom_cls_channels", False)
            else num_classes + 1
        )
        # the layers mmdet builds from the detector's predictor configs, so that retraining
        # optimises the function the exported detector computes
        self.fc_cls = MODELS.build(dict(predictors["classifier"], in_features=box_feat_dim, out_features=cls_channels))
        self.fc_reg = None
        if not reg_class_agnostic:
            self.fc_reg = MODELS.build(
                dict(predictors["box regressor"], in_features=box_feat_dim, out_features=4 * num_classes)
            )
        self.conv_logits = None
        if mask_channels:
            self.conv_logits = MODELS.build(
                dict(predictors["mask predictor"], in_channels=mask_channels, out_channels=num_classes, kernel_size=1)
            )
        self.box_trunk = box_trunk
        self.mask_trunk = mask_trunk
        self.bbox_coder = TASK_UTILS.build(bbox_coder)
        self.loss_bbox_weight = loss_bbox_weight
        self.loss_mask_weight = loss_mask_weight
        self.crat = crat
        self.reinit_cls = reinit_cls
        self.box_stats = (
            FisherStats(num_classes, (4, box_feat_dim), momentum=crat.momentum) if self.fc_reg is not None else None
        )
        self.mask_stats = FisherStats(num_classes, (mask_channels,), momentum=crat.momentum) if mask_channels else None
        counts = torch.as_tensor(
            class_instance_count if class_instance_count is not None else [1] * num_classes, dtype=torch.float
        )
        self.register_buffer("class_instance_count", counts, persistent=False)
        # the groups travel in the heads file's meta (retrain's run record), not in its state dict
        self.restrict_to_groups = donor_groups is not None
        groups = torch.as_tensor(donor_group_ids(donor_groups, class_names, num_classes), dtype=torch.long)
        self.register_buffer("donor_group", groups, persistent=False)

    # -- weights in and out ------------------------------------------------------------

    def init_weights(self) -> None:
        """No-op: every layer comes from the detector checkpoint (or, with
        ``reinit_cls``, keeps PyTorch's initialisation); mmengine's Runner must
        not re-initialise the trunks with their mmdet ``init_cfg``."""

    def load_from_detector(self, state: dict, prefix: dict[str, str]) -> None:
        """Copy fc_cls/fc_reg/conv_logits from a detector state dict (keys per ``prefix``)."""
        layers = {"fc_cls": self.fc_cls, "fc_reg": self.fc_reg, "conv_logits": self.conv_logits}
        for name, layer in layers.items():
            if layer is None or (name == "fc_cls" and self.reinit_cls):
                continue
            for p in ("weight", "bias"):
                src = state[f"{prefix[name]}.{p}"]
                dst = getattr(layer, p)
                if src.shape != dst.shape:
                    raise UserError(
                        f"{prefix[name]}.{p} has shape {tuple(src.shape)} in the checkpoint but the retrained head needs "
                        f"{tuple(dst.shape)} (classifier loss {type(self.loss_cls).__name__}); "
                        "set reinit_cls=True or use the detector's loss"
                    )
                with torch.no_grad():
                    dst.copy_(src)

    # -- forward -----------------------------------------------------------------------

    def forward(
        self,
        box_feat: Tensor,
        box: Tensor,
        gt_box: Tensor,
        label: Tensor,
        mask_feat: Tensor,
        mask_target: Tensor,
        mask_label: Tensor,
        mask_box_feat: Tensor | None = None,
        mask_box: Tensor | None = None,
        mask_gt_box: Tensor | None = None,
        mode: str = "loss",
    ):
        """Batch fields as :class:`crat_ft.heads.sampling.CachedBatchDataset` yields them.

        ``mask_box_feat`` (M, D), ``mask_box``/``mask_gt_box`` (M, 4) are the box
        fields of the masks' RoIs (used by ``crat.mask_weights='box'``). Features
        arrive as cached (float16) and mask targets as uint8; they are cast here, on
        the device (exactly: float16 and {0, 1} are float32 values).
        """
        box_feat, mask_feat, mask_target = box_feat.float(), mask_feat.float(), mask_target.float()
        mask_box_feat = mask_box_feat.float() if mask_box_feat is not None else None
        if mode == "loss":
            mask_box_fields = (mask_box_feat, mask_box, mask_gt_box)
            return self.loss(box_feat, box, gt_box, label, mask_feat, mask_target, mask_label, mask_box_fields)
        if mode in ("predict", "tensor"):
            return self.predict(box_feat, mask_feat)
        raise ValueError(f"mode should be 'loss', 'predict' or 'tensor', but got {mode!r}")

    def box_inputs(self, box_feat: Tensor) -> tuple[Tensor, Tensor]:
        """(x_cls, x_reg): the inputs of fc_cls and fc_reg for cached box features."""
        if self.box_trunk is None:
            return box_feat, box_feat
        return self.box_trunk(box_feat)

    def mask_inputs(self, mask_feat: Tensor) -> Tensor:
        """The (M, K, S, S) input of conv_logits for cached mask features."""
        return mask_feat if self.mask_trunk is None else self.mask_trunk(mask_feat)

    def predict(self, box_feat: Tensor, mask_feat: Tensor | None = None) -> dict:
        """Raw head outputs: cls_score (N, C+1), bbox_pred (N, 4C; not for a class-agnostic regressor),
        mask_logits (M, C, S, S)."""
        x_cls, x_reg = self.box_inputs(box_feat)
        out = {"cls_score": self.fc_cls(x_cls)}
        if self.fc_reg is not None:
            out["bbox_pred"] = self.fc_reg(x_reg)
        if self.conv_logits is not None and mask_feat is not None:
            out["mask_logits"] = self.conv_logits(self.mask_inputs(mask_feat))
        return out

    def loss(
        self, box_feat, box, gt_box, label, mask_feat, mask_target, mask_label, mask_box_fields=(None, None, None)
    ) -> dict:
        n = label.shape[0]
        x_cls, x_reg = self.box_inputs(box_feat)
        cls_score = self.fc_cls(x_cls)
        losses = {"loss_cls": self.loss_cls(cls_score, label, avg_factor=max(n, 1))}
        if isinstance(losses["loss_cls"], dict):  # Seesaw returns its parts
            losses.update(losses.pop("loss_cls"))

        if self.fc_reg is not None:
            losses.update(self._box_losses(x_reg, box, gt_box, label))

        if self.conv_logits is not None:
            m = mask_label.shape[0]
            mask_feat = self.mask_inputs(mask_feat)
            logits_all = self.conv_logits(mask_feat)
            z_own = logits_all[torch.arange(m, device=mask_label.device), mask_label]
            if m:
                own = F.binary_cross_entropy_with_logits(z_own, mask_target, reduction="mean")
            else:
                own = logits_all.sum() * 0.0
            losses["loss_mask"] = self.loss_mask_weight * own
            if self.crat.enable:
                losses["loss_mask_trans"] = self.crat.mask_lambda * self._mask_transfusion(
                    mask_feat, logits_all, z_own, mask_target, mask_label, mask_box_fields
                )
                if self.crat.log_mass:
                    losses["mass_mask"] = gradient_mass_ratio(
                        losses["loss_mask"], losses["loss_mask_trans"], self.conv_logits.weight
                    )
        return losses

    def _box_losses(self, x_reg, box, gt_box, label) -> dict:
        """The own-class L1 box loss and, with CRAT on, the box transfusion loss."""
        c, n = self.num_classes, label.shape[0]
        pos = label < c
        p = int(pos.sum())
        x_pos = x_reg[pos]
        y = label[pos]
        pred_all = self.fc_reg(x_pos).view(p, c, 4)
        target = self.bbox_coder.encode(box[pos], gt_box[pos]) if p else box.new_zeros(0, 4)
        pred_own = pred_all[torch.arange(p, device=label.device), y]
        # mmdet's bbox head averages the L1 over every sampled RoI, background included
        losses = {"loss_bbox": self.loss_bbox_weight * (pred_own - target).abs().sum() / max(n, 1)}
        if self.crat.enable:
            losses["loss_box_trans"] = self.crat.box_lambda * self._box_transfusion(
                x_pos, pred_all, pred_own, target, y
            )
            if self.crat.log_mass:
                losses["mass_box"] = gradient_mass_ratio(
                    losses["loss_bbox"], losses["loss_box_trans"], self.fc_reg.weight
                )
        return losses

    def _allowed(self, labels: Tensor) -> Tensor | None:
        allowed = None
        if self.crat.frequency_gate:
            counts = self.class_instance_count.to(labels.device)
            allowed = counts[None, :] < counts[labels][:, None]
        if self.restrict_to_groups:
            group = self.donor_group.to(labels.device)
            same = group[None, :] == group[labels][:, None]
            allowed = same if allowed is None else allowed & same
        return allowed

    def _box_transfusion(self, x_pos, pred_all, pred_own, target, y) -> Tensor:
        return box_transfusion(
            x_pos, pred_all, pred_own, target, y, self.box_stats, temperature=self.crat.box_tau,
            fisher=self.crat.fisher, top_k=self.crat.top_k, allowed=self._allowed(y), donors=self.crat.donors,
        )  # fmt: skip

    def _mask_transfusion(self, feats, logits_all, z_own, target, y, mask_box_fields) -> Tensor:
        if self.crat.mask_weights == "box":
            x, box, gt_box = mask_box_fields
            if x is None:
                raise UserError(
                    "crat.mask_weights='box' needs the box fields of the mask RoIs; use crat-ft's CachedBatchDataset"
                )
            with torch.no_grad():
                m = y.shape[0]
                x = self.box_inputs(x)[1]
                pred_own = self.fc_reg(x).view(m, self.num_classes, 4)[torch.arange(m, device=y.device), y]
                fisher = (box_sample_grad if self.crat.fisher == "signed" else box_sample_fisher)(
                    x, pred_own, self.bbox_coder.encode(box, gt_box) if m else box.new_zeros(0, 4)
                )
            # the box statistics were updated by this step's box branch
            w = transfusion_weights(
                fisher,
                self.box_stats,
                y,
                self.crat.box_tau,
                top_k=self.crat.top_k,
                allowed=self._allowed(y),
                donors=self.crat.donors,
            )
            return mask_transfusion_loss(logits_all, target, w)
        return mask_transfusion(
            self.conv_logits, feats, logits_all, z_own, target, y, self.mask_stats, temperature=self.crat.mask_tau,
            fisher=self.crat.fisher, top_k=self.crat.top_k, allowed=self._allowed(y), donors=self.crat.donors,
        )  # fmt: skip

    # -- refusing non-finite losses -------------------------------------------------------

    def parse_losses(self, losses: dict):
        return parse_finite_losses(self, losses)


def parse_finite_losses(model: BaseModel, losses: dict):
    """mmengine's loss parsing, raising before any update if the total loss is NaN/inf.

    Both the plain and the DDP train steps call the model's ``parse_losses``
    between the forward pass and the optimizer step, so a non-finite step is
    never applied and the last checkpoint on disk stays the last good state.
    """
    parsed, log_vars = BaseModel.parse_losses(model, losses)
    model.last_log_vars = log_vars  # named by NonFiniteGuardHook if the gradients are not finite
    if not torch.isfinite(parsed):
        from mmengine.logging import MessageHub

        from crat_ft.heads.hooks import non_finite_advice

        step = MessageHub.get_current_instance().get_info("iter", -1)
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in log_vars.items())
        raise NonFiniteLossError(f"non-finite loss at iteration {step + 1} ({parts}); {non_finite_advice(None)}")
    return parsed, log_vars


class CascadeHeads(BaseModel):
    """The class-wise heads of every stage of a Cascade R-CNN, retrained together.

    Each step takes one batch per stage (drawn from that stage's cache) and
    sums the stages' losses, each scaled by mmdet's ``stage_loss_weights`` as
    :class:`mmdet.models.roi_heads.CascadeRoIHead` does (loss names are
    prefixed ``s<i>.`` as there).

    Args:
        stages: one :class:`ClasswiseHeads` per stage.
        stage_loss_weights: the detector's ``roi_head.stage_loss_weights``.
    """

    def __init__(self, stages: list[ClasswiseHeads], stage_loss_weights: list[float]) -> None:
        super().__init__()
        if len(stage_loss_weights) != len(stages):
            raise UserError(
                f"roi_head.stage_loss_weights has {len(stage_loss_weights)} weights for {len(stages)} stages; fix the config"
            )
        self.stages = nn.ModuleList(stages)
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]

    def init_weights(self) -> None:
        """No-op, as :meth:`ClasswiseHeads.init_weights`."""

    def forward(self, *batches: dict, mode: str = "loss"):
        if len(batches) != len(self.stages):
            raise ValueError(f"expected one batch per stage ({len(self.stages)}), got {len(batches)}")
        if mode != "loss":
            return [heads(**batch, mode=mode) for heads, batch in zip(self.stages, batches)]
        losses = {}
        for i, (heads, batch, weight) in enumerate(zip(self.stages, batches, self.stage_loss_weights)):
            for name, value in heads(**batch, mode="loss").items():
                losses[f"s{i}.{name}"] = value * weight if "loss" in name else value
        return losses

    def parse_losses(self, losses: dict):
        return parse_finite_losses(self, losses)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite (raised before the optimizer step)."""


def build_trunk(head_cfg: dict, detector_state: dict, prefix: str, classwise: tuple[str, ...]) -> nn.Module:
    """The detector's RoI head ``head_cfg`` built by mmdet, loaded from ``detector_state``
    (keys under ``prefix``), with its class-wise layers ``classwise`` replaced by
    identities and its losses removed: it maps pooled RoI features to the
    inputs of the class-wise layers (ConvFC bbox heads return ``(x_cls, x_reg)``).
    """
    from mmdet.registry import MODELS

    head = MODELS.build(head_cfg)
    sub = {k[len(prefix) + 1 :]: v for k, v in detector_state.items() if k.startswith(prefix + ".")}
    for name in classwise:
        setattr(head, name, nn.Identity())
        sub = {k: v for k, v in sub.items() if not k.startswith(name + ".")}
    for name in [n for n, _ in head.named_children() if n.startswith("loss_")]:
        delattr(head, name)
    sub = {k: v for k, v in sub.items() if not k.startswith("loss_")}
    missing, unexpected = head.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise UserError(
            f"the detector checkpoint does not match its config's {type(head).__name__} under {prefix} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use the config the checkpoint was trained with"
        )
    head.is_init = True
    return head
