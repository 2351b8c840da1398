"""Paired bootstrap intervals over validation images (``crat-ft compare``).

A resample draws the validation images with replacement; an image drawn k times counts k times,
as if its ground truth and detections were there k times. Both models are scored on the same
resamples, so the interval of their difference holds only the noise the pair does not share.

Each resample re-accumulates the flags of :class:`crat_ft.evaluation.matching.MatchTable` with per-image
weights; the precision/recall arithmetic is lvis-api's (precision ``tp / (tp + fp + eps)`` made
monotone from the right, read at the first point whose recall ``tp / n_gt`` reaches each of 101
recall thresholds), so the unweighted statistic equals :func:`crat_ft.evaluation.lvis.lvis_metrics`.

Several seeds per arm (:func:`seeded_interval`): the mean of the per-seed differences, with an
interval whose variance adds the image-sampling variance of that mean (bootstrap) to the
seed-to-seed variance over the number of seeds, and a Student t quantile with seeds - 1 degrees of
freedom. Where each seed has its own val split, the seed-to-seed variance holds image noise too,
which is then counted twice: the interval errs wide.
"""

from __future__ import annotations

import numpy as np

from crat_ft.evaluation.matching import RECALL_THRESHOLDS, MatchTable

EPS = np.spacing(1)
SUMMARY_KEYS = ("AP", "APr", "APc", "APf")
MAX_BLOCK = 4_000_000  # weights x detections handled at once


