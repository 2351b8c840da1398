"""lvis_metrics: hand-computed cases, lvis-api equality, bad input."""

import copy
import json

import numpy as np
import pytest

from crat_ft.common.errors import UserError
from crat_ft.common.lvis_json import load_lvis_json
from crat_ft.evaluation.lvis import METRIC_KEYS, lvis_metrics, top_k_per_image

# AP of one class with detections TP, FP, TP (scores descending) over 2 gts:
# interpolated precision 1 up to recall 0.5 (51 of 101 points), 2/3 after (50 points)
AP_TP_FP_TP = (51 * 1.0 + 50 * 2 / 3) / 101


def _square(x, y, s=20):
    return [float(x), float(y), float(s), float(s)]


def _poly(b):
    x, y, w, h = b
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def crafted_gt():
    """3 images; cat 1 (frequent) in images 1 and 2, cat 2 (common) and cat 3 (rare) in image 3."""
    cats = [
        {"id": 1, "name": "a", "frequency": "f", "image_count": 200, "instance_count": 300},
        {"id": 2, "name": "b", "frequency": "c", "image_count": 50, "instance_count": 60},
        {"id": 3, "name": "c", "frequency": "r", "image_count": 3, "instance_count": 3},
    ]
    images = [
        {
            "id": 1,
            "height": 100,
            "width": 100,
            "coco_url": "x/1.png",
            "neg_category_ids": [3],
            "not_exhaustive_category_ids": [],
        },
        {
            "id": 2,
            "height": 100,
            "width": 100,
            "coco_url": "x/2.png",
            "neg_category_ids": [2, 3],
            "not_exhaustive_category_ids": [],
        },
        {
            "id": 3,
            "height": 100,
            "width": 100,
            "coco_url": "x/3.png",
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [3],
        },
    ]
    boxes = [(1, 1, _square(10, 10)), (2, 2, _square(50, 50)), (3, 3, _square(20, 60, 40)), (4, 3, _square(60, 10))]
    anns = []
    for aid, img, b in boxes:
        cat = {1: 1, 2: 1, 3: 2, 4: 3}[aid]
        anns.append(
            {"id": aid, "image_id": img, "category_id": cat, "bbox": b, "area": b[2] * b[3], "segmentation": _poly(b)}
        )
    return {"images": images, "annotations": anns, "categories": cats}


def det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


def test_hand_computed_ap_with_federated_rules():
    gt = crafted_gt()
    dets = [
        det(1, 1, _square(10, 10), 0.9),  # TP
        det(2, 1, _square(5, 80), 0.8),  # FP: cat 1 is positive in image 2
        det(2, 1, _square(50, 50), 0.7),  # TP
        det(1, 2, _square(70, 70), 0.95),  # ignored: cat 2 neither positive nor negative in image 1
        det(3, 2, _square(20, 60, 40), 0.6),  # TP for cat 2
        det(2, 3, _square(0, 0), 0.99),  # FP: cat 3 is verified negative in image 2 ...
        det(3, 3, _square(60, 10), 0.5),  # ... which ranks above this TP
        det(3, 3, _square(0, 70), 0.4),  # unmatched but cat 3 not exhaustive in image 3: ignored
    ]
    m = lvis_metrics(gt, dets, "bbox")
    ap_rare = (0 * 1 + 101 * 0.5) / 101  # FP then TP: precision 1/2 at every recall
    assert m["APf"] == pytest.approx(AP_TP_FP_TP, abs=1e-9)
    assert m["APc"] == pytest.approx(1.0, abs=1e-9)
    assert m["APr"] == pytest.approx(ap_rare, abs=1e-9)
    assert m["AP"] == pytest.approx((AP_TP_FP_TP + 1.0 + ap_rare) / 3, abs=1e-9)
    assert m["AP50"] == pytest.approx(m["AP"], abs=1e-9)
    assert m["APl"] == -1.0  # no gt above 96^2 area
    assert set(m) == set(METRIC_KEYS)


