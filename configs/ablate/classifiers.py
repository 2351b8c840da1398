# The decoupled classifier recipes crat-ft has, each with and without CRAT, as arms of `crat-ft ablate`, on
# the demo fine-tune configs:
#
#   crat-ft ablate configs/ablate/classifiers.py --cache work_dirs/demo/cache \
#       --data-root work_dirs/demo/data --work-dir work_dirs/ablate-classifiers --seeds 0,1,2
#
# Retraining recipes: cRT (class-balanced sampler, softmax cross-entropy), Seesaw and EQLv2 (their
# own rebalancing, so a random sampler), group softmax (BAGS, class-balanced). Recipes applied when
# the heads are evaluated (`export`, as `crat-ft export` folds them in): tau-normalisation (tau 1),
# logit adjustment (tau 1) and the original classifier's scores mixed in (weight 0.5). An arm that
# differs from an earlier one only in `export` evaluates that arm's retrained heads, so those six
# arms cost an evaluation each, no retraining. Settings are the methods' published defaults, nothing
# tuned here. Every arm is compared with cRT, and each recipe with CRAT with the same recipe without.
# Arm files are described in crat_controls.py beside this one.

_crt = "../demo/baseline_synthetic.py"  # cRT, CRAT off
_crat = "../demo/crat_synthetic.py"  # cRT with CRAT
_seesaw = {
    "heads.loss_cls": dict(_delete_=True, type="SeesawLoss", p=0.8, q=2.0, loss_weight=1.0),
    "heads.reinit_cls": True,  # Seesaw's classifier has C + 2 outputs
    "sampler.strategy": "random",
}
_group_softmax = {  # as configs/demo/crat_bags_synthetic.py: C + 2 + G outputs
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
