# The decoupled baseline for LVIS v1: identical to the CRAT config with CRAT off.
_base_ = ["./crat_mask-rcnn_r50_fpn_lvis-v1.py"]

crat = dict(enable=False)
