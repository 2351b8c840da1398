"""`crat-ft demo --e2e`: the detector trained plain and with CRAT's plugin heads on the same data and seed,
evaluated side by side and compared with paired bootstrap intervals (on tiny data, 12 iterations)."""

import json

import pytest

from conftest import run_cli
from crat_ft.config import load_config
from crat_ft.synthetic import DemoDataSpec, make_demo_data


@pytest.mark.slow
def test_demo_e2e_compares_crat_with_plain_end_to_end(tmp_path):
    work = tmp_path / "work"
    spec = DemoDataSpec(seed=0, variant="colour-shapes", train_images=24, val_images=8)
    make_demo_data(work / "data", spec, progress=False)  # the demo reuses data made with its variant
    r = run_cli("demo", "--e2e", "--detector-iters", 12, "--work-dir", work)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["settings"] == dict(variant="colour-shapes", sharing=0.5, seed=0, detector_iters=12)
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
    again = run_cli("demo", "--e2e", "--detector-iters", 12, "--work-dir", work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, reusing") == 5
    assert json.loads((work / "summary.json").read_text())["crat_vs_plain"] == cmp
