# CRAT with EQLv2 end to end (the CRAT authors' setting): mmdet's LVIS v1 R50 Mask R-CNN, 1x,
# mmdet's EQLV2Loss classifier, uniform image sampling (no repeat-factor sampling), plus
# CRAT's transfusion losses in the bbox and mask heads.
#
#   crat-ft train-detector configs/lvis/crat-e2e_mask-rcnn_r50_fpn_eqlv2_1x_lvis-v1.py --work-dir W

_base_ = "./crat-e2e_mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py"

# use_distributed: the gradient statistics EQLv2 reweights by are all-reduced over the ranks, as in
# the paper's 8-GPU runs (each rank would otherwise keep its own). It needs torchrun; for a single
# process pass --cfg-options model.roi_head.bbox_head.loss_cls.use_distributed=False
model = dict(
    roi_head=dict(
        bbox_head=dict(
            loss_cls=dict(_delete_=True, type="EQLV2Loss", num_classes=1203, loss_weight=1.0, use_distributed=True)
        )
    )
)
# the base wraps the LVIS dataset in ClassBalancedDataset (RFS); with threshold 0 every repeat
# factor is max(1, sqrt(0 / f_c)) = 1: EQLv2 samples images uniformly
train_dataloader = dict(dataset=dict(oversample_thr=0.0))
