"""`crat-ft demo` reruns: a stage is reused only when its run record matches what the invocation would
write; otherwise it is redone, with every stage that depends on it, and the console says why in one line
(on tiny data: 24 training and 8 val images, 12 detector iterations)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli

DEMO = ["demo", "--detector-iters", 12, "--train-images", 24, "--val-images", 8]
DETECTOR = "training the stage-1 detector (mask-rcnn_r18_fpn_tiny_synthetic.py)"
# the files each stage writes last, by stage
OUTPUTS = {
    "data": "data/annotations/lvis_v1_val.json",
    "stage1": "stage1/detector.pth",
    "cache": "cache/index.h5",
    "baseline": "baseline/heads.pth",
    "crat": "crat/heads.pth",
    "evaluate stage1": "stage1/metrics.json",
    "evaluate baseline": "baseline/metrics.json",
    "evaluate crat": "crat/metrics.json",
}


def _lines(r) -> list[str]:
    """The demo's lines saying what each stage does, without their time stamps and "done in" lines."""
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split("] ", 1)[1] for line in r.stdout.splitlines() if line.startswith("[crat-ft demo ")]
    return [line for line in lines if ": done in " not in line and not line.startswith("framework logs: ")]


def _times(work: Path) -> dict[str, int]:
    return {stage: (work / path).stat().st_mtime_ns for stage, path in OUTPUTS.items()}


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_demo_rerun_redoes_exactly_the_stages_its_options_change(tmp_path):
    work = tmp_path / "work"
    _lines(run_cli(*DEMO, "--heads-iters", 4, "--work-dir", work))
    first = _times(work)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["settings"] == dict(variant="families", sharing=0.5, seed=0, detector_iters=12, heads_iters=4,
                                       train_images=24, val_images=8)  # fmt: skip

    # the same options: every stage reused
    lines = _lines(run_cli(*DEMO, "--heads-iters", 4, "--work-dir", work))
    assert sum("done before, reusing" in line for line in lines) == len(OUTPUTS), lines
    assert _times(work) == first

    # other --heads-iters: both heads and their evaluations redone, nothing before them
    lines = _lines(run_cli(*DEMO, "--heads-iters", 6, "--work-dir", work))
    said = "was made with train.max_iters=4, this run has train.max_iters=6"
    assert lines[:7] == [
        f"making the synthetic long-tailed dataset: done before, reusing {work / OUTPUTS['data']}",
        f"{DETECTOR}: done before, reusing {work / OUTPUTS['stage1']}",
        f"extracting RoI features of the training split: done before, reusing {work / OUTPUTS['cache']}",
        f"retraining the class-wise heads (baseline): redoing, {work / 'baseline'} {said}",
        f"retraining the class-wise heads (crat): redoing, {work / 'crat'} {said}",
        f"evaluating stage1: done before, reusing {work / OUTPUTS['evaluate stage1']}",
        "evaluating baseline, crat (LVIS protocol, val split)",
    ]
    second = _times(work)
    redone = {"baseline", "crat", "evaluate baseline", "evaluate crat"}
    assert {stage for stage in OUTPUTS if second[stage] != first[stage]} == redone
    assert json.loads((work / "summary.json").read_text())["settings"]["heads_iters"] == 6

    # a copy of that run with another --seed: every stage redone, and the copied run left as it was
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    before = _files(work)
    lines = _lines(run_cli(*DEMO, "--heads-iters", 6, "--seed", 1, "--work-dir", copy))
    assert not [line for line in lines if "done before" in line], lines
    assert lines[:6] == [
        f"making the synthetic long-tailed dataset: redoing, {copy / 'data'} was made with seed=0, this run has seed=1",
        f"{DETECTOR}: redoing, {copy / 'stage1'} was made with randomness.seed=0, this run has randomness.seed=1",
        lines[2],
        f"retraining the class-wise heads (baseline): redoing, {copy / 'baseline'} was made with train.seed=0, "
        "this run has train.seed=1",
        f"retraining the class-wise heads (crat): redoing, {copy / 'crat'} was made with train.seed=0, "
        "this run has train.seed=1",
        "evaluating stage1, baseline, crat (LVIS protocol, val split)",
    ]
    cache = f"extracting RoI features of the training split: redoing, {copy / 'cache'} was made with checkpoint_sha256="
    assert lines[2].startswith(cache), lines[2]
    third = _times(copy)
    assert all(third[stage] > second[stage] for stage in OUTPUTS), (third, second)
    assert json.loads((copy / "summary.json").read_text())["settings"]["seed"] == 1
    assert _files(work) == before
