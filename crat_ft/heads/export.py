"""``crat-ft export``: retrained heads merged into an ordinary mmdet checkpoint.

Post-hoc classifier calibration (τ-normalisation, logit adjustment) is folded
into ``fc_cls``; a classifier loss of another width or activation (Seesaw,
group softmax, the SimCal dual head) comes with a detector config written
beside the checkpoint (docs/architecture.md#rebalanced-classifier).
"""

from __future__ import annotations

from crat_ft.common.errors import UserError
from crat_ft.detector.frozen import (
    CLASSWISE_LAYERS,
    check_checkpoint_classes,
    classwise_layers,
    num_stages,
    predictor_cfgs,
    stage_cfgs,
)


def merge_heads(
    detector_state: dict,
    heads_ckpt: dict,
    *,
    tau_norm: float | None = None,
    logit_adjust: float | None = None,
    classifier_width_changes: bool = False,
) -> dict:
    """The detector's state dict with the retrained class-wise layers merged in.

    Trunks retrained from a ``roi``-level cache (heads keys ``box_trunk.*``,
    ``mask_trunk.*``) go back under the bbox/mask head. A Cascade R-CNN's
    heads (keys ``stages.<i>.*``) go back under each stage's heads.

    Post-hoc classifier calibration is folded into ``fc_cls`` so the result is
    an ordinary mmdet checkpoint:

    - ``tau_norm=τ``: each foreground row ``W_c ← W_c / ||W_c||^τ`` (Kang et al.);
    - ``logit_adjust=τ``: foreground biases ``b_c ← b_c - τ log π_c`` with π the
      training class prior (Menon et al.). The background row is unchanged.

    Args:
        detector_state: the original detector's state dict.
        heads_ckpt: a ``heads.pth`` dict (``state_dict`` + ``meta``).
        classifier_width_changes: the retrained classifier loss needs another
            ``fc_cls`` width (Seesaw, group softmax) and the caller writes a
            config to match.

    Returns:
        A new state dict (the input is not modified).
    """
    import torch

    heads = heads_ckpt["state_dict"]
    merged = dict(detector_state)
    stages = int(heads_ckpt["meta"].get("num_stages", 1))
    pairs = []
    for i, layers in enumerate(classwise_layers(stages)):
        own = f"stages.{i}." if stages > 1 else ""
        pairs += [(f"{own}{name}.{p}", f"{prefix}.{p}") for name, prefix in layers.items() for p in ("weight", "bias")]
        for trunk, layer in (("box_trunk", "fc_cls"), ("mask_trunk", "conv_logits")):
            parent = layers[layer].rsplit(".", 1)[0]
            pairs += [(k, parent + k[len(own + trunk) :]) for k in heads if k.startswith(f"{own}{trunk}.")]
    for key, target in pairs:
        if key not in heads:
            continue
        if target not in merged:
            raise UserError(
                f"retrained {key} has no counterpart {target} in the detector checkpoint; "
                "export with the checkpoint the cache was made from"
            )
        if merged[target].shape != heads[key].shape:
            if not (classifier_width_changes and key.rsplit(".", 2)[-2] == "fc_cls"):
                raise UserError(
                    f"retrained {key} has shape {tuple(heads[key].shape)} but the detector's {target} has "
                    f"{tuple(merged[target].shape)}; export with the checkpoint the cache was made from"
                )
        merged[target] = heads[key].clone()
    counts = heads_ckpt["meta"].get("class_instance_count")
    if logit_adjust and not counts:
        raise UserError(
            "logit adjustment needs the class instance counts, which this heads file lacks; re-run retrain-heads"
        )
    for layers in classwise_layers(stages):  # a cascade averages its stages' logits: each gets the same change
        w_key, b_key = layers["fc_cls"] + ".weight", layers["fc_cls"] + ".bias"
        c = len(counts) if counts else merged[w_key].shape[0] - 1
        if tau_norm:
            w = merged[w_key].clone()
            norms = w[:c].norm(dim=1, keepdim=True).clamp_min(1e-12)
            w[:c] = w[:c] / norms.pow(tau_norm)
            merged[w_key] = w
        if logit_adjust:
            prior = torch.tensor(counts, dtype=torch.float).clamp_min(1)
            prior = prior / prior.sum()
            b = merged[b_key].clone()
            b[:c] = b[:c] - logit_adjust * prior.log()
            merged[b_key] = b
    return merged


