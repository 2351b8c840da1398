"""Every checkpoint family of mmdet's LVIS model zoo, built from mmdet's own config files.

Each detector is built with random weights (nothing is downloaded) and
``num_classes`` set to the tiny data's 40; it is extracted, retrained a few
iterations and exported through the CLI. On the cached features, the heads
crat-ft retrained must compute exactly what the exported detector's mmdet
heads compute, stage by stage, and differ from what the original computed.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from crat_ft.common.paths import demo_config

pytestmark = pytest.mark.slow

NUM_CLASSES = 40
LVIS_R50 = "lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py"
FAMILIES = {
    "mask-rcnn": LVIS_R50,
    "seesaw": "seesaw_loss/mask-rcnn_r50_fpn_seesaw-loss_sample1e-3-ms-2x_lvis-v1.py",
    "seesaw-normed-mask": "seesaw_loss/mask-rcnn_r50_fpn_seesaw-loss-normed-mask_sample1e-3-ms-2x_lvis-v1.py",
    "cascade-seesaw-normed-mask": (
        "seesaw_loss/cascade-mask-rcnn_r101_fpn_seesaw-loss-normed-mask_sample1e-3-ms-2x_lvis-v1.py"
    ),
    "faster-rcnn": LVIS_R50,  # mmdet's LVIS Mask R-CNN with its mask branch removed
}


def _mmdet_config(family: str, tmp_path: Path) -> Path:
    """mmdet's config of ``family`` with 40 classes (every stage, every loss that counts them), dumped to a file."""
    import mmdet
    from mmengine.config import Config

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / FAMILIES[family]
    if not path.is_file():
        pytest.skip("mmdet's packaged configs are not installed")
    cfg = Config.fromfile(str(path))
    roi = cfg.model.roi_head
    for key in ("bbox_head", "mask_head"):
        heads = roi.get(key)
        for head in heads if isinstance(heads, list) else [heads] if heads else []:
            head.num_classes = NUM_CLASSES
            if "num_classes" in head.get("loss_cls", {}):
                head.loss_cls.num_classes = NUM_CLASSES
    if family == "faster-rcnn":
        roi.mask_roi_extractor = None
        roi.mask_head = None
    dataset = cfg.train_dataloader.dataset
    for step in dataset.get("dataset", dataset).pipeline:  # the demo's 128-pixel images, not mmdet's 640-800
        if step.type == "RandomChoiceResize":
            step.scales = [(1333, 160)]
    out = tmp_path / f"{family}.py"
    cfg.dump(str(out))
    return out


def _random_checkpoint(config: Path, path: Path) -> dict:
    from mmdet.registry import MODELS

    from crat_ft.engine.config import load_config
    from crat_ft.heads.registry import register_all

    register_all()
    torch.manual_seed(0)
    model = MODELS.build(load_config(config).model)  # init_weights() not called: nothing is downloaded
    state = model.state_dict()
    torch.save({"state_dict": state, "meta": {}}, path)
    return state


