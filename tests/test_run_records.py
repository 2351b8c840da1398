"""Exact or refused: every command that writes a model or a stage records what decides it
(crat_ft.common.run_record) and never overwrites a run, resumes or reuses one made with other settings,
or deletes a checkpoint that fails to load.

Each refusal asserts the one error line, the exit code and the md5 of every file before and after.
"""

import datetime
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_refusals import _error_line, _files

from conftest import TINY_TRAIN_OPTIONS, demo_config_path, retrain_args, run_cli
from crat_ft.common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIX = "rerun with the recorded settings, or choose a new --work-dir"
HEADS_OPTIONS = [
    "train.max_iters=4",
    "train.milestones=[]",
    "train.checkpoint_interval=2",
    "train.log_interval=1",
    "train.warmup_iters=1",
    "sampler.rois_per_batch=64",
    "sampler.masks_per_batch=8",
]




def _save(path: Path, iteration: int, **meta) -> None:
    torch.save({"meta": {"iter": iteration, **meta}, "state_dict": {"w": torch.full((2,), float(iteration))}}, path)


def _train_args(work: Path, data: Path, *options: str, seed: int = 0) -> list:
    """``crat-ft train-detector`` as the ``tiny_detector`` fixture runs it, plus ``options``."""
    return ["train-detector", demo_config_path(), "--work-dir", work, "--data-root", data, "--seed", seed,
            "--cfg-options", *TINY_TRAIN_OPTIONS, *options]  # fmt: skip


# -- the mechanism ---------------------------------------------------------------------------------


def test_records_name_the_first_difference_and_leave_operational_keys_out(tmp_path):
    from crat_ft.common.paths import demo_config
    from crat_ft.common.run_record import OPERATIONAL_KEYS, UNSET, difference_text, first_difference, flat_settings
    from crat_ft.heads.ft_config import load_ft_config, read_donor_groups, run_settings

    tree = {
        "model": {"type": "MaskRCNN", "roi_head": {"bbox_head": {"loss_bbox": {"loss_weight": 1.0}}}},
        "param_scheduler": [{"type": "LinearLR", "end": 2}, {"milestones": (9, 11)}],
        "default_hooks": {"logger": {"interval": 50}, "checkpoint": {"interval": 4}, "sampler_seed": {"type": "S"}},
        "train_dataloader": {"num_workers": 2, "dataset": {"data_root": "/data/a/", "ann_file": "ann.json"}},
        "test_evaluator": {"ann_file": "/data/a/ann.json"},
        "work_dir": "/runs/x",
    }
    flat = flat_settings(tree, OPERATIONAL_KEYS["train-detector"])
    assert flat == {
        "model.type": "MaskRCNN",
        "model.roi_head.bbox_head.loss_bbox.loss_weight": 1.0,
        "param_scheduler.0.type": "LinearLR",
        "param_scheduler.0.end": 2,
        "param_scheduler.1.milestones": [9, 11],
        "default_hooks.sampler_seed.type": "S",  # it decides the data order: not operational
        "train_dataloader.num_workers": 2,  # each worker draws its own augmentations: not operational
        "train_dataloader.dataset.ann_file": "ann.json",
    }
    old = {"settings": flat, "inputs": {"data": "sha256:" + "a" * 64}, "paths": {"data": ["/data/a/ann.json"]}}
    assert first_difference(old, old) is None
    new = {"settings": {**flat, "param_scheduler.0.end": 4, "model.type": "X"}, "inputs": old["inputs"]}
    assert first_difference(old, new) == ("model.type", "MaskRCNN", "X")  # in the config's order
    new = {"settings": {**flat, "extra": 1}, "inputs": {"data": "sha256:" + "b" * 64}, "paths": {"data": ["/b.json"]}}
    assert first_difference(old, new) == ("extra", UNSET, 1)
    new["settings"] = flat
    assert difference_text(old, new) == (
        "inputs.data=sha256:aaaaaaaaaaaa... (/data/a/ann.json), this run has inputs.data=sha256:bbbbbbbbbbbb... "
        "(/b.json)"
    )

    # retrain-heads: operational settings and the export section are left out; donor groups count by content
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"a": "x", "b": "y"}))
    ft = load_ft_config(demo_config("crat_synthetic.py"), [f"crat.donor_groups={groups}"])
    settings = run_settings(ft, read_donor_groups(groups))
    for key in OPERATIONAL_KEYS["retrain-heads"]:
        assert not [k for k in settings if k == key or k.startswith(key + ".")], key
    groups.write_text('{\n  "b": "y",\n  "a": "x"\n}')  # the same groups, written another way
    assert run_settings(ft, read_donor_groups(groups)) == settings
    groups.write_text(json.dumps({"a": "x", "b": "x"}))
    edited = run_settings(ft, read_donor_groups(groups))
    assert [k for k in settings if settings[k] != edited[k]] == ["crat.donor_groups"]
    text = difference_text(
        {"settings": settings, "files": {"crat.donor_groups": {"path": "/a/groups.json"}}},
        {"settings": edited, "files": {"crat.donor_groups": {"path": "/b/groups.json"}}},
    )
    assert text == (
        f"crat.donor_groups=/a/groups.json (sha256:{settings['crat.donor_groups'][7:19]}...), this run has "
        f"crat.donor_groups=/b/groups.json (sha256:{edited['crat.donor_groups'][7:19]}...)"
    )


