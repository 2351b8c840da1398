"""retrain-heads, resume, DDP statistics, export round trip, configs and guards."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import demo_config_path, retrain_args, run_cli
from crat_ft.common.errors import UserError
from crat_ft.common.paths import demo_config


def _heads_options(iters=6, interval=3):
    return [
        "train.max_iters=%d" % iters,
        "train.milestones=[]",
        "train.checkpoint_interval=%d" % interval,
        "train.log_interval=1",
        "train.warmup_iters=2",
        "sampler.rois_per_batch=64",
        "sampler.masks_per_batch=8",
    ]


@pytest.fixture(scope="module")
def crat_run(tiny_cache, tmp_path_factory):
    work = tmp_path_factory.mktemp("crat")
    r = run_cli(*retrain_args(tiny_cache, work), "--cfg-options", *_heads_options())
    assert r.returncode == 0, r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_retrain_writes_heads_with_fisher_statistics(crat_run):
    ckpt = torch.load(crat_run / "heads.pth", weights_only=True)
    sd, meta = ckpt["state_dict"], ckpt["meta"]
    assert sd["fc_reg.weight"].shape == (160, 256) and sd["conv_logits.weight"].shape == (40, 32, 1, 1)
    assert sd["box_stats.fisher"].shape == (40, 4, 256) and sd["box_stats.seen"].sum() > 3
    assert sd["mask_stats.fisher"].shape == (40, 32)
    seen = sd["box_stats.seen"]
    assert (sd["box_stats.fisher"][~seen] == 0).all() and (sd["box_stats.fisher"][seen].sum((1, 2)) > 0).all()
    assert meta["crat_ft_stage"] == "heads" and meta["iter"] == 6 and len(meta["class_names"]) == 40


@pytest.mark.slow
def test_resume_ends_identical(crat_run, tiny_cache, tmp_path):
    """Resuming from the iteration-3 checkpoint ends exactly where the uninterrupted run ended."""
    work = tmp_path / "resumed"
    work.mkdir()
    shutil.copy(crat_run / "iter_3.pth", work / "iter_3.pth")
    shutil.copy(crat_run / "run.json", work / "run.json")  # what the checkpoint was trained with
    (work / "last_checkpoint").write_text(str(work / "iter_3.pth"))
    r = run_cli(*retrain_args(tiny_cache, work), "--resume", "--cfg-options", *_heads_options())
    assert r.returncode == 0, r.stderr[-3000:]
    # it resumed: the first iteration it logged is the 4th (a run from scratch ends identical on a CPU too)
    logs = "".join(p.read_text() for p in work.rglob("*.log"))
    logged = [int(i) for i in re.findall(r"Iter\(train\) \[\s*(\d+)/6\]", logs)]
    assert logged and min(logged) == 4, logged
    a = torch.load(crat_run / "heads.pth", weights_only=True)["state_dict"]
    b = torch.load(work / "heads.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        if torch.cuda.is_available():  # CUDA's index_add_ and cuDNN are not deterministic: equal to a tolerance
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6, msg=k)
        else:  # on a CPU, exactly
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_export_round_trip(crat_run, tiny_cache, tiny_detector, tmp_path):
    """The merged checkpoint, loaded by mmdet's init_detector, predicts what the retrained heads predict."""
    from mmdet.apis import init_detector

    from crat_ft.cache import RoIReader
    from crat_ft.engine.checkpoint import allow_mmengine_pickles

    out = tmp_path / "merged.pth"
    r = run_cli("export", demo_config_path(), tiny_detector, crat_run / "heads.pth", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    allow_mmengine_pickles()
    model = init_detector(str(demo_config_path()), str(out), device="cpu")
    heads = torch.load(crat_run / "heads.pth", weights_only=True)["state_dict"]
    reader = RoIReader(tiny_cache)
    rois = reader.read_rois(np.arange(20))
    x = torch.from_numpy(rois["box_feat"]).float()
    with torch.no_grad():
        cls = model.roi_head.bbox_head.fc_cls(x)
        reg = model.roi_head.bbox_head.fc_reg(x)
    torch.testing.assert_close(cls, x @ heads["fc_cls.weight"].T + heads["fc_cls.bias"])
    torch.testing.assert_close(reg, x @ heads["fc_reg.weight"].T + heads["fc_reg.bias"])
    masks = reader.read_masks(np.arange(min(4, len(reader.mask_roi))))
    mf = torch.from_numpy(masks["mask_feat"]).float()
    with torch.no_grad():
        torch.testing.assert_close(
            model.roi_head.mask_head.conv_logits(mf),
            torch.nn.functional.conv2d(mf, heads["conv_logits.weight"], heads["conv_logits.bias"]),
        )
    # the rest of the detector is untouched
    det = torch.load(tiny_detector, weights_only=True)["state_dict"]
    merged = torch.load(out, weights_only=True)["state_dict"]
    assert torch.equal(det["backbone.conv1.weight"], merged["backbone.conv1.weight"])
    assert not torch.equal(det["roi_head.bbox_head.fc_reg.weight"], merged["roi_head.bbox_head.fc_reg.weight"])


def test_post_hoc_calibration_folds_into_fc_cls():
    from crat_ft.heads.export import merge_heads

    g = torch.Generator().manual_seed(0)
    det = {
        "roi_head.bbox_head.fc_cls.weight": torch.randn(4, 5, generator=g),
        "roi_head.bbox_head.fc_cls.bias": torch.zeros(4),
    }
    heads = {
        "state_dict": {"fc_cls.weight": torch.randn(4, 5, generator=g), "fc_cls.bias": torch.ones(4)},
        "meta": {"class_instance_count": [100, 10, 1]},
    }
    m = merge_heads(det, heads, tau_norm=1.0, logit_adjust=1.0)
    w = m["roi_head.bbox_head.fc_cls.weight"]
    torch.testing.assert_close(w[:3].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(w[3], heads["state_dict"]["fc_cls.weight"][3])  # background row untouched
    prior = torch.tensor([100.0, 10, 1]) / 111
    torch.testing.assert_close(m["roi_head.bbox_head.fc_cls.bias"][:3], 1 - prior.log())
    assert m["roi_head.bbox_head.fc_cls.bias"][3] == 1.0
    assert torch.equal(det["roi_head.bbox_head.fc_cls.bias"], torch.zeros(4))  # input not modified


def _ddp_worker(rank, world, port, q):
    import torch.distributed as dist

    from crat_ft.heads.transfusion import FisherStats

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stats = FisherStats(3, (2,), momentum=0.5)
    if rank == 0:
        stats.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    else:
        stats.update(torch.tensor([[0.0, 4.0]]), torch.tensor([2]))
    stats.all_reduce()
    # numpy arrays travel by value: a tensor would travel as a shared-memory fd that the parent can only
    # collect while this process is still alive
    q.put((rank, stats.fisher.numpy().copy(), stats.seen.numpy().copy()))
    dist.destroy_process_group()


def test_fisher_stats_identical_across_gloo_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (torch.from_numpy(f), torch.from_numpy(s))) for r, f, s in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    (f0, s0), (f1, s1) = results[0], results[1]
    assert torch.equal(f0, f1) and torch.equal(s0, s1)
    torch.testing.assert_close(f0, torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 1.0]]))  # mean of the ranks' EMAs
    assert s0.tolist() == [True, False, True]


