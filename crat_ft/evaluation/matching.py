"""Per-(image, category) matching under the LVIS rules, computed once (``crat-ft compare``, ``analyze-errors``).

:func:`match_table` evaluates detections the way :func:`crat_ft.evaluation.lvis.lvis_metrics` does (the
top 300 per image, the federated filter, greedy matching at the ten IoU thresholds 0.50:0.95) and
keeps what accumulation needs: per evaluated detection its image, category, score, and per threshold
whether it is a true positive or ignored; per (image, category) the number of ground-truth
instances. Any statistic over a weighted set of images (a bootstrap resample) is then a
re-accumulation of these flags (:mod:`crat_ft.analysis.bootstrap`); nothing is re-matched.

Matching follows lvis-api's ``evaluate_img`` (and faster-coco-eval's C++ port of it): detections
in descending score order (ties in input order) each take the unmatched ground truth of their
category with the highest IoU at or above the threshold (of equal IoUs the last); an unmatched
detection of a category the image lists in ``not_exhaustive_category_ids`` is ignored. IoUs come
from faster-coco-eval's mask API, as in the metric. LVIS has no crowd regions; a ground truth with
``iscrowd`` set is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields

import numpy as np

from crat_ft.common.errors import UserError
from crat_ft.common.lvis_json import categories_by_id
from crat_ft.evaluation.detections import Detections
from crat_ft.evaluation.lvis import IOU_TYPES, federated_rows, top_k_rows

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MATCHES_FORMAT = "crat-ft matches 2"  # 2: the detections' identity, the geometry in the GT fingerprint


@dataclass
class GroundTruth:
    """LVIS ground truth as arrays: images and categories by sorted id, instances by annotation order."""

    image_ids: np.ndarray  # (n_img,) sorted
    image_hw: np.ndarray  # (n_img, 2)
    cat_ids: np.ndarray  # (K,) sorted
    frequency: np.ndarray  # (K,) "r" / "c" / "f"
    gt_image: np.ndarray  # (n_gt,) image index
    gt_cat: np.ndarray  # (n_gt,) category index
    gt_bbox: np.ndarray  # (n_gt, 4) x, y, w, h
    gt_area: np.ndarray  # (n_gt,)
    gt_segm: list  # (n_gt,) the annotations' segmentation (polygons or RLE)
    verified: np.ndarray  # sorted keys img * K + cat where the category is positive or negative
    not_exhaustive: np.ndarray  # sorted keys img * K + cat
    _fingerprint: str | None = field(default=None, repr=False, compare=False)  # computed once

    def key(self, image: np.ndarray, cat: np.ndarray) -> np.ndarray:
        return np.asarray(image, np.int64) * len(self.cat_ids) + np.asarray(cat, np.int64)

    def fingerprint(self) -> str:
        """A hash of everything matching depends on, to refuse tables made on other annotations: the ids,
        the federated sets, the image sizes and the geometry (boxes, areas, masks) of every instance."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        h = hashlib.sha256()
        for a in (self.image_ids, self.image_hw, self.cat_ids, self.gt_image, self.gt_cat, self.verified,
                  self.not_exhaustive):  # fmt: skip
            h.update(np.ascontiguousarray(a, np.int64).tobytes())
        for a in (self.gt_bbox, self.gt_area):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        h.update("".join(self.frequency.tolist()).encode())
        for segm in self.gt_segm:  # canonical JSON: equal masks hash equal, however the file was written
            text = segm if not isinstance(segm, dict) else {k: _text(v) for k, v in segm.items()}
            h.update(json.dumps(text, sort_keys=True, separators=(",", ":"), default=_plain).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _plain(value):
    """A JSON value of what a library caller may put in a segmentation (numpy arrays and numbers)."""
    return value.tolist() if hasattr(value, "tolist") else repr(value)


def index_ground_truth(gt_doc: dict) -> GroundTruth:
    cats = categories_by_id(gt_doc)
    cat_ids = np.array([c["id"] for c in cats], np.int64)
    images = sorted(gt_doc["images"], key=lambda i: i["id"])
    image_ids = np.array([i["id"] for i in images], np.int64)
    img_pos = {int(i): k for k, i in enumerate(image_ids)}
    cat_pos = {int(c): k for k, c in enumerate(cat_ids)}
    anns = gt_doc["annotations"]
    for a in anns:
        if a.get("iscrowd", 0):
            raise UserError(
                f"annotation {a.get('id')} has iscrowd=1; LVIS has no crowd regions: "
                "pass an LVIS annotation file (crowd regions need COCO's evaluation)"
            )
    gt_image = np.array([img_pos[a["image_id"]] for a in anns], np.int64)
    gt_cat = np.array([cat_pos[a["category_id"]] for a in anns], np.int64)
    k = len(cat_ids)
    neg = [img_pos[i["id"]] * k + cat_pos[c] for i in images for c in i.get("neg_category_ids", []) if c in cat_pos]
    nel = [
        img_pos[i["id"]] * k + cat_pos[c]
        for i in images
        for c in i.get("not_exhaustive_category_ids", [])
        if c in cat_pos
    ]
    return GroundTruth(
        image_ids=image_ids,
        image_hw=np.array([[i["height"], i["width"]] for i in images], np.int64).reshape(-1, 2),
        cat_ids=cat_ids,
        frequency=np.array([c["frequency"] for c in cats]),
        gt_image=gt_image,
        gt_cat=gt_cat,
        gt_bbox=np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4),
        gt_area=np.array([a["area"] for a in anns], np.float64),
        gt_segm=[a.get("segmentation") for a in anns],
        verified=np.unique(np.r_[np.asarray(neg, np.int64), gt_image * k + gt_cat]),
        not_exhaustive=np.unique(np.asarray(nel, np.int64)),
    )


