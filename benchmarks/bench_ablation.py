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
class-wise layers retrained from the cache with the arm (the demo's fine-tune configs): the runs of
``crat-ft ablate configs/ablate/crat_controls.py`` with the seed (:func:`crat_ft.pipeline.ablate.run_ablation`).

Benchmarks and seeds:

================  =====================  =====================  ============
benchmark         e2e seeds (reported)   decoupled seeds        held out
================  =====================  =====================  ============
colour-shapes     0, 1, 2                0, 1                   7
families s = 1    0, 1                   0, 1                   7
families s = 0    --                     0, 1                   7
================  =====================  =====================  ============

**Stage 1 is shortened on colour-shapes to 300 iterations** (the demo config trains 600), its warm-up
and learning-rate steps at the same fractions of the schedule (50; 225 and 275). Reason: time, chosen
before any ablation run. **Families keeps the demo's 600 iterations**: its first seed at 300 (five arms,
commit a4bd57c) left the ``plain`` detector at bbox AP 3.4 and APr 0.6, too weak for its rare classes to
be measured; that choice was made from the plain arm's own AP, and those runs were discarded, none
reported. Every arm of a benchmark gets its schedule (``BENCHMARKS``, recorded in ``ROOT/settings.json``,
which refuses a results root trained on another), so each comparison is fair; the absolute APs are
those of the schedule.

**Held-out seed: 7 for every benchmark**, named here before any ablation run (no earlier
benchmark of this project ran seed 7). It is run last and reported separately; nothing is tuned on
it or on the reported seeds.

**Beyond the paper** (``--improvements``): CRAT with one change each, named here before any of their
runs, run where CRAT showed an effect (colour-shapes, end to end) on the same seeds, the held-out seed
last, and compared with ``plain`` and with ``crat``; every other setting is the paper's, nothing tuned:

- ``crat-signed``: a Fisher that carries the residual (``crat.fisher=signed``): each sample's statistic is
  its own-class gradient unsquared (``sign(p - t) ⊗ x`` for the L1 box loss, whose square ``1 ⊗ x²`` measures
  appearance only), so donations go to classes whose layers are pulled the same way;
- ``crat-gate``: a frequency gate (``crat.frequency_gate=True``): a positive of class y transfuses only to
  classes with fewer training instances than y, so the frequent classes' layers receive nothing.

Each seed's arms are trained one after another, then evaluated side by side
(``crat_ft.pipeline.evaluate_jobs.evaluate_jobs``). A finished stage (detector, cache, heads, evaluation) is reused only
when its run record (``crat_ft.common.run_record``) matches what this run would write; otherwise it is redone,
with the stages that depend on it, and the console says why (as ``crat-ft demo`` does). Every run
writes, as it ends, ``ROOT/<benchmark>/<mode>/s<seed>/<arm>/``: ``arm.json`` (the config and
``--cfg-options`` it was trained with and its time; decoupled, as ``crat-ft ablate`` records them), ``metrics.json`` (LVIS bbox/segm), the
matches ``crat-ft compare`` resamples (``metrics_matches_*.npz``), ``errors.json`` (``crat-ft
analyze-errors``: the error decomposition and class-oracle AP) with the class-oracle matches
(``oracle_matches_*.npz``), ``mass.json`` (``crat`` only: the measured ratios) and, outside git,
checkpoints, run records and detections. ``--finished`` tabulates what exists: per benchmark and mode, each arm's
difference from ``plain`` in AP, APr, APc, APf (bbox, segm) and in class-oracle AP, with
``crat-ft compare``'s interval over the reported seeds, the held-out seed's on its own, the rare
classes' error decomposition and the mass ratios (``ROOT/ablation.md``); ``--plot F`` draws ΔAPr.

    .venv/bin/python benchmarks/bench_ablation.py [--root benchmarks/results/ablation] [--only colour-shapes/e2e]
    .venv/bin/python benchmarks/bench_ablation.py --improvements [crat-signed]
    .venv/bin/python benchmarks/bench_ablation.py --finished [--plot docs/img/ablation.png]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

