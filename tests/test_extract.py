"""extract-features: cached values, resume after SIGKILL, shards, cache validation."""

import json
import os
import shutil
import signal
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import demo_config_path, extract_args, run_cli, start_cli
from crat_ft.cache import FORMAT_VERSION, RoIReader, open_cache, unpack_masks
from crat_ft.common.errors import UserError
from crat_ft.detector.roi_policy import RoIPolicy, select_rois

pytestmark = pytest.mark.slow


def _tables(path):
    """Every dataset of a cache, as numpy, keyed by image id (order-independent)."""
    out = {}
    with open_cache(path) as f:
        ids = f["images/image_id"][...]
        rs, rc = f["images/roi_start"][...], f["images/roi_count"][...]
        ms, mc = f["images/mask_start"][...], f["images/mask_count"][...]
        rois = {k: f["rois/" + k][...] for k in ("box", "gt_index", "label", "iou", "gt_box", "box_feat", "mask_index")}
        masks = {k: f["masks/" + k][...] for k in ("feat", "target")}
        for i, img in enumerate(ids):
            block = {k: v[rs[i] : rs[i] + rc[i]] for k, v in rois.items() if k != "mask_index"}
            block.update({"mask_" + k: v[ms[i] : ms[i] + mc[i]] for k, v in masks.items()})
            block["has_mask"] = rois["mask_index"][rs[i] : rs[i] + rc[i]] >= 0
            out[int(img)] = block
    return out


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for img in a:
        for k in a[img]:
            np.testing.assert_array_equal(a[img][k], b[img][k], err_msg=f"image {img} field {k}")


def test_select_rois_policy():
    rng = np.random.default_rng(0)
    # 3 gts: gt 1 of a rare class (count 2), gts 2-3 of a frequent class (count 10000)
    gt_inds = np.array([1, 2, 3] + [1] * 5 + [2] * 20 + [3] * 20 + [0] * 50 + [-1] * 3)
    labels = np.array([0, 1, 1])
    counts = np.array([2, 10000])
    policy = RoIPolicy(max_pos_per_image=64, neg_per_image=16, box_pos_per_class=2000, mask_pos_per_class=64)
    rows, mask_rows = select_rois(gt_inds, labels, counts, policy, rng)
    picked = gt_inds[rows]
    assert (picked == 1).sum() == 6  # rare: all 6 positives of its gt kept
    assert (picked == 2).sum() <= 1 and (picked == 3).sum() <= 1  # frequent: expected 0.2 per gt
    assert (picked == 0).sum() == 16 and (picked == -1).sum() == 0
    assert set(gt_inds[rows[mask_rows]]) <= {1, 2, 3}
    assert (gt_inds[rows[mask_rows]] == 1).sum() == 6  # 64 / 2 = 32 >= 6: every rare positive has a mask