def evaluated_detections(gt: GroundTruth, gt_doc: dict, dets: Detections, max_dets: int) -> np.ndarray:
    """The rows the LVIS metric evaluates, in its order: the top ``max_dets`` per image, then the federated filter."""
    return federated_rows(dets, top_k_rows(dets.image_id, dets.score, max_dets), gt_doc)


def _rle(segm, h: int, w: int):
    from faster_coco_eval.core import mask as mask_api

    if isinstance(segm, dict) and isinstance(segm.get("counts"), str):
        return {"size": segm["size"], "counts": segm["counts"]}
    return mask_api.segmToRle(segm, w, h)


def _det_rle(dets: Detections, r: int) -> dict:
    counts = bytes(dets.rle[dets.rle_offset[r] : dets.rle_offset[r + 1]]).decode()
    return {"size": dets.rle_size[r].tolist(), "counts": counts}


def image_blocks(gt: GroundTruth, dets: Detections, rows: np.ndarray, iou_type: str, gt_mask=None):
    """Per image with detections or ground truth: ``(image index, det rows, gt indices, IoU [det, gt])``.

    ``rows`` are sorted by descending score within the image (ties in their given order); ground truth
    in annotation order. IoUs between every detection and every ground truth of the image, whatever
    their categories (the caller picks). ``gt_mask`` selects the ground truth taken part.
    """
    from faster_coco_eval.core import mask as mask_api

    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type: expected one of {IOU_TYPES}, got {iou_type!r}")
    img_of = np.searchsorted(gt.image_ids, dets.image_id[rows])
    order = np.lexsort((np.arange(len(rows)), -dets.score[rows], img_of))
    rows, img_of = rows[order], img_of[order]
    d_start = np.searchsorted(img_of, np.arange(len(gt.image_ids) + 1))
    g_idx = np.flatnonzero(gt_mask) if gt_mask is not None else np.arange(len(gt.gt_image))
    g_idx = g_idx[np.argsort(gt.gt_image[g_idx], kind="stable")]
    g_start = np.searchsorted(gt.gt_image[g_idx], np.arange(len(gt.image_ids) + 1))
    for i in np.flatnonzero((np.diff(d_start) > 0) | (np.diff(g_start) > 0)).tolist():
        d_rows, g = rows[d_start[i] : d_start[i + 1]], g_idx[g_start[i] : g_start[i + 1]]
        if len(d_rows) and len(g):
            if iou_type == "bbox":
                ious = mask_api.iou(dets.bbox[d_rows], gt.gt_bbox[g], [0] * len(g))
            else:
                h, w = gt.image_hw[i].tolist()
                d = [_det_rle(dets, r) for r in d_rows.tolist()]
                ious = mask_api.iou(d, [_rle(gt.gt_segm[j], h, w) for j in g.tolist()], [0] * len(g))
            ious = np.asarray(ious, np.float64).reshape(len(d_rows), len(g))
        else:
            ious = np.zeros((len(d_rows), len(g)))
        yield i, d_rows, g, ious


