"""Safe checkpoint loading, the same on every supported torch (2.1 to 2.14)."""

import argparse
import collections
import re

import numpy as np
import pytest
import torch

from crat_ft.common.errors import UserError
from crat_ft.engine.checkpoint import load_checkpoint_file, state_dict_of


def test_mmengine_runner_checkpoint_loads_safely(tmp_path):
    """What mmengine's Runner saves: HistoryBuffers in the message hub, numpy scalars in meta."""
    from mmengine.logging import HistoryBuffer

    buf = HistoryBuffer()
    buf.update(1.5)
    # what the plugin's checkpoints and mmengine's meta hold besides: every one loads on each supported torch
    # (torch 2.1's own weights-only list has none of _codecs.encode, Counter, set, bytearray, complex, device)
    extra = {"counts": collections.Counter({"a": 2}), "ids": {1, 2}, "frozen": frozenset({3}), "raw": bytearray(b"xy"),
             "z": complex(1, 2), "device": torch.device("cpu"), "size": torch.Size([2, 3]), "cut": slice(1, 4)}  # fmt: skip
    ckpt = {
        "meta": {"seed": np.int64(3), "lr": np.float64(0.1), "shape": np.zeros((2, 2), np.float32), **extra},
        "message_hub": {"log_scalars": {"train/lr": buf}},
        "state_dict": {"module.w": torch.ones(2)},
    }
    torch.save(ckpt, tmp_path / "runner.pth")
    with pytest.raises(Exception):  # plain torch refuses it
        torch.load(tmp_path / "runner.pth", weights_only=True)
    loaded = load_checkpoint_file(tmp_path / "runner.pth")
    assert loaded["meta"]["seed"] == 3 and loaded["message_hub"]["log_scalars"]["train/lr"].current() == 1.5
    assert {k: loaded["meta"][k] for k in extra} == extra and loaded["meta"]["shape"].shape == (2, 2)
    assert list(state_dict_of(loaded)) == ["w"]


def test_arbitrary_pickles_need_trust(tmp_path):
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "unsafe.pth")
    with pytest.raises(
        UserError,
        match=r"outside crat-ft's safe allow-list \(argparse\.Namespace\); if you trust this file, rerun with --trust-checkpoint",
    ):
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


# --------------------------------------------------------------------------- crafted checkpoints


class _Call:
    """Pickles as ``func(*args)``: the REDUCE shapes an attacker writes into a checkpoint."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _exploits(target):
    """Known ways past a weights_only-style allow-list, each trying to create ``target``."""
    import copyreg
    import os

    from mmengine.logging import HistoryBuffer

    builtins_module = _Call(getattr, getattr, "__self__")
    open_fn = _Call(getattr, builtins_module, "open")
    return {
        # the reported one: getattr reaches builtins.open, torch's _rebuild_from_type_v2 calls it
        "rebuild_from_type_v2(open)": _Call(
            torch._tensor._rebuild_from_type_v2, open_fn, torch.Tensor, (str(target), "w"), {}
        ),
        "getattr(HistoryBuffer.min, __globals__)": _Call(getattr, _Call(getattr, HistoryBuffer, "min"), "__globals__"),
        "getattr(HistoryBuffer, __init__)": _Call(getattr, HistoryBuffer, "__init__"),
        "getattr with a default": _Call(getattr, HistoryBuffer, "min", None),
        "os.system": _Call(os.system, f"touch {target}"),
        "builtins.eval": _Call(eval, f"open({str(target)!r}, 'w')"),
        "builtins.exec": _Call(exec, f"open({str(target)!r}, 'w')"),
        "copyreg._reconstructor": _Call(copyreg._reconstructor, argparse.Namespace, object, None),
        "torch.load of another file": _Call(torch.load, str(target)),
        "inside a numpy object array": np.array([_Call(os.system, f"touch {target}")], dtype=object),
        "inside a tensor's state": _Call(
            torch._utils._rebuild_parameter_with_state, torch.zeros(1), False, {}, {"x": _Call(eval, "1")}
        ),
    }


@pytest.mark.parametrize("name", list(_exploits("x")))
def test_crafted_checkpoints_are_refused_without_side_effects(name, tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"x": _exploits(target)[name]}}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint_file(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.fullmatch(
        r"checkpoint .*evil\.pth contains Python objects outside crat-ft's safe allow-list \(.+\); "
        r"if you trust this file, rerun with --trust-checkpoint",
        msg,
    ), msg
    assert not target.exists()


def test_the_reported_exploit_names_the_refused_getattr(tmp_path):
    target = tmp_path / "pwned"
    torch.save(_exploits(target)["rebuild_from_type_v2(open)"], tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"\(getattr\(getattr, '__self__'\)\)"):
        load_checkpoint_file(tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"files written by crat-ft hold only tensors and plain data"):
        load_checkpoint_file(tmp_path / "evil.pth", trust_hint=False)
    assert not target.exists()


def test_dotted_global_names_are_not_walked():
    """Protocol 4 names globals by qualified name; the unpickler must not walk the dots."""
    from crat_ft.engine.checkpoint import UnsafePickleError, safe_pickle

    def stack_global(module, name):
        def enc(s):  # SHORT_BINUNICODE
            return b"\x8c" + bytes([len(s)]) + s.encode()

        return b"\x80\x04" + enc(module) + enc(name) + b"\x93."  # STACK_GLOBAL, STOP

    from mmengine.logging import HistoryBuffer

    assert safe_pickle.loads(stack_global("mmengine.logging.history_buffer", "HistoryBuffer.min")) is HistoryBuffer.min
    for module, name in (
        ("mmengine.logging.history_buffer", "HistoryBuffer.min.__globals__"),
        ("builtins", "getattr.__self__"),
        ("os", "system"),
        ("torch", "load"),
    ):
        with pytest.raises(UnsafePickleError):
            safe_pickle.loads(stack_global(module, name))


def test_mmengine_loading_goes_through_the_safe_loader(tmp_path):
    """Runner resume, load_from and init_detector load through mmengine's CheckpointLoader."""
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    from crat_ft.engine.checkpoint import allow_mmengine_pickles, trusted_loading

    allow_mmengine_pickles()
    target = tmp_path / "pwned"
    torch.save({"meta": {"x": _exploits(target)["rebuild_from_type_v2(open)"]}}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="outside crat-ft's safe allow-list"):
        CheckpointLoader.load_checkpoint(str(tmp_path / "evil.pth"))
    assert not target.exists()
    buf = HistoryBuffer()
    buf.update(2.0)
    torch.save({"message_hub": {"b": buf}, "args": argparse.Namespace(a=1)}, tmp_path / "runner.pth")
    with pytest.raises(UserError, match=r"\(argparse\.Namespace\)"):
        CheckpointLoader.load_checkpoint(str(tmp_path / "runner.pth"))
    with trusted_loading(True):
        assert CheckpointLoader.load_checkpoint(str(tmp_path / "runner.pth"))["args"].a == 1
    torch.save({"message_hub": {"b": buf}}, tmp_path / "plain.pth")
    assert CheckpointLoader.load_checkpoint(str(tmp_path / "plain.pth"))["message_hub"]["b"].mean() == 2.0
