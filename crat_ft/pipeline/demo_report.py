"""What a demo run shows: the three-way table with paired bootstrap intervals, the class-oracle AP and the
error decomposition (``crat-ft compare`` and ``crat-ft analyze-errors`` on the demo's outputs).
"""

from __future__ import annotations

from pathlib import Path

from crat_ft.evaluation.lvis import format_table
from crat_ft.pipeline.demo_stages import say

DELTA_KEYS = ("AP", "APr", "APc", "APf")


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
    from crat_ft.analysis.compare import compare, compare_tables, verdict
    from crat_ft.analysis.error_analysis import analyze_errors, plot_errors
    from crat_ft.common.lvis_json import load_lvis_json
    from crat_ft.evaluation.detections import Detections
    from crat_ft.evaluation.results import load_results_file

    gt = data / "annotations" / "lvis_v1_val.json"
    a, b = arms
    say(f"{names[1]} - {names[0]}: paired bootstrap over val images, class-oracle AP and error decomposition")
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
