# The demo detector trained end to end with CRAT: the same Mask R-CNN, its bbox and mask heads
# replaced by crat-ft's mmdet plugin heads, which add CRAT's transfusion losses (paper settings).
#
#   crat-ft train-detector configs/demo/mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py --work-dir W --data-root D

_base_ = "./mask-rcnn_r18_fpn_tiny_synthetic.py"

custom_imports = dict(imports=["crat_ft.metric", "crat_ft.plugin"], allow_failed_imports=False)
# donors: "fisher" (CRAT), or the ablation's controls "uniform" / "permuted"; log_mass: log the transfused
# gradient's norm over the own loss's on fc_reg / conv_logits (mass_box, mass_mask); fisher: "sample" (the
# paper's) or "signed"; frequency_gate: transfuse only to rarer classes (needs class_instance_count, the
# training instances per class in label order)
crat = dict(
    box_lambda=0.001, mask_lambda=0.01, box_tau=0.05, mask_tau=0.05, momentum=0.01, donors="fisher", log_mass=False,
    fisher="sample", frequency_gate=False,
)  # fmt: skip
model = dict(
    roi_head=dict(
        bbox_head=dict(type="CratShared2FCBBoxHead", crat=crat, class_instance_count=None),
        mask_head=dict(type="CratFCNMaskHead", crat=crat, class_instance_count=None),
    )
)
