"""Every evaluation reads its own detections only: CratLVISMetric's spill directory shared by two
evaluations at once, and a rerun after a killed evaluation (no detector needed: the metric is fed
the detections of ``test_evaluation._random_dets`` as mmdet's test loop feeds a model's)."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import _random_dets

from crat_ft.evaluation.lvis import lvis_metrics


def _samples(gt: dict, dets: list[dict]) -> list[dict]:
    """``data_samples`` as mmdet's test loop hands them to a metric, one per val image."""
    import pycocotools.mask as mask_util
    import torch

    cat_ids = sorted(c["id"] for c in gt["categories"])
    samples = []
    for img in gt["images"]:
        mine = [d for d in dets if d["image_id"] == img["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(-1, 4)
        shape = (0, img["height"], img["width"])
        masks = np.stack([mask_util.decode(d["segmentation"]) for d in mine]) if mine else np.zeros(shape)
        samples.append({"img_id": img["id"], "pred_instances": {
            "bboxes": boxes, "scores": torch.tensor([d["score"] for d in mine], dtype=torch.float64),
            "labels": torch.tensor([cat_ids.index(d["category_id"]) for d in mine], dtype=torch.long),
            "masks": torch.from_numpy(masks.astype(bool))}})  # fmt: skip
    return samples


def _small_parts(rows: int = 4) -> None:
    """Spill a part every ``rows`` detections (many parts from few images)."""
    from crat_ft.evaluation.detections import DetectionSpill

    DetectionSpill.__init__.__defaults__ = (rows,)


def _metric(ann: Path, spill: Path):
    from crat_ft.evaluation.metric import CratLVISMetric

    return CratLVISMetric(ann_file=str(ann), spill_dir=str(spill), extra_protocols=())


def _expected(gt: dict, dets: list[dict]) -> dict:
    return {f"lvis/{iou}_{k}": v for iou in ("bbox", "segm") for k, v in lvis_metrics(gt, dets, iou).items()}


def _evaluate_in_child(ann, spill, seed, barriers, queue) -> None:
    """One evaluation of its own detections; ``barriers`` hold it where the other one is mid-way."""
    _small_parts()
    gt = json.loads(Path(ann).read_text())
    metric = _metric(ann, spill)
    metric.process({}, _samples(gt, _random_dets(gt, seed, with_masks=True)))
    metric._spiller().flush()
    barriers[0].wait(60)  # both have spilled every part
    if seed == 2:
        barriers[1].wait(60)  # the other one has evaluated and removed its directory
    queue.put((seed, metric.evaluate(len(gt["images"]))))
    if seed == 1:
        barriers[1].wait(60)


def test_two_evaluations_sharing_a_spill_dir_at_once_each_get_their_own_metrics(tiny_data, tmp_path):
    """Two processes spill into one spill_dir at the same time (parts of the same numbers and rank);
    the first finishes and cleans up while the second still has to read its parts. Each gets the
    metrics of its own detections."""
    ann = tiny_data / "annotations" / "lvis_v1_val.json"
    gt = json.loads(ann.read_text())
    spill = tmp_path / "shared-spill"
    ctx = multiprocessing.get_context("fork")
    barriers, queue = (ctx.Barrier(2), ctx.Barrier(2)), ctx.Queue()
    procs = [ctx.Process(target=_evaluate_in_child, args=(ann, spill, s, barriers, queue)) for s in (1, 2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for seed in (1, 2):
        assert got[seed] == pytest.approx(_expected(gt, _random_dets(gt, seed, with_masks=True)), abs=1e-12), seed
    assert got[1]["lvis/bbox_AP"] != pytest.approx(got[2]["lvis/bbox_AP"], abs=1e-6)  # the cases differ
    assert not list(spill.glob("run-*"))  # both removed what they wrote


def _killed_evaluation(ann, spill) -> None:
    """An evaluation killed after it spilled every part (its lock dies with it)."""
    _small_parts()
    gt = json.loads(Path(ann).read_text())
    metric = _metric(ann, spill)
    metric.process({}, _samples(gt, _random_dets(gt, 5, with_masks=True)))
    metric._spiller().flush()
    os._exit(9)


def test_a_rerun_after_a_killed_evaluation_equals_a_clean_run(tiny_data, tmp_path, monkeypatch):
    """A killed run leaves many parts; the rerun, of a model with fewer detections (parts of the
    same names under the old layout), evaluates exactly its own, and removes the killed run's."""
    ann = tiny_data / "annotations" / "lvis_v1_val.json"
    gt = json.loads(ann.read_text())
    spill = tmp_path / "spill"
    child = multiprocessing.get_context("fork").Process(target=_killed_evaluation, args=(ann, spill))
    child.start()
    child.join(300)
    assert child.exitcode == 9
    (left,) = spill.glob("run-*-0")  # what the killed run left: its directory, with many parts
    assert len(list(left.glob("part-*"))) > 5

    from crat_ft.evaluation.detections import DetectionSpill

    monkeypatch.setattr(DetectionSpill.__init__, "__defaults__", (4,))
    dets = [d for d in _random_dets(gt, 6, with_masks=True) if d["score"] > 0.7]  # far fewer detections
    metric = _metric(ann, spill)
    # the lock file of the killed run names a live pid (pids repeat across container starts): it still goes
    (lock,) = spill.glob("run-*.lock")
    lock.write_text(str(os.getpid()))
    metric.process({}, _samples(gt, dets))
    assert not left.exists()  # removed as this evaluation began: nobody held its lock
    assert metric.evaluate(len(gt["images"])) == pytest.approx(_expected(gt, dets), abs=1e-12)
    assert not list(spill.iterdir())


def test_a_live_evaluations_directory_is_left_alone_and_a_lost_part_is_an_error(tiny_data, tmp_path, monkeypatch):
    """A run directory whose lock is held (another evaluation under way) survives a new evaluation's
    clean-up; parts removed from under an evaluation are one line, never fewer detections evaluated."""
    from crat_ft.common.errors import UserError
    from crat_ft.evaluation.detections import claim_spill_run, release_spill_run

    ann = tiny_data / "annotations" / "lvis_v1_val.json"
    gt = json.loads(ann.read_text())
    spill = tmp_path / "spill"
    other = claim_spill_run(spill, "other-0")  # held by this process, as a live evaluation holds it
    (spill / "run-other-0" / "part-other-0-rank0-00000").mkdir()
    from crat_ft.evaluation.detections import DetectionSpill

    monkeypatch.setattr(DetectionSpill.__init__, "__defaults__", (4,))
    metric = _metric(ann, spill)
    metric.process({}, _samples(gt, _random_dets(gt, 1, with_masks=True)))
    metric._spiller().flush()
    assert (spill / "run-other-0" / "part-other-0-rank0-00000").is_dir()
    parts = sorted(Path(metric.run_dir).glob("part-*"))
    lost = np.load(parts[1] / "images.npy")
    import shutil

    shutil.rmtree(parts[1])
    with pytest.raises(UserError, match=rf"spilled detections of .*-rank0 in .* are incomplete \({len(lost)} image\(s\) "
                                        r"are missing: another process removed or wrote parts there\); rerun"):  # fmt: skip
        metric.evaluate(len(gt["images"]))
    assert (spill / "run-other-0").is_dir() and not Path(metric.run_dir).exists()
    release_spill_run(spill, "other-0", other)
    assert sorted(p.name for p in spill.iterdir()) == []