def resample_weights(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """``[n_resamples, n_images]`` counts of each image in each resample (a seeded multinomial)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples).astype(np.int32)


def first_reaching(npos: np.ndarray) -> np.ndarray:
    """``[B, R]``: the smallest integer tp with ``tp / npos >= r`` for each recall threshold r
    (float arithmetic as lvis-api does it, so boundary cases fall the same way)."""
    r = RECALL_THRESHOLDS[None, :]
    n = npos[:, None].astype(np.float64)
    t = np.ceil(r * n)
    t = np.where((t - 1) / n >= r, t - 1, t)
    return np.where(t / n < r, t + 1, t).astype(np.int64)


def curve_ap(tp: np.ndarray, fp: np.ndarray, img: np.ndarray, weights: np.ndarray, need: np.ndarray) -> np.ndarray:
    """AP (mean over recall thresholds) of one category at one IoU threshold for each weight row.

    ``tp``/``fp``: (n,) flags in accumulation order; ``img``: (n,) each row's column of ``weights``
    ([B, m] image counts); ``need``: :func:`first_reaching` of the rows' weighted ground-truth counts (> 0).

    Only the true-positive rows are walked: a recall threshold is first reached at one, and a false
    positive's precision is below the true positive's before it, so false positives matter only as
    the weighted count before each true positive (a sparse product, one pass over them).
    """
    from scipy import sparse

    b = len(weights)
    k = np.flatnonzero(tp)
    n = len(k)
    if n == 0:
        return np.zeros(b)
    f = np.flatnonzero(fp[: k[-1]])
    seg = sparse.csr_matrix((np.ones(len(f), np.int64), (np.searchsorted(k, f), img[f])), shape=(n, weights.shape[1]))
    fpc = np.cumsum(np.asarray(seg @ weights.T.astype(np.int64)).T, axis=1)
    tpc = np.cumsum(weights[:, img[k]], axis=1, dtype=np.int64)
    pr = tpc / (tpc + fpc + EPS)
    env = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    span = int(tpc[:, -1].max()) + 2
    offset = np.arange(b, dtype=np.int64)[:, None] * span
    flat = (tpc + offset).ravel()
    top = int(need.max())
    if top + 1 < need.shape[1]:  # few instances: look up each count once, then read the thresholds off it
        at = np.searchsorted(flat, (np.arange(top + 1)[None, :] + offset).ravel()).reshape(b, top + 1)
        pos = np.take_along_axis(at, need, axis=1)
    else:
        pos = np.searchsorted(flat, (need + offset).ravel()).reshape(b, -1)
    inside = pos < (np.arange(b)[:, None] + 1) * n
    q = np.where(inside, env.ravel()[np.minimum(pos, b * n - 1)], 0.0)
    return q.mean(axis=1)


def category_ap(table: MatchTable, weights: np.ndarray) -> np.ndarray:
    """``[B, K, T]`` AP per resample, category and IoU threshold; -1 where the resample holds no
    ground truth of the category (the metric leaves such a category out)."""
    weights = np.atleast_2d(weights)
    b = len(weights)
    k, n_thr = len(table.cat_ids), table.tp.shape[1]
    npos = np.zeros((b, k), np.int64)
    np.add.at(npos.T, table.gt_pair_cat, (weights[:, table.gt_pair_image] * table.gt_pair_count).T)
    out = np.full((b, k, n_thr), -1.0)
    bounds = np.searchsorted(table.det_cat, np.arange(k + 1))
    for c in range(k):
        s, e = bounds[c], bounds[c + 1]
        images, img = np.unique(table.det_image[s:e], return_inverse=True)
        tp, fp = table.tp[s:e], ~table.tp[s:e] & ~table.ignored[s:e]
        step = max(1, MAX_BLOCK // max(len(images), int(tp.sum(axis=0).max(initial=0)), 1))
        for b0 in range(0, b, step):
            rows = slice(b0, b0 + step)
            valid = np.flatnonzero(npos[rows, c] > 0)
            if not len(valid):
                continue
            w = weights[rows][valid][:, images]
            need = first_reaching(npos[rows, c][valid])
            for t in range(n_thr):
                out[b0 + valid, c, t] = curve_ap(tp[:, t], fp[:, t], img, w, need)
    return out


def summarize(ap: np.ndarray, frequency: np.ndarray) -> dict[str, np.ndarray]:
    """AP, AP50 and APr/c/f per resample from :func:`category_ap`: means over the categories
    defined in that resample (-1 where none is)."""
    per_cat = np.where((ap > -1).all(axis=2), ap.mean(axis=2), np.nan)
    groups = {
        "AP": np.ones(len(frequency), bool),
        "APr": frequency == "r",
        "APc": frequency == "c",
        "APf": frequency == "f",
    }

    def mean(x, sel):
        x = x[:, sel]
        n = (~np.isnan(x)).sum(axis=1)
        return np.where(n > 0, np.nansum(x, axis=1) / np.maximum(n, 1), -1.0)

    out = {key: mean(per_cat, sel) for key, sel in groups.items()}
    out["AP50"] = mean(np.where(ap[:, :, 0] > -1, ap[:, :, 0], np.nan), groups["AP"])
    return out


def check_same_split(a: MatchTable, b: MatchTable, names: tuple[str, str]) -> None:
    from crat_ft.common.errors import UserError

    if a.gt_fingerprint != b.gt_fingerprint:
        raise UserError(
            f"{names[0]} and {names[1]} were matched against different annotations; compare results on one val split"
        )
    if a.iou_type != b.iou_type or a.max_dets != b.max_dets:
        raise UserError(
            f"{names[0]} ({a.iou_type}, {a.max_dets} per image) and {names[1]} ({b.iou_type}, "
            f"{b.max_dets} per image) were evaluated differently; compare like with like"
        )


def paired_resamples(pairs: list[tuple[MatchTable, MatchTable]], n_resamples: int, seed: int) -> dict:
    """Full-sample and resampled statistics of each (A, B) pair (one per seed). Pairs on one val split
    share the resamples; a pair on another split (its own images) gets its own.

    Returns ``{"a": {key: [S]}, "b": ..., "boot_delta": {key: [S, B]}}`` (B - A per resample)."""
    splits: dict[str, np.ndarray] = {}
    out = {"a": {}, "b": {}, "boot_delta": {}}
    for a, b in pairs:
        if a.gt_fingerprint not in splits:
            splits[a.gt_fingerprint] = resample_weights(len(a.image_ids), n_resamples, seed + len(splits))
        weights = splits[a.gt_fingerprint]
        full = np.ones((1, len(a.image_ids)), np.int32)
        sa, sb = summarize(category_ap(a, full), a.frequency), summarize(category_ap(b, full), b.frequency)
        ra, rb = summarize(category_ap(a, weights), a.frequency), summarize(category_ap(b, weights), b.frequency)
        for key in SUMMARY_KEYS:
            out["a"].setdefault(key, []).append(float(sa[key][0]))
            out["b"].setdefault(key, []).append(float(sb[key][0]))
            both = (ra[key] > -1) & (rb[key] > -1)
            out["boot_delta"].setdefault(key, []).append(np.where(both, rb[key] - ra[key], np.nan))
    return {part: {k: np.asarray(v) for k, v in d.items()} for part, d in out.items()}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (exact for any ``df`` >= 1)."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"t975: expected at least 1 degree of freedom, got {df}")
    return float(t.ppf(0.975, df))


def seeded_interval(full_delta: np.ndarray, boot_delta: np.ndarray) -> dict:
    """Mean difference and 95% interval from ``full_delta`` [S] and ``boot_delta`` [S, B].

    One seed: the bootstrap percentile interval. Several: mean +- t(S-1) * sqrt(var_img + s_seed^2 / S),
    var_img the bootstrap variance of the seed-mean difference, s_seed the sample standard deviation
    of the per-seed differences."""
    s = len(full_delta)
    mean = float(full_delta.mean())
    boot_mean = boot_delta.mean(axis=0)
    boot_mean = boot_mean[~np.isnan(boot_mean)]
    if not len(boot_mean):
        return {"delta": mean, "low": float("nan"), "high": float("nan"), "se_images": float("nan"), "sd_seeds": None}
    se_img = float(boot_mean.std(ddof=1)) if len(boot_mean) > 1 else 0.0
    if s == 1:
        low, high = np.percentile(boot_mean, [2.5, 97.5])
        return {"delta": mean, "low": float(low), "high": float(high), "se_images": se_img, "sd_seeds": None}
    sd_seed = float(full_delta.std(ddof=1))
    half = t975(s - 1) * float(np.sqrt(se_img**2 + sd_seed**2 / s))
    return {"delta": mean, "low": mean - half, "high": mean + half, "se_images": se_img, "sd_seeds": sd_seed}