def test_resume_takes_last_checkpoint_and_never_deletes_a_checkpoint(tmp_path, capsys):
    from crat_ft.engine.runner import resume_point

    # a copied work dir: last_checkpoint names iter_20 where the run was; an older run's iter_600 lies beside it
    work = tmp_path / "copy"
    work.mkdir()
    for it in (8, 20, 400, 600):
        _save(work / f"iter_{it}.pth", it)
    (work / "last_checkpoint").write_text(str(tmp_path / "original" / "iter_20.pth"))
    assert resume_point(work) == work / "iter_20.pth"

    # the named checkpoint cut short: renamed (bytes kept), the one before it taken, one line said
    cut = (work / "iter_20.pth").read_bytes()[:300]
    (work / "iter_20.pth").write_bytes(cut)
    capsys.readouterr()
    assert resume_point(work, command="train-detector") == work / "iter_8.pth"
    assert capsys.readouterr().err == (
        f"train-detector: --resume: {work / 'iter_20.pth'} cannot be read (truncated or corrupt); set aside as "
        "iter_20.pth.unreadable, not deleted; resuming from iter_8.pth\n"
    )
    assert (work / "iter_20.pth.unreadable").read_bytes() == cut
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_400.pth", "iter_600.pth", "iter_8.pth"]
    with pytest.raises(UserError, match=r"last_checkpoint names iter_20\.pth, which .* does not hold; restore it"):
        resume_point(work)

    # an intact checkpoint the allow-list refuses: one line naming the global and --trust-checkpoint, kept
    other = tmp_path / "other"
    other.mkdir()
    _save(other / "iter_30.pth", 30, saved_at=datetime.datetime(2026, 1, 1))
    (other / "last_checkpoint").write_text(str(other / "iter_30.pth"))
    before = _files(other)
    with pytest.raises(UserError) as err:
        resume_point(other)
    assert str(err.value) == (
        f"checkpoint {other / 'iter_30.pth'} contains Python objects outside crat-ft's safe allow-list "
        "(datetime.datetime); if you trust this file, rerun with --trust-checkpoint"
    )
    assert _files(other) == before
    assert resume_point(other, trust=True) == other / "iter_30.pth"

    # killed while saving its first checkpoint: no last_checkpoint, nothing that loads
    first = tmp_path / "first"
    first.mkdir()
    (first / "iter_2.pth").write_bytes(cut)
    assert resume_point(first) is None
    assert [p.name for p in first.iterdir()] == ["iter_2.pth.unreadable"]
    assert "none before it: starting afresh" in capsys.readouterr().err


