"""Safe loading of mmdet/mmengine checkpoints.

A checkpoint is a pickle, and unpickling can call any function the file names.
torch's ``weights_only`` loader refuses everything but tensors and plain data,
which is too strict for what mmengine's Runner saves: its message hub holds
``HistoryBuffer`` objects, pickled with ``getattr(HistoryBuffer, "min")`` for
their statistics methods, and its meta holds numpy arrays and scalars. Adding
``builtins.getattr`` to torch's allow-list would be wrong: ``getattr`` reaches
``getattr.__self__`` (the builtins module), hence ``open``, ``eval`` and
everything else, and torch's allow-listed ``_rebuild_from_type_v2`` calls
whatever it is given.

So crat-ft unpickles with its own restricted unpickler (:class:`SafeUnpickler`,
passed to ``torch.load`` as the pickle module). It resolves only the globals
in :func:`safe_globals`: torch's own ``weights_only`` allow-list (tensor
rebuild functions, dtypes...), the containers and constructors that list
gained only in torch 2.13 (``Counter``, ``set``, ``bytearray``, ``complex``,
``torch.device``, ``_codecs.encode`` for numpy scalars' bytes) named here, so
torch 2.1 loads the same files, numpy arrays, dtypes and scalars, and
``HistoryBuffer``. ``getattr`` is replaced by a function that
accepts exactly ``getattr(HistoryBuffer, <statistics method>)`` and nothing
else, so every callable a file can reach is a data constructor.

Arbitrary pickles are loaded only when the user opts in with
``--trust-checkpoint`` (:func:`trusted_loading`). :func:`allow_mmengine_pickles`
makes mmengine's own checkpoint loading (``Runner`` resume, ``load_from``,
``init_detector``) go through the same loader.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import pickle
from pathlib import Path

from crat_ft.common.errors import UserError

# HistoryBuffer's built-in statistics methods: the only attributes the safe getattr returns
HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")
_HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
# Python 2 module names that pickle protocol 2 writes (torch.save's default protocol)
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_TRUSTED = contextvars.ContextVar("crat_ft_trusted_checkpoints", default=False)


class UnreadableCheckpointError(UserError):
    """A checkpoint file that cannot be read at all: truncated, corrupt, or not a torch file."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list, or uses ``getattr`` beyond HistoryBuffer's methods."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _history_buffer_getattr(obj, name, *default):
    """``getattr`` as HistoryBuffer pickles need it: ``getattr(HistoryBuffer, "min")`` and nothing else."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and name in HISTORY_BUFFER_METHODS and not default:
        return getattr(HistoryBuffer, name)
    shown = "getattr" if obj is _history_buffer_getattr else getattr(obj, "__qualname__", None) or type(obj).__name__
    raise UnsafePickleError(f"getattr({shown}, {name!r}{', ...' if default else ''})")


def safe_globals() -> dict:
    """``"module.name" -> object`` of every global a checkpoint may name without ``--trust-checkpoint``."""
    import _codecs
    import collections

    import numpy as np
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())  # tensor and storage rebuilders, dtypes: they differ between torch versions
    # what torch >= 2.13 adds to that list, named here so that every supported torch (2.1 included) loads
    # what mmengine's Runner saves: numpy scalars in its meta pickle their bytes through _codecs.encode,
    # the plugin's checkpoints hold Counters; all are data constructors
    for obj in (collections.OrderedDict, collections.Counter, set, frozenset, bytearray, complex, slice, torch.Size,
                torch.device):  # fmt: skip
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    allowed["_codecs.encode"] = _codecs.encode
    numpy_core = np.core.multiarray
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}._reconstruct"] = numpy_core._reconstruct
        allowed[f"{mod}.scalar"] = numpy_core.scalar
    allowed["numpy.ndarray"] = np.ndarray
    allowed["numpy.dtype"] = np.dtype
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes as numpy.dtypes.*DType
    if dtypes is not None:
        for n in dir(dtypes):
            if n.endswith("DType"):
                allowed[f"numpy.dtypes.{n}"] = getattr(dtypes, n)
    allowed[_HISTORY_BUFFER] = HistoryBuffer
    for name in HISTORY_BUFFER_METHODS:  # protocol >= 4 names methods by qualified name
        allowed[f"{_HISTORY_BUFFER}.{name}"] = getattr(HistoryBuffer, name)
    allowed["builtins.getattr"] = _history_buffer_getattr
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """A pickle unpickler that resolves only the globals of :func:`safe_globals`."""

    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = safe_globals()
        found = SafeUnpickler._allowed.get(f"{module}.{name}")
        if found is None:
            raise UnsafePickleError(f"{module}.{name}")
        return found


class _SafePickleModule:
    """What ``torch.load(pickle_module=...)`` needs of a pickle module, restricted."""

    __name__ = "crat_ft.engine.checkpoint.safe_pickle"
    Unpickler = SafeUnpickler

    @staticmethod
    def load(file, **kwargs):
        return SafeUnpickler(file, **kwargs).load()

    @staticmethod
    def loads(data: bytes, **kwargs):
        return SafeUnpickler(io.BytesIO(data), **kwargs).load()


safe_pickle = _SafePickleModule()


def safe_torch_load(f, map_location="cpu"):
    """``torch.load`` of a file or file object through :class:`SafeUnpickler` (no trust needed)."""
    import torch

    return torch.load(f, map_location=map_location, weights_only=False, pickle_module=safe_pickle)


@contextlib.contextmanager
def trusted_loading(trust: bool):
    """Within this context, checkpoints loaded through mmengine unpickle anything if ``trust`` is set.

    Use only for checkpoints the user vouches for (``--trust-checkpoint``).
    """
    token = _TRUSTED.set(bool(trust))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _mmengine_local_loader(filename, map_location=None):
    return load_checkpoint_file(os.path.expanduser(filename), trust=_TRUSTED.get(), map_location=map_location)


def allow_mmengine_pickles() -> None:
    """Make mmengine load local checkpoints with crat-ft's loader (safe unless :func:`trusted_loading`).

    Registers :func:`load_checkpoint_file` as mmengine's loader for local
    paths (``CheckpointLoader`` scheme ``''``; URLs keep mmengine's loaders),
    so ``Runner`` resume, ``load_from`` and ``init_detector`` read Runner
    checkpoints without opening arbitrary unpickling. Idempotent.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=_mmengine_local_loader, force=True)


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a file; else a one-line :class:`UserError` saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pth"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise UserError(f"checkpoint {path} is a directory{hint}, not a checkpoint file; pass the .pth file itself")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path or train one with `crat-ft train-detector`")
    return path