@pytest.mark.slow
def test_torchrun_ddp_retraining_all_reduces_fisher_statistics(tiny_cache, tmp_path):
    """Two CPU processes under torchrun (gloo): rank 0 draws the single-process run's batch, and the saved
    statistics also hold the classes only rank 1 drew."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from conftest import crat_ft_exe

    opts = [
        "train.max_iters=1",
        "train.milestones=[]",
        "train.checkpoint_interval=1",
        "train.log_interval=1",
        "train.warmup_iters=0",  # a warm-up must be shorter than the schedule
        "sampler.rois_per_batch=12",
        "sampler.masks_per_batch=2",
    ]
    single = tmp_path / "single"
    r = run_cli(*retrain_args(tiny_cache, single), "--cfg-options", *opts)
    assert r.returncode == 0, r.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    ddp = tmp_path / "ddp"
    r = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            f"--master_port={port}",
            *crat_ft_exe(),
            "retrain-heads",
            str(demo_config("crat_synthetic.py")),
            "--cache",
            str(tiny_cache),
            "--work-dir",
            str(ddp),
            "--cfg-options",
            *opts,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log = next(ddp.glob("*/*.log")).read_text()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    assert "Distributed training: True" in log and f"DDP: world size 2, backend {backend}" in log
    a = torch.load(single / "heads.pth", weights_only=True)["state_dict"]
    b = torch.load(ddp / "heads.pth", weights_only=True)["state_dict"]
    seen_single, seen_ddp = a["box_stats.seen"], b["box_stats.seen"]
    assert (seen_ddp | seen_single).equal(seen_ddp) and seen_ddp.sum() > seen_single.sum()
    # a class drawn by rank 0 alone keeps half its single-process statistics (rank 1 contributes zeros)
    ratio = b["box_stats.fisher"][seen_single].sum((1, 2)) / a["box_stats.fisher"][seen_single].sum((1, 2))
    assert ((ratio - 0.5).abs() < 1e-4).sum() >= 1
    assert (b["box_stats.fisher"][seen_ddp & ~seen_single].sum((1, 2)) > 0).all()  # rank 1's classes arrived


def test_unknown_ft_config_key_is_an_error(tmp_path):
    from crat_ft.heads.ft_config import load_ft_config

    bad = tmp_path / "ft.py"
    bad.write_text("_base_ = ['%s']\ncrat = dict(box_lamda=0.1)\n" % demo_config("crat_synthetic.py"))
    with pytest.raises(UserError, match=r"crat: unknown key\(s\) \['box_lamda'\]"):
        load_ft_config(bad)
    bad.write_text("_base_ = ['%s']\nsampler = dict(stratgy='random')\n" % demo_config("crat_synthetic.py"))
    with pytest.raises(UserError, match=r"unknown key\(s\) \['stratgy'\] in 'sampler'"):
        load_ft_config(bad)
    bad.write_text("_base_ = ['%s']\ntrainer = dict()\n" % demo_config("crat_synthetic.py"))
    with pytest.raises(UserError, match=r"unknown key\(s\) \['trainer'\]"):
        load_ft_config(bad)
    assert load_ft_config(demo_config("baseline_synthetic.py"))["crat"]["enable"] is False


def test_non_finite_loss_stops_before_the_update():
    from crat_ft.heads.classwise import ClasswiseHeads, NonFiniteLossError
    from crat_ft.heads.registry import register_all

    register_all()
    heads = ClasswiseHeads(
        num_classes=3,
        box_feat_dim=4,
        mask_channels=0,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at iteration \d+ \(loss=nan, loss_cls=1, loss_bbox=nan\)"
    ):
        heads.parse_losses({"loss_cls": torch.tensor(1.0), "loss_bbox": torch.tensor(float("nan"))})


def test_non_finite_gradients_and_weights_stop_before_anything_is_applied():
    """NonFiniteGuardHook: a finite loss with an infinite gradient, then a step that overflows the weights."""
    from types import SimpleNamespace

    from crat_ft.heads.hooks import NonFiniteError, NonFiniteGuardHook

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    runner = SimpleNamespace(model=model, optim_wrapper=SimpleNamespace(optimizer=optimizer), iter=4, work_dir="runs/w")
    hook = NonFiniteGuardHook()
    hook.before_train(runner)
    before = model.weight.detach().clone()
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    model.bias.grad = torch.zeros_like(model.bias)
    with pytest.raises(
        NonFiniteError,
        match=r"^non-finite gradient at iteration 5 \(weight\); the step was not applied and "
        r"the newest checkpoint in runs/w holds the last finite weights; lower the learning rate",
    ):
        optimizer.step()
    assert torch.equal(model.weight.detach(), before)
    model.weight.grad = torch.full_like(model.weight, 3e38)  # finite, but the step overflows float32
    with torch.no_grad():
        model.weight.fill_(-3e38)
    with pytest.raises(NonFiniteError, match=r"^non-finite weights after the optimizer step at iteration 5 \(weight\)"):
        optimizer.step()
    hook.after_train(runner)
    optimizer.step()  # hooks removed: no check any more


def test_samplers_balance_classes():
    from crat_ft.heads.sampling import RoIBatchSampler

    labels = np.array([0] * 900 + [1] * 90 + [2] * 10 + [3] * 1000)  # 3 = background
    images = np.arange(2000) // 10
    kw = dict(
        labels=labels,
        roi_images=images,
        mask_labels=np.zeros(0, int),
        mask_images=np.zeros(0, int),
        num_classes=3,
        rois_per_batch=1000,
        pos_fraction=0.6,
        seed=0,
    )
    rnd = RoIBatchSampler(strategy="random", **kw).batch(0)["rois"]
    bal = RoIBatchSampler(strategy="class_balanced", **kw).batch(0)["rois"]
    bil = RoIBatchSampler(strategy="bilevel", **kw).batch(0)["rois"]
    rfs = RoIBatchSampler(strategy="repeat_factor", **kw).batch(0)["rois"]
    for idx in (rnd, bal, bil, rfs):
        assert len(idx) == 1000 and (labels[idx] == 3).sum() == 400

    def count(idx, c):
        return int((labels[idx] == c).sum())

    assert count(rnd, 2) < 20 and 150 < count(bal, 2) < 250 and 150 < count(bil, 2) < 250
    assert count(rnd, 2) < count(rfs, 2) < count(bal, 2)
    again = RoIBatchSampler(strategy="class_balanced", **kw).batch(0)["rois"]
    assert np.array_equal(bal, again)  # seeded: same stream
    with pytest.raises(UserError, match="sampler strategy: expected one of"):
        RoIBatchSampler(strategy="balanced", **kw)


def test_a_resumed_loader_skips_past_steps_without_reading_them():
    """mmengine's loop advances the loader by the resumed iteration count; those batches are not read."""
    from mmengine.runner.loops import _InfiniteDataloaderIterator

    from crat_ft.heads.sampling import SKIPPED, CachedBatchDataset, RoIBatchSampler

    class CountingReader:
        """Cache rows as their own index, counting the reads."""

        def __init__(self, labels):
            self.labels, self.mask_roi, self.reads = labels, np.zeros(0, np.int64), 0

        def read_rois(self, idx):
            self.reads += 1
            n = len(idx)
            return {"box_feat": np.asarray(idx, np.float16)[:, None], "box": np.zeros((n, 4), np.float32),
                    "gt_box": np.zeros((n, 4), np.float32), "label": self.labels[idx]}  # fmt: skip

        def read_masks(self, idx):
            return {"mask_feat": np.zeros((0, 1, 2, 2), np.float16), "mask_target": np.zeros((0, 2, 2), np.uint8),
                    "mask_label": np.zeros(0, np.int64)}  # fmt: skip

    labels = np.array([0, 1, 2] * 10 + [3] * 10)
    kw = dict(labels=labels, roi_images=np.arange(40), mask_labels=np.zeros(0, int), mask_images=np.zeros(0, int),
              num_classes=3, rois_per_batch=8, seed=4)  # fmt: skip

    def steps(skip: int, n: int):
        reader = CountingReader(labels)
        sampler = RoIBatchSampler(**kw)  # 5 steps an epoch
        sampler.skip_steps(skip)
        loader = torch.utils.data.DataLoader(CachedBatchDataset(reader), sampler=sampler, batch_size=None)
        it = _InfiniteDataloaderIterator(loader)
        return [next(it) for _ in range(n)], reader.reads

    full, _ = steps(0, 8)
    resumed, reads = steps(6, 8)  # past the first epoch (mmengine's iterator sleeps 2 s at each epoch's end)
    assert all(b is SKIPPED for b in resumed[:6]) and reads == 2 * 2  # rois and mask rois of the 2 read steps
    for a, b in zip(full[6:], resumed[6:]):  # the same batches as without the skip
        assert torch.equal(a["box_feat"], b["box_feat"]) and b["box_feat"].dtype == torch.float16


