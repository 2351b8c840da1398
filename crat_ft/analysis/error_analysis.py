"""``crat-ft analyze-errors``: where the AP goes, TIDE's way (Bolya et al., ECCV 2020), under LVIS's rules.

Detections are the metric's: the top ``max_dets`` per image, and only those of a category the image
verifies (positive or in ``neg_category_ids``); the others do not count for LVIS AP, so they are no
error either. At the foreground IoU 0.5 the metric's matching marks each a true positive, a false
positive, or ignored (unmatched, of a category the image lists as ``not_exhaustive``). An ignored
detection is no error and is not counted, as TIDE skips ignored predictions: it gets no error type,
costs no AP and cannot take a ground truth's ``cls``/``loc`` fix. Every other detection that is not a
true positive gets one error type, tested in TIDE's order:

- ``loc``: its best IoU with ground truth of its own class lies in [0.1, 0.5];
- ``cls``: IoU >= 0.5 with ground truth of another class;
- ``dupe``: IoU >= 0.5 with ground truth of its class that a higher-scored detection took;
- ``bkg``: IoU <= 0.1 with every ground truth of the image;
- ``both``: anything else (wrong class and badly placed).

``miss`` is ground truth no detection took and no ``cls``/``loc`` error could take. The AP recovered
by an error type is AP50 with only those errors fixed, minus AP50 (0 where binning makes it
negative, as TIDE does): a ``cls`` error takes the ground truth's class and a ``loc`` error its
place, becoming a true positive when that ground truth is free and it is the highest-scored error
aiming at it, and is removed otherwise; ``dupe``, ``bkg`` and ``both`` errors are removed; fixing
``miss`` drops the missed instances from the count, and a category left without ground truth leaves
the mean (TIDE drops a class with nothing left; LVIS leaves a category without ground truth
undefined). All per frequency group and over all classes; -1 where a group has no ground truth, and
for a fix that leaves a group none.

The class-oracle AP: each detection (of the top ``max_dets`` per image) takes the class of the
ground truth it overlaps most (any overlap), then the ordinary LVIS AP (0.50:0.95). It is what the
boxes and masks are worth with a perfect classifier.
"""

from __future__ import annotations

import numpy as np

from crat_ft.analysis.bootstrap import category_ap, curve_ap, first_reaching, summarize
from crat_ft.evaluation.detections import Detections
from crat_ft.evaluation.lvis import top_k_rows
from crat_ft.evaluation.matching import (
    GroundTruth,
    MatchTable,
    greedy_match,
    image_blocks,
    index_ground_truth,
    match_table,
)

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
POS_IOU, BKG_IOU = 0.5, 0.1
GROUPS = ("all", "r", "c", "f")
_CODE = {"tp": 0, "cls": 1, "loc": 2, "both": 3, "dupe": 4, "bkg": 5}
_NOT_EVALUATED, _IGNORED = -1, -3


