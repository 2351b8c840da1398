"""CRAT inside mmdet's own end-to-end training: heads registered for ``custom_imports``.

Add to an mmdet config (docs/architecture.md#end-to-end-plugin)::

    custom_imports = dict(imports=['crat_ft.plugin'], allow_failed_imports=False)
    model = dict(roi_head=dict(
        bbox_head=dict(type='CratShared2FCBBoxHead', crat=dict(box_lambda=0.001)),
        mask_head=dict(type='CratFCNMaskHead', crat=dict(mask_lambda=0.01))))

The heads subclass mmdet's (``Shared2FCBBoxHead``, ``ConvFCBBoxHead``,
``FCNMaskHead``) and change one thing: ``loss_and_target`` also returns
``loss_bbox_transfusion`` / ``loss_mask_transfusion``, computed by
:mod:`crat_ft.heads.transfusion` (the functions and :class:`FisherStats` the
decoupled heads use) from the positives mmdet's sampler chose. Everything
else — the classifier loss (CE, Seesaw, EQLv2, group softmax), predictor
types, assigners, inference — is mmdet's. The Fisher statistics are buffers:
saved in checkpoints, restored on resume, all-reduced across ranks each step.

:func:`plain_config` and :func:`plain_state_dict` turn a trained model into one
stock mmdet loads without crat-ft (``crat-ft export-plain``).
"""

from __future__ import annotations

import torch
from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead, Shared2FCBBoxHead
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS
from torch import Tensor

from crat_ft.common.errors import UserError
from crat_ft.heads.ft_config import CratConfig
from crat_ft.heads.transfusion import FisherStats, box_transfusion, gradient_mass_ratio, mask_transfusion

# plugin head type -> the mmdet head it extends
PLAIN_TYPES = {
    "CratShared2FCBBoxHead": "Shared2FCBBoxHead",
    "CratConvFCBBoxHead": "ConvFCBBoxHead",
    "CratFCNMaskHead": "FCNMaskHead",
}
PLUGIN_KEYS = ("crat", "class_instance_count")
STATS_NAMES = ("box_stats", "mask_stats")


def _crat_settings(crat: dict | None, head: str) -> CratConfig:
    cfg = CratConfig.from_dict(dict(crat or {}))
    if cfg.mask_weights == "box":
        raise UserError(
            f"{head}: crat.mask_weights='box' needs the box head's statistics inside the mask head, which mmdet's "
            "heads do not share; use mask_weights='mask' (the default)"
        )
    return cfg


class _Transfusing:
    """What both plugin heads share: settings, the frequency gate and a tap on the class-wise layer's input."""

    def _setup(self, crat: dict | None, class_instance_count, layer) -> None:
        self.crat = _crat_settings(crat, type(self).__name__)
        if self.crat.donor_groups is not None:
            raise UserError(
                f"{type(self).__name__}: crat.donor_groups is supported by `crat-ft retrain-heads` only; remove it"
            )
        if self.crat.frequency_gate and class_instance_count is None:
            raise UserError(
                f"{type(self).__name__}: crat.frequency_gate needs class_instance_count (training instances per class)"
            )
        counts = torch.as_tensor(class_instance_count or [1] * self.num_classes, dtype=torch.float)
        if counts.numel() != self.num_classes:
            raise UserError(
                f"{type(self).__name__}: class_instance_count has {counts.numel()} entries for {self.num_classes} classes"
            )
        self.register_buffer("class_instance_count", counts, persistent=False)
        self._layer_input = None
        layer.register_forward_hook(self._keep_input)

    def _keep_input(self, module, args, out) -> None:
        self._layer_input = args[0]

    def _allowed(self, labels: Tensor) -> Tensor | None:
        if not self.crat.frequency_gate:
            return None
        counts = self.class_instance_count.to(labels.device)
        return counts[None, :] < counts[labels][:, None]


