"""AP-fixed (Dave et al. 2021) against a small independent LVIS bbox evaluator written here."""

from pathlib import Path

import numpy as np
import pytest
from test_evaluation import _random_dets, _square, crafted_gt, det

from crat_ft.common.errors import UserError
from crat_ft.evaluation.lvis import lvis_metrics, top_k_per_class

IOUS = np.linspace(0.5, 0.95, 10)
RECALLS = np.linspace(0.0, 1.0, 101)


def _iou(a, b):
    ax1, ay1, aw, ah = a
    bx1, by1, bw, bh = b
    iw = max(0.0, min(ax1 + aw, bx1 + bw) - max(ax1, bx1))
    ih = max(0.0, min(ay1 + ah, by1 + bh) - max(ay1, by1))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def _capped(dets, per_image=None, per_class=None):
    dets = [dict(d, order=i) for i, d in enumerate(dets)]
    if per_image is not None:
        dets = [d for img in {d["image_id"] for d in dets}
                for d in sorted([d for d in dets if d["image_id"] == img], key=lambda d: -d["score"])[:per_image]]  # fmt: skip
    if per_class is not None:
        dets = [d for c in {d["category_id"] for d in dets}
                for d in sorted([d for d in dets if d["category_id"] == c], key=lambda d: -d["score"])[:per_class]]  # fmt: skip
    return dets


def _matches(gt, dets, cat, thr):
    """(scores, true positive flags, ignored flags, number of gt) of one category at one IoU threshold."""
    images = {i["id"]: i for i in gt["images"]}
    pos = {a["image_id"] for a in gt["annotations"] if a["category_id"] == cat}
    neg = {i for i, img in images.items() if cat in img.get("neg_category_ids", [])}
    scores, tps, ignored = [], [], []
    for img in sorted(pos | neg):
        gts = [a["bbox"] for a in gt["annotations"] if a["image_id"] == img and a["category_id"] == cat]
        mine = [d for d in dets if d["image_id"] == img and d["category_id"] == cat]
        mine.sort(key=lambda d: (-d["score"], d["order"]))
        used = set()
        for d in mine:
            best, best_iou = None, min(thr, 1 - 1e-10)
            for g, box in enumerate(gts):
                if g not in used and _iou(d["bbox"], box) >= best_iou:
                    best, best_iou = g, _iou(d["bbox"], box)
            if best is not None:
                used.add(best)
            scores.append(d["score"])
            tps.append(best is not None)
            ignored.append(best is None and cat in images[img].get("not_exhaustive_category_ids", []))
    n_gt = sum(1 for a in gt["annotations"] if a["category_id"] == cat)
    return scores, tps, ignored, n_gt


def _interpolated_ap(scores, tps, ignored, n_gt):
    order = np.argsort(-np.asarray(scores, float), kind="mergesort")
    keep = ~np.asarray(ignored, bool)[order] if order.size else np.zeros(0, bool)
    tp = np.asarray(tps, bool)[order][keep] if order.size else np.zeros(0, bool)
    tp_sum, fp_sum = np.cumsum(tp), np.cumsum(~tp)
    recall = tp_sum / n_gt
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(float).eps)
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    idx = np.searchsorted(recall, RECALLS, side="left")
    return np.mean([precision[i] if i < len(precision) else 0.0 for i in idx])


def reference_ap(gt, dets, *, per_image=None, per_class=None):
    """{category_id: AP} of LVIS's federated protocol, area range 'all', written from the definitions:
    optional cap per image (across categories) or per category (over the dataset), a detection counts
    only where its category is annotated positive or negative, greedy matching of score-sorted
    detections to the unmatched gt of highest IoU, unmatched detections ignored where the category is
    not exhaustive, 101-point interpolated precision averaged over IoU 0.50:0.95."""
    dets = _capped(dets, per_image, per_class)
    aps = {}
    for cat in sorted(c["id"] for c in gt["categories"]):
        per_thr = [_matches(gt, dets, cat, thr) for thr in IOUS]
        aps[cat] = -1.0 if per_thr[0][3] == 0 else float(np.mean([_interpolated_ap(*m) for m in per_thr]))
    return aps


