"""``crat-ft compare``: is B better than A on this val split, beyond sampling noise?

Each arm is a results file (a JSON list of LVIS detections: mmdet's ``PREFIX.bbox.json`` /
``PREFIX.segm.json``, detectron2's, lvis-api's) or an ``evaluate`` output (its metrics JSON or
the directory holding ``metrics.json``), which keeps its per-image matches beside it
(``<stem>_matches_bbox.npz``, ``<stem>_matches_segm.npz``). Results files are matched here, once.

Matches are used only with the metrics they belong to: each table records the identity of the
detections it was matched from (:func:`crat_ft.evaluation.matching.detections_id`), the metrics JSON records the
same ids under ``"matches"``, and the table's full-sample AP must equal the JSON's AP (to
:data:`AP_TOLERANCE`). A metrics JSON without those ids (``evaluate-results`` writes none, an older
crat-ft neither) beside matches is refused, as is a table matched against other annotations
(:meth:`crat_ft.evaluation.matching.GroundTruth.fingerprint`, geometry included) or named for another IoU type.
Results files, ground truth and matches are read and checked by the readers ``evaluate-results`` and
``analyze-errors`` use too (:func:`crat_ft.evaluation.results.read_results`, :func:`crat_ft.common.lvis_json.load_lvis_json`,
:meth:`crat_ft.evaluation.matching.MatchTable.load`).

With ``seeds``, each arm is a pattern holding ``{seed}`` (e.g. ``runs/s{seed}/crat``), one run per
seed; run s of A is paired with run s of B (the same seed, e.g. the same stage-1 detector). GT may
hold ``{seed}`` too, where each seed has its own val split (the demo's data depend on its seed).
See :mod:`crat_ft.analysis.bootstrap` for the intervals.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from crat_ft.analysis.bootstrap import (
    SUMMARY_KEYS,
    category_ap,
    check_same_split,
    paired_resamples,
    seeded_interval,
    summarize,
)
from crat_ft.common.errors import UserError
from crat_ft.common.lvis_json import load_lvis_json
from crat_ft.evaluation.lvis import IOU_TYPES
from crat_ft.evaluation.matching import GroundTruth, MatchTable, index_ground_truth, match_table, read_matches_meta
from crat_ft.evaluation.results import is_metrics, read_json, read_results, results_iou_types

MIN_RESAMPLES = 1000
MAX_RESAMPLES = 100_000
AP_TOLERANCE = 1e-9
_REDO = "re-run `crat-ft evaluate` to write the metrics and their matches together, or pass the results file instead"


def matches_path(metrics_json: str | os.PathLike, iou_type: str) -> Path:
    """Where ``evaluate`` keeps the matches of ``iou_type`` beside its metrics JSON."""
    p = Path(metrics_json)
    return p.with_name(f"{p.stem}_matches_{iou_type}.npz")


def matches_ids(files: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """``{iou_type: detections id}`` of the matches files ``{iou_type: path}`` that exist: what a metrics
    file records under ``"matches"`` to claim them (:attr:`crat_ft.evaluation.matching.MatchTable.detections_id`)."""
    return {iou: read_matches_meta(path)["detections_id"] for iou, path in files.items() if Path(path).is_file()}


def _metrics_file(path: str | os.PathLike) -> Path:
    """The metrics JSON of an evaluate output given as the file or the directory holding ``metrics.json``."""
    p = Path(path)
    if p.is_dir():
        if not (p / "metrics.json").is_file():
            raise UserError(f"{p} is a directory without metrics.json; pass an evaluate output or a results file")
        p = p / "metrics.json"
    if not p.is_file():
        raise UserError(f"{p} does not exist; pass an evaluate output (metrics JSON) or a results file")
    return p


def _full_sample_ap(table: MatchTable) -> float:
    return float(summarize(category_ap(table, np.ones((1, len(table.image_ids)), np.int32)), table.frequency)["AP"][0])


def _evaluated_tables(
    p: Path, metrics: dict, gt: GroundTruth, iou_types: Sequence[str] | None
) -> dict[str, MatchTable]:
    """The matches an ``evaluate`` kept beside its metrics JSON ``p``, refused unless they are that
    evaluation's: the metrics record each table's detections id, and the table's full-sample AP is theirs."""
    saved = {iou: matches_path(p, iou) for iou in IOU_TYPES if matches_path(p, iou).is_file()}
    if not saved:
        raise UserError(
            f"{p} is a metrics file without its matches ({matches_path(p, 'bbox').name} or "
            f"{matches_path(p, 'segm').name} beside it), and compare needs the per-image matches; pass the results "
            "file (e.g. PREFIX.segm.json of `crat-ft evaluate --outfile-prefix PREFIX`) or re-run `crat-ft evaluate`"
        )
    wanted = list(iou_types) if iou_types else list(saved)
    missing = [iou for iou in wanted if iou not in saved]
    if missing:
        raise UserError(
            f"{p} has no {missing[0]} matches ({saved[next(iter(saved))].name} only); drop --iou-type {missing[0]}"
        )
    ids = metrics.get("matches")
    tables = {}
    for iou in wanted:
        table = MatchTable.load(saved[iou], iou)
        recorded = ids.get(iou) if isinstance(ids, dict) else None
        if recorded != table.detections_id:
            why = "records no matches" if recorded is None else "records the matches of other detections"
            raise UserError(f"{saved[iou]} does not belong to {p} ({p.name} {why}); {_REDO}")
        if table.gt_fingerprint != gt.fingerprint():
            raise UserError(
                f"{saved[iou]} was matched against other annotations than GT; pass the GT it was evaluated on"
            )
        ap = metrics.get(iou, {}).get("AP") if isinstance(metrics.get(iou), dict) else None
        full = _full_sample_ap(table)
        if not isinstance(ap, (int, float)) or isinstance(ap, bool) or not abs(full - ap) <= AP_TOLERANCE:
            raise UserError(
                f"{saved[iou]} gives {iou} AP {100 * full:.2f}, but {p} says {ap if ap is None else f'{100 * ap:.2f}'}; "
                f"the matches do not belong to these metrics: {_REDO}"
            )
        tables[iou] = table
    return tables