def _classify(gt: GroundTruth, dets: Detections, iou_type: str, max_dets: int) -> dict:
    """Per evaluated detection its status and error; per ground truth whether it was taken or can be."""
    rows = top_k_rows(dets.image_id, dets.score, max_dets)
    cat_of = np.searchsorted(gt.cat_ids, dets.category_id)
    img_of = np.searchsorted(gt.image_ids, dets.image_id)
    keys = gt.key(img_of, cat_of)
    seen = np.full(len(dets), -1, np.int64)
    seen[rows] = np.arange(len(rows))
    evaluated = np.isin(keys, gt.verified) & (seen >= 0)
    code = np.full(len(dets), _NOT_EVALUATED, np.int64)
    target = np.full(len(dets), -1, np.int64)  # the ground truth a cls/loc fix aims at
    oracle_cat = cat_of.copy()
    used = np.zeros(len(gt.gt_image), bool)
    for _, d_rows, g, ious in image_blocks(gt, dets, rows, iou_type):
        if len(g) and len(d_rows):
            best = ious.argmax(axis=1)
            hit = ious[np.arange(len(d_rows)), best] > 0
            oracle_cat[d_rows[hit]] = gt.gt_cat[g[best[hit]]]
        ev = evaluated[d_rows]
        d_rows, ious = d_rows[ev], ious[ev]
        code[d_rows] = _CODE["bkg"] if not len(g) else -2  # -2: decided below
        if not len(g) or not len(d_rows):
            continue
        d_cat, g_cat = cat_of[d_rows], gt.gt_cat[g]
        for c in np.unique(d_cat).tolist():
            ds, gs = np.flatnonzero(d_cat == c), np.flatnonzero(g_cat == c)
            m = greedy_match(ious[np.ix_(ds, gs)], [POS_IOU])[0]
            code[d_rows[ds[m >= 0]]] = _CODE["tp"]
            used[g[gs[m[m >= 0]]]] = True
        same = d_cat[:, None] == g_cat[None, :]
        taken = used[g][None, :]
        for j in np.flatnonzero(code[d_rows] == -2).tolist():
            own, other = np.where(same[j], ious[j], -1.0), np.where(~same[j], ious[j], -1.0)
            if BKG_IOU <= own.max() <= POS_IOU:
                code[d_rows[j]], target[d_rows[j]] = _CODE["loc"], g[int(own.argmax())]
            elif other.max() >= POS_IOU:
                code[d_rows[j]], target[d_rows[j]] = _CODE["cls"], g[int(other.argmax())]
            elif np.where(taken[0], own, -1.0).max() >= POS_IOU:
                code[d_rows[j]] = _CODE["dupe"]
            elif ious[j].max() <= BKG_IOU:
                code[d_rows[j]] = _CODE["bkg"]
            else:
                code[d_rows[j]] = _CODE["both"]
    # unmatched in a not-exhaustive (image, category): LVIS ignores it, so it is no error and aims at nothing
    ignored = (code > 0) & np.isin(keys, gt.not_exhaustive)
    code[ignored], target[ignored] = _IGNORED, -1
    # a cls/loc fix takes its ground truth only if free, and only for the highest-scored error aiming at it
    aims = np.flatnonzero(target >= 0)
    free = aims[~used[target[aims]]]
    fixed = np.zeros(len(dets), bool)
    if len(free):
        order = free[np.lexsort((seen[free], -dets.score[free], target[free]))]
        first = np.r_[True, target[order][1:] != target[order][:-1]]
        fixed[order[first]] = True
    usable = np.zeros(len(gt.gt_image), bool)
    usable[target[free]] = True
    return {"code": code, "target": target, "fixed": fixed, "used": used, "usable": usable, "seen": seen,
            "cat": cat_of, "img": img_of, "oracle_cat": oracle_cat}  # fmt: skip


def _group_ap50(gt: GroundTruth, score, cat, img, seen, tp, fp, npos) -> dict[str, float]:
    """AP at IoU 0.5 per group from points (``tp``/``fp`` flags; neither: not a point), over the
    categories with ground truth (``npos`` > 0); -1 for a group without any."""
    valid = npos > 0
    keep = tp | fp
    score, cat, img, seen, tp = score[keep], cat[keep], img[keep], seen[keep], tp[keep]
    order = np.lexsort((seen, img, -score, cat))
    cat, tp = cat[order], tp[order]
    bounds = np.searchsorted(cat, np.arange(len(gt.cat_ids) + 1))
    ap = np.zeros(len(gt.cat_ids))
    for c in np.flatnonzero(valid).tolist():
        s, e = bounds[c], bounds[c + 1]
        if npos[c] > 0:
            ap[c] = curve_ap(
                tp[s:e],
                ~tp[s:e],
                np.zeros(e - s, np.int64),
                np.ones((1, 1), np.int64),
                first_reaching(np.array([npos[c]])),
            )[0]
    out = {}
    for group in GROUPS:
        sel = valid & ((gt.frequency == group) if group != "all" else True)
        out[group] = float(ap[sel].mean()) if sel.any() else -1.0
    return out


