"""Random LVIS-format ground truth and detections for the analysis tests (no model involved)."""

import numpy as np

H, W = 64, 80


def _mask_rle(box):
    from faster_coco_eval.core import mask as mask_api

    x, y, w, h = box
    m = np.zeros((H, W), np.uint8, order="F")
    m[int(max(0, y)) : int(y + h), int(max(0, x)) : int(x + w)] = 1
    rle = mask_api.encode(np.asfortranarray(m))
    counts = rle["counts"]
    return {"size": [H, W], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def make_split(seed=0, n_img=60, classes=8, jitter=3.0, exhaustive=False, masks=False, models=1):
    """``(gt, [dets per model])``: each image has 0-4 instances; each model detects an instance with a
    jittered box (the right class 70% of the time) and adds background boxes. ``models`` > 1 share the
    images; model k jitters with ``jitter * (1 + 0.5 * k)``. Frequency groups cycle r, c, f."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c + 1, "name": f"c{c}", "frequency": "rcf"[c % 3], "image_count": 1, "instance_count": 1}
            for c in range(classes)]  # fmt: skip
    images, anns = [], []
    dets = [[] for _ in range(models)]
    for i in range(1, n_img + 1):
        pos = set()
        for _ in range(rng.integers(0, 5)):
            c = int(rng.integers(1, classes + 1))
            pos.add(c)
            box = [rng.uniform(0, 40), rng.uniform(0, 30), rng.uniform(8, 35), rng.uniform(8, 30)]
            x, y, w, h = box
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": box, "area": w * h,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})  # fmt: skip
            for k in range(models):
                for _ in range(rng.integers(0, 3)):
                    cc = c if rng.random() < 0.7 else int(rng.integers(1, classes + 1))
                    j = rng.normal(0, jitter * (1 + 0.5 * k), 4)
                    b = [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]
                    dets[k].append({"image_id": i, "category_id": cc, "score": float(rng.random()), "bbox": b})
        for k in range(models):
            for _ in range(rng.integers(0, 4)):
                b = [float(v) for v in (rng.uniform(0, 50), rng.uniform(0, 40), rng.uniform(5, 25), rng.uniform(5, 25))]
                dets[k].append({"image_id": i, "category_id": int(rng.integers(1, classes + 1)),
                                "score": float(rng.random() * 0.5), "bbox": b})  # fmt: skip
        others = [c for c in range(1, classes + 1) if c not in pos]
        if exhaustive:
            neg, nel = others, []
        else:
            neg = [int(c) for c in rng.choice(others, size=min(len(others), 3), replace=False)]
            nel = sorted(c for c in pos if rng.random() < 0.3)
        images.append({"id": i, "height": H, "width": W, "coco_url": f"x/{i}.png", "neg_category_ids": neg,
                       "not_exhaustive_category_ids": nel})  # fmt: skip
    if masks:
        for model in dets:
            for d in model:
                d["segmentation"] = _mask_rle(d["bbox"])
    return {"images": images, "annotations": anns, "categories": cats}, dets


def resampled_split(gt, dets, counts, image_ids):
    """The split with image ``image_ids[k]`` repeated ``counts[k]`` times under new ids (brute-force bootstrap)."""
    anns_of, dets_of = {}, {}
    for a in gt["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    for d in dets:
        dets_of.setdefault(d["image_id"], []).append(d)
    by_id = {i["id"]: i for i in gt["images"]}
    images, anns, out = [], [], []
    for img_id, k in zip(np.asarray(image_ids).tolist(), np.asarray(counts).tolist()):
        for _ in range(k):
            new = len(images) + 1
            images.append(dict(by_id[img_id], id=new))
            anns += [dict(a, id=len(anns) + 1 + n, image_id=new) for n, a in enumerate(anns_of.get(img_id, []))]
            out += [dict(d, image_id=new) for d in dets_of.get(img_id, [])]
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out
