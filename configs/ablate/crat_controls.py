# Does CRAT's Fisher guidance matter on your detector? The decoupled ablation of
# benchmarks/bench_ablation.py as arms of `crat-ft ablate`, on the demo fine-tune configs:
#
#   crat-ft ablate configs/ablate/crat_controls.py --cache work_dirs/demo/cache \
#       --data-root work_dirs/demo/data --work-dir work_dirs/ablate --seeds 0,1,2
#
# An arm is a fine-tune config (a path relative to this file), `cfg_options` overriding its keys
# and, optionally, `export` options applied when it is evaluated (tau_norm, logit_adjust,
# combine_original). A string value may hold `{arm.quantity}`, a number measured in an earlier
# arm's run of the same seed: `mass_box` / `mass_mask`, the mean gradient-mass ratio of CRAT's
# transfusion (logged with crat.log_mass=True). Every arm is compared with `reference`, and each
# pair (A, B) of `contrasts` gives B - A. Names starting with _ are helpers, not read.

_plain = "../demo/baseline_synthetic.py"  # CRAT off
_crat = "../demo/crat_synthetic.py"

arms = [
    # no transfusion: class-balanced retraining of the same layers
    dict(name="plain", ft_config=_plain),
    # CRAT with the paper's settings, logging the transfused / own gradient-mass ratio r
    dict(name="crat", ft_config=_crat, cfg_options={"crat.donors": "fisher", "crat.log_mass": True}),
    # equal weights over the other seen classes (tau -> infinity): is the Fisher guidance needed?
    dict(name="uniform", ft_config=_crat, cfg_options={"crat.donors": "uniform"}),
    # the class statistics permuted across classes: weights as sharp as CRAT's, to random receivers
    dict(name="permuted", ft_config=_crat, cfg_options={"crat.donors": "permuted"}),
    # no transfusion, the own-class box and mask losses weighted 1 + r (r measured in crat's run of the
    # same seed): is it just more box and mask loss?
    dict(
        name="loss-mass",
        ft_config=_plain,
        cfg_options={"heads.loss_bbox_weight": "1 + {crat.mass_box}", "heads.loss_mask_weight": "1 + {crat.mass_mask}"},
    ),
]
reference = "plain"
# CRAT against each control: crat - uniform, crat - permuted, crat - loss-mass
contrasts = [("uniform", "crat"), ("permuted", "crat"), ("loss-mass", "crat")]