def test_mask_weights_from_box_statistics():
    """crat.mask_weights='box': mask transfusion weighted by the box Fisher of the masks' RoIs (the reference's choice)."""
    from crat_ft.heads.classwise import ClasswiseHeads
    from crat_ft.heads.ft_config import CratConfig
    from crat_ft.heads.registry import register_all

    register_all()
    g = torch.Generator().manual_seed(0)
    kw = dict(
        num_classes=3,
        box_feat_dim=6,
        mask_channels=4,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 8, 9], [0, 0, 4, 4]])
    batch = dict(
        box_feat=torch.rand(4, 6, generator=g),
        box=boxes,
        gt_box=boxes + 1,
        label=torch.tensor([0, 1, 2, 3]),
        mask_feat=torch.rand(2, 4, 5, 5, generator=g),
        mask_target=(torch.rand(2, 5, 5, generator=g) > 0.5).float(),
        mask_label=torch.tensor([0, 2]),
        mask_box_feat=torch.rand(2, 6, generator=g),
        mask_box=boxes[:2],
        mask_gt_box=boxes[:2] + 1,
    )
    heads = ClasswiseHeads(crat=CratConfig(mask_weights="box"), **kw)
    losses = heads(**batch, mode="loss")
    assert losses["loss_mask_trans"] > 0 and torch.isfinite(losses["loss_mask_trans"])
    assert heads.mask_stats.seen.sum() == 0  # the mask statistics are not used
    losses["loss_mask_trans"].backward()
    assert heads.conv_logits.weight.grad[1].abs().sum() > 0  # class 1 (no mask sample) receives signal
    with pytest.raises(UserError, match=r"mask_weights: expected one of \('mask', 'box'\), got 'both'"):
        CratConfig.from_dict({"mask_weights": "both"})
    batch.pop("mask_box_feat")
    with pytest.raises(UserError, match="needs the box fields of the mask RoIs"):
        heads(**batch, mode="loss")