def analyze_errors(
    gt_doc: dict, dets: Detections, iou_type: str = "bbox", max_dets: int = 300, tables: dict | None = None
) -> dict:
    """The decomposition of one model's results.

    Returns ``{"AP50", "AP", "oracle_AP", "dAP50": {error type: ...}}`` each ``{group: value}`` (fractions;
    -1 where a group has no ground truth), and ``"counts"``: detections (instances for ``miss``) per error type.
    ``tables``, if given, receives the match tables of the detections (``"model"``) and of their
    class-oracle relabelling (``"oracle"``), for :mod:`crat_ft.analysis.bootstrap` intervals of either.
    """
    from crat_ft.evaluation.checks import check_columns

    gt = index_ground_truth(gt_doc)
    check_columns(dets, iou_type, set(gt.image_ids.tolist()), set(gt.cat_ids.tolist()))
    info = _classify(gt, dets, iou_type, max_dets)
    code, cat, fixed = info["code"], info["cat"], info["fixed"]
    npos = np.bincount(gt.gt_cat, minlength=len(gt.cat_ids))
    base_tp = code == 0
    base_fp = code > 0

    def ap50(tp, fp, cats=cat, counts=npos):
        return _group_ap50(gt, dets.score, cats, info["img"], info["seen"], tp, fp, counts)

    base = ap50(base_tp, base_fp)
    gains = {}
    for name in ERROR_TYPES:
        if name == "miss":
            missed = ~info["used"] & ~info["usable"]
            fixed_ap = ap50(base_tp, base_fp, counts=npos - np.bincount(gt.gt_cat[missed], minlength=len(npos)))
        else:
            mine = code == _CODE[name]
            cats = cat
            if name == "cls":
                cats = np.where(mine & fixed, gt.gt_cat[np.maximum(info["target"], 0)], cat)
            becomes_tp = mine & fixed if name in ("cls", "loc") else np.zeros_like(mine)
            fixed_ap = ap50(base_tp | becomes_tp, base_fp & ~mine, cats=cats)
        gains[name] = {g: max(fixed_ap[g] - base[g], 0.0) if min(base[g], fixed_ap[g]) >= 0 else -1.0 for g in GROUPS}
    counts = {name: int((code == _CODE[name]).sum()) for name in ERROR_TYPES if name != "miss"}
    counts["miss"] = int((~info["used"] & ~info["usable"]).sum())
    oracle = Detections(image_id=dets.image_id, category_id=gt.cat_ids[info["oracle_cat"]], score=dets.score,
                        bbox=dets.bbox, rle=dets.rle, rle_offset=dets.rle_offset, rle_size=dets.rle_size)  # fmt: skip
    model_table = match_table(gt_doc, dets, iou_type, max_dets, gt=gt)
    oracle_table = match_table(gt_doc, oracle, iou_type, max_dets, gt=gt)
    if tables is not None:
        tables.update(model=model_table, oracle=oracle_table)
    return {
        "AP50": base,
        "AP": _group_ap(model_table),
        "oracle_AP": _group_ap(oracle_table),
        "dAP50": gains,
        "counts": counts,
    }


def _group_ap(table: MatchTable) -> dict[str, float]:
    """LVIS AP (0.50:0.95) per group, by the matching ``crat-ft compare`` uses (equal to ``lvis_metrics``)."""
    s = summarize(category_ap(table, np.ones((1, len(table.image_ids)), np.int32)), table.frequency)
    return {"all": float(s["AP"][0]), "r": float(s["APr"][0]), "c": float(s["APc"][0]), "f": float(s["APf"][0])}


def format_errors(results: dict[str, dict]) -> str:
    """One table per IoU type: rows group x model; AP, class-oracle AP, AP50 and the AP50 each fix recovers."""
    lines = []
    for iou in ("bbox", "segm"):
        models = {name: r[iou] for name, r in results.items() if iou in r}
        if not models:
            continue
        lines.append(f"\n{iou}: AP, class-oracle AP, AP50 and the AP50 recovered by fixing each error type (points)")
        lines.append(f"{'':<22}{'AP':>7}{'oracle':>8}{'AP50':>7}" + "".join(f"{e:>7}" for e in ERROR_TYPES))
        for group in GROUPS:
            for name, r in models.items():
                if r["AP50"][group] < 0:
                    continue
                cells = [r["AP"][group], r["oracle_AP"][group], r["AP50"][group]] + [
                    r["dAP50"][e][group] for e in ERROR_TYPES
                ]
                widths = [7, 8, 7] + [7] * len(ERROR_TYPES)
                shown = (f"{100 * v:{w}.1f}" if v >= 0 else f"{'-':>{w}}" for v, w in zip(cells, widths))
                lines.append(f"{group + ' ' + name:<22}" + "".join(shown))
    return "\n".join(lines).lstrip("\n")