ARMS = ("plain", "crat", "uniform", "loss-mass", "permuted")
TRAIN_ORDER = ("plain", "crat", "uniform", "permuted", "loss-mass")  # loss-mass needs crat's ratio
HELD_OUT = 7
BENCHMARKS = {
    "colour-shapes": dict(variant="colour-shapes", sharing=None, e2e=(0, 1, 2), decoupled=(0, 1), stage1_iters=300),
    "families-s1": dict(variant="families", sharing=1.0, e2e=(0, 1), decoupled=(0, 1), stage1_iters=600),
    "families-s0": dict(variant="families", sharing=0.0, e2e=(), decoupled=(0, 1), stage1_iters=600),
}
MODES = ("e2e", "decoupled")
# beyond the paper: arm -> the --cfg-options keys it changes in CRAT's settings (see the docstring)
IMPROVEMENTS = {"crat-signed": {"fisher": "signed"}, "crat-gate": {"frequency_gate": True}}
IMPROVED = (("colour-shapes", "e2e"),)
KEYS = ("AP", "APr", "APc", "APf")
IOUS = ("bbox", "segm")
E2E_CONFIG = "mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py"
PLAIN_CONFIG = "mask-rcnn_r18_fpn_tiny_synthetic.py"
HEADS = ("model.roi_head.bbox_head.crat", "model.roi_head.mask_head.crat")
DONORS = {"crat": "fisher", "uniform": "uniform", "permuted": "permuted"}


def stage1_options(iters: int) -> list[str]:
    """The demo config's schedule (600 iterations: warm-up 100, steps at 450 and 550) scaled to ``iters``."""
    from crat_ft.pipeline.train_detector import demo_schedule

    return demo_schedule(iters)


@functools.cache
def decoupled_arms():
    """The decoupled arms: the ARMS file of ``crat-ft ablate`` (:func:`crat_ft.pipeline.ablate_arms.load_arms`)."""
    from crat_ft.common.paths import config_root
    from crat_ft.pipeline.ablate_arms import load_arms

    return load_arms(config_root() / "ablate" / "crat_controls.py")


def arm_settings(
    mode: str, arm: str, mass: dict | None, stage1_iters: int, counts: list[int] | None = None
) -> tuple[str, list[str]]:
    """``(config file name, --cfg-options)`` of one arm: for ``e2e`` the detector's, for ``decoupled`` the
    fine-tune config's (its stage 1 is the ``plain`` e2e detector of the same seed). ``counts``: training
    instances per class, which the plugin heads' frequency gate needs (``crat-gate`` end to end)."""
    if arm in IMPROVEMENTS:
        change = [f"{k}={v}" for k, v in IMPROVEMENTS[arm].items()]
        name, options = arm_settings(mode, "crat", mass, stage1_iters)
        options = [o.replace("log_mass=True", "log_mass=False") for o in options]
        if mode == "decoupled":
            return name, options + [f"crat.{c}" for c in change]
        options += [f"{h}.{c}" for h in HEADS for c in change]
        if "frequency_gate" in IMPROVEMENTS[arm]:
            if counts is None:
                raise ValueError(f"{arm}: the end-to-end frequency gate needs the training instance counts")
            heads = [h.rsplit(".", 1)[0] for h in HEADS]
            options += [f"{h}.class_instance_count=[{','.join(map(str, counts))}]" for h in heads]
        return name, options
    if mode == "e2e":
        s1 = stage1_options(stage1_iters)
        if arm == "plain":
            return PLAIN_CONFIG, s1
        if arm == "loss-mass":
            return PLAIN_CONFIG, s1 + [f"model.roi_head.bbox_head.loss_bbox.loss_weight={1 + mass['mass_box']}",
                                       f"model.roi_head.mask_head.loss_mask.loss_weight={1 + mass['mass_mask']}"]  # fmt: skip
        return E2E_CONFIG, s1 + [f"{h}.donors={DONORS[arm]}" for h in HEADS] + [
            f"{h}.log_mass={arm == 'crat'}" for h in HEADS
        ]
    chosen = decoupled_arms().arm(arm)  # what `crat-ft ablate configs/ablate/crat_controls.py` runs
    options = chosen.options({"crat": mass} if mass else {}, 0)
    options.pop("train.seed")
    return chosen.ft_config.name, [f"{k}={v}" for k, v in options.items()]


