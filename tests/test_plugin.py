"""CRAT inside mmdet's end-to-end training (crat_ft.heads.plugin): the same numbers as the decoupled heads,
training through mmdet, Fisher statistics in checkpoints, and back to stock mmdet."""

import subprocess
import sys

import pytest
import torch

from conftest import TINY_TRAIN_OPTIONS, run_cli
from crat_ft.common.paths import demo_config

E2E = "mask-rcnn_r18_fpn_tiny_crat-e2e_synthetic.py"
C, D, K, S = 6, 16, 8, 7


def _heads_pair(mask_predictor: str):
    """A plugin bbox + mask head and the decoupled ClasswiseHeads with the same layers and CRAT settings."""
    from mmdet.registry import MODELS

    import crat_ft.plugin  # noqa: F401  (registers the heads)
    from crat_ft.heads.classwise import ClasswiseHeads
    from crat_ft.heads.ft_config import CratConfig
    from crat_ft.heads.registry import register_all

    register_all()

    crat = dict(box_lambda=0.001, mask_lambda=0.01, box_tau=0.05, mask_tau=0.05, momentum=0.5)
    torch.manual_seed(0)
    coder = dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2])
    bbox_head = MODELS.build(
        dict(type="CratShared2FCBBoxHead", in_channels=4, roi_feat_size=2, fc_out_channels=D, num_classes=C,
             bbox_coder=coder, crat=crat)
    )  # fmt: skip
    predictor = dict(type="NormedConv2d", tempearture=20) if mask_predictor == "NormedConv2d" else None
    mask_head = MODELS.build(
        dict(type="CratFCNMaskHead", num_convs=1, in_channels=4, conv_out_channels=K, num_classes=C, crat=crat,
             **({"predictor_cfg": predictor} if predictor else {}))
    )  # fmt: skip
    decoupled = ClasswiseHeads(
        num_classes=C, box_feat_dim=D, mask_channels=K, bbox_coder=coder,
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False), mask_predictor_cfg=predictor,
        crat=CratConfig.from_dict(dict(crat, mask_weights="mask")),
    )  # fmt: skip
    with torch.no_grad():
        for name, layer in (
            ("fc_cls", bbox_head.fc_cls),
            ("fc_reg", bbox_head.fc_reg),
            ("conv_logits", mask_head.conv_logits),
        ):
            getattr(decoupled, name).weight.copy_(layer.weight)
            getattr(decoupled, name).bias.copy_(layer.bias)
    return bbox_head, mask_head, decoupled


@pytest.mark.parametrize("mask_predictor", ["Conv", "NormedConv2d"])
def test_plugin_transfusion_losses_equal_the_decoupled_heads(mask_predictor):
    """On the same RoIs, features and targets, over three steps (so the EMA statistics matter), the plugin
    heads' transfusion losses and statistics equal ClasswiseHeads'."""
    bbox_head, mask_head, decoupled = _heads_pair(mask_predictor)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        n, m = 24, 10
        x = torch.randn(n, D, generator=g)
        label = torch.randint(0, C + 1, (n,), generator=g)  # C = background
        label[:4] = torch.tensor([0, 1, 2, step % C])
        box = torch.rand(n, 4, generator=g) * 20
        box[:, 2:] += box[:, :2] + 5
        gt_box = box + torch.randn(n, 4, generator=g)
        mask_feat = torch.randn(m, K, S, S, generator=g)
        mask_label = torch.randint(0, C, (m,), generator=g)
        mask_target = (torch.rand(m, S, S, generator=g) > 0.5).float()

        ours = decoupled.loss(x, box, gt_box, label, mask_feat, mask_target, mask_label)
        # the plugin sees what mmdet gives its loss: every RoI's regression output and encoded target
        targets = bbox_head.bbox_coder.encode(box, gt_box)
        box_plugin = bbox_head.box_transfusion_loss(x, bbox_head.fc_reg(x), label, targets)
        mask_plugin = mask_head.mask_transfusion_loss(
            mask_feat, mask_head.conv_logits(mask_feat), mask_label, mask_target
        )
        torch.testing.assert_close(box_plugin * 0.001, ours["loss_box_trans"])
        torch.testing.assert_close(mask_plugin * 0.01, ours["loss_mask_trans"])
        torch.testing.assert_close(bbox_head.box_stats.fisher, decoupled.box_stats.fisher)
        torch.testing.assert_close(mask_head.mask_stats.fisher, decoupled.mask_stats.fisher)
        assert torch.equal(mask_head.mask_stats.seen, decoupled.mask_stats.seen)
    assert float(ours["loss_mask_trans"]) > 0 and float(ours["loss_box_trans"]) > 0


