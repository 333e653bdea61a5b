"""Stop a fit at the first non-finite number, before a checkpoint can hold it.

A NaN or infinite loss (a scan with extreme values that passed the checks, a learning rate too high) turns
every weight into NaN at the next optimiser step, and Lightning would go on to save it as the best model.
These checks cost one device sync per step, as any check of a value on the device does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A loss or gradient that is NaN or infinite; the message names the step and the batch's subjects."""


def _batch(subject_ids: Sequence[str] | None) -> str:
    return f" on the batch of subject(s) {', '.join(map(str, subject_ids))}" if subject_ids else ""


def check_loss(loss: Tensor, stage: str, step: int, subject_ids: Sequence[str] | None = None) -> None:
    """Raise ``NonFiniteError`` when ``loss`` is NaN or infinite."""
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteError(
            f"{stage} loss is {float(loss.detach()):g} at step {step}{_batch(subject_ids)}; stopped before any "
            "checkpoint holds it. Check those scans (`rmr-data check`), or lower the learning rate"
        )


def check_gradients(
    parameters: Iterable[torch.nn.Parameter], step: int, subject_ids: Sequence[str] | None = None
) -> None:
    """Raise ``NonFiniteError`` when a gradient is NaN or infinite, before the optimiser applies it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and not bool(torch.isfinite(torch.stack([g.detach().abs().sum() for g in grads])).all()):
        raise NonFiniteError(
            f"a gradient is NaN or infinite at step {step}{_batch(subject_ids)} (the loss was finite); stopped before "
            "the optimiser applied it. Lower the learning rate or set --trainer.gradient_clip_val"
        )