def plot_errors(results: dict[str, dict], iou_type: str, path) -> None:
    """Stacked bars of the AP50 each error type costs, per frequency group, the models side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crat_ft.common.files import atomic_path

    models = [name for name, r in results.items() if iou_type in r]
    groups = [g for g in GROUPS if any(results[m][iou_type]["AP50"][g] >= 0 for m in models)]
    width = 0.8 / max(len(models), 1)
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(min(3.0 + 1.1 * len(groups) * len(models), 11), 4))
    tallest = 0.0
    for k, name in enumerate(models):
        r = results[name][iou_type]
        x = np.arange(len(groups)) + (k - (len(models) - 1) / 2) * width
        bottom = np.zeros(len(groups))
        for e, error in enumerate(ERROR_TYPES):
            h = np.array([100 * max(r["dAP50"][error][g], 0) for g in groups])
            ax.bar(x, h, width * 0.9, bottom=bottom, color=colours[e], label=error if k == 0 else None,
                   edgecolor="black", hatch="//" if k else None, linewidth=0.5)  # fmt: skip
            bottom += h
        for xi, top in zip(x, bottom):
            ax.text(xi, top, f" {name}", ha="center", va="bottom", fontsize=7, rotation=90)
        tallest = max(tallest, float(bottom.max()) if len(bottom) else 0.0)
    ax.set_ylim(0, max(tallest, 1e-3) * 1.3)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels({"all": "all classes", "r": "rare", "c": "common", "f": "frequent"}[g] for g in groups)
    ax.set_ylabel("AP50 recovered by fixing (points)")
    ax.set_title(f"{iou_type}: where the AP50 goes (TIDE under LVIS rules)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="error fixed")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def analyze_results(gt, files, names=None, *, iou_types=None, out_dir=None, max_dets: int = 300):
    """``crat-ft analyze-errors``: the decomposition of each results file; the table, and what was written
    (``errors.json``, ``errors_<iou type>.png`` in ``out_dir``, which must not replace an input)."""
    import contextlib
    import json
    from pathlib import Path

    from crat_ft.common.files import atomic_write_text, output_dir, refuse_output_among_inputs
    from crat_ft.common.lvis_json import load_lvis_json
    from crat_ft.evaluation.results import read_results, results_iou_types

    names = names or [Path(f).name for f in files]
    if len(set(names)) != len(names):
        names = [f"{n} ({k + 1})" for k, n in enumerate(names)]
    if out_dir:
        out = Path(out_dir)
        for target in [out, out / "errors.json"] + [out / f"errors_{iou}.png" for iou in ("bbox", "segm")]:
            refuse_output_among_inputs(target, [gt, *files], "--out-dir")
    gt_doc = load_lvis_json(gt)
    dets = {name: read_results(f, gt_doc) for name, f in zip(names, files)}
    if iou_types:
        for f, d in zip(files, dets.values()):
            results_iou_types(d, iou_types, f)  # a file without masks refuses segm
    else:
        iou_types = ["bbox"] + (["segm"] if all(d.has_masks for d in dets.values()) else [])
    written = []
    with output_dir(Path(out_dir), "--out-dir") if out_dir else contextlib.nullcontext():
        results = {
            name: {iou: analyze_errors(gt_doc, d, iou, max_dets) for iou in iou_types} for name, d in dets.items()
        }
        if out_dir:
            out = Path(out_dir)
            atomic_write_text(out / "errors.json", json.dumps({"gt": str(gt), "files": dict(zip(names, map(str, files))),
                                                               "results": results}, indent=2))  # fmt: skip
            written.append(out / "errors.json")
            for iou in iou_types:
                plot_errors(results, iou, out / f"errors_{iou}.png")
                written.append(out / f"errors_{iou}.png")
    return format_errors(results), written