def test_cached_values_equal_detector_computation(tiny_cache, tiny_detector, tiny_data):
    """Box/mask features equal mmdet's RoI head layers on the same RoIs; targets equal mmdet's."""
    from mmdet.registry import DATASETS
    from mmdet.structures.bbox import bbox2roi, bbox_overlaps
    from mmdet.structures.mask import mask_target
    from mmengine.dataset import pseudo_collate

    from crat_ft.detector.extractor import extraction_pipeline
    from crat_ft.detector.frozen import build_frozen_detector
    from crat_ft.engine.config import base_dataset_cfg, prepare_config
    from crat_ft.heads.registry import register_all

    register_all()
    cfg = prepare_config(demo_config_path(), (), tiny_data, ("train_dataloader",))
    model, sha = build_frozen_detector(cfg, str(tiny_detector))
    ds_cfg = base_dataset_cfg(cfg).copy()
    ds_cfg["pipeline"] = extraction_pipeline(ds_cfg["pipeline"], flip=False)
    ds = DATASETS.build(ds_cfg)
    reader = RoIReader(tiny_cache, checkpoint_sha256=sha)
    checked_masks = 0
    for k in range(3):
        data = model.data_preprocessor(pseudo_collate([ds[k]]), True)
        sample = data["data_samples"][0]
        b = int(np.nonzero(reader.image_ids == sample.metainfo["img_id"])[0][0])
        rows = np.arange(reader.roi_start[b], reader.roi_start[b] + reader.roi_count[b])
        cached = reader.read_rois(rows)
        with torch.no_grad():
            x = model.extract_feat(data["inputs"])
            rois = bbox2roi([torch.from_numpy(cached["box"])])
            head = model.roi_head.bbox_head
            feat = model.roi_head.bbox_roi_extractor(x[: model.roi_head.bbox_roi_extractor.num_inputs], rois).flatten(1)
            for fc in head.shared_fcs:
                feat = torch.relu(fc(feat))
        np.testing.assert_allclose(cached["box_feat"].astype(np.float32), feat.numpy(), rtol=2e-3, atol=2e-3)
        gt = sample.gt_instances
        gidx = reader.read_rois(rows)["label"]
        pos = cached["label"] < 40
        gt_index = h5py.File(tiny_cache)["rois/gt_index"][rows[0] : rows[-1] + 1]
        np.testing.assert_array_equal(cached["gt_box"][pos], gt.bboxes[gt_index[pos]].numpy())
        np.testing.assert_array_equal(gidx[pos], gt.labels[gt_index[pos]].numpy())
        iou = bbox_overlaps(
            torch.from_numpy(cached["box"][pos]), torch.from_numpy(cached["gt_box"][pos]), is_aligned=True
        )
        stored_iou = h5py.File(tiny_cache)["rois/iou"][rows[0] : rows[-1] + 1][pos]
        np.testing.assert_allclose(stored_iou, iou.numpy(), atol=1e-4)
        assert (stored_iou >= 0.5 - 1e-6).all()  # the demo assigner's pos_iou_thr
        # masks
        mrows = np.arange(reader.mask_start[b], reader.mask_start[b] + reader.mask_count[b])
        if len(mrows) == 0:
            continue
        cm = reader.read_masks(mrows)
        mroi = reader.mask_roi[mrows]
        boxes = torch.from_numpy(h5py.File(tiny_cache)["rois/box"][...][mroi])
        mgt = torch.from_numpy(gt_index[mroi - rows[0]]).long()
        with torch.no_grad():
            mh = model.roi_head.mask_head
            mf = model.roi_head.mask_roi_extractor(x[: model.roi_head.mask_roi_extractor.num_inputs], bbox2roi([boxes]))
            for conv in mh.convs:
                mf = conv(mf)
            mf = mh.relu(mh.upsample(mf))
        np.testing.assert_allclose(cm["mask_feat"].astype(np.float32), mf.numpy(), rtol=2e-3, atol=2e-3)
        targets = mask_target([boxes], [mgt], [gt.masks], model.train_cfg.rcnn).numpy() > 0.5
        np.testing.assert_array_equal(cm["mask_target"], targets)
        checked_masks += len(mrows)
    assert checked_masks > 0


def test_resume_after_sigkill_gives_identical_cache(tiny_data, tiny_detector, tmp_path):
    args = [*extract_args(tiny_detector, tiny_data), "--max-images", 10, "--segment-images", 2]
    full = tmp_path / "full"
    r = run_cli(*args, "--out", full)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = start_cli(*args, "--out", killed)
    seg_dir = killed / ".segments" / "shard-00000-of-00001"
    deadline = time.time() + 300
    while time.time() < deadline and not (seg_dir.exists() and any(seg_dir.glob("seg-*.h5"))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "index.h5").exists() and not (killed / "shard-00000-of-00001.h5").exists()
    r = run_cli(*args, "--out", killed)
    assert r.returncode == 2 and "pass --resume to continue it" in r.stderr
    r = run_cli(*args, "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(_tables(full / "index.h5"), _tables(killed / "index.h5"))
    assert not (killed / ".segments").exists()


def test_two_shards_merge_to_single_process_result(tiny_data, tiny_detector, tmp_path):
    args = ["extract-features", demo_config_path(), tiny_detector, "--data-root", tiny_data, "--max-images", 6]
    single = tmp_path / "single"
    assert run_cli(*args, "--out", single).returncode == 0
    sharded = tmp_path / "sharded"
    r0 = run_cli(*args, "--out", sharded, "--shard", "0/2")
    assert r0.returncode == 0, r0.stderr[-2000:]
    assert not (sharded / "index.h5").exists()  # shard 1 missing: no index yet
    # the cache of a 2-process extraction is continued by 2 processes only
    before = {p.name: p.stat().st_mtime_ns for p in sharded.iterdir()}
    r = run_cli(*args, "--out", sharded, "--resume")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"crat-ft: error: --out {sharded} holds the shards of a 2-process extraction, this run has 1; run it with "
        "2 processes (torchrun --nproc-per-node 2, or --shard I/2), or choose a new --out"
    ), r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in sharded.iterdir()} == before
    r1 = run_cli(*args, "--out", sharded, "--shard", "1/2", "--workers", 2)  # images decoded by 2 DataLoader workers
    assert r1.returncode == 0, r1.stderr[-2000:]
    _assert_same(_tables(single / "index.h5"), _tables(sharded / "index.h5"))
    # the index reads through to both shards, with cross references rewritten
    reader = RoIReader(sharded / "index.h5")
    assert len(reader.image_ids) == 6
    with_mask = np.nonzero(reader.mask_index >= 0)[0]
    assert len(with_mask) and (reader.mask_roi[reader.mask_index[with_mask]] == with_mask).all()