def export_checkpoint(
    config: str,
    checkpoint: str,
    heads: str,
    out: str,
    *,
    tau_norm: float | None = None,
    logit_adjust: float | None = None,
    combine_original: float | None = None,
    trust_checkpoint: bool = False,
    cfg_options=(),
) -> tuple[str, str | None]:
    """Write an ordinary mmdet checkpoint: ``checkpoint`` with the retrained heads merged in.

    ``tau_norm``/``logit_adjust`` default to the ``export`` section recorded in the heads file.

    When the heads were retrained with another classifier loss than ``config``
    names (e.g. group softmax or Seesaw on a softmax-CE detector), the detector
    config with that loss (and the ``custom_imports`` it needs) is written
    beside the checkpoint as ``<out stem>.py``: mmdet must use it to build a
    classifier of the right width and activation.

    ``combine_original=A`` (default: the heads' ``export`` setting) keeps the
    detector's original classifier beside the retrained one and predicts with
    ``(1 - A)·p_retrained + A·p_original`` (SimCal's dual head, crat-ft's
    ``DualSoftmaxScores``); both must be softmax classifiers of C + 1 outputs.

    ``cfg_options`` override keys of ``config`` (as ``--cfg-options``); a
    written config includes them.

    ``out`` is locked against a second export to it, its directory checked for
    writability before any checkpoint is read, and both files are renamed into
    place only when complete.

    Returns:
        ``(checkpoint path, config path or None)``.
    """
    from pathlib import Path

    from crat_ft.common.files import RunLock, clean_stale_temps, output_dir, refuse_output_among_inputs, temp_pattern

    out_p = Path(out)
    refuse_output_among_inputs(out_p, (config, checkpoint, heads), "--out")
    with (
        output_dir(out_p.parent, "the directory of --out"),
        RunLock(out_p.with_name(f".{out_p.name}.lock"), f"--out {out_p}"),
    ):
        clean_stale_temps(out_p.parent, temp_pattern(out_p))  # also the config's: same stem
        return _export_locked(
            config,
            checkpoint,
            heads,
            out_p,
            tau_norm=tau_norm,
            logit_adjust=logit_adjust,
            combine_original=combine_original,
            trust_checkpoint=trust_checkpoint,
            cfg_options=cfg_options,
        )


def _export_locked(
    config, checkpoint, heads, out_p, *, tau_norm, logit_adjust, combine_original, trust_checkpoint, cfg_options
):
    from crat_ft.common.errors import sha_mismatch
    from crat_ft.common.files import atomic_path, atomic_torch_save, refuse_output_among_inputs, sha256_file
    from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of
    from crat_ft.engine.config import load_config

    cfg = load_config(config, cfg_options)
    det = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
    state = state_dict_of(det)
    check_checkpoint_classes(cfg, state, checkpoint)
    hk = load_checkpoint_file(heads, trust_hint=False)  # heads files are never trusted: crat-ft writes only plain data
    meta = hk.get("meta", {})
    if meta.get("crat_ft_stage") != "heads":
        raise UserError(f"{heads} is not a crat-ft heads file (written by `crat-ft retrain-heads` as heads.pth)")
    sha = sha256_file(checkpoint)
    if meta.get("checkpoint_sha256") != sha:
        raise sha_mismatch(
            f"the feature cache of heads {heads}",
            meta.get("checkpoint_sha256"),
            checkpoint,
            sha,
            "export with the checkpoint the cache was made from",
        )
    stages = num_stages(cfg)
    if int(meta.get("num_stages", 1)) != stages:
        raise UserError(
            f"{heads} holds heads of a {meta.get('num_stages', 1)}-stage detector but {config} has {stages} stage(s); "
            "export with the config the cache was made with"
        )
    exp = meta.get("export", {})
    tau = tau_norm if tau_norm is not None else exp.get("tau_norm")
    la = logit_adjust if logit_adjust is not None else exp.get("logit_adjust")
    combine = combine_original if combine_original is not None else exp.get("combine_original")
    classifier = predictor_cfgs(stage_cfgs(cfg.model.roi_head.bbox_head, stages)[0], None)["classifier"]["type"]
    if tau and classifier == "NormedLinear":
        raise UserError(
            "--tau-norm has no effect on a NormedLinear classifier (it normalises its rows itself); export without it"
        )
    loss_cls = meta.get("loss_cls")
    new_cfg = _config_for_loss(cfg, loss_cls)
    merged = merge_heads(state, hk, tau_norm=tau, logit_adjust=la, classifier_width_changes=new_cfg is not None)
    if combine is not None:
        merged, new_cfg = _combine_with_original(cfg, state, merged, loss_cls, float(combine), str(heads))
    new_meta = {k: v for k, v in (det.get("meta") or {}).items() if isinstance(v, (str, int, float, dict, list, tuple))}
    new_meta["crat_ft"] = {
        "heads": str(heads),
        "source_checkpoint_sha256": sha,
        "tau_norm": tau,
        "logit_adjust": la,
        "combine_original": combine,
        "crat": meta.get("crat"),
        "donor_groups": meta.get("donor_groups"),  # as the heads were trained with them (crat.donor_groups)
        "sampler": meta.get("sampler"),
    }
    if "class_names" in meta:
        new_meta["dataset_meta"] = {"classes": tuple(meta["class_names"])}
    cfg_path = out_p.with_suffix(".py") if new_cfg is not None else None
    if cfg_path is not None:  # the config first: a checkpoint that needs it never appears without it
        refuse_output_among_inputs(cfg_path, (config, checkpoint, heads), "--out's config (<out stem>.py)")
        new_meta["crat_ft"]["config"] = str(cfg_path)
        with atomic_path(cfg_path) as tmp_cfg:
            new_cfg.dump(str(tmp_cfg))
    atomic_torch_save({"state_dict": merged, "meta": new_meta}, out_p)
    return str(out_p), (str(cfg_path) if cfg_path is not None else None)


