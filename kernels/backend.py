"""The one switch between the Triton kernels and the PyTorch references (docs/design.md section 1).

``KERNELS_BACKEND`` (read at every call, so tests and users may change it between calls):

- ``auto`` (default): Triton kernels for CUDA tensors, the PyTorch reference for CPU tensors;
- ``triton``: always the Triton kernels; CPU tensors then need ``TRITON_INTERPRET=1``, set before
  ``kernels`` is imported (Triton decides at decoration time whether a kernel is interpreted);
- ``reference``: always the PyTorch reference.

``use_backend(name)`` overrides the variable inside a ``with`` block. ``capturing_launches()`` is for
``kernels.tools.report`` only: it lets CPU tensors take the Triton path without the interpreter while the report
intercepts every launch (no kernel runs) to compile it for a GPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "reference")
_override: Optional[str] = None
_capturing_launches = False


def _check_name(name: str) -> str:
    normalized = name.strip().lower()
    if normalized not in BACKENDS:
        raise ValueError(f"KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return normalized


def requested_backend() -> str:
    """The backend asked for: the ``use_backend`` override, else ``KERNELS_BACKEND``, else ``auto``."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get("KERNELS_BACKEND", "auto") or "auto")


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on ``tensors`` runs its Triton kernels (True) or its reference (False)."""
    backend = requested_backend()
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda
    if not on_cuda and not triton_interpreter_enabled() and not _capturing_launches:
        raise RuntimeError(
            "KERNELS_BACKEND=triton with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before importing kernels, or use KERNELS_BACKEND=auto/reference"
        )
    return True


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ``with`` block under backend ``name`` (``auto``, ``triton`` or ``reference``)."""
    global _override
    previous, _override = _override, _check_name(name)
    try:
        yield
    finally:
        _override = previous


@contextlib.contextmanager
def capturing_launches() -> Iterator[None]:
    """Inside the block, ``triton`` lets CPU tensors reach the kernels' launches without the interpreter; only for a
    caller that intercepts the launches (``kernels.tools.report``): a kernel actually launched on CPU tensors would fail."""
    global _capturing_launches
    previous, _capturing_launches = _capturing_launches, True
    try:
        yield
    finally:
        _capturing_launches = previous
