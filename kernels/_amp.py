"""Mixed precision for the ops: under ``torch.autocast`` an op runs in the autocast dtype (docs/design.md section 5).

``torch.amp.custom_fwd(cast_inputs=...)`` fixes one dtype per device at decoration time; the ops instead follow the
active autocast dtype of their inputs' device (bf16 or fp16 on CUDA, bf16 on CPU): every floating-point tensor
argument (float64 excepted, as ``custom_fwd`` does) is cast to it and the op runs with autocast disabled, so its
kernels see one dtype and accumulate in fp32 as they always do. Gradients flow back through the casts to the
callers' (fp32) parameters.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def autocast_op(fn: F | None = None, *, keep: tuple = ()) -> F:
    """Run ``fn`` in the autocast dtype of its first tensor argument's device when autocast is enabled there; the
    keyword arguments named in ``keep`` (parameters that need their precision, such as entmax's alpha) keep theirs.
    Used as ``@autocast_op`` or ``@autocast_op(keep=(...))``."""
    if fn is None:
        return functools.partial(autocast_op, keep=keep)  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = _first_tensor(args, kwargs)
        if first is None:
            return fn(*args, **kwargs)
        device_type = first.device.type
        if not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)

        def cast(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                return value.to(dtype)
            return value

        with torch.autocast(device_type, enabled=False):
            return fn(*(cast(a) for a in args),
                      **{name: value if name in keep else cast(value) for name, value in kwargs.items()})

    return wrapper  # type: ignore[return-value]
