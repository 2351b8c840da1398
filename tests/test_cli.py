"""The stage-1 workflow through the installed CLI, and its bad-input errors."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import demo_config_path, run_cli
from crat_ft.evaluation.lvis import METRIC_KEYS


def _one_line_error(r, pattern):
    import re

    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("crat-ft: error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def test_env_reports_stack():
    r = run_cli("env")
    assert r.returncode == 0, r.stderr
    assert "mmcv compiled ops  loaded (nms, roi_align)" in r.stdout
    for name in ("torch", "mmengine", "mmdet", "h5py", "faster-coco-eval"):
        assert name in r.stdout


def test_help_lists_every_command():
    r = run_cli("--help")
    for cmd in (
        "env",
        "make-demo-data",
        "train-detector",
        "evaluate",
        "demo",
        "extract-features",
        "inspect-cache",
        "retrain-heads",
        "export",
        "fisher-neighbors",
    ):
        assert cmd in r.stdout


def test_plain_pip_install_works_from_any_directory(tmp_path):
    """A non-editable install ships the CLI and the configs inside the package."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(repo),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    code = "import crat_ft.cli.main as m, crat_ft.common.paths as p; print(m.__file__); print(p.demo_config())"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    cli_file, config = r.stdout.split()
    assert cli_file.startswith(str(target)) and config.startswith(str(target))
    assert Path(config).is_file()


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(tiny_data, tiny_detector, tmp_path):
    out = tmp_path / "metrics.json"
    prefix = tmp_path / "results" / "tiny"
    r = run_cli("evaluate", demo_config_path(), tiny_detector, "--out", out, "--data-root", tiny_data,
                "--outfile-prefix", prefix)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(out.read_text())
    # the matches evaluate keeps re-accumulate to its metrics; its mmdet-style results give them too
    gt = tiny_data / "annotations" / "lvis_v1_val.json"
    from crat_ft.analysis.compare import compare

    same = compare(gt, str(tmp_path), str(out))
    dicts = json.loads(prefix.with_suffix(".segm.json").read_text())
    assert (
        dicts
        and "segmentation" in dicts[0]
        and "segmentation" not in json.loads(prefix.with_suffix(".bbox.json").read_text())[0]
    )
    files = compare(gt, str(prefix.with_suffix(".segm.json")), str(out))
    for iou in ("bbox", "segm"):
        for key in ("AP", "APr", "APc", "APf"):
            if metrics[iou][key] >= 0:
                assert same[iou][key]["a"] == pytest.approx(metrics[iou][key], abs=1e-12), (iou, key)
                assert files[iou][key]["a"] == pytest.approx(metrics[iou][key], abs=1e-12), (iou, key)
                assert same[iou][key]["delta"] == same[iou][key]["low"] == same[iou][key]["high"] == 0.0
    fixed = metrics.pop("fixed")
    assert set(metrics.pop("matches")) == {"bbox", "segm"}  # the detections' identity in each matches file
    assert set(metrics) == set(fixed) == {"bbox", "segm"}
    for iou in metrics:
        assert set(metrics[iou]) == set(fixed[iou]) == set(METRIC_KEYS)
        assert all(v == -1 or 0 <= v <= 1 for v in metrics[iou].values())
    # the demo detector outputs at most 300 detections per image and far fewer than 10,000 per class:
    # AP-fixed equals AP
    assert fixed == metrics
    assert "AP-fixed (%, 10,000 detections per class, no per-image cap)" in r.stdout
    csv_lines = (tmp_path / "metrics_per_class.csv").read_text().splitlines()
    assert csv_lines[0] == "class,frequency,train_instances,bbox_AP,segm_AP"
    assert len(csv_lines) == 41
    assert "APr" in r.stdout and "bbox" in r.stdout
    ckpt = torch.load(tiny_detector, weights_only=True)
    assert ckpt["meta"]["iter"] == 4 and len(ckpt["meta"]["dataset_meta"]["classes"]) == 40


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(tiny_data, tiny_detector, tmp_path):
    cfg = demo_config_path()
    r = run_cli("evaluate", cfg, tmp_path / "nope.pth", "--out", tmp_path / "m.json", "--data-root", tiny_data)
    _one_line_error(r, r"checkpoint .*nope\.pth does not exist; check the path")
    assert not (tmp_path / "m.json").exists()

    # a checkpoint whose class count disagrees with the config
    ckpt = torch.load(tiny_detector, weights_only=True)
    sd = ckpt["state_dict"]
    sd["roi_head.bbox_head.fc_reg.weight"] = sd["roi_head.bbox_head.fc_reg.weight"][:40]
    sd["roi_head.bbox_head.fc_reg.bias"] = sd["roi_head.bbox_head.fc_reg.bias"][:40]
    sd["roi_head.mask_head.conv_logits.weight"] = sd["roi_head.mask_head.conv_logits.weight"][:10]
    torch.save(ckpt, tmp_path / "ten.pth")
    r = run_cli("evaluate", cfg, tmp_path / "ten.pth", "--out", tmp_path / "m.json", "--data-root", tiny_data)
    _one_line_error(
        r, r"has 10 classes .* but the config has roi_head.bbox_head.num_classes=40; the dataset has 40 categories"
    )

    # a corrupt checkpoint
    (tmp_path / "bad.pth").write_bytes(b"not a zip at all")
    r = run_cli("evaluate", cfg, tmp_path / "bad.pth", "--out", tmp_path / "m.json", "--data-root", tiny_data)
    _one_line_error(r, r"could not be read .* corrupt or truncated")

    # a malformed LVIS json
    broken = tmp_path / "broken"
    (broken / "annotations").mkdir(parents=True)
    (broken / "annotations" / "lvis_v1_val.json").write_text('{"images": [')
    r = run_cli("evaluate", cfg, tiny_detector, "--out", tmp_path / "m.json", "--data-root", broken)
    _one_line_error(r, r"lvis_v1_val\.json is not valid JSON")

    # a dataset with other categories than the model
    r = run_cli(
        "evaluate",
        cfg,
        tiny_detector,
        "--out",
        tmp_path / "m.json",
        "--data-root",
        tiny_data,
        "--cfg-options",
        "model.roi_head.bbox_head.num_classes=12",
    )
    _one_line_error(r, r"num_classes=12 but .* has 40 categories")

    # an unknown --cfg-options key
    r = run_cli(
        "train-detector",
        cfg,
        "--work-dir",
        tmp_path / "w",
        "--data-root",
        tiny_data,
        "--cfg-options",
        "model.roi_head.bbox_hed.num_classes=3",
    )
    _one_line_error(
        r,
        r"unknown --cfg-options key 'model\.roi_head\.bbox_hed\.num_classes': model\.roi_head of .* has no key 'bbox_hed'",
    )
    assert not (tmp_path / "w").exists()  # a refused command creates no work dir
    assert not (tmp_path / "m.json").exists()


