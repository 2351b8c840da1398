"""The pretrained mmdet detector: checks of checkpoint against config.

Class-wise layers of a two-stage detector (mmdet names, background = last
class index K in the classifier):

- ``roi_head.bbox_head.fc_cls``: (K + 1, D) softmax classifier
  (K + 2 for Seesaw's objectness-augmented head);
- ``roi_head.bbox_head.fc_reg``: (4K, D) class-wise box regressor;
- ``roi_head.mask_head.conv_logits``: (K, C_mask, 1, 1) class-wise mask predictor.
"""

from __future__ import annotations

from crat_ft.config import head_num_classes
from crat_ft.errors import UserError

CLASSWISE_LAYERS = {
    "fc_cls": "roi_head.bbox_head.fc_cls",
    "fc_reg": "roi_head.bbox_head.fc_reg",
    "conv_logits": "roi_head.mask_head.conv_logits",
}


def checkpoint_num_classes(state_dict: dict) -> dict[str, int]:
    """Number of classes implied by each class-wise layer found in a state dict."""
    found = {}
    reg = state_dict.get(CLASSWISE_LAYERS["fc_reg"] + ".weight")
    if reg is not None and reg.shape[0] > 4:
        found["fc_reg"] = reg.shape[0] // 4
    logits = state_dict.get(CLASSWISE_LAYERS["conv_logits"] + ".weight")
    if logits is not None:
        found["conv_logits"] = logits.shape[0]
    cls = state_dict.get(CLASSWISE_LAYERS["fc_cls"] + ".weight")
    if cls is not None:
        found["fc_cls"] = cls.shape[0] - 1
    return found


def check_checkpoint_classes(cfg, state_dict: dict, checkpoint_name: str) -> None:
    """Raise a one-line :class:`UserError` if the checkpoint's class count differs from the config's.

    The regressor and mask predictor fix K exactly; the classifier is checked
    only when neither is present (its width depends on the loss).
    """
    expected = set(head_num_classes(cfg).values())
    if not expected:
        return
    k = max(expected)
    found = checkpoint_num_classes(state_dict)
    decisive = {n: v for n, v in found.items() if n != "fc_cls"} or found
    for layer, n in decisive.items():
        if layer == "fc_cls" and n in (k, k + 1):  # K + 1 (softmax) or K + 2 (Seesaw)
            continue
        if n != k:
            raise UserError(
                f"checkpoint {checkpoint_name} has {n} classes ({CLASSWISE_LAYERS[layer]}) but the config has "
                f"num_classes={k}; use the config the checkpoint was trained with, or set its num_classes to {n}"
            )


SUPPORTED = "StandardRoIHead with a ConvFC/Shared2FC box head (class-wise regression) and an FCN mask head"
# predictor types (mmdet's ``cls_predictor_cfg``, ``reg_predictor_cfg``, ``predictor_cfg``) that crat-ft
# retrains exactly: the heads build the same mmdet module, and CRAT's per-sample Fisher is derived for it
PREDICTORS = {
    "classifier": ("Linear", "NormedLinear"),
    "box regressor": ("Linear",),
    "mask predictor": ("Conv", "Conv2d", "NormedConv2d"),
}


def predictor_cfgs(bbox_head_cfg, mask_head_cfg) -> dict[str, dict]:
    """The predictor configs of a detector's heads, with mmdet's defaults filled in."""
    found = {
        "classifier": dict(bbox_head_cfg.get("cls_predictor_cfg") or dict(type="Linear")),
        "box regressor": dict(bbox_head_cfg.get("reg_predictor_cfg") or dict(type="Linear")),
    }
    if mask_head_cfg:
        found["mask predictor"] = dict(mask_head_cfg.get("predictor_cfg") or dict(type="Conv"))
    return found


def check_predictors(cfgs: dict[str, dict]) -> None:
    """Refuse predictor types crat-ft does not retrain exactly, naming the part and what is supported."""
    for part, cfg in cfgs.items():
        if cfg.get("type") not in PREDICTORS[part]:
            raise UserError(
                f"the {part} is built as {cfg.get('type')!r}; crat-ft retrains a {part} of type "
                f"{' or '.join(PREDICTORS[part])} exactly and refuses others rather than retrain a different function"
            )


