"""crat-ft's mmengine hooks: ``NonFiniteGuardHook`` and ``ConsoleProgressHook``.

``NonFiniteGuardHook``: no optimizer step with NaN/inf gradients, no checkpoint with NaN/inf weights.

A finite loss can still give infinite gradients (an exploding step), and the
step that applies them writes NaN/inf into the weights; mmengine's
``CheckpointHook`` would then save them at the end of that iteration. This
hook adds two checks to the optimizer (``torch.optim.Optimizer`` step hooks),
so they run inside every train step, plain or DDP:

1. before the step: every gradient is finite, else stop without updating;
2. after the step: every parameter is finite, else stop before the
   iteration ends (so before ``CheckpointHook.after_train_iter`` saves).

Either way the newest checkpoint on disk holds the last finite weights. The
error names the iteration, the offending tensors and the loss terms (when the
model records them as ``last_log_vars``, as :class:`crat_ft.heads.classwise.ClasswiseHeads`
does).
"""

from __future__ import annotations

from pathlib import Path

import torch
from mmengine.hooks import Hook

from crat_ft.common.errors import UserError
from crat_ft.common.progress import Progress
from crat_ft.engine.runner import unwrap


class NonFiniteError(UserError):
    """Training produced NaN/inf (loss, gradient or weights)."""


def non_finite_advice(work_dir: str | Path | None) -> str:
    """The true advice after a non-finite step: the newest checkpoint is good, but resuming repeats the step."""
    where = f"the newest checkpoint in {work_dir}" if work_dir else "the newest checkpoint"
    return (
        f"the step was not applied and {where} holds the last finite weights; lower the learning rate "
        "(or the loss weights / CRAT lambdas) and train again in a new work dir, since resuming with the same "
        "settings repeats the same step"
    )


class NonFiniteGuardHook(Hook):
    """Stop training before NaN/inf gradients are applied or NaN/inf weights are saved.

    Args:
        work_dir: named in the error message (default: the runner's).
    """

    priority = "VERY_HIGH"

    def __init__(self, *, work_dir: str | Path | None = None) -> None:
        self.work_dir = work_dir
        self._handles: list = []

    def before_train(self, runner) -> None:
        model = unwrap(runner.model)
        self._model = model
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._runner = runner
        self.work_dir = self.work_dir or runner.work_dir
        wrapper = runner.optim_wrapper  # an OptimWrapper, or an OptimWrapperDict of several
        optimizers = [w.optimizer for w in wrapper.values()] if hasattr(wrapper, "values") else [wrapper.optimizer]
        self._handles = []
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._check_grads))
            self._handles.append(optimizer.register_step_post_hook(self._check_params))

    def after_train(self, runner) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _bad(self, optimizer, tensor_of) -> list[str]:
        bad = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                t = tensor_of(p)
                if t is not None and not torch.isfinite(t).all():
                    bad.append(self._names.get(id(p), "?"))
        return bad

    def _raise(self, what: str, bad: list[str]) -> None:
        terms = getattr(self._model, "last_log_vars", None)
        loss = f"; loss terms {', '.join(f'{k}={float(v):.4g}' for k, v in terms.items())}" if terms else ""
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(
            f"non-finite {what} at iteration {self._runner.iter + 1} ({shown}{loss}); {non_finite_advice(self.work_dir)}"
        )

    def _check_grads(self, optimizer, args, kwargs) -> None:
        bad = self._bad(optimizer, lambda p: p.grad)
        if bad:
            self._raise("gradient", bad)

    def _check_params(self, optimizer, args, kwargs) -> None:
        bad = self._bad(optimizer, lambda p: p)
        if bad:
            self._raise("weights after the optimizer step", bad)


class ConsoleProgressHook(Hook):
    """A progress line on stderr for training (iterations) and testing (images), on rank 0.

    mmengine's own logs go wherever its loggers write (the demo sends them to a
    file); this line is what a person watches.

    Args:
        label: the line's prefix, e.g. ``"evaluate"``.
        make_bar: builds the bar from ``(total, label, unit)``; :class:`Progress` (the default) unless a
            caller reports elsewhere (the demo's concurrent evaluations report to one bar).
    """

    priority = "LOWEST"

    def __init__(self, label: str, make_bar=None) -> None:
        self.label, self.make_bar = label, make_bar or Progress
        self._bar: Progress | None = None

    def before_train(self, runner) -> None:
        if runner.rank == 0:
            # a resumed run counts on from the iteration it resumed at (mmengine resumes before this hook)
            self._bar = self.make_bar(runner.max_iters, self.label, unit="iterations", start=runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def before_test(self, runner) -> None:
        if runner.rank == 0:
            self._bar = self.make_bar(
                len(runner.test_dataloader.dataset) // runner.world_size, self.label, unit="images"
            )

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._bar is not None:
            self._bar.update(len(outputs) if outputs is not None else 1)