def test_cache_validation_errors(tiny_cache, tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(UserError, match="not a crat-ft feature cache"):
        open_cache(foreign)
    shard = tiny_cache.parent / "shard-00000-of-00001.h5"
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        open_cache(truncated)
    old = tmp_path / "old.h5"
    shutil.copy(shard, old)
    with h5py.File(old, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION - 1
    with pytest.raises(
        UserError, match=f"format version {FORMAT_VERSION - 1}, this crat-ft reads version {FORMAT_VERSION}"
    ):
        open_cache(old)
    with pytest.raises(UserError, match="was made from checkpoint sha256 .*, not the given checkpoint"):
        open_cache(tiny_cache, checkpoint_sha256="0" * 64)
    r = run_cli("inspect-cache", truncated)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "truncated" in r.stderr
    r = run_cli("inspect-cache", tiny_cache.parent)
    assert r.returncode == 0 and "images 12" in r.stdout and "rare" in r.stdout
    # the index's datasets are virtual: the bytes shown are its shards'
    with h5py.File(tiny_cache, "r") as index:
        shards = [tiny_cache.parent / s for s in json.loads(index.attrs["shards"])]
    stored = {}
    for name in ("rois/box_feat", "masks/feat"):
        stored[name] = 0
        for shard in shards:
            with h5py.File(shard, "r") as f:
                stored[name] += f[name].id.get_storage_size()
    assert min(stored.values()) > 0
    assert (
        f"bytes: box features {stored['rois/box_feat'] / 2**20:.1f} MiB, mask features {stored['masks/feat'] / 2**20:.1f} MiB"
        in r.stdout
    )
    on_disk = sum(p.stat().st_size for p in [tiny_cache, *shards])
    assert f"({on_disk / 2**20:.1f} MiB on disk, index and {len(shards)} shards)" in r.stdout


def test_failed_extraction_leaves_nothing_complete(tiny_data, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    r = run_cli("extract-features", demo_config_path(), bad, "--out", tmp_path / "c", "--data-root", tiny_data)
    assert r.returncode == 2 and "could not be read" in r.stderr
    assert not list((tmp_path / "c").rglob("*.h5"))  # no shard, segment or index that looks complete


def test_packed_masks_round_trip():
    from crat_ft.cache import pack_masks

    m = np.random.default_rng(0).random((3, 28, 28)) > 0.5
    np.testing.assert_array_equal(unpack_masks(pack_masks(m), 28), m)
    assert pack_masks(np.zeros((0, 28, 28), bool)).shape == (0, 98)


def _mmdet_lvis_config():
    from pathlib import Path

    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / "lvis" / "mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py"
    if not path.is_file():
        pytest.skip("mmdet's packaged configs are not installed")
    return path


def test_mmdet_real_lvis_config(tiny_data, tmp_path):
    """mmdet's own LVIS v1 Mask R-CNN (random weights): a clear class-count error on 40-class data,
    and a working extraction once the data carries LVIS's 1203 categories."""
    import json

    from mmdet.registry import MODELS

    from crat_ft.engine.config import load_config
    from crat_ft.heads.registry import register_all

    register_all()
    config = _mmdet_lvis_config()
    cfg = load_config(config)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)  # random weights; init_weights() not called: nothing is downloaded
    ckpt = tmp_path / "r50_random.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, ckpt)

    r = run_cli(
        "extract-features", config, ckpt, "--out", tmp_path / "c40", "--data-root", tiny_data, "--max-images", 1
    )
    assert r.returncode == 2
    assert (
        f"has 40 categories but checkpoint {ckpt} predicts 1203 classes; use the dataset the detector was trained on"
        in r.stderr
    )

    # the same images re-labelled into a 1203-category LVIS file
    root = tmp_path / "lvis1203"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").symlink_to(tiny_data / "train2017")
    doc = json.loads((tiny_data / "annotations" / "lvis_v1_train.json").read_text())
    extra = [
        {
            "id": i,
            "name": f"pad_{i}",
            "frequency": "r",
            "image_count": 0,
            "instance_count": 0,
            "synset": f"pad_{i}.n.01",
            "synonyms": [],
            "def": "",
        }
        for i in range(41, 1204)
    ]
    doc["categories"] += extra
    (root / "annotations" / "lvis_v1_train.json").write_text(json.dumps(doc))
    r = run_cli(
        "extract-features",
        config,
        ckpt,
        "--out",
        tmp_path / "c1203",
        "--data-root",
        root,
        "--max-images",
        2,
        "--batch-size",
        1,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    reader = RoIReader(tmp_path / "c1203" / "index.h5")
    assert reader.meta["box_shape"] == [1024] and reader.meta["mask_shape"] == [256, 28, 28]
    assert reader.num_classes == 1203 and len(reader.image_ids) == 2


def test_dry_run_projects_size_and_writes_nothing(tiny_data, tiny_detector, tmp_path):
    r = run_cli(
        "extract-features",
        demo_config_path(),
        tiny_detector,
        "--out",
        tmp_path / "c",
        "--data-root",
        tiny_data,
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "projected for 40 images, 40 classes" in r.stdout
    # mask features: (32, 28, 28) float16
    assert "box features 0.5 KiB (level fc (256,))" in r.stdout and "mask features 49.0 KiB" in r.stdout
    total = float(r.stdout.split("total")[1].split("GiB")[0])
    bound = float(r.stdout.split("upper bound from the caps:")[1].split("GiB")[0])
    assert 0 < total <= bound
    assert not (tmp_path / "c").exists()


def test_project_size_caps():
    from crat_ft.detector.roi_policy import project_size

    counts = np.array([1, 10, 100000])
    p = project_size(
        n_images=10,
        instance_count=counts,
        policy=RoIPolicy(box_pos_per_class=50, mask_pos_per_class=5, neg_per_image=2),
        pos_per_gt=4,
        neg_per_image=2,
        box_bytes=100,
        mask_bytes=1000,
        mask_size=28,
    )
    # positives: min(50, 4), min(50, 40), min(50, 400000) -> 94; masks: 4 + 5 + 5
    assert p["parts"]["box features (positives)"] == 94 * (100 + 56)
    assert p["parts"]["mask features"] == 14 * (1000 + 8)
    assert p["parts"]["box features (negatives)"] == 20 * (100 + 56)
    assert p["bound"] >= p["total"]


def test_reader_works_in_dataloader_workers(tiny_cache):
    """Each worker opens its own file handle: batches with 2 workers equal those read in-process."""
    from crat_ft.heads.sampling import CachedBatchDataset, RoIBatchSampler

    reader = RoIReader(tiny_cache, box_memory_bytes=0)  # every read goes to HDF5
    sampler = RoIBatchSampler.from_reader(reader, rois_per_batch=32, masks_per_batch=4, steps_per_epoch=4)
    reader.read_rois(np.arange(3))  # a handle opened in the parent must not leak into the workers
    ds = CachedBatchDataset(reader)
    serial = list(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, num_workers=2))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel):
        for k in a:
            assert torch.equal(a[k], b[k]), k