def _arm_tables(gt_doc: dict, gt: GroundTruth, path: str, iou_types: Sequence[str] | None) -> dict[str, MatchTable]:
    """``{iou_type: MatchTable}`` of one run: an evaluate output, or a results file matched now."""
    p = _metrics_file(path)
    doc = read_json(p, "results file")
    if is_metrics(doc):
        return _evaluated_tables(p, doc, gt, iou_types)
    dets = read_results(p, gt_doc, doc)
    return {iou: match_table(gt_doc, dets, iou, gt=gt) for iou in results_iou_types(dets, iou_types, p)}


def compare_inputs(gt: str | os.PathLike, a: str, b: str, seeds: Sequence[int] | None = None) -> list[Path]:
    """Every file ``compare`` reads for these arguments (GT, each arm, a directory arm's metrics.json
    and the matches beside a metrics JSON): what its ``--out`` must not be."""
    runs = _runs(a, seeds) + _runs(b, seeds)
    gts = _runs(str(gt), seeds) if seeds and "{seed}" in str(gt) else [str(gt)]
    paths = [Path(g) for g in gts]
    for run in runs:
        p = Path(run)
        paths.append(p)
        json_file = p / "metrics.json" if p.is_dir() else p
        paths += [json_file] + [matches_path(json_file, iou) for iou in IOU_TYPES]
    return paths


def _runs(pattern: str, seeds: Sequence[int] | None) -> list[str]:
    if not seeds:
        return [pattern]
    if "{seed}" not in pattern:
        raise UserError(f"--seeds: {pattern!r} should hold {{seed}} where the seed goes, e.g. runs/s{{seed}}/crat")
    return [pattern.replace("{seed}", str(s)) for s in seeds]


def compare(
    gt: str | os.PathLike,
    a: str,
    b: str,
    *,
    seeds: Sequence[int] | None = None,
    iou_types: Sequence[str] | None = None,
    n_resamples: int = 1000,
    bootstrap_seed: int = 0,
    progress=None,
) -> dict:
    """B - A: mean difference and 95% interval of AP, APr, APc, APf per IoU type.

    Returns ``{"a", "b", "seeds", "resamples", "bootstrap_seed", "images", iou_type: {key: {"a", "b",
    "delta", "low", "high", "se_images", "sd_seeds"}}}`` (fractions, as ``lvis_metrics``).
    """
    if n_resamples < MIN_RESAMPLES:
        raise UserError(f"--resamples: expected at least {MIN_RESAMPLES} for a 95% interval, got {n_resamples}")
    if n_resamples > MAX_RESAMPLES:
        raise UserError(
            f"--resamples: expected at most {MAX_RESAMPLES} (each resample holds a weight per image), got "
            f"{n_resamples}; 1000 to 10000 pin a 95% interval down"
        )
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: each seed once, got {list(seeds)}")
    gts = _runs(str(gt), seeds) if seeds and "{seed}" in str(gt) else [str(gt)] * len(_runs(a, seeds))
    pairs: dict[str, list] = {}
    indexed: dict[str, tuple] = {}
    for g, ra, rb in zip(gts, _runs(a, seeds), _runs(b, seeds)):
        if g not in indexed:
            doc = load_lvis_json(g)
            indexed[g] = (doc, index_ground_truth(doc))
        gt_doc, index = indexed[g]
        ta = _arm_tables(gt_doc, index, ra, iou_types)
        tb = _arm_tables(gt_doc, index, rb, iou_types)
        for iou in ta:
            if iou not in tb:
                raise UserError(f"{rb} has no {iou} results but {ra} has; pass --iou-type with what both have")
            check_same_split(ta[iou], tb[iou], (ra, rb))
            pairs.setdefault(iou, []).append((ta[iou], tb[iou]))
        if progress:
            progress()
    n_images = sorted({len(i.image_ids) for _, i in indexed.values()})
    out = {"a": a, "b": b, "seeds": list(seeds) if seeds else None, "resamples": n_resamples,
           "bootstrap_seed": bootstrap_seed, "images": n_images[0] if len(n_images) == 1 else n_images,
           "splits": len(indexed)}  # fmt: skip
    out.update(compare_tables(pairs, n_resamples, bootstrap_seed))
    return out