def greedy_match(ious: np.ndarray, thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """lvis-api's matching of score-sorted detections to ground truth of one category:
    ``[T, n_det]`` index of the matched ground truth, -1 where unmatched."""
    n_det, n_gt = ious.shape
    match = np.full((len(thresholds), n_det), -1, np.int64)
    if n_det == 0 or n_gt == 0:
        return match
    best = ious.max(axis=1)
    for t, thr in enumerate(thresholds):
        thr = min(float(thr), 1 - 1e-10)
        if n_gt == 1:  # the first detection reaching the threshold takes the one instance
            hit = np.flatnonzero(best >= thr)
            if len(hit):
                match[t, hit[0]] = 0
            continue
        free = np.ones(n_gt, bool)
        left = n_gt
        for d in np.flatnonzero(best >= thr).tolist():
            if not left:  # every instance taken: the rest stay unmatched
                break
            cand = np.where(free, ious[d], -1.0)
            top = cand.max()
            if top >= thr:
                g = n_gt - 1 - int(np.argmax(cand[::-1] == top))  # of equal IoUs the last, as lvis-api
                match[t, d] = g
                free[g] = False
                left -= 1
    return match


def detections_id(dets: Detections, iou_type: str) -> str:
    """The identity of a set of detections as one IoU type sees them: a sha256 of their columns (the
    masks' for ``segm``), in order. The matches of a model and the metrics file they belong to both
    record it, so matches are never read beside another model's metrics."""
    h = hashlib.sha256(iou_type.encode())
    columns = [dets.image_id, dets.category_id, dets.score, dets.bbox]
    columns += [dets.area] if dets.area is not None else []
    columns += [dets.rle, dets.rle_offset, dets.rle_size] if iou_type == "segm" and dets.has_masks else []
    for c in columns:
        c = np.ascontiguousarray(c)
        h.update(f"{c.dtype.str}{c.shape}".encode())
        h.update(c.reshape(-1).view(np.uint8))  # no copy: the masks may be a memory-mapped file of gigabytes
    return h.hexdigest()[:32]


def _shape_problem(t: "MatchTable") -> str | None:
    """What makes a loaded table unusable for accumulation, if anything (a corrupted or hand-made file)."""
    n, n_img, k = len(t.det_image), len(t.image_ids), len(t.cat_ids)
    per_det = (t.det_cat, t.score, t.tp, t.ignored)
    if any(len(a) != n for a in per_det) or t.tp.shape != (n, len(IOU_THRESHOLDS)) or t.ignored.shape != t.tp.shape:
        return "its per-detection arrays differ in length"
    if (
        len(t.frequency) != k
        or len(t.gt_pair_cat) != len(t.gt_pair_image)
        or len(t.gt_pair_count) != len(t.gt_pair_cat)
    ):
        return "its per-category or per-pair arrays differ in length"
    ints = (t.image_ids, t.cat_ids, t.det_image, t.det_cat, t.gt_pair_image, t.gt_pair_cat, t.gt_pair_count)
    if any(a.ndim != 1 or a.dtype.kind not in "iu" for a in ints) or t.tp.dtype != bool or t.ignored.dtype != bool:
        return "an array has the wrong type"
    if ((t.det_image < 0) | (t.det_image >= n_img)).any() or ((t.gt_pair_image < 0) | (t.gt_pair_image >= n_img)).any():
        return "an image index is out of range"
    if ((t.det_cat < 0) | (t.det_cat >= k)).any() or ((t.gt_pair_cat < 0) | (t.gt_pair_cat >= k)).any():
        return "a category index is out of range"
    if (np.diff(t.det_cat) < 0).any():
        return "its detections are not sorted by category"
    if not np.isfinite(t.score).all() or (t.gt_pair_count < 1).any():
        return "a score is not finite or a pair has no ground truth"
    if not np.isin(t.frequency, ["r", "c", "f"]).all():
        return "a frequency group is not r, c or f"
    return None


@dataclass
class MatchTable:
    """Evaluated detections of one model with their match flags, sorted for accumulation
    (by category, then descending score, then image, then the order the metric sees them).

    ``detections_id`` is :func:`detections_id` of the detections matched: the metrics file an
    ``evaluate`` writes beside the table records the same value (``"matches": {iou_type: id}``).
    """

    iou_type: str
    max_dets: int
    gt_fingerprint: str
    detections_id: str
    image_ids: np.ndarray  # (n_img,)
    cat_ids: np.ndarray  # (K,)
    frequency: np.ndarray  # (K,)
    det_image: np.ndarray  # (n,) image index
    det_cat: np.ndarray  # (n,) category index
    score: np.ndarray  # (n,)
    tp: np.ndarray  # (n, T) bool
    ignored: np.ndarray  # (n, T) bool
    gt_pair_image: np.ndarray  # (p,) image index of each (image, category) with ground truth
    gt_pair_cat: np.ndarray  # (p,)
    gt_pair_count: np.ndarray  # (p,)

    def save(self, path: str | os.PathLike) -> None:
        """Write as compressed ``.npz`` (atomic)."""
        from crat_ft.common.files import atomic_path

        meta = {"format": MATCHES_FORMAT, "iou_type": self.iou_type, "max_dets": self.max_dets,
                "gt_fingerprint": self.gt_fingerprint, "detections_id": self.detections_id}  # fmt: skip
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, iou_type: str | None = None) -> "MatchTable":
        """A table written by :meth:`save`, checked.

        Args:
            iou_type: the IoU type its name says (``..._matches_<iou_type>.npz``), if any: the table must hold it.

        Raises:
            UserError: the file is empty, truncated, of another format or inconsistent, or holds another IoU type.
        """
        meta = read_matches_meta(path)
        fix = "re-run `crat-ft evaluate` to write it again, or pass the results file instead"
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [f.name for f in fields(cls) if f.name not in meta and f.name not in z.files]
                if missing:
                    raise ValueError(f"it lacks {missing[0]!r}")
                arrays = {f.name: np.asarray(z[f.name]) for f in fields(cls) if f.name in z.files}
        except Exception as exc:  # a damaged zip fails in zipfile, zlib or numpy, each its own way
            raise UserError(f"{path} is not a readable crat-ft matches file ({_why(exc)}); {fix}") from None
        table = cls(iou_type=meta["iou_type"], max_dets=meta["max_dets"], gt_fingerprint=meta["gt_fingerprint"],
                    detections_id=meta["detections_id"], **arrays)  # fmt: skip
        problem = _shape_problem(table)
        if problem:
            raise UserError(f"{path} is not a consistent crat-ft matches file ({problem}); {fix}")
        if iou_type is not None and table.iou_type != iou_type:
            raise UserError(
                f"{path} holds {table.iou_type} matches but its name says {iou_type}: it was renamed or copied "
                f"over; name it ..._matches_{table.iou_type}.npz, or {fix}"
            )
        return table


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


