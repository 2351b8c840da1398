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
