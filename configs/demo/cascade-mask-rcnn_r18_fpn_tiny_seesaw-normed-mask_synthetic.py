# The tiny demo detector as a Cascade Mask R-CNN with mmdet's LVIS Seesaw recipe
# (configs/seesaw_loss/cascade-mask-rcnn_r101_fpn_seesaw-loss-normed-mask_*_lvis-v1.py
# in mmdet): three stages, each with a NormedLinear classifier trained with
# SeesawLoss, a class-agnostic box regressor, and an FCN mask head whose
# predictor is a NormedConv2d. Everything else is the demo detector's.
#
#   crat-ft train-detector configs/demo/cascade-mask-rcnn_r18_fpn_tiny_seesaw-normed-mask_synthetic.py ...

_base_ = "./mask-rcnn_r18_fpn_tiny_synthetic.py"

num_classes = 40


def _bbox_head(stds):
    return dict(
        type="Shared2FCBBoxHead",
        in_channels=64,
        fc_out_channels=256,
        roi_feat_size=7,
        num_classes=num_classes,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=stds),
        reg_class_agnostic=True,
        cls_predictor_cfg=dict(type="NormedLinear", tempearture=20),
        loss_cls=dict(type="SeesawLoss", p=0.8, q=2.0, num_classes=num_classes, loss_weight=1.0),
        loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
    )


def _rcnn(iou):
    return dict(
        assigner=dict(
            type="MaxIoUAssigner", pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou, match_low_quality=False,
            ignore_iof_thr=-1,
        ),
        sampler=dict(type="RandomSampler", num=128, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
        mask_size=28,
        pos_weight=-1,
        debug=False,
    )  # fmt: skip


model = dict(
    roi_head=dict(
        _delete_=True,
        type="CascadeRoIHead",
        num_stages=3,
        stage_loss_weights=[1, 0.5, 0.25],
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
            out_channels=64,
            featmap_strides=[4, 8, 16, 32],
        ),
        bbox_head=[
            _bbox_head([0.1, 0.1, 0.2, 0.2]),
            _bbox_head([0.05, 0.05, 0.1, 0.1]),
            _bbox_head([0.033, 0.033, 0.067, 0.067]),
        ],  # fmt: skip
        mask_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
            out_channels=64,
            featmap_strides=[4, 8, 16, 32],
        ),
        mask_head=dict(
            type="FCNMaskHead",
            num_convs=2,
            in_channels=64,
            conv_out_channels=64,
            num_classes=num_classes,
            predictor_cfg=dict(type="NormedConv2d", tempearture=20),
            loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0),
        ),
    ),
    train_cfg=dict(rcnn=[_rcnn(0.5), _rcnn(0.6), _rcnn(0.7)]),
)
