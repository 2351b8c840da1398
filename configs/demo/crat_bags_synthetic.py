# CRAT with a group-softmax classifier (BAGS, Li et al. 2020) instead of softmax CE.
#
#   crat-ft retrain-heads configs/demo/crat_bags_synthetic.py --cache CACHE --work-dir DIR
#
# Group softmax needs C + 2 + G classifier outputs (G instance-count groups),
# so fc_cls is re-initialised (cRT-style) and `crat-ft export` writes the
# detector config with this loss beside the merged checkpoint.
_base_ = ["./crat_synthetic.py"]

heads = dict(
    loss_cls=dict(
        _delete_=True,
        type="GroupSoftmaxLoss",
        group_bounds=(10, 100, 1000),  # instance-count bins, as LVIS's r/c/f
        others_ratio=8.0,
        loss_weight=1.0,
    ),
    reinit_cls=True,
)