def _say(msg: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _data(root: Path, bench: str, seed: int) -> Path:
    from crat_ft.synthetic.dataset import make_demo_data
    from crat_ft.synthetic.variants import DemoDataSpec

    spec = BENCHMARKS[bench]
    data = root / bench / "data" / f"s{seed}"
    if not (data / "annotations" / "lvis_v1_val.json").exists():
        kw = {} if spec["sharing"] is None else {"sharing": spec["sharing"]}
        make_demo_data(data, DemoDataSpec(seed=seed, variant=spec["variant"], **kw), progress=False)
    return data


def _detector_stage(config: Path, options: list[str], work: Path, what: str, data: Path, seed: int, log) -> Path:
    """Train a detector, or reuse it when its run record matches (``crat_ft.pipeline.demo_stages.run_stage``)."""
    from crat_ft.common.run_record import RECORD_FILE, read_record
    from crat_ft.pipeline.demo_stages import run_stage
    from crat_ft.pipeline.train_detector import DETECTOR_FILE, detector_record, detector_train_config, train_detector

    with contextlib.redirect_stdout(log):
        wanted = detector_record(detector_train_config(config, options, data, seed))
    run_stage(
        what, work, work / DETECTOR_FILE, wanted, read_record(work / RECORD_FILE),
        lambda resume: train_detector(config, work, cfg_options=options, data_root=data, seed=seed, resume=resume),
        log=log,
    )  # fmt: skip
    return work / DETECTOR_FILE


def _train(root: Path, bench: str, seed: int, arm: str, data: Path, stage1_iters: int, log) -> dict:
    """Train one arm end to end, or reuse it when its run record matches what this run would write
    (``crat_ft.pipeline.demo_stages.run_stage``); returns the evaluation job of :func:`crat_ft.pipeline.demo_stages.evaluate_stages`."""
    from crat_ft.common.lvis_json import categories_with_counts, load_lvis_json
    from crat_ft.common.paths import demo_config
    from crat_ft.pipeline.ablate import MASS_FILE, measured_mass

    seed_dir = root / bench / "e2e" / f"s{seed}"
    out = seed_dir / arm
    mass = json.loads((seed_dir / "crat" / MASS_FILE).read_text()) if arm == "loss-mass" else None
    counts = None
    if "frequency_gate" in IMPROVEMENTS.get(arm, {}):
        train = load_lvis_json(data / "annotations" / "lvis_v1_train.json")
        counts = [int(c["instance_count"]) for c in categories_with_counts(train)]
    config_name, options = arm_settings("e2e", arm, mass, stage1_iters, counts)
    t0 = time.time()
    config = demo_config(config_name)
    detector = _detector_stage(config, options, out, f"{bench} e2e seed {seed}: training {arm}", data, seed, log)
    if arm == "crat" and not (out / MASS_FILE).exists():
        (out / MASS_FILE).write_text(json.dumps(measured_mass(out)))
    if not (out / "arm.json").exists():
        record = dict(benchmark=bench, mode="e2e", seed=seed, arm=arm, config=config_name, cfg_options=options,
                      stage1_iters=stage1_iters, train_s=round(time.time() - t0, 1))  # fmt: skip
        (out / "arm.json").write_text(json.dumps(record, indent=1))
    return dict(config=config, checkpoint=detector, out=out / "metrics.json", data_root=data, heads=None,
                cfg_options=options, outfile_prefix=out / "results")  # fmt: skip


def _decoupled(root: Path, bench: str, seed: int, data: Path, stage1_iters: int, log) -> None:
    """The decoupled arms of one seed: the seed's ``plain`` e2e detector and its cache (each reused only when
    its run record matches), then ``crat-ft ablate``'s runs of ``configs/ablate/crat_controls.py`` with this
    seed (:func:`crat_ft.pipeline.ablate.run_ablation`: retraining, evaluation side by side, error analysis)."""
    from crat_ft.common.paths import demo_config
    from crat_ft.common.run_record import difference_text
    from crat_ft.detector.roi_policy import RoIPolicy
    from crat_ft.pipeline.ablate import run_ablation
    from crat_ft.pipeline.demo_stages import run_stage
    from crat_ft.pipeline.extract import extract_features, planned_settings
    from crat_ft.pipeline.extract_settings import recorded_settings

    where = f"{bench} decoupled seed {seed}"
    plain_config, plain_options = arm_settings("e2e", "plain", None, stage1_iters)
    config = demo_config(plain_config)
    plain = root / bench / "e2e" / f"s{seed}" / "plain"
    detector = _detector_stage(config, plain_options, plain, f"{where}: training the e2e plain detector", data, seed,
                               log)  # fmt: skip
    cache = root / bench / "decoupled" / f"s{seed}" / "cache"
    policy = RoIPolicy(seed=seed, mask_pos_per_class=200)
    with contextlib.redirect_stdout(log):
        wanted = planned_settings(config, detector, data_root=data, policy=policy)
    run_stage(
        f"{where}: extracting the cache", cache, cache / "index.h5", wanted,
        recorded_settings(cache) if cache.is_dir() else None,
        lambda resume: extract_features(config, detector, cache, data_root=data, policy=policy, resume=resume),
        differ=lambda old, new: difference_text({"settings": old}, {"settings": new}), log=log,
    )  # fmt: skip
    run_ablation(decoupled_arms().path, cache, root / bench / "decoupled", seeds=[seed], data_root=data, tables=False,
                 log=log)  # fmt: skip


def run_seed(root: Path, bench: str, mode: str, seed: int, stage1_iters: int, log, arms=TRAIN_ORDER) -> None:
    """Train ``arms`` (in order) of one seed and mode, evaluate them side by side, analyse their errors
    (decoupled: the arms of ``configs/ablate/crat_controls.py``, by :func:`_decoupled`).

    Every stage is reused only when its run record matches what this run would write (an arm trained or
    evaluated with other settings, or by an older crat-ft that recorded none, is redone).
    """
    from crat_ft.common.lvis_json import load_lvis_json
    from crat_ft.pipeline.ablate import analyze_arm
    from crat_ft.pipeline.demo_stages import EVALUATION_RECORD, evaluate_stages

    data = _data(root, bench, seed)
    seed_dir = root / bench / mode / f"s{seed}"
    if mode == "decoupled":
        _decoupled(root, bench, seed, data, stage1_iters, log)
        arms = [a.name for a in decoupled_arms().arms]
    else:
        jobs = {arm: _train(root, bench, seed, arm, data, stage1_iters, log) for arm in arms}
        t0 = time.time()
        stamps = {arm: _mtime(seed_dir / arm / EVALUATION_RECORD) for arm in arms}
        evaluate_stages(jobs, data, log)
        _say(f"{bench} {mode} seed {seed}: evaluations checked in {time.time() - t0:.0f} s")
        gt_doc = None
        for arm in arms:
            out = seed_dir / arm
            if not (out / "errors.json").exists() or _mtime(out / EVALUATION_RECORD) != stamps[arm]:
                gt_doc = gt_doc or load_lvis_json(data / "annotations" / "lvis_v1_val.json")
                analyze_arm(out, gt_doc)
    for arm in arms:
        m = json.loads((seed_dir / arm / "metrics.json").read_text())
        _say(f"{bench} {mode} seed {seed} {arm}: bbox AP {100 * m['bbox']['AP']:.1f} APr {100 * m['bbox']['APr']:.1f}"
             f"  segm AP {100 * m['segm']['AP']:.1f} APr {100 * m['segm']['APr']:.1f}")  # fmt: skip


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _check_root(root: Path) -> None:
    """One stage-1 schedule per benchmark and results root: runs of two schedules must not be compared."""
    want = {bench: spec["stage1_iters"] for bench, spec in BENCHMARKS.items()}
    settings = root / "settings.json"
    if settings.exists():
        had = json.loads(settings.read_text())["stage1_iters"]
        for bench, iters in had.items() if isinstance(had, dict) else []:
            if bench in want and want[bench] != iters:
                sys.exit(f"bench_ablation: {root} holds {bench} runs with a {iters}-iteration stage 1, this script "
                         f"trains {want[bench]}; choose another --root")  # fmt: skip
        if not isinstance(had, dict):
            sys.exit(f"bench_ablation: {root}/settings.json predates per-benchmark schedules; choose another --root")
    root.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"stage1_iters": want}) + "\n")


