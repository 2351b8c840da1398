import hashlib
import json

import numpy as np
import pytest

from crat_ft.errors import UserError
from crat_ft.synthetic import DemoDataSpec, class_names, frequency_group, make_demo_data, train_image_counts


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


def test_every_shape_and_colour_spans_frequency_groups():
    names = class_names(40)
    assert len(set(names)) == 40
    shapes = {n.split("_", 1)[1] for n in names}
    colours = {n.split("_", 1)[0] for n in names}
    assert len(shapes) == 8 and len(colours) == 5
    counts = train_image_counts(40, 800)
    for shape in shapes:
        groups = {frequency_group(c) for n, c in zip(names, counts) if n.endswith("_" + shape)}
        assert groups == {"r", "c", "f"}, shape
    for colour in colours:
        groups = {frequency_group(c) for n, c in zip(names, counts) if n.startswith(colour + "_")}
        assert groups == {"r", "c", "f"}, colour
    for n in (7, 20, 64):
        assert len(set(class_names(n))) == n


def test_same_seed_same_bytes(tmp_path):
    spec = DemoDataSpec(seed=7, train_images=12, val_images=4, classes=6)
    a = make_demo_data(tmp_path / "a", spec, progress=False)
    b = make_demo_data(tmp_path / "b", spec, progress=False)
    c = make_demo_data(tmp_path / "c", DemoDataSpec(seed=8, train_images=12, val_images=4, classes=6), progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


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
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserError, match="already exists and is not empty"):
        make_demo_data(tmp_path / "full", DemoDataSpec(train_images=4, val_images=1, classes=3), progress=False)
    # nothing half-written left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
