"""Input validation shared by the ops: clear ``TypeError``/``ValueError`` messages naming the argument."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, value, ndim: int | None = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """``value`` must be a tensor of rank ``ndim`` (if given) and one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")


def check_same_dtype_and_device(**tensors: torch.Tensor) -> None:
    """All named tensors share the first one's dtype and device."""
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but {first_name} has {first.dtype}; they must match")
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}; they must match")


def check_nonempty(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")


def checked_cu_seqlens(cu_seqlens, total: int, validate) -> torch.Tensor:
    """The offsets as a contiguous int32 (num_seqs + 1,) tensor (the kernels index them as a flat array); with
    ``validate`` (None: when they are on the CPU; never while torch.compile traces) also their values: start at 0,
    strictly increasing, end at ``total``."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold num_seqs + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    cu_seqlens = cu_seqlens.contiguous()
    if torch.compiler.is_compiling() or not (cu_seqlens.device.type == "cpu" if validate is None else validate):
        return cu_seqlens  # the value checks read the offsets on the host
    offsets = cu_seqlens.cpu()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(offsets[0])}")
    if not bool((offsets[1:] > offsets[:-1]).all()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {offsets.tolist()}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the packed length {total}, got {int(offsets[-1])}")
    return cu_seqlens


def check_mha_unsupported(**arguments) -> None:
    """nn.MultiheadAttention arguments that the attention modules do not implement must keep their defaults
    (None or False)."""
    reasons = {"attn_mask": "the module's mask is fixed (block-causal or causal)",
               "is_causal": "the module's mask is fixed (block-causal or causal)"}
    for name, value in arguments.items():
        if value is not None and value is not False:
            shown = "a tensor" if isinstance(value, torch.Tensor) else repr(value)
            reason = f": {reasons[name]}" if name in reasons else ""
            raise ValueError(f"{name}={shown} is not supported{reason}")
