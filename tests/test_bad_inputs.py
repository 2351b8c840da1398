"""Bad and adversarial inputs of `evaluate-results`, `compare` and `analyze-errors`: one reader, one line.

Each case of the corpus breaks one input (a results file, the ground truth, an evaluate output's
matches or an option) and runs through the commands that read it, through the installed CLI. Every
run must end with exit code 2 and exactly one line, ``crat-ft: error: ...`` matching the case's
message, and leave every file as it was: no input changed, no output written.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from crat_ft.analysis.compare import matches_path
from crat_ft.evaluation.detections import Detections
from crat_ft.evaluation.lvis import lvis_metrics
from crat_ft.evaluation.matching import match_table
from lvis_synth import make_split

GT, (DETS, OTHER) = make_split(11, n_img=8, masks=True, models=2)
ALL = ("evaluate-results", "compare", "analyze-errors")


def _tree(root: Path) -> dict[str, str]:
    """md5 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _refused(args, pattern: str, root: Path) -> None:
    before = _tree(root)
    r = run_cli(*args)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (args, r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("crat-ft: error: "), r.stderr[-3000:]
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert _tree(root) == before and not (root / "out").exists(), "an input changed or an output was written"


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _evaluated(run: Path, gt: dict, dets: list, iou_types=("bbox", "segm")) -> Path:
    """An evaluate output as `crat-ft evaluate` leaves it: metrics.json recording the identity of the
    matches it keeps beside it."""
    run.mkdir(parents=True, exist_ok=True)
    metrics = {iou: lvis_metrics(gt, dets, iou) for iou in iou_types}
    ids = {}
    for iou in iou_types:
        table = match_table(gt, Detections.from_dicts(dets, masks=True), iou)
        table.save(matches_path(run / "metrics.json", iou))
        ids[iou] = table.detections_id
    return _write(run / "metrics.json", {**metrics, "matches": ids})


def _det(k: int, **change) -> list:
    """The detections with detection ``k`` changed (a key set to ``...`` is removed)."""
    dets = json.loads(json.dumps(DETS))
    dets[k].update(change)
    dets[k] = {key: v for key, v in dets[k].items() if v is not ...}
    return json.dumps(dets, allow_nan=True)


def _segm(k: int, **change) -> list:
    seg = dict(DETS[k]["segmentation"], **change)
    return _det(k, segmentation={key: v for key, v in seg.items() if v is not ...})


def _gt(change) -> str:
    gt = json.loads(json.dumps(GT))
    change(gt)
    return json.dumps(gt, allow_nan=True)


def _set(section: str, k: int, **values):
    return lambda gt: gt[section][k].update(values)


R = r"results file \S+: results"
# (name, the bad results file's content, the line every command gives)
RESULTS_CASES = [
    ("score NaN", _det(3, score=float("nan")), rf"{R}\[3\] score: expected a finite number, got nan; "),
    ("score infinite", _det(3, score=float("inf")), rf"{R}\[3\] score: expected a finite number, got inf"),
    ("score a string", _det(3, score="0.5"), rf"{R}\[3\] score: expected a finite number, got '0.5'"),
    ("bbox NaN", _det(2, bbox=[1.0, float("nan"), 3.0, 4.0]), rf"{R}\[2\] bbox: expected \[x, y, width, height\]"),
    ("bbox infinite", _det(2, bbox=[1.0, 2.0, float("inf"), 4.0]), rf"{R}\[2\] bbox: expected .*got \[1.0, 2.0, inf"),
    ("bbox of 3 numbers", _det(2, bbox=[1.0, 2.0, 3.0]), rf"{R}\[2\] bbox: expected .* got \[1.0, 2.0, 3.0\]"),
    ("bbox negative width", _det(2, bbox=[1.0, 2.0, -3.0, 4.0]), rf"{R}\[2\] bbox: .*width, height >= 0"),
    ("bbox a string", _det(2, bbox="1 2 3 4"), rf"{R}\[2\] bbox: expected"),
    ("image_id 1.5", _det(4, image_id=1.5), rf"{R}\[4\] image_id: expected an integer id, got 1.5"),
    ("image_id 1.0", _det(4, image_id=1.0), rf"{R}\[4\] image_id: expected an integer id, got 1.0"),
    ("image_id true", _det(4, image_id=True), rf"{R}\[4\] image_id: expected an integer id, got True"),
    ("image_id a string", _det(4, image_id=str(DETS[4]["image_id"])), rf"{R}\[4\] has image_id '\d+', a string; "),
    ("category_id 2.7", _det(4, category_id=2.7), rf"{R}\[4\] category_id: expected an integer id, got 2.7"),
    ("image_id not in GT", _det(4, image_id=999), rf"{R}\[4\] has image_id 999 not in the ground truth"),
    ("category_id not in GT", _det(4, category_id=99), rf"{R}\[4\] has category_id 99 not in the ground truth"),
    ("score missing", _det(5, score=...), rf"{R}\[5\] lacks 'score'"),
    ("segmentation missing after the first", _det(5, segmentation=...), rf"{R}\[5\] lacks 'segmentation' but"),
    ("bbox missing after the first", _det(5, bbox=...), rf"{R}\[5\] lacks 'bbox' but .*\[0\] has one"),
    ("RLE garbage", _segm(1, counts="garbage!!"), rf"{R}\[1\] segmentation counts: expected a compressed RLE"),
    ("RLE ends inside a number", _segm(1, counts="0o"), rf"{R}\[1\] segmentation counts: .*ends inside a run"),
    ("RLE too few pixels", _segm(1, counts="04"), rf"{R}\[1\] segmentation counts: .*cover 4 pixels"),
    ("RLE counts a number", _segm(1, counts=12), rf"{R}\[1\] segmentation counts: expected a compressed RLE string"),
    ("RLE counts a list", _segm(1, counts=[5120]), rf"{R}\[1\] segmentation counts: expected a compressed RLE"),
    ("RLE wrong size", _segm(1, size=[32, 40]), rf"{R}\[1\] segmentation size: expected \[64, 80\] .*got \[32, 40\]"),
    ("RLE size garbage", _segm(1, size="64x80"), rf"{R}\[1\] segmentation size: expected \[64, 80\]"),
    ("RLE without counts", _segm(1, counts=...), rf"{R}\[1\] segmentation: expected an RLE .*got keys \['size'\]"),
    ("segmentation a polygon", _det(1, segmentation=[[1, 1, 9, 1, 9, 9]]), rf"{R}\[1\] segmentation is a polygon; "),
    ("segmentation null", _det(1, segmentation=None), rf"{R}\[1\] segmentation: expected an RLE"),
    ("a detection not an object", json.dumps(DETS[:2] + [7]), rf"{R}\[2\]: expected a detection object, got 7"),
    ("neither box nor mask", json.dumps([{"image_id": 1, "category_id": 1, "score": 0.5}]), r"lacks 'bbox' and"),
    ("no detections", "[]", r"holds no detections"),
    ("zero bytes", "", r"results file \S+ is not JSON"),
    ("not JSON", "[{", r"results file \S+ is not JSON"),
    ("an object", json.dumps({"detections": DETS}), r"should be a JSON list of detections .*got a dict"),
    ("an annotation file", json.dumps(GT), r"is an annotation file \(it has images and annotations\), not results"),
]


@pytest.fixture
def inputs(tmp_path):
    _write(tmp_path / "gt.json", GT)
    _write(tmp_path / "good.segm.json", DETS)
    return tmp_path


def _commands(root: Path, gt: Path, results: Path, which=ALL) -> list[list]:
    out = root / "out"
    runs = {
        "evaluate-results": ["evaluate-results", gt, results, "--out", out / "m.json"],
        "compare": ["compare", gt, root / "good.segm.json", results, "--out", out / "c.json"],
        "analyze-errors": ["analyze-errors", gt, results, "--out-dir", out / "errors"],
    }
    return [runs[c] for c in which]


@pytest.mark.parametrize("name, content, pattern", RESULTS_CASES, ids=[c[0] for c in RESULTS_CASES])
def test_bad_results_file(inputs, name, content, pattern):
    bad = _write(inputs / "bad.segm.json", content)
    for args in _commands(inputs, inputs / "gt.json", bad):
        _refused(args, pattern, inputs)


GT_CASES = [
    ("duplicate category id", _set("categories", 1, id=1), r"categories\[0\] and categories\[1\] both have id 1"),
    ("duplicate image id", _set("images", 1, id=1), r"images\[0\] and images\[1\] both have id 1"),
    ("duplicate annotation id", _set("annotations", 2, id=1), r"annotations\[0\] and annotations\[2\] both have id 1"),
    ("annotation of an image not in the GT", _set("annotations", 0, image_id=77), r"annotations\[0\] has image_id 77 "),
    ("annotation bbox NaN", _set("annotations", 0, bbox=[1.0, 2.0, float("nan"), 4.0]), r"annotations\[0\] bbox: "),
    ("annotation bbox of 3", _set("annotations", 0, bbox=[1.0, 2.0, 3.0]), r"annotations\[0\] bbox: expected"),
    ("annotation area NaN", _set("annotations", 0, area=float("nan")), r"annotations\[0\] area: expected a finite"),
    ("image id a string", _set("images", 0, id="1"), r"images\[0\] id: expected an integer, got '1'"),
    ("image of 0 pixels", _set("images", 0, height=0), r"images\[0\] is 0x80 pixels; expected a positive"),
]


@pytest.mark.parametrize("name, change, pattern", GT_CASES, ids=[c[0] for c in GT_CASES])
def test_bad_ground_truth(inputs, name, change, pattern):
    gt = _write(inputs / "bad_gt.json", _gt(change))
    for args in _commands(inputs, gt, inputs / "good.segm.json"):
        _refused(args, pattern, inputs)


def test_a_metrics_file_is_not_detections(inputs):
    metrics = _write(inputs / "m" / "metrics.json", {"bbox": lvis_metrics(GT, DETS, "bbox")})
    gt = inputs / "gt.json"
    _refused(["evaluate-results", gt, metrics], r"metrics\.json is a metrics file \(it holds AP values\), not", inputs)
    _refused(["analyze-errors", gt, metrics], r"metrics\.json is a metrics file \(it holds AP values\), not", inputs)
    for arm in (metrics, metrics.parent):  # compare reads it as an evaluate output: its matches are missing
        _refused(["compare", gt, inputs / "good.segm.json", arm], r"is a metrics file without its matches", inputs)


def test_a_directory_is_not_a_results_file(inputs):
    (inputs / "run").mkdir()
    gt = inputs / "gt.json"
    for command in ("evaluate-results", "analyze-errors"):
        _refused([command, gt, inputs / "run"], r"results file \S+run is a directory; pass a JSON results file", inputs)
    _refused(["compare", gt, inputs / "run", inputs / "good.segm.json"], r"run is a directory without metrics", inputs)


def test_compare_refuses_damaged_or_renamed_matches(inputs):
    run = inputs / "ev"
    metrics = _evaluated(run, GT, DETS)
    bbox, segm = matches_path(metrics, "bbox"), matches_path(metrics, "segm")
    gt, good = inputs / "gt.json", inputs / "good.segm.json"
    saved = bbox.read_bytes()
    bbox.write_bytes(b"")
    _refused(["compare", gt, good, run, "--iou-type", "bbox"], r"matches_bbox\.npz is empty \(0 bytes", inputs)
    bbox.write_bytes(saved[: len(saved) // 2])
    _refused(["compare", gt, good, run, "--iou-type", "bbox"], r"is not a readable crat-ft matches file", inputs)
    bbox.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    _refused(["compare", gt, good, run, "--iou-type", "bbox"], r"is not a readable crat-ft matches file", inputs)
    # the bbox matches renamed as the segm ones
    bbox.write_bytes(saved)
    segm.unlink()
    bbox.rename(segm)
    _refused(["compare", gt, good, run], r"matches_segm\.npz holds bbox matches but its name says segm", inputs)


def test_compare_refuses_matches_that_belong_to_other_metrics(inputs):
    """Issue example: `evaluate --out r/metrics.json` (model X), then `evaluate-results gt Y.json --out
    r/metrics.json` leaves X's matches beside Y's metrics; compare must not score X as Y."""
    gt, good = inputs / "gt.json", inputs / "good.segm.json"
    _write(inputs / "y.segm.json", OTHER)
    run = inputs / "r"
    _evaluated(run, GT, DETS)
    r = run_cli("evaluate-results", gt, inputs / "y.segm.json", "--out", run / "metrics.json")
    assert r.returncode == 0, r.stderr
    _refused(["compare", gt, good, run], r"matches_bbox\.npz does not belong to \S+metrics\.json \(metrics\.json "
             r"records no matches\); re-run `crat-ft evaluate`", inputs)  # fmt: skip
    # X's matches copied into a copy of Y's evaluate output
    crat = inputs / "crat"
    _evaluated(crat, GT, OTHER)
    for iou in ("bbox", "segm"):
        shutil.copy(matches_path(run / "metrics.json", iou), matches_path(crat / "metrics.json", iou))
    _refused(["compare", gt, good, crat], r"does not belong to .*records the matches of other detections", inputs)
    # the right ids, but metrics that are not what the matches give
    copy = inputs / "copy"
    metrics = json.loads(_evaluated(copy, GT, OTHER).read_text())
    metrics["bbox"]["AP"] += 0.05
    _write(copy / "metrics.json", metrics)
    _refused(["compare", gt, good, copy], r"matches_bbox\.npz gives bbox AP \d+\.\d\d, but \S+ says \d+\.\d\d", inputs)


def test_no_output_replaces_an_input(inputs):
    gt, good = inputs / "gt.json", inputs / "good.segm.json"
    run = inputs / "ev"
    metrics = _evaluated(run, GT, DETS)
    also = r"is also an input of this command"
    _refused(["evaluate-results", gt, good, "--out", gt], rf"--out \S+gt\.json {also}", inputs)
    _refused(["evaluate-results", gt, good, "--out", good], rf"--out \S+good\.segm\.json {also}", inputs)
    _refused(["evaluate-results", gt, good, "--out", inputs / "x" / ".." / "gt.json"], also, inputs)
    for out in (metrics, matches_path(metrics, "segm"), gt, good):
        _refused(["compare", gt, good, run, "--out", out], rf"--out \S+ {also}", inputs)
    _refused(["analyze-errors", gt, good, "--out-dir", good], r"'--out-dir': .*good\.segm\.json' is a file", inputs)
    errors = inputs / "e"
    errors.mkdir()
    shutil.copy(good, errors / "errors.json")
    _refused(["analyze-errors", gt, errors / "errors.json", "--out-dir", errors], rf"errors\.json {also}", inputs)


def test_resamples_have_an_upper_bound(inputs):
    gt, good = inputs / "gt.json", inputs / "good.segm.json"
    _refused(["compare", gt, good, good, "--resamples", 100_000_000], r"--resamples: expected at most 100000", inputs)


def test_evaluate_refuses_a_json_file_as_config(inputs):
    pytest.importorskip("mmdet")
    import torch

    torch.save({"state_dict": {}, "meta": {}}, inputs / "detector.pth")
    for config in (inputs / "gt.json", inputs / "good.segm.json"):
        _refused(["evaluate", config, inputs / "detector.pth", "--out", inputs / "out" / "m.json"],
                 r"config \S+\.json", inputs)  # fmt: skip


def test_the_good_inputs_pass(inputs):
    """Each command accepts the corpus' good inputs, so every refusal above is its case's own."""
    assert lvis_metrics(GT, DETS, "segm")["AP"] > 0.05
    for args in _commands(inputs, inputs / "gt.json", inputs / "good.segm.json"):
        r = run_cli(*args)
        assert r.returncode == 0 and not r.stderr.strip(), (args, r.stderr[-3000:])
    assert {p.name for p in (inputs / "out").iterdir()} == {"m.json", "c.json", "errors"}


def test_the_rle_check_accepts_what_pycocotools_encodes_and_nothing_that_misdecodes():
    """Every mask pycocotools encodes passes (empty, full, one pixel, random, 1xN); a string whose runs
    do not cover height x width, or that ends inside a run, is refused with the row it is in."""
    import pycocotools.mask as mask_util

    from crat_ft.evaluation.checks import rle_problem

    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7)), np.ones((5, 7)), np.eye(1, 9), np.ones((1, 1)), np.zeros((300, 1))]
    masks += [rng.random(tuple(rng.integers(1, 90, 2))) < rng.random() for _ in range(200)]
    counts = [mask_util.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in masks]
    sizes = np.array([m.shape for m in masks], np.int64)

    def column(strings):
        offsets = np.r_[0, np.cumsum([len(c) for c in strings])].astype(np.int64)
        return np.frombuffer(b"".join(strings), np.uint8), offsets, sizes

    assert rle_problem(*column(counts)) is None
    for k, bad, why in ((7, counts[7] + b"1", "runs cover"), (9, counts[9][:-1] + b"o", "ends inside a run length"),
                        (11, b"\x7f", "outside the RLE alphabet"), (12, b"", "runs cover 0 pixels")):  # fmt: skip
        changed = list(counts)
        changed[k] = bad
        found = rle_problem(*column(changed))
        assert found is not None and found[0] == k and why in found[1], (k, found)