def reference_pool_ap(gt, dets, *, per_class=10_000, group=None):
    """AP-pool: the same matches, one curve over the detections of all categories (of one frequency group).
    Score ties across categories keep category order, then image order (the pooled engine's order)."""
    dets = _capped(dets, per_class=per_class)
    cats = sorted(c["id"] for c in gt["categories"] if group is None or c["frequency"] == group)
    per_thr = []
    for thr in IOUS:
        pooled = [[], [], [], 0]
        for cat in cats:
            for k, part in enumerate(_matches(gt, dets, cat, thr)):
                pooled[k] = pooled[k] + part
        per_thr.append(_interpolated_ap(*pooled))
    return float(np.mean(per_thr))


def _check(gt, dets, protocol, **caps):
    got = lvis_metrics(gt, dets, "bbox", protocol=protocol, per_class=True, **caps)["per_class"]
    ref = reference_ap(
        gt, dets, per_image=caps.get("max_dets", 300) if protocol == "standard" else None,
        per_class=caps.get("dets_per_class", 10_000) if protocol == "fixed" else None,
    )  # fmt: skip
    assert got == pytest.approx(ref, abs=1e-9)
    return got


def test_ties_missing_classes_and_negative_categories_match_the_reference():
    gt = crafted_gt()
    dets = [
        det(1, 1, _square(10, 10), 0.8),  # TP, tied with the FP below ...
        det(2, 1, _square(5, 80), 0.8),  # ... FP in another image
        det(2, 1, _square(51, 50), 0.8),  # TP, same score again
        det(1, 2, _square(70, 70), 0.9),  # not evaluated: category 2 neither positive nor negative in image 1
        det(2, 3, _square(0, 0), 0.99),  # FP on a verified negative image
        det(2, 3, _square(30, 30), 0.99),  # a tie on that negative image
        det(3, 3, _square(0, 70), 0.3),  # unmatched, category 3 not exhaustive in image 3: ignored
    ]  # category 2's gt is never detected: AP 0; every class with gt has an AP
    for protocol in ("standard", "fixed"):
        got = _check(gt, dets, protocol)
        assert got[2] == 0.0 and got[3] == 0.0 and 0 < got[1] < 1


def test_the_10000_cap_per_class_and_no_cap_per_image():
    gt = crafted_gt()
    # 10,000 high-scoring FPs of category 1 on image 1 (> 300 in one image), then its two TPs
    junk = [det(1, 1, _square(60, 60, 10), 0.9 - i * 1e-6) for i in range(10_000)]
    tps = [det(1, 1, _square(10, 10), 0.5), det(2, 1, _square(50, 50), 0.4)]
    fixed = lvis_metrics(gt, junk + tps, "bbox", protocol="fixed", per_class=True)["per_class"]
    assert fixed[1] == 0.0  # both TPs fall beyond the class's 10,000
    wider = lvis_metrics(gt, junk + tps, "bbox", protocol="fixed", dets_per_class=10_002, per_class=True)["per_class"]
    # every TP kept, at recall 1 after 10,000 FPs: precision 2/10002 at recalls 0..1
    assert wider[1] == pytest.approx(2 / 10_002, rel=1e-6)
    standard = lvis_metrics(gt, junk + tps, "bbox", per_class=True)["per_class"]
    # the standard protocol keeps 300 of image 1's detections (the TP there is cut) and image 2's TP
    assert standard[1] == pytest.approx(np.mean([1 / 301 if r <= 0.5 else 0.0 for r in RECALLS]), rel=1e-6)
    assert len(top_k_per_class(junk + tps, 10_000)) == 10_000


