"""The tables of ``crat-ft ablate``: each comparison of an ablation's arms, pooled over its seeds.

Every arm is compared with the reference, then each contrast (A, B), as B - A: AP, APr, APc, APf (bbox,
segm) with ``crat-ft compare``'s 95% paired bootstrap intervals over the val images (with several
seeds, run s of A paired with run s of B and the seed-to-seed variance counted, as ``compare --seeds``),
the class-oracle AP the same way, the rare classes' bbox error decomposition of both (mean over the
seeds) and B's time per seed. :func:`report` writes ``ablation.md`` (the table, the verdicts and the
error decomposition), ``ablation.json`` (all of it, and every run's metrics) and ``ablation.png``
(ΔAPr of each comparison with its interval), and prints the table and the verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from crat_ft.evaluation.lvis import IOU_TYPES
from crat_ft.pipeline.ablate_arms import ARM_FILE, ERRORS_FILE, Ablation, say

KEYS = ("APr", "APc", "APf", "AP")


def _run(work_dir: Path, seed: int, arm: str) -> Path:
    return work_dir / f"s{seed}" / arm


def tabulate(spec: Ablation, work_dir: Path, seeds: Sequence[int], gt: Path) -> dict:
    """The comparisons of :meth:`crat_ft.pipeline.ablate_arms.Ablation.rows` over ``seeds`` of the finished runs in
    ``work_dir`` (fractions, as :func:`crat_ft.analysis.compare.compare`), the runs' metrics and times."""
    from crat_ft.analysis.compare import compare, compare_tables
    from crat_ft.analysis.error_analysis import ERROR_TYPES
    from crat_ft.evaluation.matching import MatchTable

    runs = {}
    for arm in spec.arms:
        runs[arm.name] = {}
        for s in seeds:
            metrics = json.loads((_run(work_dir, s, arm.name) / "metrics.json").read_text())
            seconds = json.loads((_run(work_dir, s, arm.name) / ARM_FILE).read_text()).get("seconds", {})
            runs[arm.name][s] = {
                "metrics": {iou: metrics[iou] for iou in IOU_TYPES if iou in metrics},
                "seconds": seconds,
            }
    ious = list(runs[spec.reference][seeds[0]]["metrics"])
    pooled = len(seeds) > 1
    rows = []
    for a, b in spec.rows():
        where = [str(work_dir / ("s{seed}" if pooled else f"s{seeds[0]}") / x) for x in (a, b)]
        r = compare(gt, *where, seeds=seeds if pooled else None)
        oracle = compare_tables({
            iou: [tuple(MatchTable.load(_run(work_dir, s, x) / f"oracle_matches_{iou}.npz") for x in (a, b))
                  for s in seeds]
            for iou in ious
        })  # fmt: skip
        errors = {x: [json.loads((_run(work_dir, s, x) / ERRORS_FILE).read_text()) for s in seeds] for x in (a, b)}
        rows.append({
            "a": a, "b": b, "seeds": list(seeds), "images": r["images"],
            "delta": {iou: {k: r[iou][k] for k in KEYS if k in r[iou]} for iou in ious},
            "oracle": {iou: {k: oracle[iou][k] for k in KEYS if k in oracle[iou]} for iou in ious},
            "rare_errors_bbox": {x: {e: float(np.mean([d["bbox"]["dAP50"][e]["r"] for d in errors[x]]))
                                     for e in ERROR_TYPES} for x in errors},
            "seconds": float(np.mean([sum(runs[b][s]["seconds"].values()) for s in seeds])),
        })  # fmt: skip
    return {"arms_file": str(spec.path), "reference": spec.reference, "seeds": list(seeds), "gt": str(gt),
            "rows": rows, "verdicts": verdicts(rows), "runs": runs}  # fmt: skip


def verdicts(rows: list[dict]) -> list[str]:
    """Per comparison and IoU type, :func:`crat_ft.analysis.compare.verdict` on rare AP."""
    from crat_ft.analysis.compare import verdict

    out = []
    for r in rows:
        result = {**r["delta"], "seeds": r["seeds"] if len(r["seeds"]) > 1 else None}
        out += [verdict(result, (r["a"], r["b"]), "APr", iou) for iou in IOU_TYPES if iou in r["delta"]]
    return out


def _interval(m: dict | None) -> str:
    if m is None:
        return "–"
    return f"{100 * m['delta']:+.1f} [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]"