class _TransfusingBBoxHead(_Transfusing):
    """Adds ``loss_bbox_transfusion`` to mmdet's bbox losses (class-wise regression only)."""

    def _setup_box(self, crat, class_instance_count) -> None:
        if self.reg_class_agnostic:
            raise UserError(
                f"{type(self).__name__}: CRAT's box branch needs class-wise regression (reg_class_agnostic=False)"
            )
        if self.reg_decoded_bbox:
            raise UserError(
                f"{type(self).__name__}: CRAT transfuses the encoded L1 box loss; set reg_decoded_bbox=False"
            )
        if type(self.fc_reg).__name__ != "Linear":
            raise UserError(f"{type(self).__name__}: CRAT's box Fisher is derived for a Linear regressor")
        self._setup(crat, class_instance_count, self.fc_reg)
        self.box_stats = FisherStats(self.num_classes, (4, self.fc_reg.in_features), momentum=self.crat.momentum)

    def loss_and_target(self, cls_score, bbox_pred, rois, sampling_results, rcnn_train_cfg, concat=True,
                        reduction_override=None) -> dict:  # fmt: skip
        out = super().loss_and_target(
            cls_score, bbox_pred, rois, sampling_results, rcnn_train_cfg, concat=concat,
            reduction_override=reduction_override,
        )  # fmt: skip
        if self.crat.enable:
            labels, _, targets, _ = out["bbox_targets"]
            out["loss_bbox"]["loss_bbox_transfusion"] = self.crat.box_lambda * self.box_transfusion_loss(
                self._layer_input, bbox_pred, labels, targets
            )
            if self.crat.log_mass:
                out["loss_bbox"]["mass_box"] = gradient_mass_ratio(
                    out["loss_bbox"]["loss_bbox"], out["loss_bbox"]["loss_bbox_transfusion"], self.fc_reg.weight
                )
        return out

    def box_transfusion_loss(self, reg_input: Tensor, bbox_pred: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
        """The unweighted box transfusion loss of the sampled RoIs (mmdet's labels and encoded targets)."""
        c = self.num_classes
        pos = (labels >= 0) & (labels < c)
        p = int(pos.sum())
        y = labels[pos]
        pred_all = bbox_pred[pos].view(p, c, 4)
        pred_own = pred_all[torch.arange(p, device=y.device), y]
        return box_transfusion(
            reg_input[pos], pred_all, pred_own, targets[pos], y, self.box_stats, temperature=self.crat.box_tau,
            fisher=self.crat.fisher, top_k=self.crat.top_k, allowed=self._allowed(y), donors=self.crat.donors,
        )  # fmt: skip


@MODELS.register_module()
class CratShared2FCBBoxHead(_TransfusingBBoxHead, Shared2FCBBoxHead):
    """mmdet's ``Shared2FCBBoxHead`` with CRAT's box transfusion loss.

    Args:
        crat: CRAT settings (``crat_ft.heads.ft_config.CratConfig`` keys; mask keys are ignored here).
        class_instance_count: training instances per class (only for ``crat.frequency_gate``).
    """

    def __init__(self, *args, crat: dict | None = None, class_instance_count=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_box(crat, class_instance_count)


@MODELS.register_module()
class CratConvFCBBoxHead(_TransfusingBBoxHead, ConvFCBBoxHead):
    """mmdet's ``ConvFCBBoxHead`` with CRAT's box transfusion loss (arguments as :class:`CratShared2FCBBoxHead`)."""

    def __init__(self, *args, crat: dict | None = None, class_instance_count=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_box(crat, class_instance_count)


@MODELS.register_module()
class CratFCNMaskHead(_Transfusing, FCNMaskHead):
    """mmdet's ``FCNMaskHead`` with CRAT's mask transfusion loss (plain or ``NormedConv2d`` predictor).

    Args:
        crat: CRAT settings (``crat_ft.heads.ft_config.CratConfig`` keys; box keys are ignored here).
        class_instance_count: training instances per class (only for ``crat.frequency_gate``).
    """

    def __init__(self, *args, crat: dict | None = None, class_instance_count=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.class_agnostic:
            raise UserError("CratFCNMaskHead: CRAT's mask branch needs class-wise masks (class_agnostic=False)")
        self._setup(crat, class_instance_count, self.conv_logits)
        self.mask_stats = FisherStats(self.num_classes, (self.conv_logits.in_channels,), momentum=self.crat.momentum)

    def loss_and_target(self, mask_preds, sampling_results, batch_gt_instances, rcnn_train_cfg) -> dict:
        out = super().loss_and_target(mask_preds, sampling_results, batch_gt_instances, rcnn_train_cfg)
        if self.crat.enable:
            labels = torch.cat([res.pos_gt_labels for res in sampling_results])
            out["loss_mask"]["loss_mask_transfusion"] = self.crat.mask_lambda * self.mask_transfusion_loss(
                self._layer_input, mask_preds, labels, out["mask_targets"]
            )
            if self.crat.log_mass:
                out["loss_mask"]["mass_mask"] = gradient_mass_ratio(
                    out["loss_mask"]["loss_mask"], out["loss_mask"]["loss_mask_transfusion"], self.conv_logits.weight
                )
        return out

    def mask_transfusion_loss(
        self, logits_input: Tensor, mask_preds: Tensor, labels: Tensor, targets: Tensor
    ) -> Tensor:
        """The unweighted mask transfusion loss of the positive RoIs (mmdet's labels and targets)."""
        m = labels.shape[0]
        z_own = mask_preds[torch.arange(m, device=labels.device), labels]
        return mask_transfusion(
            self.conv_logits, logits_input, mask_preds, z_own, targets.to(mask_preds.dtype), labels, self.mask_stats,
            temperature=self.crat.mask_tau, fisher=self.crat.fisher, top_k=self.crat.top_k,
            allowed=self._allowed(labels), donors=self.crat.donors,
        )  # fmt: skip


# -- back to stock mmdet ---------------------------------------------------------------------------


def plain_config(cfg):
    """A copy of ``cfg`` that stock mmdet builds without crat-ft: plugin heads back to mmdet's types and
    their CRAT keys removed, crat-ft's LVIS metric replaced by mmdet's ``LVISMetric``, every
    ``crat_ft`` module dropped from ``custom_imports``."""
    import copy

    new = copy.deepcopy(cfg)
    for head in _roi_heads(new):
        if head.get("type") in PLAIN_TYPES:
            head["type"] = PLAIN_TYPES[head["type"]]
            for k in PLUGIN_KEYS:
                head.pop(k, None)
    for key in ("val_evaluator", "test_evaluator"):
        evaluators = new.get(key)
        for ev in evaluators if isinstance(evaluators, list) else [evaluators] if evaluators else []:
            if ev.get("type") == "CratLVISMetric":
                for k in ("max_dets", "cat_chunk_size", "per_class_csv"):
                    ev.pop(k, None)
                ev["type"] = "LVISMetric"
    imports = new.get("custom_imports")
    if imports:
        kept = [m for m in imports.get("imports", []) if not (m == "crat_ft" or m.startswith("crat_ft."))]
        if kept:
            imports["imports"] = kept
        else:
            new.pop("custom_imports")
    return new


def _roi_heads(cfg) -> list:
    """The bbox and mask head configs of ``cfg`` (every stage's, for a cascade)."""
    roi = cfg.model.get("roi_head") or {}
    heads = []
    for key in ("bbox_head", "mask_head"):
        h = roi.get(key)
        heads += list(h) if isinstance(h, (list, tuple)) else [h] if h else []
    return heads


def plain_state_dict(state: dict) -> dict:
    """``state`` without the plugin's Fisher statistics buffers."""
    return {k: v for k, v in state.items() if not any(f".{name}." in f".{k}" for name in STATS_NAMES)}


def export_plain(config, checkpoint, out, *, cfg_options=(), trust_checkpoint: bool = False) -> tuple[str, str]:
    """``crat-ft export-plain``: a checkpoint and config trained with the plugin, as stock mmdet loads them.

    Writes ``out`` (the state dict without the Fisher statistics, the meta's
    plain values kept) and ``<out stem>.py`` (:func:`plain_config`), the
    config first, each renamed into place when complete.

    Returns:
        ``(checkpoint path, config path)``.
    """
    from pathlib import Path

    from crat_ft.common.files import (
        RunLock,
        atomic_path,
        atomic_torch_save,
        clean_stale_temps,
        output_dir,
        refuse_output_among_inputs,
        temp_pattern,
    )
    from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.engine.config import load_config

    out = Path(out)
    refuse_output_among_inputs(out, (config, checkpoint), "--out")
    refuse_output_among_inputs(out.with_suffix(".py"), (config, checkpoint), "--out's config (<out stem>.py)")
    given = load_config(config, cfg_options)
    cfg = plain_config(given)
    if not any(head.get("type") in PLAIN_TYPES for head in _roi_heads(given)):
        raise UserError(
            f"config {config} uses none of crat-ft's plugin heads ({', '.join(sorted(PLAIN_TYPES))}), so it and its "
            "checkpoints are plain mmdet already; use them as they are"
        )
    with output_dir(out.parent, "the directory of --out"), RunLock(out.with_name(f".{out.name}.lock"), f"--out {out}"):
        clean_stale_temps(out.parent, temp_pattern(out))
        ckpt = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
        state = state_dict_of(ckpt)
        if len(plain_state_dict(state)) == len(state):
            raise UserError(
                f"checkpoint {checkpoint} holds no Fisher statistics ({', '.join(STATS_NAMES)}), so it was not trained "
                f"with the plugin heads of {config}; pass the checkpoint that training wrote"
            )
        meta = {
            k: v for k, v in (ckpt.get("meta") or {}).items() if isinstance(v, (str, int, float, dict, list, tuple))
        }
        cfg_path = out.with_suffix(".py")
        with atomic_path(cfg_path) as tmp:
            cfg.dump(str(tmp))
        atomic_torch_save({"state_dict": plain_state_dict(state), "meta": meta}, out)
    return str(out), str(cfg_path)
