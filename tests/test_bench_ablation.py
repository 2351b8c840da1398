"""The ablation script's settings: every arm's options are keys of its config, the shortened stage-1
schedule keeps the demo's proportions, and each benchmark's held-out seed runs after its reported ones."""

import importlib.util
import json
from pathlib import Path

import pytest

from crat_ft.common.paths import demo_config
from crat_ft.engine.config import load_config
from crat_ft.heads.ft_config import load_ft_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ablation", ROOT / "benchmarks" / "bench_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage1_options_scale_the_demo_schedule(bench):
    full = load_config(demo_config(bench.PLAIN_CONFIG))
    same = load_config(demo_config(bench.PLAIN_CONFIG), bench.stage1_options(600))
    for cfg in (full, same):  # 600 iterations reproduce the demo config's own schedule
        assert cfg.train_cfg.max_iters == 600
        assert cfg.param_scheduler[0].end == 100
        assert cfg.param_scheduler[1].end == 600 and cfg.param_scheduler[1].milestones == [450, 550]
    short = load_config(demo_config(bench.PLAIN_CONFIG), bench.stage1_options(300))
    assert short.train_cfg.max_iters == 300
    assert short.param_scheduler[0].end == 50
    assert short.param_scheduler[1].end == 300 and short.param_scheduler[1].milestones == [225, 275]


def test_every_arm_is_a_valid_config(bench):
    mass = {"mass_box": 0.25, "mass_mask": 0.5}
    for arm in bench.ARMS:
        name, options = bench.arm_settings("e2e", arm, mass, 300)
        cfg = load_config(demo_config(name), options)
        assert cfg.train_cfg.max_iters == 300
        bbox, mask = cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head
        if arm in ("plain", "loss-mass"):
            assert bbox.type == "Shared2FCBBoxHead" and "crat" not in bbox
            weights = (1.25, 1.5) if arm == "loss-mass" else (1.0, 1.0)
            assert (bbox.loss_bbox.loss_weight, mask.loss_mask.loss_weight) == weights
        else:
            assert bbox.crat.donors == mask.crat.donors == bench.DONORS[arm]
            assert bbox.crat.log_mass is mask.crat.log_mass is (arm == "crat")
        name, options = bench.arm_settings("decoupled", arm, mass, 300)
        ft = load_ft_config(demo_config(name), options)
        assert ft["crat"]["enable"] is (arm not in ("plain", "loss-mass"))
        if arm == "loss-mass":
            assert (ft["heads"]["loss_bbox_weight"], ft["heads"]["loss_mask_weight"]) == (1.25, 1.5)
        if ft["crat"]["enable"]:
            assert ft["crat"]["donors"] == bench.DONORS[arm]


def test_held_out_seed_runs_last_in_each_benchmark(bench):
    runs = bench.plan(None, "all")
    for name, spec in bench.BENCHMARKS.items():
        mine = [(mode, seed) for b, mode, seed in runs if b == name]
        modes = [m for m in bench.MODES if spec[m]]
        assert mine[-len(modes) :] == [(m, bench.HELD_OUT) for m in modes]
        assert bench.HELD_OUT not in [s for _, s in mine[: -len(modes)]]
    assert bench.plan("colour-shapes/e2e", "reported") == [("colour-shapes", "e2e", s) for s in (0, 1, 2)]
    assert bench.plan("families-s0", "held-out") == [("families-s0", "decoupled", bench.HELD_OUT)]


def test_each_benchmark_keeps_its_schedule_in_a_results_root(bench, tmp_path, monkeypatch):
    assert bench.BENCHMARKS["colour-shapes"]["stage1_iters"] == 300
    assert bench.BENCHMARKS["families-s1"]["stage1_iters"] == bench.BENCHMARKS["families-s0"]["stage1_iters"] == 600
    bench._check_root(tmp_path)
    recorded = json.loads((tmp_path / "settings.json").read_text())["stage1_iters"]
    assert recorded == {name: spec["stage1_iters"] for name, spec in bench.BENCHMARKS.items()}
    monkeypatch.setitem(bench.BENCHMARKS, "families-s1", {**bench.BENCHMARKS["families-s1"], "stage1_iters": 300})
    with pytest.raises(SystemExit, match="families-s1 runs with a 600-iteration stage 1, this script trains 300"):
        bench._check_root(tmp_path)
    (tmp_path / "settings.json").write_text('{"stage1_iters": 300}')
    with pytest.raises(SystemExit, match="predates per-benchmark schedules"):
        bench._check_root(tmp_path)


def test_improvement_arms_change_one_crat_setting(bench):
    from mmdet.registry import MODELS

    import crat_ft.plugin  # noqa: F401  (registers the plugin heads)

    cfg = load_config(demo_config(bench.PLAIN_CONFIG))
    n = cfg.model.roi_head.bbox_head.num_classes
    counts = list(range(1, n + 1))
    with pytest.raises(ValueError, match="crat-gate: the end-to-end frequency gate needs the training instance counts"):
        bench.arm_settings("e2e", "crat-gate", None, 300)
    crat_name, crat_options = bench.arm_settings("e2e", "crat", None, 300)
    for arm, change in bench.IMPROVEMENTS.items():
        name, options = bench.arm_settings("e2e", arm, None, 300, counts)
        assert name == crat_name
        cfg = load_config(demo_config(name), options)
        bbox, mask = cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head
        for head in (bbox, mask):
            assert head.crat.donors == "fisher" and head.crat.log_mass is False
            assert all(head.crat[k] == v for k, v in change.items())
            if arm == "crat-gate":
                assert list(head.class_instance_count) == counts
        head = MODELS.build(bbox)  # the plugin accepts the settings
        assert head.crat.fisher == change.get("fisher", "sample")
        assert head.crat.frequency_gate is change.get("frequency_gate", False)
        name, options = bench.arm_settings("decoupled", arm, None, 300)
        ft = load_ft_config(demo_config(name), options)
        assert ft["crat"]["enable"] and ft["crat"]["log_mass"] is False
        assert all(ft["crat"][k] == v for k, v in change.items())


def test_improvements_run_their_held_out_seed_last(bench):
    runs = bench.improvement_plan("all")
    assert runs == [("colour-shapes", "e2e", s) for s in (0, 1, 2, bench.HELD_OUT)]
    assert bench.improvement_plan("held-out") == [("colour-shapes", "e2e", bench.HELD_OUT)]


def test_finished_rows_are_recomputed_when_their_inputs_change(bench, tmp_path):
    for x in ("plain", "crat"):
        d = tmp_path / "b" / "e2e" / "s0" / x
        d.mkdir(parents=True)
        (d / "metrics_matches_bbox.npz").write_bytes(b"1")
        (d / "errors.json").write_text("{}")
    (tmp_path / "b" / "e2e" / "s0" / "crat" / "mass.json").write_text("{}")
    gt = tmp_path / "b" / "data" / "s0" / "annotations" / "lvis_v1_val.json"
    gt.parent.mkdir(parents=True)
    gt.write_text("{}")
    before = bench._inputs_digest(tmp_path, "b", "e2e", "plain", "crat", [0])
    assert bench._inputs_digest(tmp_path, "b", "e2e", "plain", "crat", [0]) == before
    (tmp_path / "b" / "e2e" / "s0" / "crat" / "metrics_matches_bbox.npz").write_bytes(b"2")
    assert bench._inputs_digest(tmp_path, "b", "e2e", "plain", "crat", [0]) != before