def test_small_caps_match_the_reference():
    gt = crafted_gt()
    rng = np.random.default_rng(0)
    dets = [det(int(rng.integers(1, 4)), int(rng.integers(1, 4)),
                _square(*rng.integers(0, 80, 2), s=int(rng.integers(10, 40))), float(rng.random())) for _ in range(60)]  # fmt: skip
    dets += [det(1, 1, _square(10, 10), 0.7), det(2, 1, _square(50, 50), 0.2), det(3, 3, _square(60, 10), 0.6)]
    for caps in ({"max_dets": 7}, {"max_dets": 300}):
        _check(gt, dets, "standard", **caps)
    for caps in ({"dets_per_class": 5}, {"dets_per_class": 10_000}):
        _check(gt, dets, "fixed", **caps)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_fixed_equals_standard_under_both_caps(tiny_data, iou_type):
    """No image over 300 detections and no class over 10,000: AP-fixed and AP are the same numbers."""
    import json

    gt = json.loads((tiny_data / "annotations" / "lvis_v1_val.json").read_text())
    dets = _random_dets(gt, 1, with_masks=iou_type == "segm")
    standard = lvis_metrics(gt, dets, iou_type, per_class=True)
    fixed = lvis_metrics(gt, dets, iou_type, protocol="fixed", per_class=True)
    assert standard == fixed and standard["AP"] > 0


