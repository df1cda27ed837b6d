"""Algorithmic counts of the Triton kernels, measured in Triton's CPU interpreter: no GPU needed.

``python -m kernels.counts [--quick]`` prints markdown tables and writes ``bench/results/counts/<date>.{md,json}``:

1. **K traffic of the entmax forward**: the elements that every forward kernel of one no-grad, causal
   ``entmax15_attention(q, k, v)`` call (B = H = 1) loads from K, divided by what one flash-attention pass with 64-row
   query tiles loads (each query tile reads each visible key once: FA2 = 1.0), for ours and for AdaSplash-2 at its
   default settings where the ``adasplash`` package is installed.
2. **Threshold solver passes over K per query tile** (mean and max over tiles) at long T, from
   ``kernels.entmax_attention.tau_solver_passes``, the PyTorch mirror of the solver's pass count that
   ``tests/test_counts.py`` proves equal to the kernel's own count.
3. **Dot FLOPs per visible score** of every op's forward and backward kernels against the minimum.

:class:`InterpreterCounter` is the instrument: it intercepts the interpreter's loads and ``tl.dot``s, so it observes
whatever the kernels do without knowing how they do it. The counts are exact properties of the kernels' memory
accesses and dots (what a GPU would load from global memory before any caching, and multiply); they say nothing of
time. The interpreter is slow, so the runs here are at B = H = 1 and moderate T.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .backend import triton_interpreter_enabled

#: Query rows per tile of the flash-attention pass that K traffic is measured against.
FA_BLOCK_M = 64
#: (q multiplier, seed) of the inputs: q, k, v ~ N(0, 1), q multiplied to make the attention sparser.
DISTRIBUTIONS = ((1.0, 0), (4.0, 1), (16.0, 2))
RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results" / "counts"

Program = Tuple[int, int, int]


@dataclass
class Launch:
    """What one kernel launch loaded and multiplied. ``loads[program][name]`` counts the elements loaded from the
    watched tensor ``name`` by the program with that grid index; ``distinct[program][name]`` the distinct ones
    (only when the counter tracks them); ``dot_flops`` sums ``2 * M * N * K`` over every ``tl.dot``."""

    kernel: str
    grid: Program = (1, 1, 1)
    loads: Dict[Program, Dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    distinct: Dict[Program, Dict[str, np.ndarray]] = field(default_factory=lambda: defaultdict(dict))
    dot_flops: int = 0

    def loaded(self, name: str) -> int:
        """Elements loaded from ``name`` by all programs of the launch."""
        return sum(per_tensor.get(name, 0) for per_tensor in self.loads.values())

    def distinct_loaded(self, program: Program, name: str) -> int:
        """Distinct elements of ``name`` that ``program`` loaded (needs ``track_distinct``)."""
        seen = self.distinct.get(program, {}).get(name)
        return 0 if seen is None else int(np.count_nonzero(seen))


class InterpreterCounter:
    """Context manager counting, per kernel launch, the elements loaded from watched tensors and the ``tl.dot`` FLOPs,
    while kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` before the kernels are imported).

    ``tensors`` maps names to CPU tensors; a load element counts for a tensor when its mask is true and its address
    falls in the bytes the tensor spans, ``[t.data_ptr(), t.data_ptr() + (1 + sum((size - 1) * stride)) *
    itemsize)`` (the whole storage for a tensor that owns it). Masked and unmasked loads (``create_masked_load``,
    ``create_load`` and tensor-descriptor loads, which the interpreter all routes through ``create_masked_load``)
    count, as do the dots of ``create_dot`` (``2 * M * N * K`` each, batch dims multiplied in), whatever their input
    precision: they are the products of the algorithm, not tensor-core instructions. With ``track_distinct`` it
    also records which elements each program touched (memory: one bool per element and program).

    Hooks: the interpreter's module-level ``interpreter_builder`` (its ``create_masked_load`` and ``create_dot``
    are replaced on the instance) and ``GridExecutor.__call__`` (to know the launch); all restored on exit.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, track_distinct: bool = False):
        if not triton_interpreter_enabled():
            raise RuntimeError("InterpreterCounter needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                               "importing the kernels")
        self._spans = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                raise TypeError(f"tensors[{name!r}] must be a CPU torch.Tensor, got {tensor!r:.60}")
            extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) if tensor.numel() else 0
            start = tensor.data_ptr()
            self._spans[name] = (start, start + extent * tensor.element_size(), tensor.element_size())
        self.track_distinct = track_distinct
        self.launches: List[Launch] = []
        self._current: Optional[Launch] = None
        self._restore: List[Callable[[], None]] = []

    # -- results -------------------------------------------------------------------------------------------------

    def of(self, kernel: str) -> List[Launch]:
        """The launches of the kernel named ``kernel``."""
        return [launch for launch in self.launches if launch.kernel == kernel]

    def loaded(self, name: str, kernel: Optional[str] = None) -> int:
        """Elements loaded from tensor ``name`` by every launch (of ``kernel`` if given)."""
        return sum(launch.loaded(name) for launch in self.launches if kernel in (None, launch.kernel))

    def dot_flops(self, kernel: Optional[str] = None) -> int:
        """``tl.dot`` FLOPs of every launch (of ``kernel`` if given)."""
        return sum(launch.dot_flops for launch in self.launches if kernel in (None, launch.kernel))

    # -- hooks ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> "InterpreterCounter":
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        original_load, original_dot = builder.create_masked_load, builder.create_dot
        original_call = interpreter.GridExecutor.__call__
        counter = self

        def create_masked_load(ptrs, mask, other, cache_policy, is_volatile):
            counter._count_load(ptrs.data, mask.data)
            return original_load(ptrs, mask, other, cache_policy, is_volatile)

        def create_dot(a, b, d, input_precision, max_num_imprecise_acc):
            *batch, m, k = a.data.shape
            n = b.data.shape[-1]
            if counter._current is not None:
                counter._current.dot_flops += 2 * m * n * k * math.prod(batch)
            return original_dot(a, b, d, input_precision, max_num_imprecise_acc)

        def call(executor, *args, **kwargs):
            counter._current = Launch(kernel=executor.fn.__name__)
            counter.launches.append(counter._current)
            try:
                return original_call(executor, *args, **kwargs)
            finally:
                counter._current.grid = tuple(builder.grid_dim)
                counter._current = None

        builder.create_masked_load, builder.create_dot = create_masked_load, create_dot
        interpreter.GridExecutor.__call__ = call
        self._restore = [lambda: delattr(builder, "create_masked_load"), lambda: delattr(builder, "create_dot"),
                         lambda: setattr(interpreter.GridExecutor, "__call__", original_call)]
        return self

    def __exit__(self, *exc_info) -> None:
        for restore in self._restore:
            restore()
        self._restore = []

    def _count_load(self, pointers: np.ndarray, mask: np.ndarray) -> None:
        launch = self._current
        if launch is None:
            return
        from triton.runtime import interpreter

        program = tuple(interpreter.interpreter_builder.grid_idx)
        pointers = np.asarray(pointers, dtype=np.uint64)
        active = np.broadcast_to(np.asarray(mask, dtype=bool), pointers.shape)
        for name, (start, end, itemsize) in self._spans.items():
            hits = active & (pointers >= start) & (pointers < end)
            count = int(np.count_nonzero(hits))
            if not count:
                continue
            launch.loads[program][name] += count
            if self.track_distinct:
                seen = launch.distinct[program].get(name)
                if seen is None:
                    seen = launch.distinct[program][name] = np.zeros((end - start) // itemsize, dtype=bool)
                seen[((pointers[hits] - np.uint64(start)) // np.uint64(itemsize)).astype(np.int64)] = True


# ----------------------------------------------------------------------------------------------------------------
# Reference quantities
# ----------------------------------------------------------------------------------------------------------------


def flash_attention_k_elements(t: int, d: int, *, block_m: int = FA_BLOCK_M, causal: bool = True) -> int:
    """Elements of K that one flash-attention pass loads for one head: each ``block_m``-row query tile reads each
    key it can see once, ``sum_i min((i + 1) * block_m, T) * D`` when causal (``cdiv(T, block_m) * T * D`` else)."""
    tiles = triton.cdiv(t, block_m)
    if not causal:
        return tiles * t * d
    return sum(min((i + 1) * block_m, t) for i in range(tiles)) * d


def visible_scores(t: int, *, group_size: Optional[int] = None) -> int:
    """Query-key pairs one head can see: causal ``T (T + 1) / 2``; block-causal (``j // g <= i // g``) with
    ``group_size`` g."""
    if group_size is None:
        return t * (t + 1) // 2
    return sum(min((i // group_size + 1) * group_size, t) for i in range(t))


def minimum_flops_per_score(d: int, dv: int) -> Tuple[int, int]:
    """(forward, backward) dot FLOPs per visible score of exact attention: forward ``QK^T`` and ``PV``, 2 (D + Dv);
    backward FA2's five matmuls (recompute ``QK^T``, ``dP = dO V^T``, ``dV = P^T dO``, ``dQ = dS K``, ``dK = dS^T Q``),
    2 (3 D + 2 Dv)."""
    return 2 * (d + dv), 2 * (3 * d + 2 * dv)


def sample_qkv(t: int, d: int, dv: int, q_scale: float, seed: int, dtype=torch.float32):
    """q, k, v (1, 1, T, D/Dv) ~ N(0, 1) from ``torch.Generator().manual_seed(seed)`` (q, k, v drawn in that order),
    q multiplied by ``q_scale``."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, t, d, generator=generator) * q_scale
    k = torch.randn(1, 1, t, d, generator=generator)
    v = torch.randn(1, 1, t, dv, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# K traffic of the entmax forward
# ----------------------------------------------------------------------------------------------------------------


def count_forward_k_traffic(attention: Callable, q, k, v) -> dict:
    """Run ``attention(q, k, v)`` (no grad) under the counter: K elements every kernel loaded, and their ratio to
    one flash-attention pass (:func:`flash_attention_k_elements`, causal)."""
    with torch.no_grad(), InterpreterCounter({"k": k}) as counter:
        attention(q, k, v)
    per_kernel = defaultdict(int)
    for launch in counter.launches:
        per_kernel[launch.kernel] += launch.loaded("k")
    _, _, t, d = k.shape
    fa = flash_attention_k_elements(t, d) * k.shape[0] * k.shape[1]
    total = counter.loaded("k")
    return {"k_elements": total, "fa_k_elements": fa, "ratio": total / fa, "per_kernel": dict(per_kernel)}


def _ours(q, k, v):
    from .backend import use_backend
    from .entmax_attention import entmax15_attention

    with use_backend("triton"):
        return entmax15_attention(q, k, v, causal=True)


#: Tiles of AdaSplash-2's first (row-max) kernel, which only its GPU autotuner chooses (the other kernels use 64 x 64).
ADASPLASH_MAX_PASS_TILES = (64, 64)


@triton.jit
def _nth_set_bit(bmask, n_blk):
    """Plain-Triton twin of AdaSplash-2's ``get_next_block``: bit position of the (n_blk + 1)-th set bit."""
    position = bmask * 0 - 1
    seen = bmask * 0
    for bit in range(32):
        is_set = (bmask >> bit) & 1
        seen += is_set
        position = tl.where((is_set == 1) & (seen == n_blk + 1), bit, position)
    return position


@triton.jit
def _popcount(bmask):
    """Plain-Triton twin of libdevice ``popc`` on int32."""
    count = bmask * 0
    for bit in range(32):
        count += (bmask >> bit) & 1
    return count


@triton.jit
def _floor_to_int32(x):
    """Plain-Triton twin of libdevice ``float2int_rd``."""
    return tl.floor(x).to(tl.int32)


@contextlib.contextmanager
def _adasplash_under_interpreter():
    """Shims that let AdaSplash-2 0.2.2 run in Triton's interpreter without changing what it loads or multiplies:

    - ``_get_tau`` (the row-max pass) takes BLOCK_M/BLOCK_N from ``triton.autotune``, which adasplash disables under
      the interpreter, so the launch misses them (``TypeError: _get_tau() missing 2 required positional arguments:
      'BLOCK_M' and 'BLOCK_N'``): they are passed as :data:`ADASPLASH_MAX_PASS_TILES`;
    - three device functions the interpreter cannot run are replaced by the same functions in plain Triton:
      ``get_next_block`` (PTX inline assembly ``fns.b32``, the position of the (n+1)-th set bit of the output
      kernel's 32-bit block mask; the interpreter raises ``inline_asm not supported in interpreter mode``), and the
      libdevice externs ``float2int_rd`` (histogram bins) and ``popc`` (blocks in the mask), which it does not
      implement (the launch fails with ``'NoneType' object has no attribute 'dtype'``).
    """
    import importlib

    module = importlib.import_module("adasplash.adasplash_v2")

    class WithTiles:
        def __init__(self, kernel, block_m, block_n):
            self.kernel, self.tiles = kernel, {"BLOCK_M": block_m, "BLOCK_N": block_n}

        def __getitem__(self, grid):
            launch = self.kernel[grid]
            return lambda *args, **kwargs: launch(*args, **kwargs, **self.tiles)

    replacements = {"_get_tau": WithTiles(module._get_tau, *ADASPLASH_MAX_PASS_TILES), "get_next_block": _nth_set_bit,
                    "popc": _popcount, "float2int_rd": _floor_to_int32}
    saved = {name: getattr(module, name) for name in replacements}
    for name, replacement in replacements.items():
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(module, name, original)


def adasplash_status() -> Tuple[Optional[Callable], str]:
    """(AdaSplash-2's causal entmax-1.5 call at its defaults, or None, and a line saying which or why not)."""
    try:
        import adasplash
    except ImportError as error:
        return None, f"adasplash not installed ({error})"

    def run(q, k, v):
        with _adasplash_under_interpreter():
            # the package's dispatcher: alpha=1.5, is_causal=True go to AdaSplash-2 with its default niter=1
            return adasplash.adasplash(q, k, v)

    version = getattr(adasplash, "__version__", "?")
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("adasplash")
    except Exception:  # noqa: BLE001 - the version is informative only
        pass
    return run, (f"adasplash {version}: `adasplash.adasplash(q, k, v)` (alpha=1.5, is_causal=True -> AdaSplash-2, "
                 f"niter=1), row-max pass at {ADASPLASH_MAX_PASS_TILES[0]}x{ADASPLASH_MAX_PASS_TILES[1]} tiles")