def _config_for_loss(cfg, loss_cls: dict | None):
    """A copy of ``cfg`` whose bbox head uses ``loss_cls``, or None when it already does."""
    heads = stage_cfgs(cfg.model.roi_head.bbox_head, num_stages(cfg))
    if not loss_cls or all(_plain(head.get("loss_cls")) == _plain(loss_cls) for head in heads):
        return None
    return _with_loss(cfg, loss_cls)


def _with_loss(cfg, loss_cls: dict):
    """A copy of ``cfg`` whose bbox heads (every stage's) use ``loss_cls``; crat-ft's own losses get
    ``crat_ft.losses`` in ``custom_imports``."""
    import copy

    from crat_ft.heads.losses import CRAT_LOSSES

    new = copy.deepcopy(cfg)
    for head in stage_cfgs(new.model.roi_head.bbox_head, num_stages(new)):
        head.loss_cls = dict(loss_cls)
    if loss_cls.get("type") in CRAT_LOSSES:
        imports = dict(new.get("custom_imports") or {"imports": [], "allow_failed_imports": False})
        if "crat_ft.losses" not in imports.get("imports", []):
            imports["imports"] = list(imports.get("imports", [])) + ["crat_ft.losses"]
        new.custom_imports = imports
    return new


def _combine_with_original(cfg, original: dict, merged: dict, loss_cls: dict | None, weight: float, heads: str):
    """fc_cls of ``merged`` stacked on the original one, and the config predicting with their mixed scores."""
    import torch

    if num_stages(cfg) > 1:
        raise UserError(
            "--combine-original mixes two classifiers of a single-stage RoI head; a cascade averages its stages' "
            "classifiers already: export without --combine-original"
        )
    if not 0.0 <= weight <= 1.0:
        raise UserError(
            f"--combine-original {weight}: expected a weight in [0, 1] (the original classifier's share of the scores)"
        )
    key = CLASSWISE_LAYERS["fc_cls"]
    c = int(original[CLASSWISE_LAYERS["fc_reg"] + ".weight"].shape[0]) // 4

    def softmax(loss) -> bool:
        return bool(loss) and loss.get("type") == "CrossEntropyLoss" and not loss.get("use_sigmoid", False)

    det_loss = cfg.model.roi_head.bbox_head.get("loss_cls")
    if (
        not softmax(loss_cls or det_loss)
        or not softmax(det_loss)
        or merged[key + ".weight"].shape[0] != c + 1
        or original[key + ".weight"].shape[0] != c + 1
    ):
        raise UserError(
            f"--combine-original mixes two softmax classifiers of {c} + 1 outputs, but {heads} or the detector uses another classifier "
            f"loss ({(loss_cls or {}).get('type')} / {(det_loss or {}).get('type')}); export without --combine-original"
        )
    merged = dict(merged)
    for p in ("weight", "bias"):
        merged[f"{key}.{p}"] = torch.cat([merged[f"{key}.{p}"], original[f"{key}.{p}"]])
    return merged, _with_loss(cfg, dict(type="DualSoftmaxScores", num_classes=c, original_weight=weight))


def _plain(x):
    """ConfigDicts/tuples as plain dicts/lists, for comparison."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