def test_plugin_batch_without_positives_gives_zero_loss_with_a_graph():
    bbox_head, mask_head, _ = _heads_pair("Conv")
    x = torch.randn(5, D, requires_grad=True)
    loss = bbox_head.box_transfusion_loss(x, bbox_head.fc_reg(x), torch.full((5,), C), torch.zeros(5, 4))
    assert float(loss) == 0.0 and loss.requires_grad
    feats = torch.randn(0, K, S, S)
    loss = mask_head.mask_transfusion_loss(feats, mask_head.conv_logits(feats), torch.zeros(0, dtype=torch.long),
                                           torch.zeros(0, S, S))  # fmt: skip
    assert float(loss) == 0.0 and loss.requires_grad


def test_plugin_refuses_what_it_cannot_transfuse():
    from mmdet.registry import MODELS

    import crat_ft.heads.plugin  # noqa: F401
    from crat_ft.common.errors import UserError

    with pytest.raises(UserError, match="CRAT's box branch needs class-wise regression"):
        MODELS.build(dict(type="CratShared2FCBBoxHead", num_classes=C, reg_class_agnostic=True))
    with pytest.raises(UserError, match="mask_weights='box' needs the box head's statistics"):
        MODELS.build(dict(type="CratFCNMaskHead", num_classes=C, crat=dict(mask_weights="box")))
    with pytest.raises(UserError, match="unknown"):
        MODELS.build(dict(type="CratFCNMaskHead", num_classes=C, crat=dict(mask_lamda=0.1)))


