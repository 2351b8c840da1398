"""`crat-ft demo --e2e`: the detector trained plain and with CRAT's plugin heads on the same data and seed,
evaluated side by side and compared with paired bootstrap intervals (on tiny data, 12 iterations); a rerun
reuses a stage only when it was made with the rerun's settings."""

import json
import shutil

import pytest
import torch

from conftest import run_cli
from crat_ft.engine.config import load_config

E2E = ["demo", "--e2e", "--train-images", 24, "--val-images", 8]


def _stage_lines(r) -> list[str]:
    """The demo's lines saying what each stage does, without their time stamps and "done in" lines."""
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split("] ", 1)[1] for line in r.stdout.splitlines() if line.startswith("[crat-ft demo ")]
    return [line for line in lines if ": done in " not in line and not line.startswith("framework logs: ")]


def _kill_during_training(run) -> None:
    """Leave ``run`` as a kill during its training would: its record and checkpoints, nothing after them."""
    for p in run.iterdir():
        if p.name not in ("run.json", "last_checkpoint") and not p.name.startswith("iter_"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.mark.slow
def test_demo_e2e_compares_crat_with_plain_end_to_end(tmp_path):
    work = tmp_path / "work"
    r = run_cli(*E2E, "--detector-iters", 12, "--work-dir", work)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["settings"] == dict(variant="colour-shapes", sharing=0.5, seed=0, detector_iters=12,
                                       train_images=24, val_images=8)  # fmt: skip
    for name, config in (("plain", "Shared2FCBBoxHead"), ("crat", "CratShared2FCBBoxHead")):
        dumped = load_config(next((work / name).glob("mask-rcnn_r18_fpn_tiny*_synthetic.py")))
        assert dumped.model.roi_head.bbox_head.type == config
        assert dumped.train_cfg.max_iters == 12  # the demo schedule scaled: warm-up 2, steps at 9 and 11
        assert dumped.param_scheduler[0].end == 2 and dumped.param_scheduler[1].milestones == [9, 11]
        assert (work / name / "results.segm.json").is_file() and (work / name / "metrics_matches_segm.npz").is_file()
    cmp = summary["crat_vs_plain"]
    for iou in ("bbox", "segm"):
        m = cmp[iou]["AP"]
        assert m["delta"] == pytest.approx(summary["crat"][iou]["AP"] - summary["plain"][iou]["AP"], abs=1e-9)
        assert m["low"] <= m["delta"] <= m["high"]
        oracle = summary["class_oracle_crat_vs_plain"][iou]["AP"]
        assert oracle["a"] == pytest.approx(summary["class_oracle_AP"]["plain"][iou]["all"])
    shown = f"AP {100 * cmp['segm']['AP']['delta']:+.1f} [{100 * cmp['segm']['AP']['low']:+.1f}, "
    assert "CRAT e2e - plain (95% paired bootstrap over val images): " + shown in r.stdout
    assert "class-oracle AP, CRAT e2e - plain (95% paired bootstrap): AP " in r.stdout
    assert "training the detector end to end, with CRAT (mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py, 12" in r.stdout
    assert "loss_bbox_transfusion" in (work / "demo.log").read_text()  # framework logs go to the file
    # a rerun reuses every stage
    again = run_cli(*E2E, "--detector-iters", 12, "--work-dir", work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, reusing") == 5
    assert json.loads((work / "summary.json").read_text())["crat_vs_plain"] == cmp

    # killed during the CRAT training: rerun with the same settings, the training is continued
    plain = "training the detector end to end, plain (mask-rcnn_r18_fpn_tiny_synthetic.py"
    crat = "training the detector end to end, with CRAT (mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py"
    _kill_during_training(work / "crat")
    lines = _stage_lines(run_cli(*E2E, "--detector-iters", 12, "--work-dir", work))
    assert lines[:5] == [
        f"making the synthetic long-tailed dataset: done before, reusing {work / 'data' / 'annotations' / 'lvis_v1_val.json'}",
        f"{plain}, 12 iterations): done before, reusing {work / 'plain' / 'detector.pth'}",
        f"{crat}, 12 iterations): continuing the unfinished run in {work / 'crat'}",
        f"evaluating plain: done before, reusing {work / 'plain' / 'metrics.json'}",
        "evaluating crat (LVIS protocol, val split)",
    ]
    assert json.loads((work / "summary.json").read_text())["crat_vs_plain"] == cmp

    # killed again, then rerun with a longer schedule: neither detector is reused, nor continued
    _kill_during_training(work / "crat")
    lines = _stage_lines(run_cli(*E2E, "--detector-iters", 16, "--work-dir", work))
    said = "was made with train_cfg.max_iters=12, this run has train_cfg.max_iters=16"
    assert lines[1:4] == [
        f"{plain}, 16 iterations): redoing, {work / 'plain'} {said}",
        f"{crat}, 16 iterations): redoing, {work / 'crat'} {said}",
        "evaluating plain, crat (LVIS protocol, val split)",
    ]
    for name in ("plain", "crat"):
        assert torch.load(work / name / "detector.pth", weights_only=False)["meta"]["iter"] == 16
    assert json.loads((work / "summary.json").read_text())["settings"]["detector_iters"] == 16
