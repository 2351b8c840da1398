# CRAT with Seesaw end to end: mmdet's LVIS v1 R50 Seesaw Mask R-CNN (NormedLinear classifier,
# SeesawLoss, RFS, 2x), plus CRAT's transfusion losses in the bbox and mask heads.
#
#   crat-ft train-detector configs/lvis/crat-e2e_mask-rcnn_r50_fpn_seesaw-loss_sample1e-3-ms-2x_lvis-v1.py --work-dir W

_base_ = "mmdet::seesaw_loss/mask-rcnn_r50_fpn_seesaw-loss_sample1e-3-ms-2x_lvis-v1.py"

custom_imports = dict(imports=["crat_ft.plugin"], allow_failed_imports=False)
crat = dict(box_lambda=0.001, mask_lambda=0.01, box_tau=0.05, mask_tau=0.05, momentum=0.01)
model = dict(
    roi_head=dict(
        bbox_head=dict(type="CratShared2FCBBoxHead", crat=crat), mask_head=dict(type="CratFCNMaskHead", crat=crat)
    )
)