def markdown(table: dict) -> str:
    """``ablation.md``: the table, the verdicts and the rare classes' error decomposition."""
    from crat_ft.analysis.error_analysis import ERROR_TYPES

    rows, seeds = table["rows"], table["seeds"]
    ious = list(rows[0]["delta"]) if rows else []
    ref = table["runs"][table["reference"]]
    mean = {iou: {k: np.mean([ref[s]["metrics"][iou][k] for s in seeds]) for k in KEYS} for iou in ious}
    images = rows[0]["images"] if rows else "the"
    lines = [
        f"# Ablation: {table['arms_file']}",
        "",
        f"Seeds {', '.join(map(str, seeds))}. AP points, B − A with its 95% interval (`crat-ft compare`: paired "
        f"bootstrap over the {images} val images" + (", pooled over the seeds as `--seeds` does)." if len(seeds) > 1
                                                      else ")."),
        f"Reference {table['reference']}, mean over the seeds: "
        + "; ".join(f"{iou} " + ", ".join(f"{k} {100 * mean[iou][k]:.1f}" for k in KEYS) for iou in ious) + ".",
        "Class-oracle AP: each detection takes the class of the ground truth it overlaps most. Time: B's "
        "retraining (0 where it shares an earlier arm's) and its share of the evaluations, mean per seed.",
        "",
    ]  # fmt: skip
    head = [f"{iou} Δ{k}" for iou in ious for k in KEYS] + [f"class-oracle {iou} ΔAP" for iou in ious] + ["time (s)"]
    lines += ["| B − A | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for r in rows:
        cells = [_interval(r["delta"][iou].get(k)) for iou in ious for k in KEYS]
        cells += [_interval(r["oracle"][iou].get("AP")) for iou in ious] + [f"{r['seconds']:.0f}"]
        lines.append(f"| {r['b']} − {r['a']} | " + " | ".join(cells) + " |")
    lines += ["", *table["verdicts"], ""]
    lines += ["Rare classes, bbox: the AP50 points fixing each error type would recover (A → B, mean over the seeds).",
              "", "| B − A | " + " | ".join(ERROR_TYPES) + " |", "|---" * (len(ERROR_TYPES) + 1) + "|"]  # fmt: skip
    for r in rows:
        e = r["rare_errors_bbox"]
        cells = [f"{100 * e[r['a']][t]:.1f} → {100 * e[r['b']][t]:.1f}" for t in ERROR_TYPES]
        lines.append(f"| {r['b']} − {r['a']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """ΔAPr of every comparison with its 95% interval, one panel per IoU type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crat_ft.common.files import atomic_path

    rows = table["rows"]
    ious = list(rows[0]["delta"]) if rows else ["bbox"]
    fig, axes = plt.subplots(1, len(ious), figsize=(1.2 + 0.9 * max(len(rows), 2) * len(ious), 4.2), squeeze=False)
    for ax, iou in zip(axes[0], ious):
        for x, r in enumerate(rows):
            m = r["delta"][iou].get("APr")
            if m is None:
                continue
            ax.errorbar(x, 100 * m["delta"], yerr=[[100 * (m["delta"] - m["low"])], [100 * (m["high"] - m["delta"])]],
                        fmt="o", color="C0" if r["a"] == table["reference"] else "C1", capsize=3)  # fmt: skip
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['b']}\n− {r['a']}" for r in rows], fontsize=7, rotation=45, ha="right")
        ax.set_title(f"{iou} APr, B − A (95% interval; seeds {', '.join(map(str, table['seeds']))})", fontsize=9)
        ax.set_ylabel("AP points")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def report(spec: Ablation, work_dir: Path, seeds: Sequence[int], gt: Path) -> dict:
    """:func:`tabulate`, written to ``work_dir`` (``ablation.md``, ``.json``, ``.png``) and printed."""
    from crat_ft.common.files import atomic_write_text

    say(f"comparing {len(spec.rows())} pairs of arms over seeds {', '.join(map(str, seeds))}")
    table = tabulate(spec, work_dir, seeds, gt)
    text = markdown(table)
    atomic_write_text(work_dir / "ablation.json", json.dumps(table, indent=1))
    atomic_write_text(work_dir / "ablation.md", text)
    plot(table, work_dir / "ablation.png")
    print(text.split("\nRare classes")[0].rstrip(), flush=True)
    say(f"tables: {work_dir / 'ablation.md'}, {work_dir / 'ablation.json'}, {work_dir / 'ablation.png'}")
    return table