def test_a_stage_is_reused_continued_or_redone_by_its_record(tmp_path, capsys):
    from crat_ft.pipeline.demo_stages import plan_stage

    out = tmp_path / "stage1"
    wanted = {"settings": {"train_cfg.max_iters": 24}}
    assert plan_stage("training", out, out / "detector.pth", wanted, None) == "run"
    out.mkdir()
    (out / "iter_8.pth").write_bytes(b"x")
    assert plan_stage("training", out, out / "detector.pth", wanted, wanted) == "resume"
    (out / "detector.pth").write_bytes(b"x")
    assert plan_stage("training", out, out / "detector.pth", wanted, wanted) is None
    assert out.is_dir()
    old = {"settings": {"train_cfg.max_iters": 12}}
    assert plan_stage("training", out, out / "detector.pth", wanted, old) == "run"
    assert not out.exists()
    out.mkdir()
    (out / "detector.pth").write_bytes(b"x")
    assert plan_stage("training", out, out / "detector.pth", wanted, None) == "run"
    assert not out.exists()
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "training",
        f"training: continuing the unfinished run in {out}",
        f"training: done before, reusing {out / 'detector.pth'}",
        f"training: redoing, {out} was made with train_cfg.max_iters=12, this run has train_cfg.max_iters=24",
        f"training: redoing, {out} holds no record of what made it",
    ]


