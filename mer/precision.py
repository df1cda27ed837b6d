"""Training precision shared by both training CLIs: ``--precision {fp32,bf16,fp16}``.

``bf16`` and ``fp16`` run each training forward and loss under ``torch.autocast`` on the model's device (the kernels
then run in that dtype with fp32 accumulation, ``kernels._amp``); ``fp16`` also scales the loss with a
``torch.amp.GradScaler``, whose state goes into the checkpoints so that a resumed run continues with the same scale.
Parameters and optimizer states stay fp32; evaluation runs in fp32.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A GradScaler that is enabled for fp16 only (for fp32 and bf16 its calls pass the loss and step through)."""
    check_precision(precision)
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                      parameters: Iterable[torch.nn.Parameter], grad_clip: float) -> None:
    """``loss.backward()``, optional gradient-norm clipping (on unscaled gradients) and ``optimizer.step()``."""
    scaler.scale(loss).backward()
    clip_and_step(optimizer, scaler, parameters=parameters, grad_clip=grad_clip)


def clip_and_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                  parameters: Iterable[torch.nn.Parameter], grad_clip: float) -> None:
    """After ``scaler.scale(loss).backward()`` (one or several): optional gradient-norm clipping (on unscaled
    gradients), ``optimizer.step()`` (skipped by the scaler when fp16 gradients overflowed) and the scale update."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(parameters), grad_clip)
    scaler.step(optimizer)
    scaler.update()
