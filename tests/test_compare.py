"""crat-ft compare: matching once and re-accumulating equals lvis_metrics; paired bootstrap intervals."""

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import run_cli
from crat_ft.analysis.bootstrap import category_ap, paired_resamples, resample_weights, seeded_interval, summarize
from crat_ft.analysis.compare import compare
from crat_ft.common.errors import UserError
from crat_ft.evaluation.detections import Detections
from crat_ft.evaluation.lvis import lvis_metrics
from crat_ft.evaluation.matching import MatchTable, match_table
from lvis_synth import make_split, resampled_split

KEYS = ("AP", "AP50", "APr", "APc", "APf")


def _full(table):
    ap = category_ap(table, np.ones((1, len(table.image_ids)), np.int32))
    return ap[0], {k: float(v[0]) for k, v in summarize(ap, table.frequency).items()}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_sample_equals_lvis_metrics(iou_type, seed):
    gt, (dets,) = make_split(seed, masks=iou_type == "segm")
    ref = lvis_metrics(gt, dets, iou_type, per_class=True)
    table = match_table(gt, Detections.from_dicts(dets, masks=iou_type == "segm"), iou_type)
    ap, stats = _full(table)
    for key in KEYS:
        assert stats[key] == pytest.approx(ref[key], abs=1e-12), key
    per_class = np.where((ap > -1).all(axis=1), ap.mean(axis=1), -1.0)
    np.testing.assert_allclose(per_class, [ref["per_class"][c] for c in table.cat_ids], atol=1e-12)
    assert 0.05 < ref["AP"] < 0.5  # a case with something to measure


def test_resamples_equal_brute_force_lvis_metrics():
    """Each resample's statistic equals lvis_metrics on the split with images repeated as drawn
    (tolerance 1e-12), so the bootstrap standard errors are the brute-force ones."""
    gt, (a, b) = make_split(5, n_img=50, models=2)
    ta, tb = (match_table(gt, Detections.from_dicts(d), "bbox") for d in (a, b))
    weights = resample_weights(len(ta.image_ids), 25, seed=3)
    fast = {n: summarize(category_ap(t, weights), t.frequency) for n, t in (("a", ta), ("b", tb))}
    brute = {"a": {k: [] for k in KEYS}, "b": {k: [] for k in KEYS}}
    for counts in weights:
        for name, dets in (("a", a), ("b", b)):
            g2, d2 = resampled_split(gt, dets, counts, ta.image_ids)
            m = lvis_metrics(g2, d2, "bbox")
            for k in KEYS:
                brute[name][k].append(m[k])
    for k in KEYS:
        for name in "ab":
            np.testing.assert_allclose(fast[name][k], brute[name][k], atol=1e-12, err_msg=k)
        se_fast = np.std(fast["b"][k] - fast["a"][k], ddof=1)
        se_brute = np.std(np.subtract(brute["b"][k], brute["a"][k]), ddof=1)
        assert se_fast == pytest.approx(se_brute, abs=1e-12) and se_fast > 0.003


def test_identical_inputs_give_exactly_zero(tmp_path):
    gt, (dets,) = make_split(2, masks=True)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "r.json").write_text(json.dumps(dets))
    result = compare(tmp_path / "gt.json", str(tmp_path / "r.json"), str(tmp_path / "r.json"))
    assert set(result) >= {"bbox", "segm"} and result["resamples"] == 1000
    for iou in ("bbox", "segm"):
        for key in ("AP", "APr", "APc", "APf"):
            m = result[iou][key]
            assert (m["delta"], m["low"], m["high"]) == (0.0, 0.0, 0.0)
            assert m["a"] == m["b"] > 0


def _subset(table: MatchTable, images: np.ndarray) -> MatchTable:
    """The table of a val split made of some of its images (a sample of a larger population)."""
    new = np.full(len(table.image_ids), -1)
    new[images] = np.arange(len(images))
    d, g = new[table.det_image] >= 0, new[table.gt_pair_image] >= 0
    return replace(
        table, image_ids=table.image_ids[images], det_image=new[table.det_image[d]], det_cat=table.det_cat[d],
        score=table.score[d], tp=table.tp[d], ignored=table.ignored[d],
        gt_pair_image=new[table.gt_pair_image[g]], gt_pair_cat=table.gt_pair_cat[g], gt_pair_count=table.gt_pair_count[g],
    )  # fmt: skip