def test_the_ablation_reuses_a_run_only_with_its_own_settings(tiny_data, tmp_path, monkeypatch, capsys):
    import crat_ft.pipeline.train_detector
    from crat_ft.common.run_record import RECORD_FILE, write_record

    spec = importlib.util.spec_from_file_location("bench_ablation", ROOT / "benchmarks" / "bench_ablation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trained = []

    def train(config, work_dir, *, cfg_options, data_root, seed, resume):  # records what it would train
        trained.append((Path(config).name, resume))
        cfg = crat_ft.pipeline.train_detector.detector_train_config(config, cfg_options, data_root, seed)
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        write_record(Path(work_dir) / RECORD_FILE, crat_ft.pipeline.train_detector.detector_record(cfg))
        (Path(work_dir) / "detector.pth").write_bytes(b"weights")

    monkeypatch.setattr(crat_ft.pipeline.train_detector, "train_detector", train)
    with open(tmp_path / "log", "w") as log:
        bench._train(tmp_path, "colour-shapes", 3, "plain", tiny_data, 24, log)
        arm = tmp_path / "colour-shapes" / "e2e" / "s3" / "plain"
        (arm / "metrics.json").write_text("{}")
        bench._train(tmp_path, "colour-shapes", 3, "plain", tiny_data, 24, log)
        assert trained == [(bench.PLAIN_CONFIG, False)]
        bench._train(tmp_path, "colour-shapes", 3, "plain", tiny_data, 12, log)  # another schedule
    assert trained == [(bench.PLAIN_CONFIG, False)] * 2
    assert not (arm / "metrics.json").exists()  # the arm's old results went with it
    assert json.loads((arm / "arm.json").read_text())["stage1_iters"] == 12
    said = capsys.readouterr().out
    assert f"training plain: done before, reusing {arm / 'detector.pth'}" in said
    assert (
        f"training plain: redoing, {arm} was made with train_cfg.max_iters=24, this run has train_cfg.max_iters=12"
        in said
    )


# -- train-detector ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_detector_never_overwrites_mixes_or_changes_a_run(tiny_detector, tiny_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_detector.parent, copy)  # a finished 4-iteration run
    before = _files(copy)
    r = run_cli(*_train_args(copy, tiny_data, "train_cfg.max_iters=20"))
    assert _error_line(r) == (
        f"crat-ft: error: --work-dir {copy} holds a train-detector run (run.json, detector.pth, last_checkpoint, "
        "iter_4.pth); pass --resume, or choose a new --work-dir"
    )
    r = run_cli(*_train_args(copy, tiny_data, "train_cfg.max_iters=30", "optim_wrapper.optimizer.lr=0.02"), "--resume")
    assert _error_line(r) == (
        f"crat-ft: error: --resume: {copy} was trained with train_cfg.max_iters=4, this run has "
        f"train_cfg.max_iters=30; {FIX}"
    )
    assert _files(copy) == before

    # killed after its checkpoint: resumed only with the settings it was trained with
    (copy / "detector.pth").unlink()
    before = _files(copy)
    cases = {
        "optim_wrapper.optimizer.lr=0.01": "optim_wrapper.optimizer.lr=0.002, this run has optim_wrapper.optimizer.lr=0.01",
        "model.roi_head.bbox_head.loss_bbox.loss_weight=5.0": "model.roi_head.bbox_head.loss_bbox.loss_weight=1.0, "
        "this run has model.roi_head.bbox_head.loss_bbox.loss_weight=5.0",
    }  # fmt: skip
    for option, said in cases.items():
        r = run_cli(*_train_args(copy, tiny_data, option), "--resume")
        assert _error_line(r) == f"crat-ft: error: --resume: {copy} was trained with {said}; {FIX}"
    r = run_cli(*_train_args(copy, tiny_data, seed=1), "--resume")
    assert "was trained with randomness.seed=0, this run has randomness.seed=1;" in _error_line(r)
    assert _files(copy) == before

    # an operational setting may change; the resume starts from the checkpoint last_checkpoint names,
    # never from a higher iteration lying beside it
    shutil.copy(copy / "iter_4.pth", copy / "iter_600.pth")
    r = run_cli(*_train_args(copy, tiny_data, "default_hooks.logger.interval=2"), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = torch.load(copy / "detector.pth", weights_only=False)["meta"]
    assert meta["iter"] == 4
    assert meta["run"] == json.loads((copy / "run.json").read_text())
    assert (
        meta["run"]["settings"]["train_cfg.max_iters"] == 4
        and "default_hooks.logger.interval" not in meta["run"]["settings"]
    )


@pytest.mark.slow
def test_train_detector_resume_never_deletes_an_intact_checkpoint(tiny_detector, tiny_data, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_detector.parent, work)
    (work / "detector.pth").unlink()  # killed after its checkpoint
    ckpt = torch.load(work / "iter_4.pth", weights_only=False)
    ckpt["meta"]["saved_at"] = datetime.datetime(2026, 1, 1)  # intact, but outside the allow-list
    torch.save(ckpt, work / "iter_4.pth")
    before = _files(work)
    r = run_cli(*_train_args(work, tiny_data), "--resume")
    assert _error_line(r) == (
        f"crat-ft: error: checkpoint {work / 'iter_4.pth'} contains Python objects outside crat-ft's safe "
        "allow-list (datetime.datetime); if you trust this file, rerun with --trust-checkpoint"
    )
    assert _files(work) == before
    r = run_cli(*_train_args(work, tiny_data), "--resume", "--trust-checkpoint")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(work / "detector.pth", weights_only=False)["meta"]["iter"] == 4

    # a checkpoint cut short is set aside, not removed, with one line
    cut = tmp_path / "cut"
    shutil.copytree(tiny_detector.parent, cut)
    (cut / "detector.pth").unlink()
    data = (cut / "iter_4.pth").read_bytes()[:100_000]
    (cut / "iter_4.pth").write_bytes(data)
    r = run_cli(*_train_args(cut, tiny_data), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f"train-detector: --resume: {cut / 'iter_4.pth'} cannot be read (truncated or corrupt); set aside as "
        "iter_4.pth.unreadable, not deleted; none before it: starting afresh"
    ) in r.stderr.splitlines()
    assert (cut / "iter_4.pth.unreadable").read_bytes() == data and (cut / "detector.pth").is_file()


# -- retrain-heads ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups_run(tiny_data, tiny_cache, tmp_path_factory):
    """A finished 4-iteration CRAT retraining that transfuses within the tiny data's families."""
    root = tmp_path_factory.mktemp("groups")
    train = json.loads((tiny_data / "annotations" / "lvis_v1_train.json").read_text())
    groups = {c["name"]: c["family"] for c in train["categories"]}
    (root / "groups.json").write_text(json.dumps(groups))
    work = root / "run"
    r = run_cli(*retrain_args(tiny_cache, work), "--cfg-options", *HEADS_OPTIONS, "crat.donor_groups=groups.json",
                cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return root, groups


@pytest.mark.slow
def test_an_edited_donor_groups_file_is_refused_on_resume(groups_run, tiny_cache, tiny_detector, tmp_path):
    root, groups = groups_run
    meta = torch.load(root / "run" / "heads.pth", weights_only=True)["meta"]
    assert meta["donor_groups"] == groups and meta["run"]["files"]["crat.donor_groups"]["content"] == groups
    recorded = meta["run"]["settings"]["crat.donor_groups"]

    work = tmp_path / "killed"
    shutil.copytree(root / "run", work)
    (work / "heads.pth").unlink()  # killed after iter_2 and iter_4
    before = _files(work)
    edited = dict(groups)
    edited[next(iter(edited))] = "another"
    (tmp_path / "groups.json").write_text(json.dumps(edited))  # edited, or another directory's groups.json
    args = [*retrain_args(tiny_cache, work), "--resume", "--cfg-options", *HEADS_OPTIONS]
    r = run_cli(*args, "crat.donor_groups=groups.json", cwd=tmp_path)
    line = _error_line(r)
    assert line.startswith(
        f"crat-ft: error: --resume: {work} was trained with crat.donor_groups={root / 'groups.json'} "
        f"(sha256:{recorded[7:19]}...), this run has crat.donor_groups={tmp_path / 'groups.json'} (sha256:"
    ) and line.endswith(f"...); {FIX}")
    r = run_cli(*args, cwd=tmp_path)  # without the groups
    line = _error_line(r)
    assert "was trained with crat.donor_groups=" in line and "this run has crat.donor_groups=null;" in line
    assert _files(work) == before

    # the same groups, wherever the file lies, resume; the run ends as the uninterrupted one did
    (tmp_path / "groups.json").write_text(json.dumps(groups, indent=3))
    r = run_cli(*args, "crat.donor_groups=groups.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(root / "run" / "heads.pth", weights_only=True)["state_dict"]
    b = torch.load(work / "heads.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fisher_neighbours_and_export_use_the_recorded_groups(groups_run, tiny_detector, tmp_path):
    root, groups = groups_run
    heads = root / "run" / "heads.pth"
    r = run_cli("fisher-neighbors", heads, "--top", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    shown = {}
    for line in r.stdout.strip().splitlines():
        name, rest = line.split(" (", 1)
        shown[name] = [part.split(" (")[0] for part in rest.split(": ", 1)[1].split("), ") if " (" in part]
    assert sum(map(len, shown.values())) > 0, r.stdout
    assert all(groups[n] == groups[name] for name, found in shown.items() for n in found), r.stdout
    (root / "groups.json").write_text(json.dumps({n: "one" for n in groups}))  # the file no longer matters
    again = run_cli("fisher-neighbors", heads, "--top", 3)
    assert again.stdout == r.stdout
    r = run_cli("export", demo_config_path(), tiny_detector, heads, "--out", tmp_path / "merged.pth")
    assert r.returncode == 0, r.stderr[-3000:]
    merged = torch.load(tmp_path / "merged.pth", weights_only=False)["meta"]["crat_ft"]
    assert merged["donor_groups"] == groups


@pytest.mark.slow
def test_retrain_resume_never_deletes_an_intact_checkpoint(groups_run, tiny_cache, tmp_path):
    root, groups = groups_run
    work = tmp_path / "work"
    shutil.copytree(root / "run", work)
    (work / "heads.pth").unlink()
    ckpt = torch.load(work / "iter_4.pth", weights_only=False)
    ckpt["meta"]["saved_at"] = datetime.datetime(2026, 1, 1)
    torch.save(ckpt, work / "iter_4.pth")
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    args = [
        *retrain_args(tiny_cache, work),
        "--resume",
        "--cfg-options",
        *HEADS_OPTIONS,
        "crat.donor_groups=groups.json",
    ]
    before = _files(work)
    r = run_cli(*args, cwd=tmp_path)
    assert _error_line(r) == (
        f"crat-ft: error: checkpoint {work / 'iter_4.pth'} contains Python objects outside crat-ft's safe "
        "allow-list (datetime.datetime); if you trust this file, rerun with --trust-checkpoint"
    )
    assert _files(work) == before
    r = run_cli(*args, "--trust-checkpoint", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(work / "heads.pth", weights_only=True)["meta"]["iter"] == 4

    # the newest checkpoint cut short: set aside with one line, the run resumed from iter_2 to the same heads
    cut = tmp_path / "cut"
    shutil.copytree(root / "run", cut)
    (cut / "heads.pth").unlink()
    data = (cut / "iter_4.pth").read_bytes()[:5000]
    (cut / "iter_4.pth").write_bytes(data)
    r = run_cli(*[cut if a == work else a for a in args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f"retrain-heads: --resume: {cut / 'iter_4.pth'} cannot be read (truncated or corrupt); set aside as "
        "iter_4.pth.unreadable, not deleted; resuming from iter_2.pth"
    ) in r.stderr.splitlines()
    assert (cut / "iter_4.pth.unreadable").read_bytes() == data
    a = torch.load(root / "run" / "heads.pth", weights_only=True)["state_dict"]
    b = torch.load(cut / "heads.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