def check_supported(model) -> None:
    """Refuse detectors whose RoI heads crat-ft cannot retrain, naming the head."""
    roi = getattr(model, "roi_head", None)
    if roi is None:
        raise UserError(f"{type(model).__name__} has no roi_head; crat-ft needs a two-stage detector ({SUPPORTED})")
    if isinstance(getattr(roi, "bbox_head", None), (list, tuple)) or hasattr(roi, "stage_loss_weights"):
        raise UserError(f"{type(roi).__name__} is a cascade RoI head; crat-ft supports {SUPPORTED}")
    head = roi.bbox_head
    if not hasattr(head, "fc_reg") or not hasattr(head, "fc_cls"):
        raise UserError(f"{type(head).__name__} has no fc_cls/fc_reg layers; crat-ft supports {SUPPORTED}")
    if head.reg_class_agnostic:
        raise UserError(
            f"{type(head).__name__} uses class-agnostic regression (reg_class_agnostic=True); CRAT needs class-wise regression: {SUPPORTED}"
        )
    if getattr(roi, "with_mask", False) and not hasattr(roi.mask_head, "conv_logits"):
        raise UserError(f"{type(roi.mask_head).__name__} has no conv_logits; crat-ft supports {SUPPORTED}")
    if getattr(roi, "with_mask", False) and getattr(roi.mask_head, "class_agnostic", False):
        raise UserError(f"{type(roi.mask_head).__name__} is class-agnostic; CRAT needs class-wise masks: {SUPPORTED}")
    mask_head = roi.mask_head if getattr(roi, "with_mask", False) else None
    check_predictors(
        predictor_cfgs(
            {k: getattr(head, k, None) for k in ("cls_predictor_cfg", "reg_predictor_cfg")},
            {"predictor_cfg": getattr(mask_head, "predictor_cfg", None)} if mask_head is not None else None,
        )
    )


def shared_box_features(head) -> bool:
    """True when fc_cls and fc_reg read the same tensor (no branch-specific convs/fcs)."""
    return all(getattr(head, a, 0) == 0 for a in ("num_cls_convs", "num_cls_fcs", "num_reg_convs", "num_reg_fcs"))


def build_frozen_detector(cfg, checkpoint: str, *, trust_checkpoint: bool = False):
    """Build the detector of ``cfg.model`` with mmdet, load ``checkpoint``, freeze it.

    Returns:
        ``(model, checkpoint_sha256)``; the model is in eval mode with every
        parameter's ``requires_grad`` False, on the CPU.

    Raises:
        UserError: missing/corrupt checkpoint, class-count mismatch, missing
            ``model.train_cfg`` (its rcnn assigner defines positives), or an
            unsupported head.
    """
    import mmdet.utils
    from mmdet.registry import MODELS

    from crat_ft.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.files import sha256_file

    mmdet.utils.register_all_modules(init_default_scope=True)
    ckpt = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
    state = state_dict_of(ckpt)
    check_checkpoint_classes(cfg, state, str(checkpoint))
    if not cfg.model.get("train_cfg") or not cfg.model.train_cfg.get("rcnn"):
        raise UserError(
            "model.train_cfg.rcnn is missing from the config; its assigner defines positive RoIs: use the training config of the checkpoint"
        )
    model = MODELS.build(cfg.model)
    check_supported(model)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise UserError(
                f"checkpoint {checkpoint} does not fit the config: {key} has shape {tuple(value.shape)} in the "
                f"checkpoint but {tuple(own[key].shape)} in the model the config builds (a classifier's width also "
                "depends on its loss); use the config the checkpoint was trained with"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    important = [k for k in missing if k.startswith("roi_head.") or k.startswith("rpn_head.")]
    if important:
        raise UserError(f"checkpoint {checkpoint} lacks weights {important[:3]}...; it does not belong to this config")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, sha256_file(checkpoint)
