import hashlib
import json

import numpy as np
import pytest

from crat_ft.common.errors import UserError
from crat_ft.synthetic.dataset import make_demo_data
from crat_ft.synthetic.render import class_geometries
from crat_ft.synthetic.variants import (
    FAMILIES,
    DemoDataSpec,
    class_layout,
    class_names,
    frequency_group,
    train_image_counts,
)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_size_has_all_lvis_frequency_groups():
    counts = train_image_counts(40, 800)
    groups = [frequency_group(c) for c in counts]
    assert groups.count("f") == 11 and groups.count("c") == 16 and groups.count("r") == 13
    assert counts[0] == 400 and counts[-1] == 2
    assert all(a >= b for a, b in zip(counts, counts[1:]))


@pytest.mark.parametrize("variant", ["families", "colour-shapes"])
def test_every_family_and_marking_spans_frequency_groups(variant):
    layout = class_layout(40, variant)
    assert len(set(layout)) == 40 and len(set(class_names(40, variant))) == 40
    families, markings = {f for f, _ in layout}, {m for _, m in layout}
    assert len(families) == 8 and len(markings) == 5
    counts = train_image_counts(40, 800)
    for axis, values in ((0, families), (1, markings)):
        for value in values:
            groups = {frequency_group(c) for fm, c in zip(layout, counts) if fm[axis] == value}
            assert groups == {"r", "c", "f"}, value
    for n in (7, 20, 64):
        assert len(set(class_names(n, variant))) == n
    assert class_names(2, "colour-shapes") == ["red_circle", "red_square"]
    assert class_names(2) == ["alpha_striped", "beta_striped"]


def test_sharing_knob_blends_family_and_own_geometry():
    layout = class_layout(40)
    g0, g5, g1 = (class_geometries(40, seed=4, sharing=s) for s in (0.0, 0.5, 1.0))
    fam = [k for k, (f, _) in enumerate(layout) if f == "gamma"]
    assert len(fam) == 5
    # s = 1: every member of a family has the family's geometry; families differ
    for k in fam[1:]:
        np.testing.assert_array_equal(g1[k].harmonics, g1[fam[0]].harmonics)
        np.testing.assert_array_equal(g1[k].appendage, g1[fam[0]].appendage)
        assert g1[k].log_aspect == g1[fam[0]].log_aspect
    assert not np.allclose(g1[0].harmonics, g1[1].harmonics)
    # s = 0: each class its own; s = 0.5: half way, parameter by parameter
    assert not np.allclose(g0[fam[0]].harmonics, g0[fam[1]].harmonics)
    for k in range(40):
        np.testing.assert_allclose(g5[k].harmonics, (g0[k].harmonics + g1[k].harmonics) / 2)
        np.testing.assert_allclose(g5[k].appendage, (g0[k].appendage + g1[k].appendage) / 2)
        assert g5[k].log_aspect == pytest.approx((g0[k].log_aspect + g1[k].log_aspect) / 2)
    # the draws depend on the seed only
    assert np.array_equal(class_geometries(40, seed=4, sharing=0.0)[7].harmonics, g0[7].harmonics)
    assert not np.allclose(class_geometries(40, seed=5, sharing=0.0)[7].harmonics, g0[7].harmonics)


def test_families_data_records_variant_family_and_sharing(tmp_path):
    spec = DemoDataSpec(seed=2, train_images=12, val_images=4, classes=16, sharing=1.0)
    doc = json.loads(
        (make_demo_data(tmp_path / "d", spec, progress=False) / "annotations/lvis_v1_val.json").read_text()
    )
    assert doc["info"]["variant"] == "families" and doc["info"]["sharing"] == 1.0
    assert [c["family"] for c in doc["categories"]] == [FAMILIES[k % 8] for k in range(16)]
    assert doc["categories"][0]["name"] == "alpha_striped"
    # per-instance appearance: objects of one class do not share a colour
    import cv2

    colours = {}
    for ann in (
        doc["annotations"] + json.loads((tmp_path / "d/annotations/lvis_v1_train.json").read_text())["annotations"]
    ):
        folder = "val2017" if ann["image_id"] > 100_000 else "train2017"
        img = cv2.imread(str(tmp_path / "d" / folder / f"{ann['image_id']:012d}.png")).astype(float)
        mask = np.zeros(img.shape[:2], np.uint8)
        for poly in ann["segmentation"]:
            cv2.fillPoly(mask, [np.round(np.array(poly).reshape(-1, 2)).astype(np.int32)], 1)
        colours.setdefault(ann["category_id"], []).append(np.median(img[mask.astype(bool)], 0))
    # the spread (max - min over instances) of a class's median colour, in the channel where it is largest
    spread = [np.ptp(np.array(c), 0).max() for c in colours.values() if len(c) >= 3]
    assert len(spread) >= 3 and np.median(spread) > 60 and min(spread) > 15, spread
    shapes_doc = make_demo_data(
        tmp_path / "cs",
        DemoDataSpec(seed=2, train_images=12, val_images=4, classes=16, variant="colour-shapes"),
        progress=False,
    )
    info = json.loads((shapes_doc / "annotations/lvis_v1_val.json").read_text())
    assert info["info"]["variant"] == "colour-shapes" and info["info"]["sharing"] is None
    assert info["categories"][1]["family"] == "square"