def test_coverage_on_a_known_difference():
    """Model B jitters its boxes 1.5 times as much as A. The population: 2,000 images. A val split:
    100 of them. The true difference at that size is the mean over 1,000 splits (AP is not a mean over
    images: its expectation moves with the split's size). 95% intervals of 100 splits must cover it
    about 95% of the time (measured with these seeds: 0.97 for AP, 0.94 for APr)."""
    gt, (a, b) = make_split(10_000, n_img=2000, models=2)
    ta, tb = (match_table(gt, Detections.from_dicts(d), "bbox") for d in (a, b))
    rng = np.random.default_rng(0)
    picks = np.array([np.sort(rng.choice(2000, 100, replace=False)) for _ in range(1000)])
    w = np.zeros((len(picks), 2000), np.int32)
    w[np.arange(len(picks))[:, None], picks] = 1
    sa, sb = summarize(category_ap(ta, w), ta.frequency), summarize(category_ap(tb, w), tb.frequency)
    truth = {k: float(np.mean(sb[k] - sa[k])) for k in ("AP", "APr")}
    assert truth["AP"] < -0.02  # B is worse by construction
    covered = {k: [] for k in truth}
    for r in range(100):
        pair = (_subset(ta, picks[r]), _subset(tb, picks[r]))
        stats = paired_resamples([pair], 1000, seed=r)
        for k in truth:
            ci = seeded_interval(stats["b"][k] - stats["a"][k], stats["boot_delta"][k])
            covered[k].append(ci["low"] <= truth[k] <= ci["high"])
    print({k: np.mean(hits) for k, hits in covered.items()})
    for k, hits in covered.items():
        assert 0.88 <= np.mean(hits) <= 0.99, (k, np.mean(hits))


def test_seeded_interval_adds_seed_variance():
    boot = np.random.default_rng(0).normal(0.0, 0.01, (3, 4000)) + np.array([[0.01], [0.02], [0.03]])
    ci = seeded_interval(np.array([0.01, 0.02, 0.03]), boot)
    assert ci["delta"] == pytest.approx(0.02)
    assert ci["sd_seeds"] == pytest.approx(0.01)
    se_img = np.std(boot.mean(axis=0), ddof=1)  # ~0.01 / sqrt(3)
    half = 4.302652729749464 * np.sqrt(se_img**2 + 0.01**2 / 3)  # t(2) 0.975 quantile
    assert (ci["low"], ci["high"]) == pytest.approx((0.02 - half, 0.02 + half))
    one = seeded_interval(np.array([0.01]), boot[:1])
    assert (one["low"], one["high"]) == pytest.approx(tuple(np.percentile(boot[0], [2.5, 97.5])))