def _stage_layers(model) -> list[tuple]:
    from crat_ft.detector.frozen import stage_heads

    return stage_heads(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_retrained_heads_equal_the_exported_mmdet_heads(family, tiny_data, tmp_path):
    from mmdet.apis import init_detector

    from crat_ft.cache import RoIReader, stage_indexes
    from crat_ft.engine.checkpoint import allow_mmengine_pickles
    from crat_ft.engine.config import load_config
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.pipeline.retrain_builders import build_heads

    config = _mmdet_config(family, tmp_path)
    ckpt = tmp_path / "random.pth"
    original = _random_checkpoint(config, ckpt)
    cache = tmp_path / "cache"
    r = run_cli("extract-features", config, ckpt, "--data-root", tiny_data, "--out", cache, "--max-images", 2,
                "--batch-size", 1, "--mask-pos-per-class", 400)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    options = ["train.max_iters=3", "train.milestones=[]", "train.checkpoint_interval=3", "train.warmup_iters=1", "train.lr=0.05",
               "sampler.rois_per_batch=64", "sampler.masks_per_batch=8", "crat.mask_weights=mask"]  # fmt: skip
    if "seesaw" in family:
        options.append("heads.loss_cls.type=SeesawLoss")
    work = tmp_path / "heads"
    r = run_cli("retrain-heads", demo_config("crat_synthetic.py"), "--cache", cache, "--work-dir", work,
                "--cfg-options", *options)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    cascade = family.startswith("cascade")
    assert ("the box regressors are class-agnostic" in r.stderr) == cascade, r.stderr[-2000:]
    out = tmp_path / "merged.pth"
    r = run_cli("export", config, ckpt, work / "heads.pth", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]

    readers = [RoIReader(index) for index in stage_indexes(cache)]
    assert len(readers) == (3 if cascade else 1)
    ft = load_ft_config(demo_config("crat_synthetic.py"), options)
    heads = build_heads(ft, readers if cascade else readers[0], load_config(config), original)
    heads.load_state_dict(torch.load(work / "heads.pth", weights_only=True)["state_dict"])
    stages = list(heads.stages) if cascade else [heads]
    allow_mmengine_pickles()
    merged_cfg = out.with_suffix(".py")
    model = init_detector(str(merged_cfg if merged_cfg.exists() else config), str(out), device="cpu")
    before = init_detector(str(config), str(ckpt), device="cpu")
    for s, (ours, reader, (bbox_head, mask_head), (old_bbox, old_mask)) in enumerate(
        zip(stages, readers, _stage_layers(model), _stage_layers(before))
    ):
        rois = reader.read_rois(np.arange(min(48, len(reader.labels))))
        x = torch.from_numpy(rois["box_feat"]).float()
        with torch.no_grad():
            got = ours.predict(x, None)
            torch.testing.assert_close(got["cls_score"], bbox_head.fc_cls(x), msg=f"stage {s} classifier")
            assert not torch.allclose(got["cls_score"], old_bbox.fc_cls(x)), f"stage {s} classifier not retrained"
            if bbox_head.reg_class_agnostic:
                assert ours.fc_reg is None and "bbox_pred" not in got
                torch.testing.assert_close(bbox_head.fc_reg.weight, old_bbox.fc_reg.weight)  # kept as it is
            else:
                torch.testing.assert_close(got["bbox_pred"], bbox_head.fc_reg(x), msg=f"stage {s} regressor")
                assert not torch.allclose(got["bbox_pred"], old_bbox.fc_reg(x))
            if mask_head is None:
                assert ours.conv_logits is None and family == "faster-rcnn"
                continue
            masks = reader.read_masks(np.arange(min(8, len(reader.mask_roi))))
            mx = torch.from_numpy(masks["mask_feat"]).float()
            assert len(mx), f"stage {s} cached no masks"
            logits = ours.predict(x, mx)["mask_logits"]
            torch.testing.assert_close(logits, mask_head.conv_logits(mx), msg=f"stage {s} mask predictor")
            assert not torch.allclose(logits, old_mask.conv_logits(mx)), f"stage {s} mask predictor not retrained"
            assert type(mask_head.conv_logits).__name__ == ("NormedConv2d" if "normed-mask" in family else "Conv2d")


CASCADE_DEMO = "cascade-mask-rcnn_r18_fpn_tiny_seesaw-normed-mask_synthetic.py"


def test_cascade_demo_detector_through_every_command(tiny_data, tmp_path):
    """The demo detector as a Cascade Seesaw normed-mask R-CNN: dry run, extraction, resume, inspect-cache,
    retraining, export and evaluate --heads."""
    import json

    config = demo_config(CASCADE_DEMO)
    ckpt = tmp_path / "cascade.pth"
    original = _random_checkpoint(config, ckpt)
    base = ["extract-features", config, ckpt, "--data-root", tiny_data, "--max-images", 4, "--segment-images", 2]
    r = run_cli(*base, "--out", tmp_path / "dry", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [f"dry run: stage {s}:" in r.stdout for s in range(3)] == [True] * 3
    assert "all 3 stages: total" in r.stdout and not (tmp_path / "dry").exists()
    cache = tmp_path / "cache"
    r = run_cli(*base, "--out", cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir() if p.name != "extract-features.log") == [
        "stage-0",
        "stage-1",
        "stage-2",
    ]
    assert [f"shard 0/1 stage {s}: 4 images" in r.stderr for s in range(3)] == [True] * 3
    # a finished cascade cache: a resume with the same settings changes nothing, other settings are refused
    index_bytes = (cache / "stage-2" / "shard-00000-of-00001.h5").read_bytes()
    r = run_cli(*base, "--out", cache, "--resume")
    assert r.returncode == 0 and (cache / "stage-2" / "shard-00000-of-00001.h5").read_bytes() == index_bytes
    r = run_cli(*base[:-1], 3, "--out", cache, "--resume")
    assert r.returncode == 2 and "was made with segment_images=2, this run has segment_images=3" in r.stderr
    r = run_cli(*base, "--out", cache)
    assert r.returncode == 2 and "stage-0/shard-00000-of-00001.h5 already exists; pass --resume" in r.stderr

    r = run_cli("inspect-cache", cache)
    assert r.returncode == 0 and [f"stage {s} of a 3-stage cascade" in r.stdout for s in range(3)] == [True] * 3
    assert r.stdout.count("box regressor: class-agnostic, kept as it is; CRAT's box branch does not apply") == 3

    work = tmp_path / "heads"
    options = ["heads.loss_cls.type=SeesawLoss", "train.max_iters=3", "train.milestones=[]", "train.checkpoint_interval=3",
               "train.warmup_iters=1", "sampler.rois_per_batch=64", "sampler.masks_per_batch=8"]  # fmt: skip
    r = run_cli("retrain-heads", demo_config("crat_synthetic.py"), "--cache", cache, "--work-dir", work,
                "--cfg-options", *options)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "regressor is class-agnostic; set crat.mask_weights=mask" in r.stderr
    r = run_cli("retrain-heads", demo_config("crat_synthetic.py"), "--cache", cache, "--work-dir", work,
                "--cfg-options", *options, "crat.mask_weights=mask")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    heads = torch.load(work / "heads.pth", weights_only=True)
    assert heads["meta"]["num_stages"] == 3
    state = heads["state_dict"]
    for s in range(3):
        assert f"stages.{s}.fc_reg.weight" not in state and state[f"stages.{s}.mask_stats.seen"].sum() > 0
    # a single-stage config is refused for cascade heads
    r = run_cli("export", demo_config("mask-rcnn_r18_fpn_tiny_synthetic.py"), ckpt, work / "heads.pth", "--out",
                tmp_path / "x.pth")  # fmt: skip
    assert r.returncode == 2 and "holds heads of a 3-stage detector but" in r.stderr
    out = tmp_path / "merged.pth"
    r = run_cli("export", config, ckpt, work / "heads.pth", "--out", out, "--logit-adjust", 0.5)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = torch.load(out, weights_only=True)["state_dict"]
    prior = torch.tensor(heads["meta"]["class_instance_count"], dtype=torch.float).clamp_min(1)
    prior = prior / prior.sum()
    for s in range(3):
        torch.testing.assert_close(
            merged[f"roi_head.mask_head.{s}.conv_logits.weight"], state[f"stages.{s}.conv_logits.weight"]
        )
        # logit adjustment moves every stage's foreground biases by the same -0.5 log prior
        shift = merged[f"roi_head.bbox_head.{s}.fc_cls.bias"] - state[f"stages.{s}.fc_cls.bias"]
        torch.testing.assert_close(shift[:NUM_CLASSES], -0.5 * prior.log())
        assert float(shift[NUM_CLASSES:].abs().max()) == 0.0
        torch.testing.assert_close(
            merged[f"roi_head.bbox_head.{s}.fc_reg.weight"], original[f"roi_head.bbox_head.{s}.fc_reg.weight"]
        )
    r = run_cli("evaluate", config, ckpt, "--heads", work / "heads.pth", "--data-root", tiny_data, "--out",
                tmp_path / "m.json")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert sorted(metrics) == ["bbox", "fixed", "matches", "segm"] and 0.0 <= metrics["segm"]["AP"] <= 100.0
