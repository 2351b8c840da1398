"""Does CRAT's Fisher guidance matter? Five arms, end to end and decoupled, on the synthetic benchmarks.

Arms (CRAT's settings are the paper's everywhere: lambda_box 0.001, lambda_mask 0.01, tau 0.05, alpha 0.01):

1. ``plain``: no transfusion;
2. ``crat``: CRAT (Fisher-guided weights), logging the gradient-mass ratio of transfusion (below);
3. ``uniform``: CRAT with equal weights over the other seen classes (``crat.donors=uniform``: tau -> infinity);
4. ``loss-mass``: no transfusion, the own-class box and mask loss weights raised to 1 + r, r the mean
   gradient-mass ratio measured in the ``crat`` run of the same seed and mode: the norm of the
   transfusion loss's gradient on the class-wise layer (``fc_reg`` / ``conv_logits``) over the norm of
   the own-class loss's (``crat.log_mass``, logged every iteration, averaged over the logged windows);
5. ``permuted``: CRAT with the class statistics permuted across classes (``crat.donors=permuted``):
   weights as sharp as CRAT's, to random receivers.

Modes: ``e2e``, the demo detector trained by mmdet with the arm's heads (the plugin heads,
``configs/demo/mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py``; the transfusion gradient also reaches the
shared trunk); ``decoupled``, the ``plain`` e2e detector of the seed, its RoI features cached, and the
class-wise layers retrained from the cache with the arm (the demo's fine-tune configs).

Benchmarks and seeds (stage 1: the demo config's 600 iterations; nothing shortened):

================  =====================  =====================  ============
benchmark         e2e seeds (reported)   decoupled seeds        held out
================  =====================  =====================  ============
colour-shapes     0, 1, 2                0, 1                   7
families s = 1    0, 1                   0, 1                   7
families s = 0    --                     0, 1                   7
================  =====================  =====================  ============

**Held-out seed: 7 for every benchmark**, named here before any ablation run (no earlier
benchmark of this project ran seed 7). It is run last and reported separately; nothing is tuned on
it or on the reported seeds.

Every run writes, as it ends, ``ROOT/<benchmark>/<mode>/s<seed>/<arm>/``: ``metrics.json`` (LVIS
bbox/segm), the matches ``crat-ft compare`` resamples (``metrics_matches_*.npz``), ``mass.json``
(for ``crat``: the measured ratios) and, outside git, checkpoints and ``results.segm.json``.
``--finished`` tabulates what exists: per benchmark and mode, each arm's AP, APr, APc, APf and its
difference from ``plain`` with ``crat-ft compare``'s interval over the reported seeds, and the
held-out seed's difference on its own; ``--plot F`` draws the ΔAPr of every arm.

    .venv/bin/python benchmarks/bench_ablation.py [--root benchmarks/results/ablation] [--only colour-shapes/e2e]
    .venv/bin/python benchmarks/bench_ablation.py --finished [--plot docs/img/ablation.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ARMS = ("plain", "crat", "uniform", "loss-mass", "permuted")
HELD_OUT = 7
BENCHMARKS = {
    "colour-shapes": dict(variant="colour-shapes", sharing=None, e2e=(0, 1, 2), decoupled=(0, 1)),
    "families-s1": dict(variant="families", sharing=1.0, e2e=(0, 1), decoupled=(0, 1)),
    "families-s0": dict(variant="families", sharing=0.0, e2e=(), decoupled=(0, 1)),
}
KEYS = ("AP", "APr", "APc", "APf")
E2E_CONFIG = "mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py"
PLAIN_CONFIG = "mask-rcnn_r18_fpn_tiny_synthetic.py"


def _mass(work: Path) -> dict:
    """Mean of the logged ``mass_box`` / ``mass_mask`` windows of a run's mmengine scalars."""
    sums: dict[str, list] = {}
    for path in work.glob("*/vis_data/scalars.json"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for key, value in rec.items():
                if key.endswith("mass_box") or key.endswith("mass_mask"):
                    sums.setdefault(key.split(".")[-1], []).append(value)
    if not sums:
        raise RuntimeError(f"{work}: no mass_box / mass_mask in its logs; was crat.log_mass on?")
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _e2e_options(arm: str, mass: dict | None) -> tuple[str, list[str]]:
    heads = ("model.roi_head.bbox_head.crat", "model.roi_head.mask_head.crat")
    if arm == "plain":
        return PLAIN_CONFIG, []
    if arm == "loss-mass":
        return PLAIN_CONFIG, [f"model.roi_head.bbox_head.loss_bbox.loss_weight={1 + mass['mass_box']}",
                              f"model.roi_head.mask_head.loss_mask.loss_weight={1 + mass['mass_mask']}"]  # fmt: skip
    donors = {"crat": "fisher", "uniform": "uniform", "permuted": "permuted"}[arm]
    return E2E_CONFIG, [f"{h}.donors={donors}" for h in heads] + [f"{h}.log_mass={arm == 'crat'}" for h in heads]


def _decoupled_options(arm: str, mass: dict | None) -> tuple[str, list[str]]:
    if arm == "plain":
        return "baseline_synthetic.py", []
    if arm == "loss-mass":
        return "baseline_synthetic.py", [f"heads.loss_bbox_weight={1 + mass['mass_box']}",
                                         f"heads.loss_mask_weight={1 + mass['mass_mask']}"]  # fmt: skip
    donors = {"crat": "fisher", "uniform": "uniform", "permuted": "permuted"}[arm]
    return "crat_synthetic.py", [f"crat.donors={donors}", f"crat.log_mass={arm == 'crat'}"]


def _say(msg: str) -> None:
    import time

    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_seed(root: Path, bench: str, mode: str, seed: int, log) -> None:
    from crat_ft.cache import INDEX_FILE
    from crat_ft.extract import extract_features
    from crat_ft.paths import demo_config
    from crat_ft.retrain import HEADS_FILE, retrain_heads
    from crat_ft.roi_policy import RoIPolicy
    from crat_ft.stage1 import DETECTOR_FILE, evaluate_detector, train_detector
    from crat_ft.synthetic import DemoDataSpec, make_demo_data

    spec = BENCHMARKS[bench]
    base = root / bench
    data = base / "data" / f"s{seed}"
    if not (data / "annotations" / "lvis_v1_val.json").exists():
        kw = {} if spec["sharing"] is None else {"sharing": spec["sharing"]}
        make_demo_data(data, DemoDataSpec(seed=seed, variant=spec["variant"], **kw), progress=False)
    mass = None
    for arm in ("plain", "crat", "uniform", "permuted", "loss-mass"):  # loss-mass needs crat's ratio
        out = base / mode / f"s{seed}" / arm
        if arm == "loss-mass":
            mass = json.loads((base / mode / f"s{seed}" / "crat" / "mass.json").read_text())
        if (out / "metrics.json").exists():
            continue
        _say(f"{bench} {mode} seed {seed}: {arm}")
        with contextlib.redirect_stdout(log):
            if mode == "e2e":
                config_name, options = _e2e_options(arm, mass)
                config = demo_config(config_name)
                detector = out / DETECTOR_FILE
                if not detector.exists():
                    train_detector(config, out, cfg_options=options, data_root=data, seed=seed)
                if arm == "crat":
                    (out / "mass.json").write_text(json.dumps(_mass(out)))
                evaluate_detector(config, detector, out / "metrics.json", data_root=data,
                                  cfg_options=options, outfile_prefix=out / "results")  # fmt: skip
            else:
                stage1 = base / "e2e" / f"s{seed}" / "plain" / DETECTOR_FILE
                config = demo_config(PLAIN_CONFIG)
                if not stage1.exists():
                    train_detector(config, stage1.parent, data_root=data, seed=seed)
                cache = base / "decoupled" / f"s{seed}" / "cache" / INDEX_FILE
                if not cache.exists():
                    policy = RoIPolicy(seed=seed, mask_pos_per_class=200)
                    extract_features(config, stage1, cache.parent, data_root=data, policy=policy, resume=True)
                ft_name, options = _decoupled_options(arm, mass)
                if not (out / HEADS_FILE).exists():
                    retrain_heads(demo_config(ft_name), cache, out, cfg_options=[f"train.seed={seed}", *options],
                                  resume=True)  # fmt: skip
                if arm == "crat":
                    (out / "mass.json").write_text(json.dumps(_mass(out)))
                evaluate_detector(config, stage1, out / "metrics.json", data_root=data, heads=out / HEADS_FILE,
                                  outfile_prefix=out / "results")  # fmt: skip
        m = json.loads((out / "metrics.json").read_text())
        _say(
            f"{bench} {mode} seed {seed} {arm}: bbox APr {100 * m['bbox']['APr']:.1f} segm APr {100 * m['segm']['APr']:.1f}"
        )


def finished(root: Path, plot: Path | None) -> None:
    from crat_ft.compare import compare

    rows = []
    for bench, spec in BENCHMARKS.items():
        for mode in ("e2e", "decoupled"):
            seeds = [s for s in spec[mode] if (root / bench / mode / f"s{s}" / "plain" / "metrics.json").exists()]
            gt = str(root / bench / "data" / "s{seed}" / "annotations" / "lvis_v1_val.json")
            for arm in ARMS[1:]:
                done = [s for s in seeds if (root / bench / mode / f"s{s}" / arm / "metrics.json").exists()]
                for label, use in (("reported", done), ("held out", [HELD_OUT])):
                    run = root / bench / mode / f"s{use[0]}" / arm if use else None
                    if not use or not (run / "metrics.json").exists():
                        continue
                    r = compare(gt, str(root / bench / mode / "s{seed}" / "plain"),
                                str(root / bench / mode / "s{seed}" / arm), seeds=use)  # fmt: skip
                    rows.append((bench, mode, arm, label, use, r))
    print("arm - plain, AP points, 95% interval (seeds pooled as `crat-ft compare --seeds` does)")
    for bench, mode, arm, label, use, r in rows:
        cells = "  ".join(f"{iou} {k} {100 * r[iou][k]['delta']:+.1f} [{100 * r[iou][k]['low']:+.1f}, "
                          f"{100 * r[iou][k]['high']:+.1f}]" for iou in ("bbox", "segm") for k in ("APr", "APf"))  # fmt: skip
        print(f"{bench:<14}{mode:<10}{arm:<10}{label:<9}seeds {','.join(map(str, use)):<6} {cells}")
    if plot and rows:
        _plot(rows, plot)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(b, m) for b, m, *_ in rows}, key=lambda x: (list(BENCHMARKS).index(x[0]), x[1]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, iou in zip(axes, ("bbox", "segm")):
        for g, (bench, mode) in enumerate(groups):
            for k, arm in enumerate(ARMS[1:]):
                for bench_, mode_, arm_, label, use, r in rows:
                    if (bench_, mode_, arm_) == (bench, mode, arm) and label == "reported":
                        m = r[iou]["APr"]
                        x = g + (k - 1.5) * 0.18
                        ax.errorbar(x, 100 * m["delta"], yerr=[[100 * (m["delta"] - m["low"])], [100 * (m["high"] - m["delta"])]],
                                    fmt="o", color=f"C{k}", capsize=3, label=arm if g == 0 else None)  # fmt: skip
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{b}\n{m}" for b, m in groups], fontsize=8)
        ax.set_title(f"{iou} APr: arm - plain (95% interval, reported seeds)")
    axes[0].set_ylabel("AP points")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("benchmarks/results/ablation"))
    ap.add_argument("--only", default=None, help="BENCHMARK/MODE, e.g. colour-shapes/e2e")
    ap.add_argument("--held-out", action="store_true", help="run the held-out seed (last)")
    ap.add_argument("--finished", action="store_true")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.finished:
        finished(args.root, args.plot)
        return
    args.root.mkdir(parents=True, exist_ok=True)
    with open(args.root / "ablation.log", "a") as log:
        for bench, spec in BENCHMARKS.items():
            for mode in ("e2e", "decoupled"):
                if args.only and args.only != f"{bench}/{mode}":
                    continue
                for seed in [HELD_OUT] if args.held_out else spec[mode]:
                    if seed == HELD_OUT and not spec[mode]:
                        continue
                    run_seed(args.root, bench, mode, seed, log)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