def test_cli_compare_results_files_and_seeds(tmp_path):
    gt, models = make_split(3, models=2, masks=True)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    for seed in (0, 1):  # two "seeds": the same two models with scores perturbed per seed
        rng = np.random.default_rng(seed)
        for name, dets in zip(("base", "crat"), models):
            run = tmp_path / f"s{seed}"
            run.mkdir(exist_ok=True)
            moved = [dict(d, score=float(np.clip(d["score"] + rng.normal(0, 0.05), 0, 1))) for d in dets]
            (run / f"{name}.segm.json").write_text(json.dumps(moved))
    out = tmp_path / "cmp" / "c.json"
    r = run_cli("compare", tmp_path / "gt.json", tmp_path / "s0/base.segm.json", tmp_path / "s0/crat.segm.json",
                "--names", "baseline,CRAT", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    saved = json.loads(out.read_text())
    ref = {
        iou: lvis_metrics(gt, json.loads((tmp_path / "s0/crat.segm.json").read_text()), iou) for iou in ("bbox", "segm")
    }
    for iou in ("bbox", "segm"):
        assert saved[iou]["APr"]["b"] == pytest.approx(ref[iou]["APr"], abs=1e-12)
        m = saved[iou]["AP"]
        assert m["low"] < m["delta"] < m["high"] and m["delta"] == pytest.approx(m["b"] - m["a"])
        assert f"{100 * m['delta']:+.1f} [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]" in r.stdout
    assert "CRAT - baseline rare bbox AP" in r.stdout and "on this run" in r.stdout
    r = run_cli("compare", tmp_path / "gt.json", tmp_path / "s{seed}/base.segm.json", tmp_path / "s{seed}/crat.segm.json",
                "--seeds", "0,1", "--iou-type", "bbox", "--out", tmp_path / "seeds.json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1] and "segm" not in seeds and seeds["bbox"]["AP"]["sd_seeds"] > 0
    assert "the mean of 2 seeds" in r.stdout
    # bad input: one line each, nothing written
    cases = [
        (("--seeds", "0,1"), "should hold {seed} where the seed goes"),
        (("--resamples", "100"), "--resamples: expected at least 1000 for a 95% interval, got 100"),
        (("--seeds", "0,x"), "--seeds: expected integers separated by commas, got '0,x'"),
    ]
    for options, message in cases:
        r = run_cli("compare", tmp_path / "gt.json", tmp_path / "s0/base.segm.json", tmp_path / "s0/crat.segm.json",
                    *options, "--out", tmp_path / "no" / "x.json")  # fmt: skip
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "no").exists()
    other, _ = make_split(4, n_img=20)
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = run_cli("compare", tmp_path / "other.json", tmp_path / "s0/base.segm.json", tmp_path / "s0/crat.segm.json")
    assert r.returncode == 2 and "not in the ground truth; evaluate against the matching annotation file" in r.stderr


def test_saved_tables_refuse_other_annotations(tmp_path):
    gt, (dets,) = make_split(6)
    table = match_table(gt, Detections.from_dicts(dets), "bbox")
    (tmp_path / "m").mkdir()
    metrics = {"bbox": lvis_metrics(gt, dets, "bbox"), "matches": {"bbox": table.detections_id}}
    (tmp_path / "m" / "metrics.json").write_text(json.dumps(metrics))
    table.save(tmp_path / "m" / "metrics_matches_bbox.npz")
    loaded = MatchTable.load(tmp_path / "m" / "metrics_matches_bbox.npz")
    assert np.array_equal(loaded.tp, table.tp) and loaded.gt_fingerprint == table.gt_fingerprint
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    same = compare(tmp_path / "gt.json", str(tmp_path / "m"), str(tmp_path / "m" / "metrics.json"))
    assert same["bbox"]["AP"]["a"] == pytest.approx(lvis_metrics(gt, dets, "bbox")["AP"], abs=1e-12)
    gt["images"][0]["neg_category_ids"] = []
    (tmp_path / "gt2.json").write_text(json.dumps(gt))
    with pytest.raises(
        UserError, match="was matched against other annotations than GT; pass the GT it was evaluated on"
    ):
        compare(tmp_path / "gt2.json", str(tmp_path / "m"), str(tmp_path / "m"))
    with pytest.raises(UserError, match="has no segm matches"):
        compare(tmp_path / "gt.json", str(tmp_path / "m"), str(tmp_path / "m"), iou_types=["segm"])


def test_seeds_with_a_val_split_each(tmp_path):
    """The demo's data depend on its seed: GT holds {seed} too; each split gets its own resamples."""
    singles = []
    for seed in (0, 1):
        gt, (a, b) = make_split(20 + seed, n_img=40 + 10 * seed, models=2)
        run = tmp_path / f"s{seed}"
        run.mkdir()
        for name, doc in (("gt", gt), ("a", a), ("b", b)):
            (run / f"{name}.json").write_text(json.dumps(doc))
        singles.append(compare(run / "gt.json", str(run / "a.json"), str(run / "b.json"), iou_types=["bbox"]))
    both = compare(tmp_path / "s{seed}/gt.json", str(tmp_path / "s{seed}/a.json"), str(tmp_path / "s{seed}/b.json"),
                   seeds=[0, 1])  # fmt: skip
    assert both["splits"] == 2 and both["images"] == [40, 50]
    for key in ("AP", "APf"):
        deltas = [s["bbox"][key]["delta"] for s in singles]
        m = both["bbox"][key]
        assert m["delta"] == pytest.approx(np.mean(deltas), abs=1e-12)
        assert m["sd_seeds"] == pytest.approx(np.std(deltas, ddof=1), abs=1e-12)
        assert m["low"] < m["delta"] < m["high"]


def test_demo_summary_carries_intervals_oracle_and_verdict(tmp_path):
    """What the demo prints and writes after its evaluations, on a made-up pair of models."""
    from crat_ft.analysis.compare import matches_path
    from crat_ft.pipeline.demo_report import delta_table, what_the_run_shows

    gt, models = make_split(9, models=2, masks=True)
    (tmp_path / "data" / "annotations").mkdir(parents=True)
    (tmp_path / "data" / "annotations" / "lvis_v1_val.json").write_text(json.dumps(gt))
    summary = {}
    for name, dets in zip(("stage1", "baseline", "crat"), [models[0], *models]):
        run = tmp_path / name
        run.mkdir()
        (run / "results.segm.json").write_text(json.dumps(dets))
        metrics = {iou: lvis_metrics(gt, dets, iou) for iou in ("bbox", "segm")}
        ids = {}
        for iou in ("bbox", "segm"):
            table = match_table(gt, Detections.from_dicts(dets, masks=True), iou)
            table.save(matches_path(run / "metrics.json", iou))
            ids[iou] = table.detections_id
        (run / "metrics.json").write_text(json.dumps({**metrics, "matches": ids}))
        summary[name] = metrics
    shown = what_the_run_shows(tmp_path, tmp_path / "data", seed=0)
    cmp = shown["crat_vs_baseline"]
    assert cmp["bbox"]["APr"]["delta"] == pytest.approx(
        summary["crat"]["bbox"]["APr"] - summary["baseline"]["bbox"]["APr"]
    )
    oracle = shown["class_oracle_crat_vs_baseline"]["segm"]["AP"]
    assert oracle["a"] == pytest.approx(shown["class_oracle_AP"]["baseline"]["segm"]["all"])
    assert oracle["low"] <= oracle["delta"] <= oracle["high"]
    assert (tmp_path / "errors_bbox.png").is_file() and (tmp_path / "errors_segm.png").is_file()
    text = delta_table({**summary, **shown})
    m = cmp["segm"]["APr"]
    assert f"APr {100 * m['delta']:+.1f} [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]" in text
    assert "class-oracle AP, CRAT - baseline (95% paired bootstrap): AP " in text
    assert text.splitlines()[-4].startswith("CRAT - baseline rare bbox AP ")
    assert text.splitlines()[-1].startswith("CRAT - baseline bbox class-oracle AP ")
    assert all(line.endswith("on this run") for line in text.splitlines()[-4:])


def test_t975_is_exact_for_any_number_of_seeds():
    """Beyond 30 degrees of freedom too: 41 seeds take t(40) = 2.021, not the normal 1.960."""
    from scipy.stats import t

    from crat_ft.analysis.bootstrap import t975

    for df in (1, 2, 5, 29, 30, 31, 40, 59, 500):
        assert t975(df) == pytest.approx(t.ppf(0.975, df), rel=1e-12), df
    full = np.linspace(0.0, 0.04, 41)
    boot = full[:, None] + np.random.default_rng(1).normal(0.0, 0.01, (41, 2000))
    ci = seeded_interval(full, boot)
    se_img = np.std(boot.mean(axis=0), ddof=1)
    half = 2.0210753903062737 * np.sqrt(se_img**2 + np.std(full, ddof=1) ** 2 / 41)
    assert (ci["low"], ci["high"]) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-12)