@pytest.mark.parametrize(
    "loss_cls, width",
    [(dict(type="EQLV2Loss", num_classes=3), 4), (dict(type="SeesawLoss", num_classes=3, loss_weight=1.0), 5)],
)
def test_mmdet_rebalanced_classifier_losses(loss_cls, width):
    """EQLv2 and Seesaw come from mmdet; Seesaw's extra objectness channel needs a re-initialised classifier."""
    from crat_ft.heads.classwise import ClasswiseHeads
    from crat_ft.heads.ft_config import CratConfig
    from crat_ft.heads.registry import register_all

    register_all()
    g = torch.Generator().manual_seed(0)
    heads = ClasswiseHeads(
        num_classes=3,
        box_feat_dim=6,
        mask_channels=0,
        loss_cls=loss_cls,
        crat=CratConfig(enable=False),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        reinit_cls=width == 5,
    )
    assert heads.fc_cls.out_features == width
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 8, 9], [0, 0, 4, 4]])
    losses = heads(
        box_feat=torch.rand(4, 6, generator=g),
        box=boxes,
        gt_box=boxes + 1,
        label=torch.tensor([0, 1, 2, 3]),
        mask_feat=torch.zeros(0, 1, 2, 2),
        mask_target=torch.zeros(0, 2, 2),
        mask_label=torch.zeros(0, dtype=torch.long),
        mode="loss",
    )
    cls_parts = [k for k in losses if k.startswith("loss_cls")]
    assert cls_parts and all(torch.isfinite(losses[k]) and losses[k] > 0 for k in cls_parts)
    det = {
        "roi_head.bbox_head.fc_cls.weight": torch.zeros(4, 6),
        "roi_head.bbox_head.fc_cls.bias": torch.zeros(4),
        "roi_head.bbox_head.fc_reg.weight": torch.zeros(12, 6),
        "roi_head.bbox_head.fc_reg.bias": torch.zeros(12),
    }
    if width == 5:
        heads.reinit_cls = False
        from crat_ft.detector.frozen import CLASSWISE_LAYERS

        with pytest.raises(
            UserError, match=r"fc_cls.weight has shape \(4, 6\) in the checkpoint but the retrained head needs \(5, 6\)"
        ):
            heads.load_from_detector(det, CLASSWISE_LAYERS)


