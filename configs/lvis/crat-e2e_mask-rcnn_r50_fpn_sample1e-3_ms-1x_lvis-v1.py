# CRAT in mmdet's own end-to-end training: mmdet's LVIS v1 R50 Mask R-CNN (1x, RFS t = 1e-3),
# unchanged except that its bbox and mask heads add CRAT's transfusion losses.
#
#   crat-ft train-detector configs/lvis/crat-e2e_mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py --work-dir W
#   python mmdetection/tools/train.py configs/lvis/crat-e2e_mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py
#
# CRAT's hyper-parameters are the paper's: lambda_box 0.001, lambda_mask 0.01, tau 0.05, alpha 0.01.

_base_ = "mmdet::lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py"

custom_imports = dict(imports=["crat_ft.plugin"], allow_failed_imports=False)
crat = dict(box_lambda=0.001, mask_lambda=0.01, box_tau=0.05, mask_tau=0.05, momentum=0.01)
model = dict(
    roi_head=dict(
        bbox_head=dict(type="CratShared2FCBBoxHead", crat=crat), mask_head=dict(type="CratFCNMaskHead", crat=crat)
    )
)