def plan(only: str | None, which: str) -> list[tuple[str, str, int]]:
    """``(benchmark, mode, seed)`` in run order: per benchmark the reported seeds of both modes, then its
    held-out seed (last)."""
    runs = []
    for bench, spec in BENCHMARKS.items():
        if only and only not in (bench, *(f"{bench}/{m}" for m in MODES)):
            continue
        modes = [m for m in MODES if not only or only in (bench, f"{bench}/{m}")]
        if which in ("all", "reported"):
            runs += [(bench, m, s) for m in modes for s in spec[m]]
        if which in ("all", "held-out"):
            runs += [(bench, m, HELD_OUT) for m in modes if spec[m]]
    return runs


def improvement_plan(which: str) -> list[tuple[str, str, int]]:
    """``(benchmark, mode, seed)`` of the improvement arms, each benchmark's held-out seed after its reported ones."""
    runs = []
    for bench, mode in IMPROVED:
        seeds = BENCHMARKS[bench][mode]
        runs += [(bench, mode, s) for s in seeds if which in ("all", "reported")]
        runs += [(bench, mode, HELD_OUT)] if which in ("all", "held-out") else []
    return runs


def _interval(m: dict) -> str:
    return f"{100 * m['delta']:+.1f} [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]"


# what --finished compares, B - A per seed: every arm against plain, then CRAT against each control
PAIRS = [("plain", arm) for arm in ARMS[1:]] + [(arm, "crat") for arm in ("uniform", "loss-mass", "permuted")]
# ... and each improvement against plain and against CRAT
PAIRS += [(a, arm) for arm in IMPROVEMENTS for a in ("plain", "crat")]


