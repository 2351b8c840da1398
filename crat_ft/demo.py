"""``crat-ft demo``: the whole chain on the embedded synthetic benchmark, on a CPU.

Stages, each reused on a rerun when its output exists (outputs are written
atomically, so an interrupted stage is simply redone):

1. ``data/``: ``make-demo-data`` (docs/architecture.md#synthetic-benchmark);
2. ``stage1/detector.pth``: a tiny Mask R-CNN trained with plain random sampling;
3. ``cache/index.h5``: its RoI features on the training split;
4. ``baseline/heads.pth`` and ``crat/heads.pth``: the class-wise layers retrained
   from the cache, class-balanced, without and with CRAT;
5. ``{stage1,baseline,crat}/metrics.json``: LVIS bbox/segm metrics on val;
6. ``summary.json``, the three-way table with CRAT - baseline's paired bootstrap intervals
   (``crat-ft compare``), the class-oracle AP and error decomposition (``crat-ft analyze-errors``,
   ``errors_bbox.png``, ``errors_segm.png``), ``ap_change_crat_vs_baseline.png``,
   ``rare_classes_baseline_vs_crat.png`` (the rarest classes' val detections,
   baseline beside CRAT), ``fisher_embedding.png`` and ``rare_fisher_neighbors.txt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from crat_ft.errors import UserError
from crat_ft.evaluation import format_table
from crat_ft.files import atomic_write_text
from crat_ft.paths import demo_config
from crat_ft.retrain import HEADS_FILE, retrain_heads
from crat_ft.stage1 import DETECTOR_FILE, evaluate_side_by_side, train_detector
from crat_ft.synthetic import DEFAULT_SHARING, DemoDataSpec, make_demo_data

DELTA_KEYS = ("AP", "APr", "APc", "APf")


def _say(msg: str) -> None:
    print(f"[crat-ft demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stage(done: Path, what: str, fn, log=None):
    """Run ``fn`` unless ``done`` exists; say which.

    With ``log`` (an open text file), what the stage prints on stdout goes
    there: mmengine's loggers write their console output to ``sys.stdout`` as
    it is when they are created, so a Runner built inside the stage logs to the
    file. Progress bars (stderr) and this function's lines stay on the console.
    """
    if done.exists():
        _say(f"{what}: done before, reusing {done}")
        return
    _say(what)
    t0 = time.time()
    with contextlib.redirect_stdout(log) if log is not None else contextlib.nullcontext():
        fn()
    _say(f"{what}: done in {time.time() - t0:.0f} s")


def _load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _check_reused_data(data: Path, spec: DemoDataSpec) -> None:
    """Refuse a work dir whose dataset was made with another variant or sharing knob."""
    ann = data / "annotations" / "lvis_v1_train.json"
    if not ann.is_file():
        return
    info = _load_json(ann).get("info", {})
    made = (info.get("variant", "colour-shapes"), info.get("sharing"))
    wanted = (spec.variant, spec.recorded_sharing)
    if made != wanted:
        raise UserError(
            f"demo: {data} holds the {made[0]} data (sharing {made[1]}), not {wanted[0]} (sharing {wanted[1]}); "
            "pass another --work-dir"
        )


def delta_table(
    summary: dict, models=("stage1", "baseline", "crat"), arms=("baseline", "crat"), names=("baseline", "CRAT")
) -> str:
    """The table of ``models``, then B - A (``arms``, called ``names``) with its paired bootstrap intervals
    and the class-oracle AP per frequency group, bbox and segm; a last line of verdict."""
    lines = []
    a, b = arms
    said = f"{names[1]} - {names[0]}"
    cmp = summary.get(f"{b}_vs_{a}")
    for iou in ("bbox", "segm"):
        lines.append(format_table({k: summary[k][iou] for k in models}, title=f"\n{iou} (LVIS v1 protocol, %)"))
        if cmp and iou in cmp:
            cells = [
                f"{k} {100 * m['delta']:+.1f} [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]"
                for k, m in cmp[iou].items()
            ]
            lines.append(f"{said} (95% paired bootstrap over val images): " + "  ".join(cells))
        else:
            d = {k: 100 * (summary[b][iou][k] - summary[a][iou][k]) for k in DELTA_KEYS}
            lines.append(f"{said}: " + "  ".join(f"{k} {v:+.1f}" for k, v in d.items()))
        oracle = summary.get(f"class_oracle_{b}_vs_{a}", {}).get(iou)
        if oracle:
            lines.append(
                "class-oracle AP (each detection takes the class of the ground truth it overlaps most): "
                + f"{names[0]} "
                + "  ".join(f"{k} {100 * m['a']:.1f}" for k, m in oracle.items())
            )
            cells = [
                f"{k} {100 * m['delta']:+.1f} [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]"
                for k, m in oracle.items()
            ]
            lines.append(f"class-oracle AP, {said} (95% paired bootstrap): " + "  ".join(cells))
        if all("fixed" in summary[k] for k in models):
            lines.append(
                "AP-fixed (10,000 per class, no per-image cap): "
                + "  ".join(
                    f"{k} AP {100 * summary[k]['fixed'][iou]['AP']:.1f} APr {100 * summary[k]['fixed'][iou]['APr']:.1f}"
                    for k in models
                )
            )
    if summary.get("verdict"):
        lines.append("\n" + "\n".join(summary["verdict"]))
    return "\n".join(lines)


def what_the_run_shows(
    work_dir: Path, data: Path, seed: int, arms: tuple[str, str] = ("baseline", "crat"), names=("baseline", "CRAT")
) -> dict:
    """B - A (``arms``: the runs' directories in ``work_dir``; ``names``: what the console calls them) with
    paired bootstrap intervals, the class-oracle AP and the error decomposition of both, and the verdict
    sentences; ``errors_bbox.png`` / ``errors_segm.png`` in ``work_dir``."""
    from crat_ft.compare import compare, compare_tables, verdict
    from crat_ft.detections import Detections
    from crat_ft.error_analysis import analyze_errors, plot_errors
    from crat_ft.evaluation import load_results_file
    from crat_ft.lvis_json import load_lvis_json

    gt = data / "annotations" / "lvis_v1_val.json"
    a, b = arms
    _say(f"{names[1]} - {names[0]}: paired bootstrap over val images, class-oracle AP and error decomposition")
    result = compare(gt, str(work_dir / a), str(work_dir / b), bootstrap_seed=seed)
    gt_doc = load_lvis_json(gt)
    errors, oracle_pairs = {}, {}
    for name in arms:
        dets = Detections.from_dicts(load_results_file(work_dir / name / "results.segm.json"), masks=True)
        errors[name] = {}
        for iou in ("bbox", "segm"):
            tables: dict = {}
            errors[name][iou] = analyze_errors(gt_doc, dets, iou, tables=tables)
            oracle_pairs.setdefault(iou, [[]])[0].append(tables["oracle"])
    oracle = compare_tables({iou: [tuple(p[0])] for iou, p in oracle_pairs.items()}, bootstrap_seed=seed)
    for iou in ("bbox", "segm"):
        plot_errors(errors, iou, work_dir / f"errors_{iou}.png")
    return {
        f"{b}_vs_{a}": result,
        "class_oracle_AP": {name: {iou: e[iou]["oracle_AP"] for iou in e} for name, e in errors.items()},
        f"class_oracle_{b}_vs_{a}": oracle,
        "errors": errors,
        "verdict": [verdict(result, names, "APr", iou) for iou in ("bbox", "segm")]
        + [verdict(oracle, names, key, "bbox", what="class-oracle AP") for key in ("APr", "AP")],
    }


def _demo_data(data: Path, spec: DemoDataSpec) -> None:
    spec.validate()
    _check_reused_data(data, spec)
    _stage(
        data / "annotations" / "lvis_v1_val.json",
        "making the synthetic long-tailed dataset",
        lambda: make_demo_data(data, spec),
    )


def run_demo(
    work_dir: str | os.PathLike = "work_dirs/demo",
    *,
    seed: int = 0,
    detector_iters: int | None = None,
    heads_iters: int | None = None,
    variant: str = "families",
    sharing: float = DEFAULT_SHARING,
) -> dict:
    """Run the demo pipeline.

    Args:
        work_dir: where every stage writes.
        seed: seed of the data, of both trainings and of the RoI policy.
        detector_iters: stage-1 iterations (default: the config's).
        heads_iters: retrain-heads iterations (default: the fine-tune configs').
        variant: the synthetic benchmark's variant (``families`` or ``colour-shapes``).
        sharing: the families variant's sharing knob ``s``.

    Returns:
        ``{"stage1"|"baseline"|"crat": {"bbox": {...}, "segm": {...}}}``.
    """
    from crat_ft.cache import INDEX_FILE
    from crat_ft.diagnostics import fisher_neighbors, plot_ap_change, plot_fisher_embedding, read_per_class_csv
    from crat_ft.extract import extract_features
    from crat_ft.gallery import rare_class_gallery
    from crat_ft.lvis_json import categories_by_id
    from crat_ft.roi_policy import RoIPolicy

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "data"
    config = demo_config()
    t_start = time.time()
    # the frameworks' own logs (configs, hooks, iterations) go to a file; the console keeps
    # a line per stage, progress bars and the result tables. Left open: mmengine's loggers
    # keep writing to it until the process ends.
    log = open(work_dir / "demo.log", "a")
    _say(f"framework logs: {work_dir / 'demo.log'}")

    _demo_data(data, DemoDataSpec(seed=seed, variant=variant, sharing=sharing))

    detector = work_dir / "stage1" / DETECTOR_FILE
    options = {"train_cfg.max_iters": detector_iters} if detector_iters else {}
    _stage(
        detector,
        f"training the stage-1 detector ({config.name})",
        lambda: train_detector(config, detector.parent, cfg_options=options, data_root=data, seed=seed),
        log,
    )

    cache = work_dir / "cache" / INDEX_FILE
    policy = RoIPolicy(seed=seed, mask_pos_per_class=200)
    _stage(
        cache,
        "extracting RoI features of the training split",
        lambda: extract_features(config, detector, cache.parent, data_root=data, policy=policy, resume=True),
        log,
    )

    heads_options = {"train.seed": seed}
    if heads_iters:  # a shorter schedule: its step at 3/4 and a warm-up of at most a quarter of it
        step = int(heads_iters * 0.75)
        heads_options.update(
            {
                "train.max_iters": heads_iters,
                "train.milestones": [step] if step >= 1 else [],
                "train.warmup_iters": min(50, heads_iters // 4),
            }
        )
    for name in ("baseline", "crat"):
        ft = demo_config(f"{name}_synthetic.py")
        out = work_dir / name / HEADS_FILE
        _stage(
            out,
            f"retraining the class-wise heads ({name})",
            lambda ft=ft, out=out: retrain_heads(ft, cache, out.parent, cfg_options=heads_options, resume=True),
            log,
        )

    models = ("stage1", "baseline", "crat")
    jobs = {}
    for name in models:
        metrics_file = work_dir / name / "metrics.json"
        if metrics_file.exists() and (work_dir / name / "results.segm.json").exists():
            _say(f"evaluating {name}: done before, reusing {metrics_file}")
        else:
            jobs[name] = (None if name == "stage1" else work_dir / name / HEADS_FILE, metrics_file)
    if jobs:
        what = f"evaluating {', '.join(jobs)} (LVIS protocol, val split)"
        _say(what)
        t0 = time.time()
        with contextlib.redirect_stdout(log):
            evaluate_side_by_side(config, detector, jobs, data_root=data, log=log, with_results=True)
        _say(f"{what}: done in {time.time() - t0:.0f} s")
    summary = {name: _load_json(work_dir / name / "metrics.json") for name in models}
    summary.update(what_the_run_shows(work_dir, data, seed))

    cats = categories_by_id(_load_json(data / "annotations" / "lvis_v1_train.json"))
    plot_ap_change(
        read_per_class_csv(work_dir / "baseline" / "metrics_per_class.csv"),
        read_per_class_csv(work_dir / "crat" / "metrics_per_class.csv"),
        cats,
        work_dir / "ap_change_crat_vs_baseline.png",
        "CRAT vs decoupled baseline (synthetic long-tailed shapes)",
    )
    crat_heads = work_dir / "crat" / HEADS_FILE
    gallery = work_dir / "rare_classes_baseline_vs_crat.png"
    with contextlib.redirect_stdout(log):
        shown = rare_class_gallery(
            config, detector, {"baseline": work_dir / "baseline" / HEADS_FILE, "CRAT": crat_heads}, data, gallery
        )
    if shown:
        _say(f"rare classes side by side ({', '.join(shown)}): {gallery}")
    else:
        _say("no rare class has a validation instance: no rare-class picture")
    plot_fisher_embedding(crat_heads, work_dir / "fisher_embedding.png")
    (work_dir / "rare_fisher_neighbors.txt").write_text(fisher_neighbors(crat_heads, top=5) + "\n")

    atomic_write_text(work_dir / "summary.json", json.dumps(summary, indent=2))
    print(delta_table(summary))
    _say(
        f"total {time.time() - t_start:.0f} s; summary {work_dir / 'summary.json'}, plots and rare_fisher_neighbors.txt in {work_dir}"
    )
    return summary


# the end-to-end demo: where the ablation (benchmarks/bench_ablation.py) measured CRAT's effect
E2E_VARIANT = "colour-shapes"
E2E_ITERS = 300
E2E_CONFIG = "mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py"


def run_demo_e2e(
    work_dir: str | os.PathLike = "work_dirs/demo-e2e",
    *,
    seed: int = 0,
    detector_iters: int = E2E_ITERS,
    variant: str = E2E_VARIANT,
    sharing: float = DEFAULT_SHARING,
) -> dict:
    """CRAT end to end: the demo detector trained by mmdet twice on the same data and seed, plain and with
    crat-ft's plugin heads (the paper's settings; the transfusion gradient also reaches the shared trunk),
    then evaluated side by side and compared with paired bootstrap intervals.

    Writes ``data/``, ``plain/`` and ``crat/`` (each ``detector.pth``, ``metrics.json`` and its matches,
    ``results.{bbox,segm}.json``), ``errors_{bbox,segm}.png`` and ``summary.json`` under ``work_dir``;
    stages done before are reused. Returns the summary: ``{"plain"|"crat": metrics, "crat_vs_plain", ...}``.
    """
    from crat_ft.stage1 import demo_schedule, evaluate_jobs

    work_dir = Path(work_dir)
    options = demo_schedule(detector_iters)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "data"
    t_start = time.time()
    log = open(work_dir / "demo.log", "a")  # left open: mmengine's loggers keep writing to it
    _say(f"framework logs: {work_dir / 'demo.log'}")
    _demo_data(data, DemoDataSpec(seed=seed, variant=variant, sharing=sharing))
    runs = {"plain": demo_config(), "crat": demo_config(E2E_CONFIG)}
    for name, config in runs.items():
        out = work_dir / name / DETECTOR_FILE
        _stage(
            out,
            f"training the detector end to end, {'plain' if name == 'plain' else 'with CRAT'} "
            f"({config.name}, {detector_iters} iterations)",
            lambda config=config, out=out: train_detector(
                config, out.parent, cfg_options=options, data_root=data, seed=seed
            ),
            log,
        )
    jobs = {}
    for name, config in runs.items():
        run = work_dir / name
        if (run / "metrics.json").exists() and (run / "results.segm.json").exists():
            _say(f"evaluating {name}: done before, reusing {run / 'metrics.json'}")
            continue
        jobs[name] = dict(config=config, checkpoint=run / DETECTOR_FILE, out=run / "metrics.json", data_root=data,
                          cfg_options=options, outfile_prefix=run / "results")  # fmt: skip
    if jobs:
        what = f"evaluating {', '.join(jobs)} (LVIS protocol, val split)"
        _say(what)
        t0 = time.time()
        with contextlib.redirect_stdout(log):
            evaluate_jobs(jobs, log=log)
        _say(f"{what}: done in {time.time() - t0:.0f} s")
    arms, names = ("plain", "crat"), ("plain", "CRAT e2e")
    summary = {name: _load_json(work_dir / name / "metrics.json") for name in arms}
    summary.update(what_the_run_shows(work_dir, data, seed, arms=arms, names=names))
    summary["settings"] = dict(variant=variant, sharing=sharing, seed=seed, detector_iters=detector_iters)
    atomic_write_text(work_dir / "summary.json", json.dumps(summary, indent=2))
    print(delta_table(summary, models=arms, arms=arms, names=names))
    _say(f"total {time.time() - t_start:.0f} s; summary {work_dir / 'summary.json'}")
    return summary
