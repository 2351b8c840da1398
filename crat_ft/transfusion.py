"""The public name of CRAT's maths, pure tensors: the module is :mod:`crat_ft.heads.transfusion`."""

from crat_ft.heads.transfusion import (
    FisherStats,
    box_sample_fisher,
    box_sample_grad,
    box_transfusion,
    box_transfusion_loss,
    gradient_mass_ratio,
    mask_layer_sample_grad,
    mask_sample_fisher,
    mask_sample_grad,
    mask_transfusion,
    mask_transfusion_loss,
    normed_mask_sample_grad,
    reference_fisher,
    sample_statistic,
    transfusion_weights,
)

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