def compare_tables(pairs: dict[str, list], n_resamples: int = 1000, bootstrap_seed: int = 0) -> dict:
    """``{iou_type: {key: {"a", "b", "delta", "low", "high", "se_images", "sd_seeds"}}}`` of
    ``{iou_type: [(table A, table B) per seed]}`` (groups without ground truth left out)."""
    out = {}
    for iou, runs in pairs.items():
        stats = paired_resamples(runs, n_resamples, bootstrap_seed)
        out[iou] = {}
        for key in SUMMARY_KEYS:
            if (stats["a"][key] < 0).any():  # no ground truth of this group in the split
                continue
            ci = seeded_interval(stats["b"][key] - stats["a"][key], stats["boot_delta"][key])
            out[iou][key] = {"a": float(stats["a"][key].mean()), "b": float(stats["b"][key].mean()), **ci}
    return out


def _pct(x: float, sign: bool = False) -> str:
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def format_comparison(result: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The console table: A, B and B - A [95% interval] in AP points per IoU type."""
    na, nb = names
    runs = f"{len(result['seeds'])} seeds" if result["seeds"] else "one run each"
    images = result["images"] if isinstance(result["images"], int) else "/".join(map(str, result["images"]))
    where = f"{images} val images" + (f" in each of {result['splits']} splits" if result.get("splits", 1) > 1 else "")
    lines = [
        f"{nb} - {na}: 95% paired bootstrap intervals over {where} "
        f"({result['resamples']} resamples, seed {result['bootstrap_seed']}; {runs}), AP points"
    ]
    keys = [k for k in SUMMARY_KEYS if any(k in result.get(iou, {}) for iou in IOU_TYPES)]
    lines.append(f"{'':<16}" + "".join(f"{k:>22}" for k in keys))
    for iou in IOU_TYPES:
        if iou not in result:
            continue
        m = result[iou]
        cell = lambda k, f: f"{f(m[k]) if k in m else '-':>22}"  # noqa: E731
        lines.append(f"{iou + ' ' + na:<16}" + "".join(cell(k, lambda v: _pct(v["a"])) for k in keys))
        lines.append(f"{iou + ' ' + nb:<16}" + "".join(cell(k, lambda v: _pct(v["b"])) for k in keys))
        lines.append(
            f"{iou + ' ' + nb[:3] + '-' + na[:3]:<16}"
            + "".join(
                cell(k, lambda v: f"{_pct(v['delta'], True)} [{_pct(v['low'], True)}, {_pct(v['high'], True)}]")
                for k in keys
            )
        )
    return "\n".join(lines)


GROUP_WORDS = {"AP": "", "APr": "rare ", "APc": "common ", "APf": "frequent "}


def verdict(result: dict, names: tuple[str, str], key: str = "APr", iou: str = "bbox", what: str = "AP") -> str:
    """One sentence: the difference, its interval, and whether the interval excludes zero (``what``: the
    statistic's name, e.g. ``"class-oracle AP"``)."""
    if key not in result.get(iou, {}):
        return f"{names[1]} - {names[0]}: no {GROUP_WORDS[key]}ground truth in the val split, nothing to compare"
    m = result[iou][key]
    ci = f"{GROUP_WORDS[key]}{iou} {what} {_pct(m['delta'], True)} [{_pct(m['low'], True)}, {_pct(m['high'], True)}]"
    runs = f"the mean of {len(result['seeds'])} seeds" if result.get("seeds") else "this run"
    if m["low"] <= 0 <= m["high"]:
        return f"{names[1]} - {names[0]} {ci}: not distinguishable from zero on {runs}"
    side = "better" if m["delta"] > 0 else "worse"
    return f"{names[1]} - {names[0]} {ci}: {names[1]} is {side}, the interval excludes zero on {runs}"


def write_json(path: str | os.PathLike, result: dict) -> None:
    from crat_ft.common.files import atomic_write_text

    atomic_write_text(
        path, json.dumps(result, indent=2, default=lambda x: x.tolist() if isinstance(x, np.ndarray) else x)
    )
