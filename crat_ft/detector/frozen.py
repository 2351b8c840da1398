"""The pretrained mmdet detector: checks of checkpoint against config.

Class-wise layers of a two-stage detector (mmdet names, background = last
class index K in the classifier):

- ``roi_head.bbox_head.fc_cls``: (K + 1, D) softmax classifier
  (K + 2 for Seesaw's objectness-augmented head);
- ``roi_head.bbox_head.fc_reg``: (4K, D) class-wise box regressor;
- ``roi_head.mask_head.conv_logits``: (K, C_mask, 1, 1) class-wise mask predictor.

A Cascade R-CNN has these per stage (``roi_head.bbox_head.<i>.fc_cls`` ...),
usually with class-agnostic (4, D) regressors, which crat-ft leaves as they are.
"""

from __future__ import annotations

from crat_ft.common.errors import UserError
from crat_ft.engine.config import dataset_class_names, head_num_classes

CLASSWISE_LAYERS = {
    "fc_cls": "roi_head.bbox_head.fc_cls",
    "fc_reg": "roi_head.bbox_head.fc_reg",
    "conv_logits": "roi_head.mask_head.conv_logits",
}


def num_stages(cfg) -> int:
    """1 for a single-stage RoI head, the number of stages of a cascade (``bbox_head`` given as a list)."""
    heads = (cfg.model.get("roi_head") or {}).get("bbox_head")
    return len(heads) if isinstance(heads, (list, tuple)) else 1


def classwise_layers(stages: int) -> list[dict[str, str]]:
    """State-dict prefixes of each stage's class-wise layers.

    A single-stage head has :data:`CLASSWISE_LAYERS`; stage ``i`` of a
    cascade has ``roi_head.bbox_head.<i>.fc_cls`` and so on (mmdet's
    ``CascadeRoIHead`` keeps one bbox and one mask head per stage).
    """
    if stages == 1:
        return [dict(CLASSWISE_LAYERS)]
    return [
        {name: f"{prefix.rsplit('.', 1)[0]}.{i}.{name}" for name, prefix in CLASSWISE_LAYERS.items()}
        for i in range(stages)
    ]


def stage_cfgs(cfg_list, stages: int) -> list:
    """A config given once or per stage, as a list of ``stages`` items (mmdet's cascade convention)."""
    if isinstance(cfg_list, (list, tuple)):
        return list(cfg_list)
    return [cfg_list] * stages


def checkpoint_num_classes(state_dict: dict, layers: dict[str, str] = CLASSWISE_LAYERS) -> dict[str, int]:
    """Number of classes implied by each class-wise layer of one stage found in a state dict."""
    found = {}
    reg = state_dict.get(layers["fc_reg"] + ".weight")
    if reg is not None and reg.shape[0] > 4:
        found["fc_reg"] = reg.shape[0] // 4
    logits = state_dict.get(layers["conv_logits"] + ".weight")
    if logits is not None and logits.shape[0] > 1:
        found["conv_logits"] = logits.shape[0]
    cls = state_dict.get(layers["fc_cls"] + ".weight")
    if cls is not None:
        found["fc_cls"] = cls.shape[0] - 1
    return found


def check_checkpoint_classes(cfg, state_dict: dict, checkpoint_name: str) -> None:
    """Raise a one-line :class:`UserError` if a head's ``num_classes`` in the config differs from the checkpoint's.

    Every ``num_classes`` of the config is checked on its own head's layers:
    a bbox head's (and its loss's) against its regressor, or its classifier
    when the regression is class-agnostic (K + 1 rows, K + 2 for Seesaw); a
    mask head's against its mask predictor.
    """
    stages = num_stages(cfg)
    layers = classwise_layers(stages)
    categories = len(dataset_class_names(cfg))  # 0 unless a command filled them in from its dataset
    for key, k in head_num_classes(cfg).items():
        parts = key.split(".")  # model.roi_head.<bbox_head|mask_head>[.<stage>][.loss_cls].num_classes
        head = parts[2]
        for i in [int(parts[3])] if parts[3].isdigit() else range(stages):
            found = checkpoint_num_classes(state_dict, layers[i])
            if head == "mask_head":
                decisive = {n: v for n, v in found.items() if n == "conv_logits"}
            else:
                decisive = {n: v for n, v in found.items() if n == "fc_reg"} or {
                    n: v for n, v in found.items() if n == "fc_cls"
                }
            for layer, n in decisive.items():
                if layer == "fc_cls" and n in (k, k + 1):  # K + 1 (softmax) or K + 2 (Seesaw)
                    continue
                if n == k:
                    continue
                fix = f"use the config the checkpoint was trained with, or set its num_classes to {n}"
                if categories and categories != n:
                    fix = f"the dataset has {categories} categories: use the dataset the detector was trained on"
                raise UserError(
                    f"checkpoint {checkpoint_name} has {n} classes ({layers[i][layer]}) but the config has "
                    f"{key.removeprefix('model.')}={k}; {fix}"
                )


def trained_num_classes(state_dict: dict) -> int | None:
    """The classes a checkpoint predicts, from its (first stage's) regressor or mask predictor;
    None when only a classifier says (its width depends on the loss)."""
    for stages in (1, 2):  # a single RoI head, or a cascade's first stage
        found = checkpoint_num_classes(state_dict, classwise_layers(stages)[0])
        for layer in ("fc_reg", "conv_logits"):
            if layer in found:
                return found[layer]
    return None