@pytest.mark.slow
def test_plugin_trains_with_mmdet_checkpoints_its_statistics_and_exports_to_stock_mmdet(tiny_data, tmp_path):
    work = tmp_path / "e2e"
    args = ["train-detector", demo_config(E2E), "--work-dir", work, "--data-root", tiny_data, "--seed", 0,
            "--cfg-options", *TINY_TRAIN_OPTIONS, "train_cfg.max_iters=6", "default_hooks.checkpoint.interval=2"]  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = "".join(p.read_text() for p in work.rglob("*.log"))
    assert "loss_bbox_transfusion" in logs and "loss_mask_transfusion" in logs
    state = torch.load(work / "iter_4.pth", weights_only=False)["state_dict"]
    for key in ("roi_head.bbox_head.box_stats", "roi_head.mask_head.mask_stats"):
        assert state[f"{key}.seen"].sum() > 0 and state[f"{key}.fisher"].abs().sum() > 0
    # killed after iter_4: --resume (with the same settings) restores the statistics and goes on
    (work / "detector.pth").unlink()
    (work / "iter_6.pth").unlink()
    (work / "last_checkpoint").write_text(str(work / "iter_4.pth"))
    r = run_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in (r.stderr + "".join(p.read_text() for p in work.rglob("*.log"))).lower()
    later = torch.load(work / "iter_6.pth", weights_only=False)["state_dict"]
    seen = state["roi_head.mask_head.mask_stats.seen"]
    assert (later["roi_head.mask_head.mask_stats.seen"] >= seen).all()  # classes seen before stay seen

    out = tmp_path / "plain.pth"
    r = run_cli("export-plain", demo_config(E2E), work / "detector.pth", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    plain = torch.load(out, weights_only=True)["state_dict"]
    assert not [k for k in plain if "_stats." in k] and len(plain) == len(later) - 4
    text = out.with_suffix(".py").read_text()
    assert "crat_ft" not in text and "Crat" not in text and "'Shared2FCBBoxHead'" in text
    # stock mmdet, with crat_ft unimportable, loads it and predicts what the plugin model predicts
    image = (
        next((tiny_data / "val2017").glob("*.png"))
        if (tiny_data / "val2017").exists()
        else next(tiny_data.rglob("*.png"))
    )
    script = (
        "import sys; sys.modules['crat_ft'] = None\n"
        "import torch\nfrom mmdet.apis import init_detector, inference_detector\n"
        f"m = init_detector({str(out.with_suffix('.py'))!r}, {str(out)!r}, device='cpu')\n"
        f"r = inference_detector(m, {str(image)!r})\n"
        f"torch.save(r.pred_instances.scores[:20], {str(tmp_path / 'stock.pt')!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from mmdet.apis import inference_detector, init_detector

    from crat_ft.engine.checkpoint import allow_mmengine_pickles

    allow_mmengine_pickles()
    ours = inference_detector(
        init_detector(str(demo_config(E2E)), str(work / "detector.pth"), device="cpu"), str(image)
    )
    torch.testing.assert_close(torch.load(tmp_path / "stock.pt"), ours.pred_instances.scores[:20])


LVIS_E2E = {
    "crat-e2e_mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py": ("CrossEntropyLoss", "Linear"),
    "crat-e2e_mask-rcnn_r50_fpn_eqlv2_1x_lvis-v1.py": ("EQLV2Loss", "Linear"),
    "crat-e2e_mask-rcnn_r50_fpn_seesaw-loss_sample1e-3-ms-2x_lvis-v1.py": ("SeesawLoss", "NormedLinear"),
}


@pytest.mark.parametrize("name", list(LVIS_E2E))
def test_lvis_e2e_configs_inherit_mmdets_files_and_build_the_plugin_heads(name):
    from mmdet.registry import MODELS

    from crat_ft.common.paths import config_root
    from crat_ft.engine.config import load_config
    from crat_ft.heads.plugin import plain_config
    from crat_ft.heads.registry import register_all

    register_all()
    path = config_root() / "lvis" / name
    assert '_base_ = "mmdet::' in path.read_text() or '_base_ = "./crat-e2e' in path.read_text()
    cfg = load_config(path)
    model = MODELS.build(cfg.model)
    loss, classifier = LVIS_E2E[name]
    head, mask_head = model.roi_head.bbox_head, model.roi_head.mask_head
    assert type(head).__name__ == "CratShared2FCBBoxHead" and type(mask_head).__name__ == "CratFCNMaskHead"
    assert head.num_classes == 1203 and type(head.loss_cls).__name__ == loss
    assert type(head.fc_cls).__name__ == classifier
    assert (head.crat.box_lambda, mask_head.crat.mask_lambda, head.crat.box_tau, head.crat.momentum) == (
        0.001,
        0.01,
        0.05,
        0.01,
    )
    if "eqlv2" in name:
        assert cfg.train_dataloader.dataset.oversample_thr == 0.0  # every repeat factor is 1: uniform sampling
        assert head.loss_cls.use_distributed  # the gradient statistics are all-reduced over the ranks
    plain = plain_config(cfg)
    assert plain.model.roi_head.bbox_head.type == "Shared2FCBBoxHead" and "crat" not in plain.model.roi_head.mask_head
    assert "custom_imports" not in plain


@pytest.mark.slow
def test_mmdets_own_train_tool_trains_with_the_plugin(tiny_data, tmp_path):
    from pathlib import Path

    import mmdet

    tool = Path(mmdet.__file__).parent / ".mim" / "tools" / "train.py"
    if not tool.is_file():
        pytest.skip("mmdet's packaged tools are not installed")
    root = f"{tiny_data}/"
    p = subprocess.run(
        [sys.executable, str(tool), str(demo_config(E2E)), "--work-dir", str(tmp_path), "--cfg-options",
         "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2", "default_hooks.logger.interval=1",
         f"train_dataloader.dataset.data_root={root}", f"test_dataloader.dataset.data_root={root}",
         f"test_evaluator.ann_file={root}annotations/lvis_v1_val.json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    logs = "".join(f.read_text() for f in tmp_path.rglob("*.log"))
    assert "loss_bbox_transfusion" in logs and "loss_mask_transfusion" in logs
    state = torch.load(tmp_path / "iter_2.pth", weights_only=False)["state_dict"]
    assert state["roi_head.mask_head.mask_stats.seen"].sum() > 0