def load_checkpoint_file(
    path: str | os.PathLike, *, trust: bool = False, map_location="cpu", trust_hint: bool = True
) -> dict:
    """Load a checkpoint dict, safely unless ``trust``.

    Args:
        path: the file.
        trust: unpickle anything (the user vouched for the file).
        map_location: as ``torch.load``'s.
        trust_hint: whether the error for an unsafe file suggests
            ``--trust-checkpoint`` (False for files that are never trusted,
            such as heads files).

    Raises:
        UnreadableCheckpointError: an unreadable or truncated file.
        UserError: a missing file, or a file that needs unpickling beyond the
            allow-list (the message names the refused global and ``--trust-checkpoint``).
    """
    import torch

    path = check_checkpoint_path(path)
    try:
        if trust:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        else:
            ckpt = safe_torch_load(path, map_location=map_location)
    except UnsafePickleError as exc:
        fix = (
            "if you trust this file, rerun with --trust-checkpoint"
            if trust_hint
            else "files written by crat-ft hold only tensors and plain data: use the file crat-ft wrote"
        )
        raise UserError(
            f"checkpoint {path} contains Python objects outside crat-ft's safe allow-list ({exc.what}); {fix}"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt files
        msg = str(exc)
        text = msg.splitlines()[0] if msg else type(exc).__name__
        raise UnreadableCheckpointError(
            f"checkpoint {path} could not be read ({text}); the file is corrupt or truncated: re-download or re-train it"
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(
            f"checkpoint {path}: expected a dict (state_dict or mmengine checkpoint), got {type(ckpt).__name__}"
        )
    return ckpt


def state_dict_of(ckpt: dict) -> dict:
    """The model weights of a checkpoint (mmengine's ``state_dict`` or a bare state dict)."""
    sd = ckpt.get("state_dict", ckpt)
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
