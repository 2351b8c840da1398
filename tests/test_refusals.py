"""Refused runs: a resume with other settings, a finished work dir without --resume, bad training
values, refused checkpoints, contradicting --cfg-options, click's own usage errors.

Each case asserts the one error line and that nothing was written or changed: the md5 of every
file of an existing output before and after, and no output directory where there was none.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import demo_config_path, extract_args, retrain_args, run_cli
from crat_ft.common.errors import UserError
from crat_ft.common.paths import demo_config

SCHEDULE = [
    "train.max_iters=6",
    "train.checkpoint_interval=2",
    "train.log_interval=1",
    "train.warmup_iters=2",
    "train.milestones=[4]",
    "sampler.rois_per_batch=64",
    "sampler.masks_per_batch=8",
]


def _files(root: Path) -> dict[str, str]:
    """md5 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _error_line(r) -> str:
    """The single stderr line of a refused command (exit code 2)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crat-ft: error: "), r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def crat_work(tiny_cache, tmp_path_factory) -> Path:
    """A finished 6-iteration CRAT retraining (checkpoints at 2, 4, 6; the last two kept)."""
    work = tmp_path_factory.mktemp("refusals") / "crat"
    r = run_cli(*retrain_args(tiny_cache, work), "--cfg-options", *SCHEDULE)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_a_work_dir_is_resumed_only_with_its_own_settings(crat_work, tiny_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(crat_work, copy)
    before = _files(copy)

    # the decoupled baseline resumed in a copy of a CRAT run would hand back CRAT's tensors
    r = run_cli(*retrain_args(tiny_cache, copy, "baseline_synthetic.py"), "--resume", "--cfg-options", *SCHEDULE)
    assert _error_line(r) == (
        f"crat-ft: error: --resume: {copy} was trained with crat.enable=true, this run has crat.enable=false; "
        "rerun with the recorded settings, or choose a new --work-dir"
    )
    r = run_cli(*retrain_args(tiny_cache, copy), "--resume", "--cfg-options", *SCHEDULE, "train.lr=0.02")
    assert "was trained with train.lr=0.01, this run has train.lr=0.02;" in _error_line(r)
    # without --resume a finished run is never replaced
    r = run_cli(*retrain_args(tiny_cache, copy), "--cfg-options", *SCHEDULE)
    assert _error_line(r) == (
        f"crat-ft: error: --work-dir {copy} holds a retrain-heads run (run.json, heads.pth, last_checkpoint, "
        "iter_4.pth and 1 more); pass --resume, or choose a new --work-dir"
    )
    assert _files(copy) == before

    # an operational setting may change; the resumed run ends where the uninterrupted one did,
    # and its progress line counts on from iteration 4
    (copy / "heads.pth").unlink()
    (copy / "iter_6.pth").unlink()
    (copy / "last_checkpoint").write_text(str(copy / "iter_4.pth"))
    r = run_cli(*retrain_args(tiny_cache, copy), "--resume", "--cfg-options", *SCHEDULE, "train.log_interval=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "retrain-heads: 6/6 iterations" in r.stderr and "2/2 iterations" not in r.stderr, r.stderr
    a = torch.load(crat_work / "heads.pth", weights_only=True)
    b = torch.load(copy / "heads.pth", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert b["meta"]["crat"] == a["meta"]["crat"] and b["meta"]["run"]["settings"]["crat.enable"] is True
    assert b["meta"]["run"]["ft_config_hash"] == a["meta"]["run"]["ft_config_hash"]

    # checkpoints without a record of what they were trained with are not resumed
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(crat_work / "iter_4.pth", bare / "iter_4.pth")
    before = _files(bare)
    r = run_cli(*retrain_args(tiny_cache, bare), "--resume", "--cfg-options", *SCHEDULE)
    assert _error_line(r) == (
        f"crat-ft: error: --resume: {bare} holds iter_4.pth but no run.json saying what they were trained with; "
        "choose a new --work-dir"
    )
    assert _files(bare) == before


def test_a_resume_checks_cache_detector_and_world_size(tmp_path):
    from crat_ft.pipeline.retrain_record import RUN_FILE, check_resume

    record = {
        "settings": {"crat.enable": True, "train.lr": 0.01},
        "ft_config_hash": "h",
        "cache_identity": "a" * 64,
        "cache_path": "/caches/one",
        "detector_sha256": "d" * 64,
        "detector_config_hash": "c",
        "world_size": 1,
    }
    check_resume(tmp_path, record)  # nothing there: a fresh start
    (tmp_path / RUN_FILE).write_text(json.dumps(record))
    check_resume(tmp_path, record)
    fix = "; rerun with the recorded settings, or choose a new --work-dir"
    cases = {
        "cache_identity": f"was trained with another feature cache (/caches/one) than --cache /caches/two{fix}",
        "detector_sha256": f"was trained with another detector checkpoint than the one this cache was made from{fix}",
        "detector_config_hash": f"was trained with another detector config (its model section differs){fix}",
        "world_size": f"was trained with 1 process(es), this run has 2{fix}",
    }
    for key, message in cases.items():
        other = dict(record, cache_path="/caches/two", **{key: 2 if key == "world_size" else "x"})
        with pytest.raises(UserError) as err:
            check_resume(tmp_path, other)
        assert str(err.value) == f"--resume: {tmp_path} {message}", key
    # a setting the recorded run did not have (an older crat-ft) is a difference too
    with pytest.raises(UserError, match=r"was trained with crat\.top_k=\"<unset>\", this run has crat\.top_k=3;"):
        check_resume(tmp_path, dict(record, settings={**record["settings"], "crat.top_k": 3}))


@pytest.mark.parametrize(
    "option, message",
    [
        ("train.max_iters=0", "train.max_iters: expected an integer >= 1, got 0"),
        ("train.max_iters=-5", "train.max_iters: expected an integer >= 1, got -5"),
        ("train.max_iters=2.5", "train.max_iters: expected an integer >= 1, got 2.5"),
        ("train.lr=-1", "train.lr: expected a number > 0, got -1"),
        ("train.lr=0", "train.lr: expected a number > 0, got 0"),
        ("train.milestones=[700]", "milestones: expected None or increasing integers in [1, 600) (inside train.max_iters=600), got [700]"),
        ("train.milestones=[300,200]", "train.milestones: expected None or increasing integers in [1, 600)"),
        ("train.warmup_iters=600", "train.warmup_iters: expected an integer in [0, 600) (shorter than train.max_iters=600), got 600"),
        ("train.checkpoint_interval=0", "train.checkpoint_interval: expected an integer >= 1, got 0"),
        ("train.momentum=1.5", "train.momentum: expected a number in [0, 1), got 1.5"),
        ("sampler.rois_per_batch=0", "sampler.rois_per_batch: expected an integer >= 1, got 0"),
        ("sampler.strategy=balanced", "strategy: expected one of ('random', 'class_balanced', 'bilevel', 'repeat_factor'), got 'balanced'"),
        ("crat.box_lambda=-0.1", "crat.box_lambda: expected a number >= 0, got -0.1"),
        ("crat.momentum=0", "crat.momentum: expected a number in (0, 1], got 0"),
        ("heads.loss_mask_weight=-1", "heads.loss_mask_weight: expected a number >= 0, got -1"),
    ],
)  # fmt: skip
def test_training_values_are_checked_when_the_config_is_read(option, message):
    from crat_ft.heads.ft_config import load_ft_config

    with pytest.raises(UserError) as err:
        load_ft_config(demo_config("crat_synthetic.py"), [option])
    assert message in str(err.value), str(err.value)
    key = option.split("=")[0]
    assert str(err.value).endswith(f"; set it in the file or with --cfg-options {key}=..."), str(err.value)


def test_a_bad_training_value_ends_in_one_line_before_anything_is_created(tmp_path):
    work = tmp_path / "new" / "work"
    r = run_cli(*retrain_args(tmp_path / "no-cache", work), "--cfg-options", "train.max_iters=0")
    line = _error_line(r)
    assert (
        line.startswith("crat-ft: error: fine-tune config ")
        and "train.max_iters: expected an integer >= 1, got 0" in line
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_refused_checkpoint_leaves_nothing_and_blocks_nothing(tiny_data, tiny_detector, tmp_path):
    out = tmp_path / "runs" / "cache"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_detector.read_bytes()[:5000])
    text = tmp_path / "text.pth"
    text.write_text("a text file, not a checkpoint\n")
    for bad in (truncated, text):
        r = run_cli(*extract_args(bad, tiny_data), "--out", out, "--max-images", 2)
        assert "could not be read" in _error_line(r) and "corrupt or truncated" in r.stderr
        assert not (tmp_path / "runs").exists()
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    r = run_cli(*extract_args(empty, tiny_data), "--out", out, "--max-images", 2)
    assert _error_line(r) == (
        f"crat-ft: error: checkpoint {empty} is a directory, not a checkpoint file; pass the .pth file itself"
    )
    # what an older crat-ft left after such a refusal: settings recorded, no segment written
    seg_dir = out / ".segments" / "shard-00000-of-00001"
    seg_dir.mkdir(parents=True)
    (seg_dir / "run.json").write_text(json.dumps({"checkpoint_sha256": "0" * 64}))
    r = run_cli(*extract_args(tiny_detector, tiny_data), "--out", out, "--max-images", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "index.h5").is_file() and not (out / ".segments").exists()
    log = out / "extract-features.log"
    assert f"framework logs: {log}" in r.stderr and "run settings" in log.read_text()


@pytest.mark.slow
def test_export_refuses_options_that_contradict_the_checkpoint(crat_work, tiny_detector, tmp_path):
    out = tmp_path / "exported" / "merged.pth"
    for head in ("bbox_head", "mask_head"):
        r = run_cli(
            "export", demo_config_path(), tiny_detector, crat_work / "heads.pth", "--out", out,
            "--cfg-options", f"model.roi_head.{head}.num_classes=30",
        )  # fmt: skip
        layer = {"bbox_head": "roi_head.bbox_head.fc_reg", "mask_head": "roi_head.mask_head.conv_logits"}[head]
        assert f"has 40 classes ({layer}) but the config has roi_head.{head}.num_classes=30;" in _error_line(r)
    assert not (tmp_path / "exported").exists()

    # export-plain takes only what the end-to-end plugin trained
    r = run_cli("export-plain", demo_config_path(), tiny_detector, "--out", out)
    assert "uses none of crat-ft's plugin heads" in _error_line(r)
    e2e = demo_config("mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py")
    r = run_cli("export-plain", e2e, tiny_detector, "--out", out)
    assert _error_line(r) == (
        f"crat-ft: error: checkpoint {tiny_detector} holds no Fisher statistics (box_stats, mask_stats), so it was "
        f"not trained with the plugin heads of {e2e}; pass the checkpoint that training wrote"
    )
    assert not (tmp_path / "exported").exists()


@pytest.mark.slow
def test_a_dataset_of_other_categories_is_named_once_with_the_true_fix(tiny_detector, tmp_path):
    data = tmp_path / "d39"
    r = run_cli("make-demo-data", data, "--classes", 39, "--train-images", 6, "--val-images", 2)
    assert r.returncode == 0, r.stderr
    expected = (
        f"has 39 categories but checkpoint {tiny_detector} predicts 40 classes; use the dataset the detector was "
        "trained on, or train one on this dataset with `crat-ft train-detector`"
    )
    base = ["evaluate", demo_config_path(), tiny_detector, "--data-root", data, "--out", tmp_path / "m" / "m.json"]
    assert expected in _error_line(run_cli(*base))
    # the config's num_classes set to the dataset's: the checkpoint still says 40, and so does the message
    r = run_cli(
        *base, "--cfg-options", "model.roi_head.bbox_head.num_classes=39", "model.roi_head.mask_head.num_classes=39"
    )
    assert _error_line(r).endswith(
        "has 40 classes (roi_head.bbox_head.fc_reg) but the config has roi_head.bbox_head.num_classes=39; "
        "the dataset has 39 categories: use the dataset the detector was trained on"
    )
    assert not (tmp_path / "m").exists()


def test_click_usage_errors_are_one_line(tmp_path):
    cases = {
        ("extract-features", "c.py", "k.pth", "--out", tmp_path / "c", "--max-images", 0):
            "Invalid value for '--max-images': 0 is not in the range x>=1. (see `crat-ft extract-features --help`)",
        ("extract-features", "c.py", "k.pth", "--out", tmp_path / "c", "--batch-size", 0):
            "Invalid value for '--batch-size': 0 is not in the range x>=1. (see `crat-ft extract-features --help`)",
        ("fisher-neighbors", "heads.pth", "--top", 0):
            "Invalid value for '--top': 0 is not in the range x>=1. (see `crat-ft fisher-neighbors --help`)",
        ("export", "c.py", "k.pth"): "Missing argument 'HEADS'. (see `crat-ft export --help`)",
        ("no-such-command",): "No such command 'no-such-command'. (see `crat-ft --help`)",
    }  # fmt: skip
    for args, message in cases.items():
        assert _error_line(run_cli(*args)) == f"crat-ft: error: {message}", args
    assert not (tmp_path / "c").exists()
    r = run_cli("--help")
    assert r.returncode == 0 and "retrain-heads" in r.stdout and r.stderr == ""


@pytest.mark.slow
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(crat_work, tiny_detector, tmp_path):
    """export, export-plain and evaluate never write over the checkpoint, heads or config they read."""
    work = tmp_path / "inputs"
    work.mkdir()
    det, heads, config = work / "det.pth", work / "heads.pth", work / "det.py"
    shutil.copy(tiny_detector, det)
    shutil.copy(crat_work / "heads.pth", heads)
    shutil.copy(demo_config_path(), config)
    before = _files(work)
    cases = [
        (["export", config, det, heads, "--out", det], f"--out {det} is also an input of this command ({det})"),
        (["export", config, det, heads, "--out", heads], f"--out {heads} is also an input of this command ({heads})"),
        (["export", config, det, heads, "--out", work / "sub" / ".." / "det.pth"], "is also an input of this command"),
        (["export-plain", config, det, "--out", det], f"--out {det} is also an input of this command ({det})"),
        (["export-plain", config, det, "--out", work / "det.pt"],  # its config would be written as det.py
         f"--out's config (<out stem>.py) {work / 'det.py'} is also an input of this command ({config})"),
        (["evaluate", config, det, "--out", det], f"--out {det} is also an input of this command ({det})"),
        (["evaluate", config, det, "--out", work / "m.json", "--per-class-csv", config],
         f"--per-class-csv {config} is also an input of this command ({config})"),
    ]  # fmt: skip
    for args, message in cases:
        line = _error_line(run_cli(*args))
        assert message in line and line.endswith("an output never replaces an input"), (args, line)
        assert _files(work) == before, args
