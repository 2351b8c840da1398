# The decoupled classifier recipes crat-ft has, each with and without CRAT, as arms of `crat-ft ablate`, for
# mmdet's LVIS v1 Mask R-CNN checkpoints (configs/lvis/: softmax CE detectors, 20,000 iterations per retraining):
#
#   torchrun --nproc-per-node 8 $(which crat-ft) ablate configs/lvis/ablate/classifiers.py \
#       --cache cache/ --data-root data/lvis_v1/ --work-dir work_dirs/ablate_classifiers_r50 --seeds 0,1,2
#
# Retraining recipes: cRT (class-balanced sampler, softmax cross-entropy), Seesaw and EQLv2 (their
# own rebalancing, so a random sampler), group softmax (BAGS, class-balanced). Recipes applied when
# the heads are evaluated (`export`, as `crat-ft export` folds them in): tau-normalisation (tau 1),
# logit adjustment (tau 1) and the original classifier's scores mixed in (weight 0.5). An arm that
# differs from an earlier one only in `export` evaluates that arm's retrained heads, so those six
# arms cost an evaluation each, no retraining. Settings are the methods' published defaults, nothing
# tuned here. Every arm is compared with cRT, and each recipe with CRAT with the same recipe without.
# Arm files are described in crat_controls.py beside this one.

_crt = "../baseline_mask-rcnn_r50_fpn_lvis-v1.py"  # cRT, CRAT off
_crat = "../crat_mask-rcnn_r50_fpn_lvis-v1.py"  # cRT with CRAT
_seesaw = {
    "heads.loss_cls": dict(_delete_=True, type="SeesawLoss", p=0.8, q=2.0, loss_weight=1.0),
    "heads.reinit_cls": True,  # Seesaw's classifier has C + 2 outputs
    "sampler.strategy": "random",
}
_group_softmax = {  # BAGS: C + 2 + G outputs
    "heads.loss_cls": dict(_delete_=True, type="GroupSoftmaxLoss", group_bounds=(10, 100, 1000), others_ratio=8.0),
    "heads.reinit_cls": True,
}
_eqlv2 = {"heads.loss_cls": dict(_delete_=True, type="EQLV2Loss", loss_weight=1.0), "sampler.strategy": "random"}

arms = [
    dict(name="crt", ft_config=_crt),
    dict(name="crt+crat", ft_config=_crat),
    dict(name="seesaw", ft_config=_crt, cfg_options=_seesaw),
    dict(name="seesaw+crat", ft_config=_crat, cfg_options=_seesaw),
    dict(name="eqlv2", ft_config=_crt, cfg_options=_eqlv2),
    dict(name="eqlv2+crat", ft_config=_crat, cfg_options=_eqlv2),
    dict(name="group-softmax", ft_config=_crt, cfg_options=_group_softmax),
    dict(name="group-softmax+crat", ft_config=_crat, cfg_options=_group_softmax),
    dict(name="tau-norm", ft_config=_crt, export=dict(tau_norm=1.0)),
    dict(name="tau-norm+crat", ft_config=_crat, export=dict(tau_norm=1.0)),
    dict(name="logit-adjust", ft_config=_crt, export=dict(logit_adjust=1.0)),
    dict(name="logit-adjust+crat", ft_config=_crat, export=dict(logit_adjust=1.0)),
    dict(name="combine-original", ft_config=_crt, export=dict(combine_original=0.5)),
    dict(name="combine-original+crat", ft_config=_crat, export=dict(combine_original=0.5)),
]
reference = "crt"
# each recipe with CRAT against the same recipe without (crt+crat - crt is a row already)
contrasts = [(name, name + "+crat") for name in
             ("seesaw", "eqlv2", "group-softmax", "tau-norm", "logit-adjust", "combine-original")]