def test_gt_fingerprint_covers_the_geometry(tmp_path):
    """Boxes, areas, masks and image sizes are part of the annotations a table was matched against."""
    import copy

    from crat_ft.evaluation.matching import index_ground_truth

    gt, (dets,) = make_split(6, masks=True)
    base = index_ground_truth(gt).fingerprint()
    same = copy.deepcopy(gt)
    same["annotations"][0] = dict(reversed(list(same["annotations"][0].items())))  # key order: no change
    assert index_ground_truth(same).fingerprint() == base

    def moved(g):
        g["annotations"][0]["bbox"][0] += 1.0

    def area(g):
        g["annotations"][0]["area"] += 1.0

    def mask(g):
        g["annotations"][0]["segmentation"][0][0] += 1.0

    def size(g):
        g["images"][0]["height"] += 1

    for change in (moved, area, mask, size):
        other = copy.deepcopy(gt)
        change(other)
        assert index_ground_truth(other).fingerprint() != base, change.__name__
    # an evaluate output made before a box moved is refused against the moved GT
    run = tmp_path / "m"
    run.mkdir()
    table = match_table(gt, Detections.from_dicts(dets), "bbox")
    table.save(run / "metrics_matches_bbox.npz")
    metrics = {"bbox": lvis_metrics(gt, dets, "bbox"), "matches": {"bbox": table.detections_id}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    moved(gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(UserError, match="was matched against other annotations than GT"):
        compare(tmp_path / "gt.json", str(run), str(run))


def test_matches_carry_the_identity_of_their_detections(tmp_path):
    """The id a metrics file records for its matches: the same detections give the same id, others another,
    and ``matches_ids`` reads it back from the saved files without their arrays."""
    from crat_ft.analysis.compare import matches_ids

    gt, (a, b) = make_split(6, masks=True, models=2)
    ta, tb = (match_table(gt, Detections.from_dicts(d, masks=True), "segm") for d in (a, b))
    again = match_table(gt, Detections.from_dicts(json.loads(json.dumps(a)), masks=True), "segm")
    assert ta.detections_id == again.detections_id != tb.detections_id
    moved = [dict(d) for d in a]
    moved[0]["score"] = np.nextafter(moved[0]["score"], 1.0)
    assert match_table(gt, Detections.from_dicts(moved, masks=True), "segm").detections_id != ta.detections_id
    ta.save(tmp_path / "m_matches_segm.npz")
    ids = matches_ids({"segm": tmp_path / "m_matches_segm.npz", "bbox": tmp_path / "m_matches_bbox.npz"})
    assert ids == {"segm": ta.detections_id}
    assert MatchTable.load(tmp_path / "m_matches_segm.npz", "segm").detections_id == ta.detections_id
