"""docs/lvis.md, run: the LVIS guide's commands on a tiny LVIS v1 dataset, with only paths and sizes changed.

The commands are read from the guide's ```bash blocks, so editing one changes what runs here; a
command this test does not know fails it (:func:`plan`). They run in a scratch directory that stands
for the user's working directory, so the guide's ``checkpoints/``, ``data/lvis_v1/``, ``cache/`` and
``work_dirs/`` are used as written. What changes:

=====================================================  ==============================================
in the guide                                           here
=====================================================  ==============================================
``wget -P checkpoints/ URL``                           random weights of the model of the config that
                                                       mmdet's LVIS metafile lists for URL, saved
                                                       where wget puts the file (nothing downloaded)
``mkdir -p work_dirs/... && ...`` (detector config)    run as written, by bash
``torchrun --nproc-per-node 8 $(which crat-ft)``       ``torchrun --standalone --nproc-per-node 2``
                                                       and the installed crat-ft (gloo, CPU)
``crat-ft``                                            the installed crat-ft
``configs/lvis/...``                                   the repository's ``configs/lvis/...``
``data/lvis_v1/``                                      demo images relabelled onto LVIS v1's 1,203
                                                       categories (``tests/lvis_v1_tiny.py``)
``extract-features``, ``retrain-heads``, ``evaluate``  ``--cfg-options`` appended: :data:`SIZES`
``crat-ft ablate ...``                                 not run: every arm retrains its 20,000 steps
                                                       (ablate takes no ``--cfg-options``)
=====================================================  ==============================================
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import crat_ft_exe, run_cli
from lvis_v1_tiny import lvis_v1_names, make_lvis_v1_tiny, save_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "lvis.md"
TORCHRUN_8 = "torchrun --nproc-per-node 8 $(which crat-ft) "
NPROC = 2
# the guide's paths used as written (relative to the scratch directory), and the one mapped
AS_WRITTEN = ("checkpoints/", "data/lvis_v1/", "cache/", "work_dirs/")
REPO_CONFIGS = "configs/lvis/"
# small images (the demo's are 128 px), a few steps, few proposals: random weights score all 1,203
# classes alike, so each proposal gives 1,203 boxes to the NMS and up to 20 masks to the mask head
SIZES = {
    "extract-features": ["train_dataloader.dataset.dataset.pipeline.2.scales=[(1333,160)]"],
    "retrain-heads": [
        "train.max_iters=4",
        "train.milestones=[]",
        "train.warmup_iters=0",
        "train.checkpoint_interval=4",
        "train.log_interval=1",
        "train.num_workers=0",
    ],
    "evaluate": [
        "test_dataloader.dataset.pipeline.1.scale=(1333,160)",
        "model.test_cfg.rpn.max_per_img=8",
        "model.test_cfg.rcnn.max_per_img=20",
    ],
}
RUN = ("env", "extract-features", "inspect-cache", "retrain-heads", "export", "evaluate", "compare", "analyze-errors")
RETRAINED = ("bbox_head.fc_cls", "bbox_head.fc_reg", "mask_head.conv_logits")  # from the default fc/logits cache
NOT_RUN = {"ablate": "every arm retrains the config's 20,000 steps and ablate takes no --cfg-options"}
# every step the guide must have, with how many commands
EXPECTED = Counter({"wget": 1, "detector config": 1, "env": 1, "extract-features --dry-run": 1,
                    "extract-features": 1, "inspect-cache": 1, "retrain-heads": 2, "export": 2, "evaluate": 2,
                    "compare": 1, "analyze-errors": 1, "ablate": 2})  # fmt: skip


@dataclass
class Step:
    """One command of the guide and what the test does for it."""

    name: str  # a key of EXPECTED
    command: str  # as the guide writes it
    argv: list[str] = field(default_factory=list)  # what runs (empty: not run by a subprocess)
    args: list[str] = field(default_factory=list)  # the crat-ft arguments after the command, as written


def guide_commands(text: str) -> list[str]:
    """The command of each ```bash block of the guide, in order (a block holds one command)."""
    return [block.strip() for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)]


def plan(command: str) -> Step:
    """What the test runs for a command of the guide; ValueError naming the command for one it does not know."""
    if "\n" not in command and command.startswith("wget "):
        words = shlex.split(command)
        if len(words) != 4 or words[1] != "-P" or not words[2].startswith(AS_WRITTEN):
            raise ValueError(f"docs/lvis.md: expected `wget -P checkpoints/ URL`, got {command!r}")
        return Step("wget", command)
    if command.startswith("mkdir -p work_dirs/") and "> work_dirs/lvis/detector.py" in command:
        return Step("detector config", command, ["bash", "-c", command])
    if "\n" in command:
        raise ValueError(f"docs/lvis.md: a command of several lines the test does not know: {command!r}")
    if command.startswith(TORCHRUN_8):  # --standalone: a free port, beside other torchrun jobs
        launch = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={NPROC}"]
        rest = command[len(TORCHRUN_8) :]
    elif command.startswith("crat-ft "):
        launch, rest = [], command[len("crat-ft ") :]
    else:
        raise ValueError(f"docs/lvis.md: a command the test does not know: {command!r}; map it in {__name__}.plan")
    args = shlex.split(rest)
    sub = args[0] if args else ""
    if sub in NOT_RUN:
        return Step(sub, command, args=args)
    if sub not in RUN:
        raise ValueError(f"docs/lvis.md: crat-ft {sub} is not among the commands the test runs ({', '.join(RUN)})")
    if sub in SIZES and "--cfg-options" in args:
        raise ValueError(f"docs/lvis.md: {command!r} has --cfg-options; the test appends its own sizes to them")
    argv = [*launch, *crat_ft_exe(), *(_path(a, command) for a in args)]
    if sub in SIZES:
        argv += ["--cfg-options", *SIZES[sub]]
    return Step(f"{sub} --dry-run" if "--dry-run" in args else sub, command, argv, args)


def _path(arg: str, command: str) -> str:
    """``arg`` with a path of the repository's configs made absolute; ValueError for a path the test does not know."""
    if arg.startswith("-") or "/" not in arg or arg.startswith(AS_WRITTEN):
        return arg
    if arg.startswith(REPO_CONFIGS):
        return str(ROOT / arg)
    raise ValueError(
        f"docs/lvis.md: {command!r} names {arg!r}, under none of {', '.join((*AS_WRITTEN, REPO_CONFIGS))}; "
        "map its place in the test"
    )


def option(step: Step, name: str) -> str:
    return step.args[step.args.index(name) + 1]


def test_every_command_of_the_guide_is_mapped_and_every_step_is_there():
    steps = [plan(c) for c in guide_commands(GUIDE.read_text())]
    assert Counter(s.name for s in steps) == EXPECTED
    retrained = sorted(Path(s.args[1]).name.split("_")[0] for s in steps if s.name == "retrain-heads")
    assert retrained == ["baseline", "crat"]


def test_a_command_the_test_does_not_know_fails_it():
    with pytest.raises(ValueError, match=r"crat-ft train-detector is not among the commands the test runs"):
        plan("crat-ft train-detector work_dirs/lvis/detector.py --work-dir work_dirs/x")
    with pytest.raises(ValueError, match=r"a command the test does not know: 'python tools/test.py"):
        plan("python tools/test.py work_dirs/lvis/detector.py")
    with pytest.raises(ValueError, match=r"names '/data/lvis/', under none of checkpoints/"):
        plan("crat-ft inspect-cache /data/lvis/")
    with pytest.raises(ValueError, match=r"the test appends its own sizes"):
        plan("crat-ft evaluate work_dirs/lvis/detector.py m.pth --out m.json --cfg-options a=1")


def _run(step: Step, cwd: Path) -> str:
    # CPU only wherever it runs: two ranks need not fit the GPUs of the machine
    if step.argv[: len(crat_ft_exe())] == crat_ft_exe():  # a crat-ft command: as the other tests run one
        r = run_cli(*step.argv[len(crat_ft_exe()) :], cwd=cwd, env={"CUDA_VISIBLE_DEVICES": ""})
    else:  # torchrun, bash
        env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
        r = subprocess.run(step.argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"{step.command}\nran as {shlex.join(step.argv)}\n{(r.stdout + r.stderr)[-4000:]}"
    return r.stdout + r.stderr


def _check_metrics(out: Path, data: Path, names: list[str]) -> None:
    """metrics.json: LVIS's keys, finite; AP and its groups defined (each group has val instances).
    The per-class CSV: every category of LVIS v1, an AP for exactly those with val instances."""
    import csv

    from crat_ft.evaluation.lvis import METRIC_KEYS

    metrics = json.loads(out.read_text())
    for table in (metrics, metrics["fixed"]):
        for iou in ("bbox", "segm"):
            assert set(table[iou]) == set(METRIC_KEYS), table[iou]
            assert all(math.isfinite(v) and (v == -1 or 0 <= v <= 1) for v in table[iou].values()), table[iou]
            assert all(0 <= table[iou][k] <= 1 for k in ("AP", "APr", "APc", "APf")), table[iou]
    val = json.loads((data / "annotations" / "lvis_v1_val.json").read_text())
    in_val = {names[a["category_id"] - 1] for a in val["annotations"]}
    with open(out.parent / f"{out.stem}_per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == names
    for row in rows:
        for iou in ("bbox", "segm"):
            assert (float(row[f"{iou}_AP"]) >= 0) == (row["class"] in in_val), row


@pytest.mark.slow
def test_the_lvis_guide_runs_on_a_tiny_lvis_v1(tmp_path):
    steps = [plan(c) for c in guide_commands(GUIDE.read_text())]
    assert Counter(s.name for s in steps) == EXPECTED
    make_lvis_v1_tiny(tmp_path / "data" / "lvis_v1")
    done = Counter()
    crat_on = {}  # work dir of each retrain-heads -> whether its config has CRAT on
    for step in steps:
        if step.name == "wget":
            words = shlex.split(step.command)
            save_random_checkpoint(words[3], tmp_path / words[2])
        elif step.argv:
            out = _run(step, tmp_path)
            _check_step(step, out, tmp_path)
            if step.name == "retrain-heads":
                crat_on[Path(option(step, "--work-dir"))] = Path(step.args[1]).name.startswith("crat_")
            if step.name == "export":
                _check_merged(tmp_path, step, crat_on[Path(step.args[3]).parent])
        done[step.name] += 1
    assert done == EXPECTED
    assert sorted(crat_on.values()) == [False, True]  # CRAT and the baseline


def _check_step(step: Step, out: str, cwd: Path) -> None:
    """What each command must have written or printed (export: :func:`_check_merged`)."""
    if step.name == "detector config":
        assert (cwd / "work_dirs" / "lvis" / "detector.py").is_file()
    elif step.name == "env":
        assert re.search(r"^mmdet\s+3\.", out, re.M), out
    elif step.name == "extract-features --dry-run":
        assert re.search(r"projected for \d+ images, 1203 classes", out), out
        assert not (cwd / option(step, "--out")).exists()  # a dry run writes nothing
    elif step.name == "extract-features":
        cache = cwd / option(step, "--out")
        shards = sorted(p.name for p in cache.glob("shard-*.h5"))
        assert shards == [f"shard-{i:05d}-of-{NPROC:05d}.h5" for i in range(NPROC)], shards
        assert (cache / "index.h5").is_file()
    elif step.name == "inspect-cache":
        for group, n in (("rare", 337), ("common", 461), ("frequent", 405)):
            assert re.search(rf"^\s+{group}\s+{n} classes\s+[1-9]\d* RoIs", out, re.M), out[:2000]
    elif step.name == "retrain-heads":
        assert (cwd / option(step, "--work-dir") / "heads.pth").is_file()
    elif step.name == "evaluate":
        assert out.count("LVIS v1 metrics (%)") == 1, out  # rank 0 alone reports
        _check_metrics(cwd / option(step, "--out"), cwd / option(step, "--data-root"), lvis_v1_names())
        prefix = option(step, "--outfile-prefix")
        assert (cwd / f"{prefix}.bbox.json").is_file() and (cwd / f"{prefix}.segm.json").is_file()
    elif step.name == "compare":
        a, b = option(step, "--names").split(",")
        assert "95% paired bootstrap intervals over 4 val images" in out, out
        for iou in ("bbox", "segm"):
            assert re.search(rf"^{iou} {a}\s", out, re.M) and re.search(rf"^{iou} {b}\s", out, re.M), out
    elif step.name == "analyze-errors":
        assert "class-oracle AP" in out, out
        assert (cwd / option(step, "--out-dir") / "errors.json").is_file()


def _check_merged(cwd: Path, step: Step, crat: bool) -> None:
    """The merged checkpoint: the original's weights but for the retrained layers; LVIS v1's classes."""
    import torch

    original, merged = cwd / step.args[2], cwd / option(step, "--out")
    before = torch.load(original, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(merged, map_location="cpu", weights_only=True)
    changed = sorted(k for k in before if not torch.equal(after["state_dict"][k], before[k]))
    assert after["state_dict"].keys() == before.keys()
    assert changed == sorted(f"roi_head.{layer}.{p}" for layer in RETRAINED for p in ("weight", "bias"))
    assert after["state_dict"]["roi_head.bbox_head.fc_cls.weight"].shape[0] == 1204  # 1,203 classes + background
    assert list(after["meta"]["dataset_meta"]["classes"]) == lvis_v1_names()
    assert after["meta"]["crat_ft"]["crat"]["enable"] is crat
