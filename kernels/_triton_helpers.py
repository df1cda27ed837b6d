"""Triton helpers shared by the op kernels.

Triton 3.9's CPU interpreter (``TRITON_INTERPRET=1``, how the tests run without a GPU) computes ``tl.dot`` wrongly
on bfloat16 operands: it multiplies their raw bit patterns. Kernels therefore take a ``UPCAST_DOTS`` constexpr,
chosen per launch by :func:`upcast_dots_for`, and multiply through :func:`dot_fp32acc`. It is True only for
bfloat16 under the interpreter, so GPU launches (and ``aot_configurations()``) always have ``UPCAST_DOTS=False``
and keep bfloat16 tensor-core dots. Upcasting is exact: the bfloat16 products are the same in float32.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .backend import triton_interpreter_enabled

# Triton decides at decoration time (when ``kernels`` is imported) whether kernels are interpreted; read it once then.
_KERNELS_INTERPRETED = triton_interpreter_enabled()


@triton.jit
def dot_fp32acc(a, b, INPUT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """``tl.dot(a, b)`` accumulated in fp32 ([M, K] @ [K, N] -> [M, N] fp32). ``INPUT_PRECISION`` is passed on (it
    only matters for fp32 operands). With ``UPCAST_DOTS`` both operands are first cast to fp32, working around the
    interpreter's bf16 dot (see the module docstring); never set on GPUs."""
    if UPCAST_DOTS:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


#: what ``KERNELS_FP32_PRECISION`` may say: see :func:`fp32_dot_precision`
FP32_DOT_PRECISIONS = ("tf32", "ieee")


def fp32_dot_precision() -> str:
    """How the kernels multiply float32 tiles, from ``KERNELS_FP32_PRECISION`` (read at every launch):

    - ``tf32`` (default): TF32 tensor cores, i.e. operands rounded to a 10-bit mantissa (relative error <= 2^-11
      per product), products summed in float32, as torch does with ``torch.backends.cuda.matmul.allow_tf32``;
    - ``ieee``: exact float32 products (CUDA-core FMAs, several times slower), as torch's default float32 matmul.

    16-bit inputs always multiply exactly (bf16/fp16 tensor cores, float32 sums). The interpreter computes exactly
    either way."""
    value = os.environ.get("KERNELS_FP32_PRECISION", "tf32").strip().lower() or "tf32"
    if value not in FP32_DOT_PRECISIONS:
        raise ValueError(f"KERNELS_FP32_PRECISION must be one of {FP32_DOT_PRECISIONS}, got {value!r}")
    return value


def upcast_dots_for(dtype: torch.dtype) -> bool:
    """The ``UPCAST_DOTS`` constexpr for kernels whose dot operands have ``dtype``: True only for bfloat16 under
    Triton's interpreter."""
    return dtype == torch.bfloat16 and _KERNELS_INTERPRETED


def launch_device_of(tensor: torch.Tensor):
    """Context that launches kernels on ``tensor``'s GPU, not the current one (tensors on cuda:1 while cuda:0 is
    current); a no-op for CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


MAX_GRID_AXIS = 65535  # CUDA's limit on grid axes 1 and 2, where the kernels put batch * heads


def check_batch_heads(batch_heads: int) -> None:
    """A clear error, instead of a failed launch, when batch * heads exceeds what one grid axis holds."""
    if batch_heads > MAX_GRID_AXIS:
        raise ValueError(f"q has B * H = {batch_heads} batch-heads; the Triton kernels take at most {MAX_GRID_AXIS}")


# TMA (Hopper's tensor memory accelerator, sm_90): kernels that build tensor descriptors on the device
# (``tl.make_tensor_descriptor``) get them written to a global scratch buffer (128 bytes per descriptor and program),
# which Triton's launcher asks ``triton.set_allocator``'s allocator for at every launch.
TMA_ALIGNMENT = 16  # bytes: of a descriptor's base address and of every stride but the last (which must be 1)
TMA_MAX_BOX = tl.constexpr(256)  # elements: the most a descriptor's tile (box) holds along each dimension


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address every tensor as is: a ``TMA_ALIGNMENT``-byte aligned address, a unit-stride
    last dim, and positive ``TMA_ALIGNMENT``-byte multiples as the strides of the other dims, those of size 1 too (a
    kernel may put any of them in a descriptor, e.g. the row stride of a one-row sequence; broadcast dims, stride 0,
    are left to pointer loads). The launchers fall back to pointer loads otherwise."""
    for t in tensors:
        if t.data_ptr() % TMA_ALIGNMENT or (t.stride(-1) != 1 and t.shape[-1] != 1):
            return False
        if any(stride <= 0 or stride * t.element_size() % TMA_ALIGNMENT for stride in t.stride()[:-1]):
            return False
    return True


def tma_launch(arch: str, *streamed: torch.Tensor) -> bool:
    """Whether a launch for ``arch`` (``kernels._autotune.launch_arch``) loads the ``streamed`` tiles through TMA
    tensor descriptors (the kernels' ``USE_TMA``): on sm_90 when every one meets TMA's alignment (``tma_eligible``);
    elsewhere, or unaligned, through pointer loads (cp.async when 16-byte aligned)."""
    return arch == "sm_90" and tma_eligible(*streamed)


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's allocator protocol on torch's caching allocator (blocks are 512-byte aligned, ``alignment`` <= 128),
    on the current device and stream: what the launch runs on."""
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


@contextlib.contextmanager
def tma_scratch(needed: bool = True):
    """Within the block, launches of kernels with device-side tensor descriptors get their scratch from torch's
    caching allocator, unless the caller set an allocator of their own (``triton.set_allocator``), which is kept.
    Scoped (a context variable, reset on exit): nothing global changes. A no-op when not ``needed``."""
    from triton.runtime import _allocation  # Triton 3.9: set_allocator has no public getter

    if not needed or not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(_torch_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)