def _inputs_digest(root: Path, bench: str, mode: str, a: str, b: str, seeds: list[int]) -> str:
    """A digest of every file a row of ``--finished`` is computed from (so an unchanged row is reused)."""
    import hashlib

    h = hashlib.sha256()
    base = root / bench / mode
    files = [root / bench / "data" / f"s{s}" / "annotations" / "lvis_v1_val.json" for s in seeds]
    files += [base / f"s{s}" / "crat" / "mass.json" for s in seeds]
    for s in seeds:
        for x in (a, b):
            files += sorted((base / f"s{s}" / x).glob("*_matches_*.npz")) + [base / f"s{s}" / x / "errors.json"]
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _pair_row(root: Path, bench: str, mode: str, a: str, b: str, seeds: list[int], label: str) -> dict:
    """B - A over ``seeds`` of one benchmark and mode: LVIS AP and class-oracle AP with their intervals,
    the rare classes' bbox error decomposition of both (mean over the seeds), CRAT's mass ratios."""
    import numpy as np

    from crat_ft.analysis.compare import compare, compare_tables
    from crat_ft.analysis.error_analysis import ERROR_TYPES
    from crat_ft.evaluation.matching import MatchTable

    base = root / bench / mode
    gt = str(root / bench / "data" / "s{seed}" / "annotations" / "lvis_v1_val.json")
    r = compare(gt, str(base / "s{seed}" / a), str(base / "s{seed}" / b), seeds=seeds)
    oracle = compare_tables(
        {
            iou: [
                tuple(MatchTable.load(base / f"s{s}" / x / f"oracle_matches_{iou}.npz") for x in (a, b)) for s in seeds
            ]
            for iou in IOUS
        }  # fmt: skip
    )
    errs = {x: [json.loads((base / f"s{s}" / x / "errors.json").read_text()) for s in seeds] for x in (a, b)}
    mass = [json.loads((base / f"s{s}" / "crat" / "mass.json").read_text()) for s in seeds]
    return dict(benchmark=bench, mode=mode, a=a, b=b, seeds=seeds, label=label,
                inputs=_inputs_digest(root, bench, mode, a, b, seeds),
                delta={iou: {k: r[iou][k] for k in KEYS if k in r[iou]} for iou in IOUS},
                oracle={iou: {k: oracle[iou][k] for k in KEYS if k in oracle[iou]} for iou in IOUS},
                rare_errors_bbox={x: {e: float(np.mean([y["bbox"]["dAP50"][e]["r"] for y in errs[x]]))
                                      for e in ERROR_TYPES} for x in errs},
                mass={k: float(np.mean([m[k] for m in mass])) for k in mass[0]})  # fmt: skip