def test_inputs_not_mutated_and_chunking_is_exact():
    gt = crafted_gt()
    dets = [det(1, 1, _square(11, 10), 0.9), det(2, 1, _square(52, 49), 0.7), det(3, 2, _square(22, 60, 38), 0.6)]
    gt0, dets0 = copy.deepcopy(gt), copy.deepcopy(dets)
    a = lvis_metrics(gt, dets, "bbox", per_class=True)
    b = lvis_metrics(gt, dets, "bbox", per_class=True, cat_chunk_size=1)
    assert a == b
    assert gt == gt0 and dets == dets0
    assert a["per_class"][3] == 0.0 and a["APr"] == 0.0  # rare class never detected


def test_top_300_per_image_across_categories():
    gt = crafted_gt()
    junk = [det(1, 3, _square(80, 80, 5), 0.99) for _ in range(300)]  # cat 3 is negative in image 1
    tp = det(1, 1, _square(10, 10), 0.5)
    m300 = lvis_metrics(gt, junk + [tp], "bbox", max_dets=300, per_class=True)
    m301 = lvis_metrics(gt, junk + [tp], "bbox", max_dets=301, per_class=True)
    assert m300["per_class"][1] == 0.0  # the TP is the 301st detection of image 1: cut
    assert m301["per_class"][1] == pytest.approx((51 * 1.0 + 50 * 0.0) / 101)  # 1 of 2 gts found
    assert len(top_k_per_image(junk + [tp], 300)) == 300


def _random_dets(gt, seed, with_masks):
    import pycocotools.mask as mask_util

    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    out = []
    for a in gt["annotations"]:
        for k in range(3):
            x, y, w, h = a["bbox"]
            b = [x + rng.normal(0, 2), y + rng.normal(0, 2), w * (1 + rng.normal(0, 0.1)), h * (1 + rng.normal(0, 0.1))]
            cat = a["category_id"] if k == 0 or rng.random() < 0.5 else int(rng.choice(cats))
            d = det(a["image_id"], cat, [float(v) for v in b], float(rng.random()))
            if with_masks:
                img = next(i for i in gt["images"] if i["id"] == a["image_id"])
                rle = mask_util.merge(mask_util.frPyObjects(_poly(b), img["height"], img["width"]))
                rle["counts"] = rle["counts"].decode()
                d["segmentation"] = rle
            out.append(d)
    return out


@pytest.mark.parametrize("iou_type, boxes", [("bbox", True), ("segm", True), ("segm", False)])
def test_equals_lvis_api(tiny_data, iou_type, boxes, monkeypatch):
    """Same numbers as lvis-api's LVISEval on the same detections (neg and not-exhaustive lists included);
    segm results without boxes take their area from the mask, as lvis-api does."""
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis-api 0.5.3 still uses np.float
    from lvis import LVIS, LVISEval, LVISResults

    ann = tiny_data / "annotations/lvis_v1_val.json"
    gt = json.loads(ann.read_text())
    # make the federated lists matter: one not-exhaustive category per image
    for img in gt["images"]:
        present = sorted({a["category_id"] for a in gt["annotations"] if a["image_id"] == img["id"]})
        img["not_exhaustive_category_ids"] = present[:1]
    path = ann.parent / "lvis_v1_val_ne.json"
    path.write_text(json.dumps(gt))
    dets = _random_dets(gt, 0, with_masks=True)
    if not boxes:
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    mine = lvis_metrics(path, dets, iou_type, max_dets=4)
    lvis_gt = LVIS(str(path))
    ref = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(dets), max_dets=4), iou_type)
    ref.run()
    for key in METRIC_KEYS:
        assert mine[key] == pytest.approx(ref.results[key], abs=1e-4), key
    assert mine["AP"] > 0.05


def test_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"bad\.json is not valid JSON"):
        load_lvis_json(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_lvis_json(tmp_path / "missing.json")
    gt = crafted_gt()
    del gt["images"][0]["neg_category_ids"]
    with pytest.raises(UserError, match=r"images\[0\] lacks 'neg_category_ids'"):
        lvis_metrics(gt, [], "bbox")
    gt = crafted_gt()
    with pytest.raises(UserError, match="category_id 9 not in the ground truth"):
        lvis_metrics(gt, [det(1, 9, _square(1, 1), 0.5)], "bbox")
    with pytest.raises(UserError, match="iou_type: expected one of"):
        lvis_metrics(gt, [], "keypoints")
