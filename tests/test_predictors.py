"""Detectors whose class-wise layers are mmdet's normalised predictors (Seesaw's NormedLinear / NormedConv2d)."""

import numpy as np
import pytest
import torch

from conftest import demo_config_path, extract_args, run_cli
from crat_ft.common.paths import demo_config

pytestmark = pytest.mark.slow

# Seesaw's LVIS configs on the demo detector: normalised classifier (C + 2 outputs) and mask predictor
SEESAW = """_base_ = '{base}'
model = dict(roi_head=dict(
    bbox_head=dict(
        cls_predictor_cfg=dict(type='NormedLinear', tempearture=20),
        loss_cls=dict(_delete_=True, type='SeesawLoss', p=0.8, q=2.0, num_classes=40, loss_weight=1.0)),
    mask_head=dict(predictor_cfg=dict(type='NormedConv2d', tempearture=20))))
"""


def _random_detector(config, path):
    from mmdet.registry import MODELS

    from crat_ft.engine.config import load_config
    from crat_ft.heads.registry import register_all

    register_all()
    torch.manual_seed(0)
    model = MODELS.build(load_config(config).model)  # random weights; nothing is downloaded
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return model


def test_seesaw_normed_predictors_retrain_the_function_the_exported_detector_computes(tiny_data, tmp_path):
    from mmdet.apis import init_detector

    from crat_ft.cache import RoIReader
    from crat_ft.engine.checkpoint import allow_mmengine_pickles
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.pipeline.retrain_builders import build_heads

    config = tmp_path / "seesaw_normed.py"
    config.write_text(SEESAW.format(base=demo_config_path()))
    detector = _random_detector(config, tmp_path / "seesaw.pth")
    assert type(detector.roi_head.bbox_head.fc_cls).__name__ == "NormedLinear"
    assert type(detector.roi_head.mask_head.conv_logits).__name__ == "NormedConv2d"
    cache = tmp_path / "cache"
    args = ["extract-features", config, tmp_path / "seesaw.pth", "--data-root", tiny_data, "--max-images", 6]
    r = run_cli(*args, "--out", cache, "--mask-pos-per-class", 400)
    assert r.returncode == 0, r.stderr[-3000:]
    # the plain demo config builds a 41-wide softmax classifier: one line, not a traceback
    r = run_cli(*extract_args(tmp_path / "seesaw.pth", tiny_data), "--out", tmp_path / "c2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "roi_head.bbox_head.fc_cls.weight has shape (42, 256) in the checkpoint but (41, 256)" in r.stderr
    work = tmp_path / "heads"
    options = ["detector.config=" + str(config), "heads.loss_cls.type=SeesawLoss", "train.max_iters=4", "train.milestones=[]",
               "train.checkpoint_interval=4", "train.warmup_iters=1", "sampler.rois_per_batch=64",
               "sampler.masks_per_batch=8", "crat.mask_weights=mask"]  # fmt: skip
    r = run_cli("retrain-heads", demo_config("crat_synthetic.py"), "--cache", cache, "--work-dir", work,
                "--cfg-options", *options)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "merged.pth"
    r = run_cli("export", config, tmp_path / "seesaw.pth", work / "heads.pth", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]

    # the retrained heads, as retrain-heads builds them, are mmdet's normalised layers ...
    reader = RoIReader(cache / "index.h5")
    ft = load_ft_config(demo_config("crat_synthetic.py"), options)
    det_state = torch.load(tmp_path / "seesaw.pth", weights_only=True)["state_dict"]
    from crat_ft.engine.config import load_config

    heads = build_heads(ft, reader, load_config(config), det_state)
    heads.load_state_dict(torch.load(work / "heads.pth", weights_only=True)["state_dict"])
    assert type(heads.fc_cls).__name__ == "NormedLinear" and type(heads.conv_logits).__name__ == "NormedConv2d"
    # ... and on the same cached features they compute what the exported detector's mmdet heads compute
    allow_mmengine_pickles()
    model = init_detector(str(out.with_suffix(".py")) if out.with_suffix(".py").exists() else str(config), str(out),
                          device="cpu")  # fmt: skip
    rois = reader.read_rois(np.arange(32))
    masks = reader.read_masks(np.arange(min(8, len(reader.mask_roi))))
    x = torch.from_numpy(rois["box_feat"]).float()
    mx = torch.from_numpy(masks["mask_feat"]).float()
    with torch.no_grad():
        ours = heads.predict(x, mx)
        torch.testing.assert_close(ours["cls_score"], model.roi_head.bbox_head.fc_cls(x))
        torch.testing.assert_close(ours["bbox_pred"], model.roi_head.bbox_head.fc_reg(x))
        torch.testing.assert_close(ours["mask_logits"], model.roi_head.mask_head.conv_logits(mx))
    # the mask Fisher statistics came from the normalised layer's per-sample gradients
    stats = torch.load(work / "heads.pth", weights_only=True)["state_dict"]
    assert (
        stats["mask_stats.seen"].sum() > 0 and (stats["mask_stats.fisher"][stats["mask_stats.seen"]].sum(1) > 0).all()
    )
    before = det_state["roi_head.mask_head.conv_logits.weight"]
    assert not torch.equal(model.roi_head.mask_head.conv_logits.weight, before)  # it was retrained


def test_unsupported_predictors_are_refused_before_extraction(tiny_data, tmp_path):
    config = tmp_path / "normed_reg.py"
    config.write_text(
        f"_base_ = '{demo_config_path()}'\n"
        "model = dict(roi_head=dict(bbox_head=dict(reg_predictor_cfg=dict(type='NormedLinear', tempearture=20))))\n"
    )
    _random_detector(config, tmp_path / "d.pth")
    r = run_cli("extract-features", config, tmp_path / "d.pth", "--data-root", tiny_data, "--out", tmp_path / "c")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert (
        "the box regressor is built as 'NormedLinear'; crat-ft retrains a box regressor of type Linear exactly "
        "and refuses others rather than retrain a different function" in r.stderr
    )
    assert not list((tmp_path / "c").rglob("*.h5"))


FASTER_RCNN = """_base_ = '{base}'
model = dict(roi_head=dict(mask_roi_extractor=None, mask_head=None))
test_evaluator = dict(metric=['bbox'])
"""


def test_box_only_detector_extracts_retrains_exports_and_evaluates(tiny_data, tmp_path):
    """A Faster R-CNN (the demo Mask R-CNN without its mask branch): classifier and box regressor with CRAT."""
    config = tmp_path / "faster_rcnn.py"
    config.write_text(FASTER_RCNN.format(base=demo_config_path()))
    detector = _random_detector(config, tmp_path / "faster.pth")
    assert not detector.roi_head.with_mask
    cache = tmp_path / "cache"
    r = run_cli("extract-features", config, tmp_path / "faster.pth", "--data-root", tiny_data, "--out", cache,
                "--max-images", 6)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "heads"
    r = run_cli("retrain-heads", demo_config("crat_synthetic.py"), "--cache", cache, "--work-dir", work,
                "--cfg-options", "detector.config=" + str(config), "train.max_iters=4", "train.milestones=[]",
                "train.checkpoint_interval=4", "train.warmup_iters=1", "sampler.rois_per_batch=64",
                "crat.mask_weights=mask")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    heads = torch.load(work / "heads.pth", weights_only=True)["state_dict"]
    assert "conv_logits.weight" not in heads and heads["box_stats.seen"].sum() > 0
    out = tmp_path / "merged.pth"
    r = run_cli("export", config, tmp_path / "faster.pth", work / "heads.pth", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = torch.load(out, weights_only=True)["state_dict"]
    torch.testing.assert_close(merged["roi_head.bbox_head.fc_reg.weight"], heads["fc_reg.weight"])
    r = run_cli("evaluate", config, out, "--data-root", tiny_data, "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (
        list(metrics) == ["bbox", "fixed", "matches"]
        and list(metrics["matches"]) == ["bbox"]
        and list(metrics["fixed"]) == ["bbox"]
        and 0.0 <= metrics["bbox"]["AP"] <= 100.0
    )


def test_mmdet2_format_checkpoint_extracts_the_same_cache(tiny_data, tiny_detector, tiny_cache, tmp_path):
    """mmdet 2.x model-zoo checkpoints: meta with CLASSES, mmdet_version 2.x and the config text, no message hub."""
    from test_extract import _assert_same, _tables

    ckpt = torch.load(tiny_detector, weights_only=True)
    classes = tuple(ckpt["meta"]["dataset_meta"]["classes"])
    old = {
        "meta": {"CLASSES": classes, "mmdet_version": "2.28.2", "config": "model = dict(...)", "epoch": 12, "iter": 4},
        "state_dict": ckpt["state_dict"],
    }
    torch.save(old, tmp_path / "mmdet2.pth")
    out = tmp_path / "cache"
    r = run_cli(*extract_args(tmp_path / "mmdet2.pth", tiny_data), "--out", out, "--max-images", 12,
                "--segment-images", 4, "--mask-pos-per-class", 400)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(_tables(tiny_cache), _tables(out / "index.h5"))


def test_checkpoint_trained_on_other_classes_is_refused(tiny_data, tiny_detector, tmp_path):
    """A checkpoint whose recorded class names (mmdet 2.x CLASSES) differ from the dataset's, with the same count:
    every label would mean another class, so extraction and evaluation refuse it in one line."""
    ckpt = torch.load(tiny_detector, weights_only=True)
    classes = list(ckpt["meta"]["dataset_meta"]["classes"])
    classes[3], classes[7] = classes[7], classes[3]
    torch.save({"meta": {"CLASSES": tuple(classes), "mmdet_version": "2.28.2"}, "state_dict": ckpt["state_dict"]},
               tmp_path / "swapped.pth")  # fmt: skip
    expected = f"class 3 is {classes[3]!r} in the checkpoint and {classes[7]!r} in the annotation file"
    r = run_cli(*extract_args(tmp_path / "swapped.pth", tiny_data), "--out", tmp_path / "c")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "c").rglob("*.h5"))
    r = run_cli("evaluate", demo_config_path(), tmp_path / "swapped.pth", "--data-root", tiny_data, "--out",
                tmp_path / "m.json")  # fmt: skip
    assert r.returncode == 2 and expected in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model = dict(roi_head=dict(bbox_head=dict(reg_class_agnostic=True), mask_roi_extractor=None, "
            "mask_head=None))",
            "uses class-agnostic regression (reg_class_agnostic=True) and the detector has no mask head, so it has no "
            "class-wise box or mask layer for CRAT",
        ),
        (
            "model = dict(roi_head=dict(type='PISARoIHead'))",
            "PISARoIHead runs its heads its own way, which crat-ft does not reproduce; crat-ft supports StandardRoIHead "
            "or CascadeRoIHead",
        ),
    ],
)
def test_unsupported_detector_parts_are_refused_in_one_line(override, message, tiny_data, tmp_path):
    config = tmp_path / "unsupported.py"
    config.write_text(f"_base_ = '{demo_config_path()}'\n{override}\n")
    _random_detector(config, tmp_path / "d.pth")
    r = run_cli("extract-features", config, tmp_path / "d.pth", "--data-root", tiny_data, "--out", tmp_path / "c")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert message in r.stderr
    assert not list((tmp_path / "c").rglob("*.h5"))