def _table(rows: list[dict], title: str, head: list[str], cells) -> list[str]:
    lines = ["", title, "", "| benchmark | mode | B − A | seeds | " + " | ".join(head) + " |"]
    lines.append("|---" * (4 + len(head)) + "|")
    for r in rows:
        seeds = ",".join(map(str, r["seeds"])) + (" (held out)" if r["label"] == "held out" else "")
        lines.append(
            f"| {r['benchmark']} | {r['mode']} | {r['b']} − {r['a']} | {seeds} | " + " | ".join(cells(r)) + " |"
        )
    return lines


def finished(root: Path, plot: Path | None) -> str:
    """The tables of what exists under ``root`` (also written to ``root/ablation.md`` / ``ablation.json``)."""
    from crat_ft.analysis.error_analysis import ERROR_TYPES

    old = json.loads((root / "ablation.json").read_text()) if (root / "ablation.json").exists() else []
    cached = {(r["benchmark"], r["mode"], r["a"], r["b"], tuple(r["seeds"])): r for r in old if "inputs" in r}
    rows = []
    for bench, spec in BENCHMARKS.items():
        for mode in MODES:
            base = root / bench / mode
            for a, b in PAIRS:
                done = [
                    s
                    for s in (*spec[mode], HELD_OUT)
                    if all((base / f"s{s}" / x / "errors.json").exists() for x in (a, b))
                ]
                for label, use in (("reported", [s for s in done if s != HELD_OUT]),
                                   ("held out", [s for s in done if s == HELD_OUT])):  # fmt: skip
                    if not use:
                        continue
                    row = cached.get((bench, mode, a, b, tuple(use)))
                    if row is None or row["inputs"] != _inputs_digest(root, bench, mode, a, b, use):
                        row = _pair_row(root, bench, mode, a, b, use, label)
                    rows.append(row)
    lines = ["AP points, B − A with its 95% interval (`crat-ft compare`; several seeds pooled as `--seeds` does)."]
    keys = [(iou, k) for iou in IOUS for k in KEYS[1:]]

    def delta(r):
        return [_interval(r["delta"][iou][k]) if k in r["delta"][iou] else "–" for iou, k in keys]

    against_plain = [r for r in rows if r["a"] == "plain" and r["b"] in ARMS]
    against_controls = [r for r in rows if r["b"] == "crat" and r["a"] != "plain"]
    beyond = [r for r in rows if r["b"] in IMPROVEMENTS]
    lines += _table(against_plain, "Each arm against plain (no transfusion):", [f"{i} Δ{k}" for i, k in keys], delta)
    lines += _table(against_controls, "CRAT against each control:", [f"{i} Δ{k}" for i, k in keys], delta)
    lines += _table(beyond, "Beyond the paper: each improvement against plain and against CRAT:",
                    [f"{i} Δ{k}" for i, k in keys], delta)  # fmt: skip
    okeys = [(iou, k) for iou in IOUS for k in ("AP", "APr")]
    lines += _table(rows, "Class-oracle AP (each detection takes the class of the ground truth it overlaps most):",
                    [f"{i} oracle Δ{k}" for i, k in okeys],
                    lambda r: [_interval(r["oracle"][i][k]) if k in r["oracle"][i] else "–" for i, k in okeys])  # fmt: skip
    from_plain = [r for r in rows if r["a"] == "plain"]
    lines += _table(from_plain, "Rare classes, bbox: the AP50 points fixing each error type would recover (mean over "
                    "the seeds; plain → arm), and CRAT's gradient-mass ratio (transfused / own, fc_reg and conv_logits):",
                    [*ERROR_TYPES, "mass box", "mass mask"],
                    lambda r: [f"{100 * r['rare_errors_bbox']['plain'][t]:.1f} → {100 * r['rare_errors_bbox'][r['b']][t]:.1f}"
                               for t in ERROR_TYPES] + [f"{r['mass']['mass_box']:.3f}", f"{r['mass']['mass_mask']:.3f}"])  # fmt: skip
    text = "\n".join(lines)
    (root / "ablation.md").write_text(text + "\n")
    (root / "ablation.json").write_text(json.dumps(rows, indent=1))
    if plot and against_plain:
        _plot(from_plain, plot)
    return text