def test_evaluate_results_reads_other_tools_files_and_refuses_wrong_ones(tiny_data, tmp_path):
    """`crat-ft evaluate-results`: the metrics of a results file equal lvis_metrics'; wrong files get one line."""
    import json

    from conftest import run_cli

    ann = tiny_data / "annotations" / "lvis_v1_val.json"
    gt = json.loads(ann.read_text())
    dets = _random_dets(gt, 2, with_masks=True)  # detectron2 / lvis-api style: bbox and segmentation
    results = tmp_path / "lvis_instances_results.json"
    results.write_text(json.dumps(dets))
    r = run_cli("evaluate-results", ann, results, "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-2000:]
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["protocol"] == "standard" and sorted(written) == ["bbox", "protocol", "segm"]
    for iou in ("bbox", "segm"):
        assert written[iou] == pytest.approx(lvis_metrics(gt, dets, iou))
    assert f"{100 * written['segm']['APr']:7.1f}" in r.stdout.splitlines()[-2]
    # mmdet's outfile_prefix.bbox.json: boxes only, evaluated with AP-fixed
    bbox_only = tmp_path / "prefix.bbox.json"
    bbox_only.write_text(json.dumps([{k: v for k, v in d.items() if k != "segmentation"} for d in dets]))
    r = run_cli("evaluate-results", ann, bbox_only, "--protocol", "fixed", "--out", tmp_path / "f.json")
    assert r.returncode == 0 and "AP-fixed" in r.stdout, r.stderr[-2000:]
    fixed = json.loads((tmp_path / "f.json").read_text())
    r = run_cli("evaluate-results", ann, bbox_only, "--protocol", "pool", "--out", tmp_path / "p.json")
    assert r.returncode == 0 and "AP-pool" in r.stdout, r.stderr[-2000:]
    pool = json.loads((tmp_path / "p.json").read_text())
    assert pool["bbox"] == pytest.approx(lvis_metrics(gt, dets, "bbox", protocol="pool"))
    assert sorted(fixed) == ["bbox", "protocol"] and fixed["bbox"] == pytest.approx(written["bbox"])

    other = tmp_path / "other.json"
    other.write_text(json.dumps([dict(d, image_id=d["image_id"] + 10**6) for d in dets[:5]]))
    pickle_file = tmp_path / "results.pkl"
    pickle_file.write_bytes(b"\x80\x04N.")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    cases = [
        (other, "has image_id", "not in the ground truth; evaluate against the matching annotation file"),
        (ann, "is an annotation file (it has images and annotations), not results", ""),
        (pickle_file, "is a pickle (mmdet's --out); crat-ft reads JSON results", ""),
        (broken, "is not JSON", ""),
    ]
    for path, first, second in cases:
        r = run_cli("evaluate-results", ann, path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert first in r.stderr and second in r.stderr
    r = run_cli("evaluate-results", ann, bbox_only, "--iou-type", "segm")
    assert r.returncode == 2 and "lacks 'segmentation'" in r.stderr


def test_metric_spills_detections_to_disk_and_gathers_only_image_numbers(tiny_data, tmp_path):
    """CratLVISMetric keeps (process, image number) pairs in memory, the detections in spill files, and
    gives lvis_metrics' numbers on the same detections; images beyond the dataset size (a distributed
    sampler's padding) are left out."""
    import json

    import pycocotools.mask as mask_util
    import torch

    from crat_ft.evaluation.metric import CratLVISMetric

    ann = tiny_data / "annotations" / "lvis_v1_val.json"
    gt = json.loads(ann.read_text())
    dets = _random_dets(gt, 3, with_masks=True)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    spill = tmp_path / "spill"
    metric = CratLVISMetric(ann_file=str(ann), spill_dir=str(spill))
    samples = []
    for img in gt["images"]:
        mine = [d for d in dets if d["image_id"] == img["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(-1, 4)
        masks = np.stack([mask_util.decode(d["segmentation"]) for d in mine]) if mine else np.zeros((0, 1, 1))
        samples.append({"img_id": img["id"], "pred_instances": {
            "bboxes": boxes, "scores": torch.tensor([d["score"] for d in mine], dtype=torch.float64),
            "labels": torch.tensor([cat_ids.index(d["category_id"]) for d in mine], dtype=torch.long),
            "masks": torch.from_numpy(masks.astype(bool))}})  # fmt: skip
    metric.process({}, samples)
    metric.process({}, samples[:1])  # padding: the first image again, beyond the dataset size
    assert len(metric.results) == len(gt["images"]) + 1 and all(isinstance(r, tuple) for r in metric.results)
    metric._spiller().flush()
    run = Path(metric.run_dir)  # this evaluation's own directory in spill_dir, locked while it runs
    assert run.parent == spill and sorted(p.name for p in spill.iterdir()) == [run.name, f"{run.name}.lock"]
    assert sorted(p.name for p in run.iterdir()) == [f"part-{run.name[len('run-') :]}-rank0-00000"]
    result = metric.evaluate(len(gt["images"]))
    assert not list(spill.iterdir())  # removed after the evaluation
    for iou in ("bbox", "segm"):
        expected = lvis_metrics(gt, dets, iou)
        assert {k: result[f"lvis/{iou}_{k}"] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert metric.last_results["fixed"]["segm"] == pytest.approx(lvis_metrics(gt, dets, "segm", protocol="fixed"))


def test_ap_pool_matches_the_reference():
    """AP-pool pools every category's detections into one curve: an FP of one class with a high score
    costs every class; AP50 and the frequency groups pool the same way."""
    gt = crafted_gt()
    rng = np.random.default_rng(4)
    dets = [det(1, 1, _square(10, 10), 0.7), det(2, 1, _square(50, 50), 0.35), det(3, 2, _square(20, 60, 40), 0.6),
            det(3, 3, _square(60, 10), 0.3), det(2, 3, _square(0, 0), 0.95), det(3, 3, _square(0, 70), 0.9)]  # fmt: skip
    dets += [det(int(rng.integers(1, 4)), int(rng.integers(1, 4)),
                 _square(*rng.integers(0, 80, 2), s=int(rng.integers(10, 40))), float(rng.random())) for _ in range(25)]  # fmt: skip
    got = lvis_metrics(gt, dets, "bbox", protocol="pool")
    assert got["AP"] == pytest.approx(reference_pool_ap(gt, dets), abs=1e-9)
    for key, group in (("APr", "r"), ("APc", "c"), ("APf", "f")):
        assert got[key] == pytest.approx(reference_pool_ap(gt, dets, group=group), abs=1e-9)
    # with one category, pooling changes nothing: AP-pool of the frequent group is its AP-fixed
    fixed = lvis_metrics(gt, dets, "bbox", protocol="fixed")
    assert got["APf"] == pytest.approx(fixed["APf"], abs=1e-12)
    # pooled across classes, a confident FP of the rare class lowers the pool below the mean of the APs
    assert got["AP"] < fixed["AP"]
    with pytest.raises(UserError, match="AP-pool is one curve over all categories"):
        lvis_metrics(gt, dets, "bbox", protocol="pool", per_class=True)