def test_make_demo_data_cli(tmp_path):
    r = run_cli("make-demo-data", tmp_path / "d", "--train-images", 6, "--val-images", 2, "--classes", 4)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "annotations" / "lvis_v1_train.json").is_file()
    r = run_cli("make-demo-data", tmp_path / "d")
    _one_line_error(r, r"already exists and is not empty; choose a new OUT")
    r = run_cli("make-demo-data", tmp_path / "e", "--classes", 1)
    _one_line_error(r, r"--classes: expected 2\.\.64, got 1")


def test_a_command_in_the_test_server_is_what_a_fresh_process_gives(tmp_path, monkeypatch):
    """run_cli's pre-imported server (tests/cli_server.py) against ``crat-ft`` started anew, each in its own
    working directory: the same exit code, stdout, stderr (paths aside) and files, byte for byte."""
    cases = [
        ["--version"],
        ["evaluate-results", "gt.json", "none.json", "--out", "m.json"],  # a refusal: one line, exit 2
        ["make-demo-data", "data", "--train-images", 2, "--val-images", 1, "--classes", 3],
        ["inspect-cache", "data"],  # a refusal after the dataset was written: not a cache
    ]
    runs = {}
    for how in ("served", "fresh"):
        cwd = tmp_path / how
        cwd.mkdir()
        (cwd / "gt.json").write_text(json.dumps({"images": [], "annotations": []}))
        if how == "fresh":
            monkeypatch.setenv("CRAT_FT_TEST_FRESH_PROCESSES", "1")
        results = [run_cli(*args, cwd=cwd) for args in cases]
        runs[how] = [
            (r.returncode, r.stdout.replace(str(cwd), "CWD"), r.stderr.replace(str(cwd), "CWD")) for r in results
        ]
        runs[how + " files"] = {str(p.relative_to(cwd)): p.read_bytes() for p in sorted(cwd.rglob("*")) if p.is_file()}
    assert runs["served"] == runs["fresh"]
    assert runs["served files"] == runs["fresh files"] and "data/annotations/lvis_v1_val.json" in runs["served files"]
    codes = [code for code, _, _ in runs["served"]]
    assert codes == [0, 2, 0, 2] and runs["served"][1][2].startswith("crat-ft: error: ")
