"""A tiny LVIS v1 dataset and a random-weight model-zoo checkpoint, for the test of docs/lvis.md.

The dataset is ``crat-ft make-demo-data``'s synthetic images relabelled onto LVIS v1's 1,203
categories, laid out where the guide puts LVIS (``annotations/lvis_v1_{train,val}.json``,
``train2017/``, ``val2017/``, each image's path in its ``coco_url``):

- every category of LVIS v1 (ids 1..1203, the names mmdet's ``LVISV1Dataset`` carries, in id
  order), with LVIS's fields: ``synset``, ``synonyms`` (a list of names, the name first),
  ``def``, ``frequency``, ``image_count``, ``instance_count``;
- the demo's classes become a few LVIS categories chosen by the seed; ``image_count`` and
  ``instance_count`` are counted from the training annotations (0 for the others);
- ``frequency`` splits the 1,203 categories into LVIS v1's groups (337 rare, 461 common,
  405 frequent); the annotated categories get two of each group, the more training images the
  more frequent, so APr, APc and APf are all defined on the val split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crat_ft.synthetic.dataset import make_demo_data
from crat_ft.synthetic.variants import DemoDataSpec

# LVIS v1's frequency groups: number of categories in each
LVIS_V1_GROUPS = {"r": 337, "c": 461, "f": 405}
TINY_SPEC = DemoDataSpec(seed=5, train_images=8, val_images=4, classes=6)


def lvis_v1_names() -> list[str]:
    """LVIS v1's category names in category-id order (ids 1..1203), as mmdet carries them."""
    from mmdet.datasets import LVISV1Dataset

    return list(LVISV1Dataset.METAINFO["classes"])


def make_lvis_v1_tiny(root: Path, spec: DemoDataSpec = TINY_SPEC) -> Path:
    """Write the tiny LVIS v1 dataset to ``root`` (which must not exist or be empty); returns ``root``."""
    names = lvis_v1_names()
    make_demo_data(root, spec, progress=False)
    rng = np.random.default_rng(spec.seed)
    # demo class k (1-based) -> an LVIS v1 category id
    lvis_id = {
        k + 1: int(i) for k, i in enumerate(rng.choice(np.arange(1, len(names) + 1), spec.classes, replace=False))
    }
    docs = {
        split: json.loads((root / "annotations" / f"lvis_v1_{split}.json").read_text()) for split in ("train", "val")
    }
    for doc in docs.values():
        for ann in doc["annotations"]:
            ann["category_id"] = lvis_id[ann["category_id"]]
        for img in doc["images"]:
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                img[key] = sorted(lvis_id[c] for c in img[key])
    images_of: dict[int, set] = {}
    instances_of: dict[int, int] = {}
    for ann in docs["train"]["annotations"]:
        images_of.setdefault(ann["category_id"], set()).add(ann["image_id"])
        instances_of[ann["category_id"]] = instances_of.get(ann["category_id"], 0) + 1
    frequency = _frequencies(len(names), sorted(lvis_id.values(), key=lambda c: -len(images_of.get(c, ()))), rng)
    categories = [
        {
            "id": cid,
            "name": name,
            "synset": f"{name}.n.01",
            "synonyms": [name],
            "def": f"the LVIS v1 category {name!r}, drawn as a synthetic shape",
            "frequency": frequency[cid],
            "image_count": len(images_of.get(cid, ())),
            "instance_count": instances_of.get(cid, 0),
        }
        for cid, name in enumerate(names, start=1)
    ]
    for split, doc in docs.items():
        doc["categories"] = categories
        doc["info"] = {"description": f"crat-ft's tiny LVIS v1 ({split}): demo images, LVIS v1's 1,203 categories"}
        (root / "annotations" / f"lvis_v1_{split}.json").write_text(json.dumps(doc))
    return root


def _frequencies(num_categories: int, annotated: list[int], rng: np.random.Generator) -> dict[int, str]:
    """LVIS v1's group sizes over ids 1..num_categories; ``annotated`` (most training images first)
    split evenly over f, c, r in that order, the rest of each group drawn by ``rng``."""
    if num_categories != sum(LVIS_V1_GROUPS.values()):
        raise ValueError(f"LVIS v1 has {sum(LVIS_V1_GROUPS.values())} categories, but mmdet gave {num_categories}")
    groups = [g for g in "fcr" for _ in range(-(-len(annotated) // 3))][: len(annotated)]
    frequency = dict(zip(annotated, groups))
    left = [g for g, n in LVIS_V1_GROUPS.items() for _ in range(n - groups.count(g))]
    others = [c for c in range(1, num_categories + 1) if c not in frequency]
    frequency.update(zip(others, (left[i] for i in rng.permutation(len(left)))))
    return frequency


def save_random_checkpoint(weights_url: str, out_dir: Path) -> Path:
    """What ``wget -P out_dir weights_url`` gives, with random weights: the model of the config that mmdet's
    LVIS metafile lists for ``weights_url``, built without ``init_weights`` (which would download the
    backbone's ImageNet weights), saved as ``out_dir/<the URL's file name>``."""
    import mmdet
    import torch
    import yaml
    from mmdet.registry import MODELS

    from crat_ft.engine.config import load_config
    from crat_ft.heads.registry import register_all

    mim = Path(mmdet.__file__).parent / ".mim"
    models = yaml.safe_load((mim / "configs" / "lvis" / "metafile.yml").read_text())["Models"]
    config = next((m["Config"] for m in models if m.get("Weights") == weights_url), None)
    if config is None:
        raise ValueError(f"{weights_url} is not a checkpoint of mmdet's configs/lvis/metafile.yml")
    register_all()
    torch.manual_seed(0)
    model = MODELS.build(load_config(mim / config).model)
    out = out_dir / weights_url.rsplit("/", 1)[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, out)
    return out