PLOTTED = [*ARMS[1:], *IMPROVEMENTS]


def _plot(rows: list[dict], path: Path) -> None:
    """ΔAPr of every arm, bbox and segm, per benchmark and mode: the reported seeds pooled (filled) and the
    held-out seed (open), with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["benchmark"], r["mode"]) for r in rows}, key=lambda x: (list(BENCHMARKS).index(x[0]), x[1]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, iou in zip(axes, IOUS):
        named = set()
        for r in rows:
            g = groups.index((r["benchmark"], r["mode"]))
            k = PLOTTED.index(r["b"])
            held = r["label"] == "held out"
            m = r["delta"][iou]["APr"]
            x = g + (k - (len(PLOTTED) - 1) / 2) * 0.13 + (0.05 if held else 0)
            ax.errorbar(x, 100 * m["delta"], yerr=[[100 * (m["delta"] - m["low"])], [100 * (m["high"] - m["delta"])]],
                        fmt="o", color=f"C{k}", mfc="white" if held else f"C{k}", capsize=3,
                        label=None if r["b"] in named else r["b"])  # fmt: skip
            named.add(r["b"])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{b}\n{m}" for b, m in groups], fontsize=8)
        ax.set_title(f"{iou} APr, arm − plain (95% interval; open: held-out seed)", fontsize=9)
    axes[0].set_ylabel("AP points")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("benchmarks/results/ablation"))
    ap.add_argument("--only", default=None, help="BENCHMARK or BENCHMARK/MODE, e.g. colour-shapes/e2e")
    ap.add_argument("--seeds", choices=("all", "reported", "held-out"), default="all",
                    help="which seeds to run (all: each benchmark's held-out seed after its reported ones)")  # fmt: skip
    ap.add_argument("--improvements", nargs="*", choices=list(IMPROVEMENTS), default=None, metavar="ARM",
                    help=f"run the arms beyond the paper (all, or those named: {', '.join(IMPROVEMENTS)}) instead of "
                    "the ablation's")  # fmt: skip
    ap.add_argument("--finished", action="store_true", help="tabulate what exists, run nothing")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.finished:
        print(finished(args.root, args.plot))
        return
    _check_root(args.root)
    with open(args.root / "ablation.log", "a") as log:
        if args.improvements is not None:
            arms = args.improvements or list(IMPROVEMENTS)
            for bench, mode, seed in improvement_plan(args.seeds):
                run_seed(args.root, bench, mode, seed, BENCHMARKS[bench]["stage1_iters"], log, arms=arms)
            return
        for bench, mode, seed in plan(args.only, args.seeds):
            run_seed(args.root, bench, mode, seed, BENCHMARKS[bench]["stage1_iters"], log)


if __name__ == "__main__":
    main()