def test_same_seed_same_bytes(tmp_path):
    spec = DemoDataSpec(seed=7, train_images=12, val_images=4, classes=6)
    a = make_demo_data(tmp_path / "a", spec, progress=False)
    b = make_demo_data(tmp_path / "b", spec, progress=False)
    c = make_demo_data(tmp_path / "c", DemoDataSpec(seed=8, train_images=12, val_images=4, classes=6), progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    d = make_demo_data(
        tmp_path / "d", DemoDataSpec(seed=7, train_images=12, val_images=4, classes=6, sharing=1.0), progress=False
    )
    assert _digest(d) != _digest(a)


def test_lvis_layout_and_statistics(tiny_data):
    train = json.loads((tiny_data / "annotations/lvis_v1_train.json").read_text())
    val = json.loads((tiny_data / "annotations/lvis_v1_val.json").read_text())
    assert len(train["images"]) == 40 and len(val["images"]) == 10
    for img in train["images"] + val["images"]:
        rel = img["coco_url"].replace("http://images.cocodataset.org/", "")
        assert (tiny_data / rel).is_file()
        assert rel.startswith("train2017/") or rel.startswith("val2017/")
        present = {a["category_id"] for a in train["annotations"] + val["annotations"] if a["image_id"] == img["id"]}
        assert not present & set(img["neg_category_ids"])
        assert set(img["not_exhaustive_category_ids"]) <= present
    # image_count / instance_count / frequency are those of the train split as written
    for cat in train["categories"]:
        anns = [a for a in train["annotations"] if a["category_id"] == cat["id"]]
        assert cat["instance_count"] == len(anns)
        assert cat["image_count"] == len({a["image_id"] for a in anns})
        assert cat["frequency"] == frequency_group(cat["image_count"])
    assert val["categories"] == train["categories"]
    # masks: polygons inside the box; area equals the rasterised visible mask
    ann = train["annotations"][0]
    x, y, w, h = ann["bbox"]
    poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
    assert poly[:, 0].min() >= x and poly[:, 0].max() <= x + w
    assert 30 <= ann["area"] <= w * h


def test_val_is_class_balanced(tiny_data):
    val = json.loads((tiny_data / "annotations/lvis_v1_val.json").read_text())
    per_class = np.bincount([a["category_id"] for a in val["annotations"]], minlength=41)[1:]
    # 30 objects cycled over 40 classes, minus a few heavily occluded ones
    assert per_class.max() <= 1 and per_class.sum() >= 25


def test_loaded_by_mmdet_lvis_dataset(tiny_data):
    from mmdet.datasets import LVISV1Dataset

    ds = LVISV1Dataset(
        data_root=str(tiny_data) + "/",
        ann_file="annotations/lvis_v1_train.json",
        data_prefix=dict(img=""),
        pipeline=[],
        metainfo=dict(classes=tuple(class_names(40))),
    )
    item = ds[0]
    assert item["img_path"].endswith(".png") and (tiny_data / "train2017").as_posix() in item["img_path"]
    assert all(0 <= inst["bbox_label"] < 40 for inst in item["instances"])


def test_bad_sizes_and_existing_output(tmp_path):
    with pytest.raises(UserError, match=r"--classes: expected 2\.\.64, got 65"):
        make_demo_data(tmp_path / "x", DemoDataSpec(classes=65), progress=False)
    with pytest.raises(UserError, match=r"^--sharing: expected a value in \[0, 1\], got 1.5$"):
        make_demo_data(tmp_path / "x", DemoDataSpec(sharing=1.5), progress=False)
    with pytest.raises(UserError, match=r"^--variant: expected one of families, colour-shapes, got 'shapes'$"):
        make_demo_data(tmp_path / "x", DemoDataSpec(variant="shapes"), progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserError, match="already exists and is not empty"):
        make_demo_data(tmp_path / "full", DemoDataSpec(train_images=4, val_images=1, classes=3), progress=False)
    # nothing half-written left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_demo_refuses_data_made_with_another_sharing(tmp_path):
    from crat_ft.pipeline.demo import run_demo

    make_demo_data(
        tmp_path / "work" / "data", DemoDataSpec(seed=0, train_images=4, val_images=2, classes=4), progress=False
    )
    with pytest.raises(
        UserError,
        match=r"holds the families data \(sharing 0\.5\), not families \(sharing 1\.0\); pass another --work-dir",
    ):
        run_demo(tmp_path / "work", sharing=1.0)
    with pytest.raises(UserError, match=r"not colour-shapes \(sharing None\)"):
        run_demo(tmp_path / "work", variant="colour-shapes")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["data", "demo.log"]