@pytest.mark.slow
def test_group_softmax_heads_export_with_their_config(tiny_cache, tiny_detector, tiny_data, tmp_path):
    """Group softmax: retrain, export writes the config with the loss, mmdet loads both and predicts through it."""
    from mmdet.apis import inference_detector, init_detector

    from crat_ft.engine.checkpoint import allow_mmengine_pickles

    work = tmp_path / "bags"
    r = run_cli(
        "retrain-heads",
        demo_config("crat_bags_synthetic.py"),
        "--cache",
        tiny_cache,
        "--work-dir",
        work,
        "--cfg-options",
        *_heads_options(iters=4, interval=4),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    heads = torch.load(work / "heads.pth", weights_only=True)
    n_groups = len({min(3, len(str(max(int(n), 1))) - 1) for n in heads["meta"]["class_instance_count"]})
    assert heads["state_dict"]["fc_cls.weight"].shape == (40 + 2 + n_groups, 256)
    out = tmp_path / "merged.pth"
    r = run_cli("export", demo_config_path(), tiny_detector, work / "heads.pth", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"config for it: {tmp_path / 'merged.py'}" in r.stdout
    allow_mmengine_pickles()
    model = init_detector(str(tmp_path / "merged.py"), str(out), device="cpu")
    assert type(model.roi_head.bbox_head.loss_cls).__name__ == "GroupSoftmaxLoss"
    torch.testing.assert_close(model.roi_head.bbox_head.fc_cls.weight, heads["state_dict"]["fc_cls.weight"])
    image = next((tiny_data / "val2017").iterdir())
    pred = inference_detector(model, str(image)).pred_instances
    assert len(pred) > 0 and pred.scores.max() <= 1 and pred.labels.max() < 40
    r = run_cli(
        "export",
        demo_config_path(),
        tiny_detector,
        work / "heads.pth",
        "--out",
        tmp_path / "dual.pth",
        "--combine-original",
        0.5,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert (
        "--combine-original mixes two softmax classifiers of 40 + 1 outputs" in r.stderr
        and not (tmp_path / "dual.pth").exists()
    )
    # evaluate --heads uses the written config too
    r = run_cli(
        "evaluate",
        demo_config_path(),
        tiny_detector,
        "--heads",
        work / "heads.pth",
        "--data-root",
        tiny_data,
        "--out",
        tmp_path / "m.json",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"bbox", "segm", "fixed", "matches"} and 0 <= metrics["bbox"]["AP"] <= 1
    # without that config, mmdet's softmax head cannot take the merged classifier
    with pytest.raises(RuntimeError, match="size mismatch"):
        from mmengine.runner import load_checkpoint

        load_checkpoint(init_detector(str(demo_config_path()), device="cpu"), str(out), strict=True)


@pytest.fixture(scope="module")
def roi_cache(tiny_data, tiny_detector, tmp_path_factory):
    out = tmp_path_factory.mktemp("roi-cache") / "cache"
    r = run_cli(
        "extract-features",
        demo_config_path(),
        tiny_detector,
        "--out",
        out,
        "--data-root",
        tiny_data,
        "--max-images",
        4,
        "--box-level",
        "roi",
        "--mask-level",
        "roi",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "index.h5"


@pytest.mark.slow
def test_roi_level_cache_retrains_the_trunks_and_exports_them(roi_cache, tiny_detector, tmp_path):
    """At level roi the shared fcs and mask convs are retrained too; the export round trip holds for the whole heads."""
    from mmdet.apis import init_detector

    from crat_ft.cache import RoIReader
    from crat_ft.engine.checkpoint import allow_mmengine_pickles
    from crat_ft.heads.ft_config import load_ft_config
    from crat_ft.heads.registry import register_all
    from crat_ft.pipeline.retrain_builders import build_heads

    work = tmp_path / "roi"
    r = run_cli(*retrain_args(roi_cache, work), "--cfg-options", *_heads_options(iters=4, interval=4))
    assert r.returncode == 0, r.stderr[-3000:]
    sd = torch.load(work / "heads.pth", weights_only=True)["state_dict"]
    det = torch.load(tiny_detector, weights_only=True)["state_dict"]
    assert sd["box_trunk.shared_fcs.0.weight"].shape == det["roi_head.bbox_head.shared_fcs.0.weight"].shape
    assert not torch.equal(
        sd["box_trunk.shared_fcs.0.weight"], det["roi_head.bbox_head.shared_fcs.0.weight"]
    )  # trained
    assert not torch.equal(sd["mask_trunk.convs.0.conv.weight"], det["roi_head.mask_head.convs.0.conv.weight"])
    assert sd["box_stats.seen"].sum() > 0

    out = tmp_path / "merged.pth"
    r = run_cli("export", demo_config_path(), tiny_detector, work / "heads.pth", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    allow_mmengine_pickles()
    model = init_detector(str(demo_config_path()), str(out), device="cpu")
    register_all()
    reader = RoIReader(roi_cache)
    from crat_ft.engine.config import load_config

    heads = build_heads(load_ft_config(demo_config("crat_synthetic.py")), reader, load_config(demo_config_path()), det)
    heads.load_state_dict(sd)
    rois = reader.read_rois(np.arange(10))
    masks = reader.read_masks(np.arange(min(3, len(reader.mask_roi))))
    x, mf = torch.from_numpy(rois["box_feat"]).float(), torch.from_numpy(masks["mask_feat"]).float()
    with torch.no_grad():
        ours = heads.predict(x, mf)
        cls, reg = model.roi_head.bbox_head(x)
        logits = model.roi_head.mask_head(mf)
    assert x.shape[1:] == (64, 7, 7) and mf.shape[1:] == (64, 14, 14)
    torch.testing.assert_close(cls, ours["cls_score"])
    torch.testing.assert_close(reg, ours["bbox_pred"])
    torch.testing.assert_close(logits, ours["mask_logits"])


@pytest.mark.slow
def test_export_combining_the_original_classifier(crat_run, tiny_detector, tiny_data, tmp_path):
    """--combine-original: both classifiers in one fc_cls, mmdet predicts with the mixed softmax scores."""
    from mmdet.apis import inference_detector, init_detector

    from crat_ft.engine.checkpoint import allow_mmengine_pickles

    out = tmp_path / "dual.pth"
    r = run_cli(
        "export", demo_config_path(), tiny_detector, crat_run / "heads.pth", "--out", out, "--combine-original", 0.3
    )
    assert r.returncode == 0, r.stderr[-2000:]
    allow_mmengine_pickles()
    model = init_detector(str(tmp_path / "dual.py"), str(out), device="cpu")
    head = model.roi_head.bbox_head
    heads = torch.load(crat_run / "heads.pth", weights_only=True)["state_dict"]
    det = torch.load(tiny_detector, weights_only=True)["state_dict"]
    assert head.fc_cls.weight.shape == (82, 256)
    torch.testing.assert_close(head.fc_cls.weight[:41], heads["fc_cls.weight"])
    torch.testing.assert_close(head.fc_cls.weight[41:], det["roi_head.bbox_head.fc_cls.weight"])
    x = torch.randn(3, 256)
    with torch.no_grad():
        p = head.loss_cls.get_activation(head.fc_cls(x))
    expect = 0.7 * torch.softmax(x @ heads["fc_cls.weight"].T + heads["fc_cls.bias"], 1) + 0.3 * torch.softmax(
        x @ det["roi_head.bbox_head.fc_cls.weight"].T + det["roi_head.bbox_head.fc_cls.bias"], 1
    )
    torch.testing.assert_close(p, expect)
    pred = inference_detector(model, str(next((tiny_data / "val2017").iterdir()))).pred_instances
    assert len(pred) > 0 and pred.labels.max() < 40
    r = run_cli(
        "export",
        demo_config_path(),
        tiny_detector,
        crat_run / "heads.pth",
        "--out",
        tmp_path / "bad.pth",
        "--combine-original",
        2,
    )
    assert r.returncode == 2 and "expected a weight in [0, 1]" in r.stderr and not (tmp_path / "bad.pth").exists()


@pytest.mark.slow
def test_console_shows_what_matters_and_the_framework_log_the_rest(tiny_cache, tmp_path):
    """retrain-heads (as train-detector, extract-features and evaluate): mmengine's output goes to
    crat-ft.log in the work dir; the console keeps progress, the result and where the log is."""
    work = tmp_path / "quiet"
    r = run_cli(*retrain_args(tiny_cache, work), "--cfg-options", *_heads_options(iters=3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [f"retrained heads: {work / 'heads.pth'}"]
    assert "mmengine - INFO" not in r.stderr and "retrain-heads: 3/3 iterations" in r.stderr
    assert f"framework logs: {work / 'crat-ft.log'}" in r.stderr
    assert "mmengine - INFO - Iter(train) [3/3]" in (work / "crat-ft.log").read_text()
    loud = tmp_path / "loud"
    r = run_cli(*retrain_args(tiny_cache, loud), "--verbose", "--cfg-options", *_heads_options(iters=3))
    assert r.returncode == 0 and "mmengine - INFO - Iter(train) [3/3]" in r.stdout, r.stderr[-3000:]
    assert not (loud / "crat-ft.log").exists()


def test_rare_class_gallery_draws_the_rarest_classes(crat_run, tiny_detector, tiny_data, tmp_path):
    import cv2

    from crat_ft.analysis.gallery import CAPTION_H, SCALE, pick_rare_examples, rare_class_gallery

    train = json.loads((tiny_data / "annotations/lvis_v1_train.json").read_text())
    val = json.loads((tiny_data / "annotations/lvis_v1_val.json").read_text())
    in_val = {a["category_id"] for a in val["annotations"]}
    rare = sorted((c for c in train["categories"] if c["frequency"] == "r" and c["id"] in in_val),
                  key=lambda c: (c["image_count"], c["id"]))  # fmt: skip
    examples = pick_rare_examples(
        tiny_data / "annotations/lvis_v1_train.json", tiny_data / "annotations/lvis_v1_val.json", 3
    )
    assert [e["category"]["name"] for e in examples] == [c["name"] for c in rare[:3]]
    for e in examples:
        assert e["gts"] and all(
            a["image_id"] == e["image"]["id"] and a["category_id"] == e["category"]["id"] for a in e["gts"]
        )

    out = tmp_path / "gallery.png"
    heads = crat_run / "heads.pth"
    shown = rare_class_gallery(
        demo_config_path(), tiny_detector, {"baseline": heads, "CRAT": heads}, tiny_data, out, classes=3, score_thr=0.0
    )
    assert shown == [c["name"] for c in rare[:3]]
    img = cv2.imread(str(out))
    side = 128 * SCALE
    assert img.shape == (3 * (CAPTION_H + side), 3 * side, 3)
    # same heads, same detections: the two model columns are identical, and they differ from the ground truth's
    for row in range(3):
        y = row * (CAPTION_H + side) + CAPTION_H
        gt, base, crat = (img[y : y + side, k * side : (k + 1) * side] for k in range(3))
        assert np.array_equal(base, crat) and not np.array_equal(gt, base)
    assert not list(tmp_path.glob(".*tmp*"))


def test_gallery_box_ious_and_gt_mask_by_hand():
    from crat_ft.analysis.gallery import box_ious, gt_mask

    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]], float)
    np.testing.assert_allclose(box_ious(boxes, np.array([0, 0, 10, 10.0])), [1, 25 / 175, 0], atol=1e-8)
    assert box_ious(np.zeros((0, 4)), np.array([0, 0, 1, 1.0])).shape == (0,)
    # a 10 x 10 square polygon covers the 100 pixels whose centres lie inside it
    mask = gt_mask({"segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}, 20, 16)
    assert mask.shape == (20, 16) and mask.sum() == 100 and mask[2:12, 2:12].all()


def test_donor_groups_restrict_transfusion_to_a_group(tmp_path):
    from crat_ft.heads.classwise import ClasswiseHeads
    from crat_ft.heads.ft_config import CratConfig, read_donor_groups
    from crat_ft.heads.transfusion import FisherStats, transfusion_weights

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"a_cup": "cup", "b_cup": "cup", "a_dog": "dog", "b_dog": "dog"}))
    kwargs = dict(
        num_classes=4, box_feat_dim=3, mask_channels=0, class_names=["a_cup", "a_dog", "b_cup", "b_dog"],
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )  # fmt: skip
    crat = CratConfig(donor_groups=str(groups), frequency_gate=True)
    heads = ClasswiseHeads(crat=crat, donor_groups=read_donor_groups(groups), **kwargs,
                           class_instance_count=[50, 40, 5, 4])  # fmt: skip
    allowed = heads._allowed(torch.tensor([0, 1, 2]))
    # same group and (frequency gate) rarer than the donor
    assert allowed.tolist() == [[False, False, True, False], [False, False, False, True], [False, False, False, False]]
    stats = FisherStats(4, (2,))
    stats.update(torch.ones(4, 2), torch.arange(4))
    w = transfusion_weights(torch.ones(2, 2), stats, torch.tensor([0, 1]), 0.05, allowed=allowed[:2])
    assert w.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert ClasswiseHeads(crat=CratConfig(), **kwargs)._allowed(torch.tensor([0])) is None
    # the heads transfuse within the groups they are given (the run's record), never reading the file
    groups.write_text(json.dumps({"a_cup": "x", "b_cup": "y", "a_dog": "x", "b_dog": "y"}))
    assert heads._allowed(torch.tensor([0])).tolist() == [[False, False, True, False]]

    groups.write_text(json.dumps({"a_cup": "cup"}))
    with pytest.raises(UserError, match=r"has no group for class 'a_dog' \(3 missing\); give every class"):
        ClasswiseHeads(crat=CratConfig(donor_groups=str(groups)), donor_groups=read_donor_groups(groups), **kwargs)
    with pytest.raises(UserError, match=r"crat.donor_groups: cannot read .*nope.json"):
        read_donor_groups(tmp_path / "nope.json")
