"""Safe checkpoint loading under torch >= 2.6."""

import argparse

import numpy as np
import pytest
import torch

from crat_ft.checkpoint import load_checkpoint_file, state_dict_of
from crat_ft.errors import UserError


def test_mmengine_runner_checkpoint_loads_safely(tmp_path):
    """What mmengine's Runner saves: HistoryBuffers in the message hub, numpy scalars in meta."""
    from mmengine.logging import HistoryBuffer

    buf = HistoryBuffer()
    buf.update(1.5)
    ckpt = {"meta": {"seed": np.int64(3), "lr": np.float64(0.1)}, "message_hub": {"log_scalars": {"train/lr": buf}},
            "state_dict": {"module.w": torch.ones(2)}}
    torch.save(ckpt, tmp_path / "runner.pth")
    with pytest.raises(Exception):  # plain torch refuses it
        torch.load(tmp_path / "runner.pth", weights_only=True)
    loaded = load_checkpoint_file(tmp_path / "runner.pth")
    assert loaded["meta"]["seed"] == 3 and loaded["message_hub"]["log_scalars"]["train/lr"].current() == 1.5
    assert list(state_dict_of(loaded)) == ["w"]


def test_arbitrary_pickles_need_trust(tmp_path):
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "unsafe.pth")
    with pytest.raises(UserError, match=r"outside crat-ft's safe allow-list \(argparse\.Namespace\); if you trust this file, rerun with --trust-checkpoint"):
        load_checkpoint_file(tmp_path / "unsafe.pth")
    assert load_checkpoint_file(tmp_path / "unsafe.pth", trust=True)["args"].a == 1


def test_corrupt_and_missing(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage!")
    with pytest.raises(UserError, match=r"could not be read \(.+\); the file is corrupt or truncated"):
        load_checkpoint_file(tmp_path / "bad.pth")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint_file(tmp_path / "cut.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.pth")