def trained_classes(checkpoint, trust_checkpoint: bool = False):
    """For :func:`crat_ft.engine.config.prepare_config`: a callable that loads ``checkpoint`` (only when asked)
    and returns ``(its name, the classes it predicts)``."""

    def ask() -> tuple[str, int | None]:
        from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of

        ckpt = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
        return str(checkpoint), trained_num_classes(state_dict_of(ckpt))

    return ask


def checkpoint_class_names(meta: dict | None) -> list[str] | None:
    """Class names a checkpoint records: mmdet 3.x ``dataset_meta.classes`` or mmdet 2.x ``CLASSES``."""
    meta = meta or {}
    names = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")
    return [str(n) for n in names] if names else None


def check_checkpoint_class_names(meta: dict | None, names: list[str], checkpoint_name: str) -> None:
    """Refuse a checkpoint whose recorded class names differ from the dataset's (same count, other classes
    or order: every label would silently mean another class)."""
    recorded = checkpoint_class_names(meta)
    if not recorded or not names or len(recorded) != len(names) or recorded == list(names):
        return
    i = next(i for i, (a, b) in enumerate(zip(recorded, names)) if a != b)
    raise UserError(
        f"checkpoint {checkpoint_name} was trained with other classes than the dataset's: class {i} is {recorded[i]!r} "
        f"in the checkpoint and {names[i]!r} in the annotation file; use the dataset (category list) the checkpoint was trained on"
    )


SUPPORTED = (
    "StandardRoIHead or CascadeRoIHead with ConvFC/Shared2FC box heads (class-wise or class-agnostic regression) "
    "and FCN mask heads, with class-wise regression or a mask head"
)
ROI_HEADS = ("StandardRoIHead", "CascadeRoIHead")
# predictor types (mmdet's ``cls_predictor_cfg``, ``reg_predictor_cfg``, ``predictor_cfg``) that crat-ft
# retrains exactly: the heads build the same mmdet module, and CRAT's per-sample Fisher is derived for it
PREDICTORS = {
    "classifier": ("Linear", "NormedLinear"),
    "box regressor": ("Linear",),
    "mask predictor": ("Conv", "Conv2d", "NormedConv2d"),
}


def predictor_cfgs(bbox_head_cfg, mask_head_cfg) -> dict[str, dict]:
    """The predictor configs of one stage's heads, with mmdet's defaults filled in.

    The box regressor is left out when it is class-agnostic: crat-ft keeps it as it is.
    """
    found = {"classifier": dict(bbox_head_cfg.get("cls_predictor_cfg") or dict(type="Linear"))}
    if not bbox_head_cfg.get("reg_class_agnostic", False):
        found["box regressor"] = dict(bbox_head_cfg.get("reg_predictor_cfg") or dict(type="Linear"))
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


def stage_heads(model) -> list[tuple]:
    """``(bbox_head, mask_head or None)`` of each stage of a built detector's RoI head."""
    from torch import nn

    roi = model.roi_head
    bbox = list(roi.bbox_head) if isinstance(roi.bbox_head, nn.ModuleList) else [roi.bbox_head]
    if not getattr(roi, "with_mask", False):
        return [(b, None) for b in bbox]
    masks = list(roi.mask_head) if isinstance(roi.mask_head, nn.ModuleList) else [roi.mask_head]
    return list(zip(bbox, masks))


def check_supported(model) -> None:
    """Refuse detectors whose RoI heads crat-ft cannot retrain exactly, naming the part."""
    roi = getattr(model, "roi_head", None)
    if roi is None:
        raise UserError(f"{type(model).__name__} has no roi_head; crat-ft needs a two-stage detector ({SUPPORTED})")
    if type(roi).__name__ not in ROI_HEADS:
        raise UserError(
            f"{type(roi).__name__} runs its heads its own way, which crat-ft does not reproduce; crat-ft supports {SUPPORTED}"
        )
    for i, (head, mask_head) in enumerate(stage_heads(model)):
        where = f" (stage {i})" if type(roi).__name__ == "CascadeRoIHead" else ""
        if not hasattr(head, "fc_reg") or not hasattr(head, "fc_cls"):
            raise UserError(f"{type(head).__name__}{where} has no fc_cls/fc_reg layers; crat-ft supports {SUPPORTED}")
        if mask_head is not None and not hasattr(mask_head, "conv_logits"):
            raise UserError(f"{type(mask_head).__name__}{where} has no conv_logits; crat-ft supports {SUPPORTED}")
        if mask_head is not None and getattr(mask_head, "class_agnostic", False):
            raise UserError(
                f"{type(mask_head).__name__}{where} is class-agnostic; CRAT needs class-wise masks: {SUPPORTED}"
            )
        if head.reg_class_agnostic and mask_head is None:
            raise UserError(
                f"{type(head).__name__}{where} uses class-agnostic regression (reg_class_agnostic=True) and the detector "
                "has no mask head, so it has no class-wise box or mask layer for CRAT; crat-ft supports " + SUPPORTED
            )
        check_predictors(
            predictor_cfgs(
                {k: getattr(head, k, None) for k in ("cls_predictor_cfg", "reg_predictor_cfg", "reg_class_agnostic")},
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

    from crat_ft.common.files import sha256_file
    from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of

    mmdet.utils.register_all_modules(init_default_scope=True)
    ckpt = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
    state = state_dict_of(ckpt)
    check_checkpoint_classes(cfg, state, str(checkpoint))
    check_checkpoint_class_names(ckpt.get("meta"), dataset_class_names(cfg), str(checkpoint))
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