def read_matches_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` record of a matches file (its format, IoU type, max_dets, GT fingerprint and
    detections id), read without its arrays.

    Raises:
        UserError: missing, empty, truncated, not a crat-ft matches file, or of an older format.
    """
    from pathlib import Path

    fix = "re-run `crat-ft evaluate` to write it again, or pass the results file instead"
    path = Path(path)
    if not path.is_file():
        raise UserError(f"matches file {path} does not exist; {fix}")
    if path.stat().st_size == 0:
        raise UserError(f"matches file {path} is empty (0 bytes: a write that did not finish); {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except Exception as exc:  # a damaged zip fails in zipfile, zlib, numpy or json, each its own way
        raise UserError(f"{path} is not a readable crat-ft matches file ({_why(exc)}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != MATCHES_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise UserError(f"{path} is a matches file of format {got!r}, expected {MATCHES_FORMAT!r}; {fix}")
    ok = (
        meta.get("iou_type") in IOU_TYPES
        and isinstance(meta.get("max_dets"), int)
        and all(isinstance(meta.get(k), str) for k in ("gt_fingerprint", "detections_id"))
    )
    if not ok:
        raise UserError(f"{path} has a damaged meta record ({_why(ValueError(str(meta)[:80]))}); {fix}")
    return meta


def match_table(
    gt_doc: dict, dets: Detections, iou_type: str, max_dets: int = 300, gt: GroundTruth | None = None
) -> MatchTable:
    """Match ``dets`` (checked as :func:`crat_ft.evaluation.lvis.lvis_metrics` checks them) once."""
    from crat_ft.evaluation.checks import check_columns

    gt = gt or index_ground_truth(gt_doc)
    check_columns(dets, iou_type, set(gt.image_ids.tolist()), set(gt.cat_ids.tolist()))
    rows = evaluated_detections(gt, gt_doc, dets, max_dets)
    seen = np.empty(len(dets), np.int64)
    seen[rows] = np.arange(len(rows))  # the order the metric hands them to the engine
    cat_of = np.searchsorted(gt.cat_ids, dets.category_id)
    n_thr = len(IOU_THRESHOLDS)
    tp_rows, tp_flags = [], []
    for _, d_rows, g, ious in image_blocks(gt, dets, rows, iou_type):
        if not len(d_rows) or not len(g):
            continue
        for c in np.intersect1d(cat_of[d_rows], gt.gt_cat[g]).tolist():
            d_sel, g_sel = cat_of[d_rows] == c, gt.gt_cat[g] == c
            match = greedy_match(ious[np.ix_(d_sel, g_sel)])
            tp_rows.append(d_rows[d_sel])
            tp_flags.append((match >= 0).T)
    tp = np.zeros((len(dets), n_thr), bool)
    if tp_rows:
        tp[np.concatenate(tp_rows)] = np.concatenate(tp_flags)
    img_of = np.searchsorted(gt.image_ids, dets.image_id)
    nel = np.isin(gt.key(img_of, cat_of), gt.not_exhaustive)
    order = rows[np.lexsort((seen[rows], img_of[rows], -dets.score[rows], cat_of[rows]))]
    pairs, counts = np.unique(gt.key(gt.gt_image, gt.gt_cat), return_counts=True)
    k = len(gt.cat_ids)
    return MatchTable(
        iou_type=iou_type, max_dets=max_dets, gt_fingerprint=gt.fingerprint(),
        detections_id=detections_id(dets, iou_type),
        image_ids=gt.image_ids, cat_ids=gt.cat_ids, frequency=gt.frequency,
        det_image=img_of[order], det_cat=cat_of[order], score=dets.score[order],
        tp=tp[order], ignored=~tp[order] & nel[order, None],
        gt_pair_image=pairs // k, gt_pair_cat=pairs % k, gt_pair_count=counts.astype(np.int64),
    )  # fmt: skip
