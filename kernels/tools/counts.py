"""Algorithmic counts of the Triton kernels, measured in Triton's CPU interpreter: no GPU needed.

``python -m kernels.tools.counts [--quick]`` prints markdown tables and writes ``bench/results/counts/<date>.{md,json}``
(``--alphas 1.25 2 [--traffic-lengths T ...]``: only the forward K traffic of ``entmax_attention`` at those alphas,
the kernels' GENERAL variants, printed; ``--decode``: only the KV-cache decoding traffic, printed):

1. **K traffic of the entmax forward**: the elements that every forward kernel of one no-grad, causal
   ``entmax15_attention(q, k, v)`` call (B = H = 1) loads from K, divided by what one flash-attention pass with 64-row
   query tiles loads (each query tile reads each visible key once: FA2 = 1.0), for ours and for AdaSplash-2 at its
   default settings where the ``adasplash`` package is installed.
2. **Threshold solver passes over K per program** (mean and max over the threshold kernel's programs of
   ``Tiles.tau_block_m`` query rows) at long T, from
   ``kernels.entmax.tau_solver_passes``, the PyTorch mirror of the solver's pass count that
   ``tests/test_counts.py`` proves equal to the kernel's own count.
3. **Key tiles the entmax output kernel visits**: the share of visible (query tile, key tile) pairs that the
   threshold pass's support mask marks (``kernels.entmax.tau_support_tiles``, the mirror that
   ``tests/test_entmax.py`` proves equal to the kernel's mask), against the share with any p > 0.
4. **Dot FLOPs per visible score** of every op's forward and backward kernels against the minimum.

:class:`InterpreterCounter` is the instrument: it intercepts the interpreter's loads and ``tl.dot``s, so it observes
whatever the kernels do without knowing how they do it. The counts are exact properties of the kernels' memory
accesses and dots (what a GPU would load from global memory before any caching, and multiply); they say nothing of
time. The interpreter is slow, so the runs here are at B = H = 1 and moderate T.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from kernels.backend import triton_interpreter_enabled, use_backend
from kernels.block_causal import block_causal_attention
from kernels.entmax import (_tau_pass_tiles, _tiles, entmax15_attention, entmax_attention, tau_solver_passes,
                            tau_support_tiles)

#: Query rows per tile of the flash-attention pass that K traffic is measured against.
FA_BLOCK_M = 64
#: (q multiplier, seed) of the inputs: q, k, v ~ N(0, 1), q multiplied to make the attention sparser.
DISTRIBUTIONS = ((1.0, 0), (4.0, 1), (16.0, 2))
RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results" / "counts"

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
        self._restore: Optional[Callable[[], None]] = None

    # -- results -------------------------------------------------------------------------------------------------

    def of(self, kernel: str) -> List[Launch]:
        """The launches of the kernel named ``kernel``."""
        return [launch for launch in self.launches if launch.kernel == kernel]

    def loaded(self, name: str, kernel: Optional[str] = None) -> int:
        """Elements loaded from tensor ``name`` by every launch (of ``kernel`` if given)."""
        return sum(launch.loaded(name) for launch in self.launches if kernel in (None, launch.kernel))

    def loaded_per_kernel(self, name: str) -> Dict[str, int]:
        """Elements loaded from tensor ``name``, summed per kernel name."""
        totals: Dict[str, int] = defaultdict(int)
        for launch in self.launches:
            totals[launch.kernel] += launch.loaded(name)
        return dict(totals)

    def dot_flops(self, kernel: Optional[str] = None) -> int:
        """``tl.dot`` FLOPs of every launch (of ``kernel`` if given)."""
        return sum(launch.dot_flops for launch in self.launches if kernel in (None, launch.kernel))

    # -- hooks ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> "InterpreterCounter":
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

        # an enclosing counter's hooks are instance attributes too: put back exactly what was there
        hooked = {name: vars(builder).get(name) for name in ("create_masked_load", "create_dot")}
        builder.create_masked_load, builder.create_dot = create_masked_load, create_dot
        interpreter.GridExecutor.__call__ = call

        def restore():
            for name, previous in hooked.items():
                if previous is None:
                    delattr(builder, name)
                else:
                    setattr(builder, name, previous)
            interpreter.GridExecutor.__call__ = original_call

        self._restore = restore
        return self

    def __exit__(self, *exc_info) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def _count_load(self, pointers: np.ndarray, mask: np.ndarray) -> None:
        launch = self._current
        if launch is None:
            return
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


def count_forward_k_traffic(attention: Callable, q, k, v, *, block_m: int = FA_BLOCK_M) -> dict:
    """Run ``attention(q, k, v)`` (no grad) under the counter: K elements every kernel loaded, and their ratio to
    one flash-attention pass with ``block_m``-row query tiles (:func:`flash_attention_k_elements`, causal)."""
    with torch.no_grad(), InterpreterCounter({"k": k}) as counter:
        attention(q, k, v)
    _, _, t, d = k.shape
    fa = flash_attention_k_elements(t, d, block_m=block_m) * k.shape[0] * k.shape[1]
    total = counter.loaded("k")
    return {"k_elements": total, "fa_k_elements": fa, "ratio": total / fa,
            "per_kernel": counter.loaded_per_kernel("k")}


def _ours(q, k, v):
    with use_backend("triton"):
        return entmax15_attention(q, k, v, causal=True)


def ours_at(alpha: float) -> Callable:
    """Causal ``entmax_attention(q, k, v, alpha=alpha)`` on the Triton kernels (alpha other than 1.5: the kernels'
    GENERAL variants), as an ``attention(q, k, v)`` for :func:`count_forward_k_traffic`."""
    def run(q, k, v):
        with use_backend("triton"):
            return entmax_attention(q, k, v, alpha=alpha, causal=True)
    return run


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

    block_m, block_n = ADASPLASH_MAX_PASS_TILES
    return run, (f"adasplash {_versions()['adasplash']}: `adasplash.adasplash(q, k, v)` (alpha=1.5, "
                 f"is_causal=True -> AdaSplash-2, niter=1), row-max pass at {block_m}x{block_n} tiles")


# ----------------------------------------------------------------------------------------------------------------
# Threshold solver passes
# ----------------------------------------------------------------------------------------------------------------


def solver_tiles(t: int, dtype: torch.dtype = torch.float32):
    """(block_m, block_n) of the entmax threshold kernel's launch at length ``t`` for ``dtype`` inputs: the row tiles
    when rows fit in registers (``T <= row_block_n``), else the passes' query rows per program and the support
    mask's key tiles (the launcher's choice, ``kernels.entmax``)."""
    tiles = _tiles(dtype)
    if t <= tiles.row_block_n:
        return tiles.row_block_m, tiles.row_block_n
    return _tau_pass_tiles(tiles)["BM"], tiles.block_n


def counted_solver_passes(counter: InterpreterCounter, kernel: str, name: str = "k") -> Dict[Program, float]:
    """Passes over ``name`` per program of ``kernel``'s launches in ``counter`` (which must track distinct
    elements): elements loaded / distinct elements loaded, i.e. how many times the program read the keys it reads."""
    passes = {}
    for launch in counter.of(kernel):
        for program, per_tensor in launch.loads.items():
            if per_tensor.get(name):
                passes[program] = per_tensor[name] / launch.distinct_loaded(program, name)
    return passes


def solver_pass_stats(t: int, d: int, q_scale: float, seed: int) -> dict:
    """Mean and max over query tiles of ``tau_solver_passes`` (the mirror) on :func:`sample_qkv` inputs."""

    q, k, _ = sample_qkv(t, d, 1, q_scale, seed)
    block_m, block_n = solver_tiles(t)
    passes = tau_solver_passes(q, k, causal=True, block_m=block_m, block_n=block_n).flatten().double()
    return {"mean": passes.mean().item(), "max": int(passes.max().item()), "tiles": passes.numel(),
            "block_m": block_m, "block_n": block_n}


def support_tile_stats(t: int, d: int, q_scale: float, seed: int) -> dict:
    """Shares of the visible (query tile, key tile) pairs of the fp32 threshold tiles (T > ``row_block_n``) that the
    support mask marks (``visited``: the output kernel computes QK^T and PV there) and that hold some p > 0
    (``with_support``: the tightest sound mask), on :func:`sample_qkv` inputs, causal."""
    q, k, _ = sample_qkv(t, d, 1, q_scale, seed)
    tiles = _tiles(torch.float32)
    i_m = torch.arange(triton.cdiv(t, tiles.block_m))[:, None]
    i_n = torch.arange(triton.cdiv(t, tiles.block_n))[None, :]
    visible = int((i_n * tiles.block_n < torch.clamp((i_m + 1) * tiles.block_m, max=t)).sum())
    shares = {name: int(tau_support_tiles(q, k, block_m=tiles.block_m, block_n=tiles.block_n,
                                          pass_block_m=_tau_pass_tiles(tiles)["BM"], exact=exact).sum())
              / visible for name, exact in (("visited", False), ("with_support", True))}
    return {**shares, "visible_tiles": visible, "block_m": tiles.block_m, "block_n": tiles.block_n}


# ----------------------------------------------------------------------------------------------------------------
# FLOPs per visible score
# ----------------------------------------------------------------------------------------------------------------


def count_dot_flops(op: Callable, q, k, v, seed: int = 0) -> Dict[str, int]:
    """``tl.dot`` FLOPs of ``op(q, k, v)``: ``inference`` (forward under no_grad), ``inference_by_kernel`` (the same
    per kernel name), ``training_forward`` (forward with q, k, v requiring grad, which may store more for the
    backward) and ``backward`` (from a N(0, 1) output grad)."""
    with torch.no_grad(), InterpreterCounter({}) as counter:
        op(q, k, v)
    flops = {"inference": counter.dot_flops(),
             "inference_by_kernel": {name: counter.dot_flops(name)
                                     for name in dict.fromkeys(launch.kernel for launch in counter.launches)}}
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with InterpreterCounter({}) as counter:
        out = op(*leaves)
    flops["training_forward"] = counter.dot_flops()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    with InterpreterCounter({}) as counter:
        out.backward(grad)
    flops["backward"] = counter.dot_flops()
    return flops


def _block_causal(group_size: int):
    def run(q, k, v):
        with use_backend("triton"):
            return block_causal_attention(q, k, v, group_size=group_size)

    return run


#: (label, D, Dv) of the FLOP counts: two plain head sizes and CARN's causal-cue attention (hidden 256, one head,
#: ``forward_with_context`` appends x (E = 256) to the head's values: Dv = 256 + 256).
ENTMAX_HEAD_DIMS = (("D 64", 64, 64), ("D 128", 128, 128), ("CARN, context", 256, 512))
#: block-causal kernels take D, Dv <= 256
BLOCK_CAUSAL_HEAD_DIMS = (("D 64 (CaM-HG: 512 / 8 heads)", 64, 64), ("D 128", 128, 128), ("D 256", 256, 256))
BLOCK_CAUSAL_GROUP = 3


def flops_per_score_rows(t: int, head_dims_entmax, head_dims_block) -> List[dict]:
    """Dot FLOPs per visible score of both attention ops (fp32, B = H = 1, default tiles) against the minimum."""
    rows = []
    cases = [("entmax15_attention", _ours, None, dims) for dims in head_dims_entmax]
    cases += [(f"block_causal_attention (group {BLOCK_CAUSAL_GROUP})", _block_causal(BLOCK_CAUSAL_GROUP),
               BLOCK_CAUSAL_GROUP, dims) for dims in head_dims_block]
    for op_name, op, group, (label, d, dv) in cases:
        q, k, v = sample_qkv(t, d, dv, 1.0, 0)
        start = time.perf_counter()
        flops = count_dot_flops(op, q, k, v)
        scores = visible_scores(t, group_size=group)
        minimum_fwd, minimum_bwd = minimum_flops_per_score(d, dv)
        rows.append({
            "op": op_name, "case": label, "T": t, "D": d, "Dv": dv, "visible_scores": scores,
            "flops": flops,
            "inference_per_score": flops["inference"] / scores,
            "training_forward_per_score": flops["training_forward"] / scores,
            "backward_per_score": flops["backward"] / scores,
            "minimum_forward_per_score": minimum_fwd, "minimum_backward_per_score": minimum_bwd,
            "wall_s": round(time.perf_counter() - start, 1),
        })
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Sizes of one run: the full run (default) or ``--quick``."""

    traffic_lengths: Tuple[int, ...] = (1024, 2048)
    solver_lengths: Tuple[int, ...] = (4096, 16384)
    support_lengths: Tuple[int, ...] = (16384,)
    flops_length: int = 512
    head_dim: int = 64
    entmax_head_dims: tuple = ENTMAX_HEAD_DIMS
    block_causal_head_dims: tuple = BLOCK_CAUSAL_HEAD_DIMS


QUICK = Settings(traffic_lengths=(128, 256), solver_lengths=(512, 1024), support_lengths=(1024,), flops_length=64,
                 entmax_head_dims=ENTMAX_HEAD_DIMS[:1], block_causal_head_dims=BLOCK_CAUSAL_HEAD_DIMS[:1])


def k_traffic_rows(settings: Settings, log: Callable[[str], None]) -> Tuple[List[dict], str]:
    """K traffic of ours and AdaSplash-2 at every length and distribution; ours also cross-checks the solver mirror
    against the kernel's own per-tile pass count at these lengths."""
    adasplash_run, adasplash_note = adasplash_status()
    rows = []
    for t in settings.traffic_lengths:
        for q_scale, seed in DISTRIBUTIONS:
            q, k, v = sample_qkv(t, settings.head_dim, settings.head_dim, q_scale, seed)
            start = time.perf_counter()
            with torch.no_grad(), InterpreterCounter({"k": k}, track_distinct=True) as counter:
                _ours(q, k, v)
            ours_wall = time.perf_counter() - start
            fa = flash_attention_k_elements(t, settings.head_dim)
            counted = counted_solver_passes(counter, "_entmax_tau_kernel")
            # the threshold kernel's grid is (query tiles, B * H): order its programs like the mirror's (B, H, tiles)
            kernel_passes = [counted[program] for program in sorted(counted, key=lambda p: (p[1], p[0]))]
            block_m, block_n = solver_tiles(t)
            mirror = tau_solver_passes(q, k, causal=True, block_m=block_m, block_n=block_n).flatten().tolist()
            row = {
                "T": t, "D": settings.head_dim, "q_scale": q_scale, "seed": seed,
                "fa_k_elements": fa,
                "ours": {"k_elements": counter.loaded("k"), "ratio": counter.loaded("k") / fa,
                         "per_kernel": counter.loaded_per_kernel("k"),
                         "solver_passes_counted": kernel_passes, "solver_passes_mirror": mirror,
                         "mirror_equals_kernel": [float(p) for p in mirror] == kernel_passes,
                         "wall_s": round(ours_wall, 1)},
            }
            if adasplash_run is not None:
                peer_start = time.perf_counter()
                try:
                    peer = count_forward_k_traffic(adasplash_run, q, k, v)
                    peer["wall_s"] = round(time.perf_counter() - peer_start, 1)
                except Exception as error:  # noqa: BLE001 - reported in the table, not fatal to our counts
                    peer = {"error": f"{type(error).__name__}: {error}"}
                row["adasplash2"] = peer
            rows.append(row)
            log(f"K traffic T={t} q x{q_scale:g}: ours {row['ours']['ratio']:.2f}"
                + (f", AdaSplash-2 {row['adasplash2'].get('ratio', float('nan')):.2f}" if "adasplash2" in row else "")
                + f" ({time.perf_counter() - start:.0f} s)")
    return rows, adasplash_note


def _per_distribution_rows(lengths: Tuple[int, ...], head_dim: int, stats_of: Callable[..., dict],
                           describe: Callable[[dict], str], log: Callable[[str], None]) -> List[dict]:
    """One row of ``stats_of(T, D, q_scale, seed)`` per length and q distribution, each logged with ``describe``."""
    rows = []
    for t in lengths:
        for q_scale, seed in DISTRIBUTIONS:
            start = time.perf_counter()
            stats = stats_of(t, head_dim, q_scale, seed)
            rows.append({"T": t, "D": head_dim, "q_scale": q_scale, "seed": seed, **stats,
                         "wall_s": round(time.perf_counter() - start, 1)})
            log(f"T={t} q x{q_scale:g}: {describe(stats)}")
    return rows


def solver_rows(settings: Settings, log: Callable[[str], None]) -> List[dict]:
    return _per_distribution_rows(settings.solver_lengths, settings.head_dim, solver_pass_stats,
                                  lambda s: f"solver passes mean {s['mean']:.2f}, max {s['max']}", log)


def support_rows(settings: Settings, log: Callable[[str], None]) -> List[dict]:
    return _per_distribution_rows(settings.support_lengths, settings.head_dim, support_tile_stats,
                                  lambda s: f"key tiles visited {s['visited']:.3f}, with support "
                                            f"{s['with_support']:.3f}", log)


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The report's tables in markdown."""
    traffic, solver, flops = report["k_traffic"], report["solver_passes"], report["flops_per_score"]
    support = report["support_tiles"]
    out = [f"# Algorithmic counts, {report['date']}", "",
           f"`{report['command']}`; {report['versions_line']}. Inputs: q, k, v ~ N(0, 1) (float32, B = H = 1, "
           f"`torch.Generator().manual_seed(seed)`, drawn q, k, v in that order), q multiplied by 1, 4, 16 with seeds "
           f"0, 1, 2. Wall time {report['wall_s']:.0f} s.", "",
           "## K traffic of the causal forward (elements loaded from K / one flash-attention pass with 64-row query "
           "tiles)", "",
           f"Peer: {report['adasplash']}.", ""]
    header = ["T", "q scale", "ours", "AdaSplash-2", "ours: solver passes per program (mean / max)",
              "mirror = kernel"]
    rows = []
    for row in traffic:
        passes = row["ours"]["solver_passes_counted"]
        peer = row.get("adasplash2")
        peer_text = "not run" if peer is None else (f"{peer['ratio']:.2f}" if "ratio" in peer else peer["error"])
        rows.append([str(row["T"]), f"x{row['q_scale']:g}", f"{row['ours']['ratio']:.2f}", peer_text,
                     f"{sum(passes) / len(passes):.2f} / {max(passes):g}",
                     "yes" if row["ours"]["mirror_equals_kernel"] else "**no**"])
    out += [_table(header, rows), ""]
    out += ["## Threshold solver: passes over K per program (`tau_solver_passes`, D = 64, causal)", "",
            _table(["T", "q scale", "tiles", "mean", "max"],
                   [[str(r["T"]), f"x{r['q_scale']:g}", f"{r['tiles']} of {r['block_m']}x{r['block_n']}",
                     f"{r['mean']:.2f}", str(r["max"])] for r in solver]), ""]
    out += ["## Key tiles the output kernel visits (support mask, `tau_support_tiles`, fp32 tiles, D = 64, causal)", "",
            "Share of the visible (query tile, key tile) pairs: marked by the threshold pass's mask (QK^T and PV "
            "computed) and holding some p > 0 (the tightest sound mask).", "",
            _table(["T", "q scale", "tiles", "visited", "with support"],
                   [[str(r["T"]), f"x{r['q_scale']:g}", f"{r['block_m']}x{r['block_n']}",
                     f"{r['visited']:.1%}", f"{r['with_support']:.1%}"] for r in support]), ""]
    out += [f"## Dot FLOPs per visible score (fp32, default tiles, T = {flops[0]['T'] if flops else '-'}, q x1 seed 0)",
            "",
            "Minimum: forward 2 (D + Dv) (QK^T, PV); backward 2 (3 D + 2 Dv) (FA2's five matmuls: QK^T recomputed, "
            "dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q). Visible scores: causal T (T + 1) / 2, block-causal "
            "pairs with j // g <= i // g. Counted: every `tl.dot` of the op's kernels, 2 M N K on whole tiles.", "",
            _table(["op", "D, Dv", "inference fwd", "training fwd", "min fwd", "backward", "min bwd",
                    "fwd / min", "fwd / min per kernel", "bwd / min"],
                   [[r["op"], f"{r['D']}, {r['Dv']} ({r['case']})", f"{r['inference_per_score']:.0f}",
                     f"{r['training_forward_per_score']:.0f}", str(r["minimum_forward_per_score"]),
                     f"{r['backward_per_score']:.0f}", str(r["minimum_backward_per_score"]),
                     f"{r['inference_per_score'] / r['minimum_forward_per_score']:.2f}",
                     ", ".join(f"{name} {value / r['visible_scores'] / r['minimum_forward_per_score']:.2f}"
                               for name, value in r["flops"]["inference_by_kernel"].items()),
                     f"{r['backward_per_score'] / r['minimum_backward_per_score']:.2f}"] for r in flops]), ""]
    return "\n".join(out)


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Every count of the report (a dict ready for JSON)."""
    start = time.perf_counter()
    traffic, adasplash_note = k_traffic_rows(settings, log)
    solver = solver_rows(settings, log)
    support = support_rows(settings, log)
    flops = flops_per_score_rows(settings.flops_length, settings.entmax_head_dims, settings.block_causal_head_dims)
    for row in flops:
        log(f"FLOPs {row['op']} {row['case']}: fwd {row['inference_per_score']:.0f}, "
            f"bwd {row['backward_per_score']:.0f} per score ({row['wall_s']} s)")
    return {"k_traffic": traffic, "solver_passes": solver, "support_tiles": support, "flops_per_score": flops,
            "adasplash": adasplash_note,
            "settings": {key: value for key, value in vars(settings).items()},
            "distributions": [{"q_scale": s, "seed": seed} for s, seed in DISTRIBUTIONS],
            "wall_s": time.perf_counter() - start}


def _versions() -> Dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "numpy": np.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    try:
        versions["adasplash"] = importlib.metadata.version("adasplash")
    except importlib.metadata.PackageNotFoundError:
        versions["adasplash"] = "not installed"
    return versions


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m kernels.tools.counts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small lengths and head sizes (seconds, not minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for <date>.md/.json (default {RESULTS_DIR.relative_to(RESULTS_DIR.parents[2])};"
                             " --quick writes nothing unless given)")
    parser.add_argument("--traffic-lengths", type=int, nargs="+", default=None, metavar="T",
                        help="sequence lengths of the K-traffic table (default 1024 2048; each T = 2048 case takes "
                             "about 25 min of interpreter time)")
    parser.add_argument("--decode", type=int, nargs="*", default=None, metavar="T",
                        help=f"only the KV-cache decoding traffic at these cache lengths (default {DECODE_LENGTHS})")
    parser.add_argument("--alphas", type=float, nargs="+", default=None, metavar="ALPHA",
                        help="only the forward K traffic of entmax_attention at these alphas in (1, 2], at "
                             f"--traffic-lengths (default {ALPHA_LENGTHS})")
    args = parser.parse_args(argv)
    if args.alphas is not None:
        return {"alpha_k_traffic": alpha_main(tuple(args.traffic_lengths or ALPHA_LENGTHS), tuple(args.alphas))}
    if args.decode is not None:
        return {"decode": decode_main(tuple(args.decode) or DECODE_LENGTHS)}
    settings = QUICK if args.quick else Settings()
    if args.traffic_lengths:
        settings = dataclasses.replace(settings, traffic_lengths=tuple(args.traffic_lengths))
    report = run(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    versions = _versions()
    command = "python -m kernels.tools.counts" + (" --quick" if args.quick else "") + (
        " --traffic-lengths " + " ".join(map(str, args.traffic_lengths)) if args.traffic_lengths else "")
    report.update(date=today, versions=versions, command=command,
                  versions_line=", ".join(f"{key} {value}" for key, value in versions.items()))
    markdown = render_markdown(report)
    print(markdown)
    out = args.out if args.out is not None else (None if args.quick else RESULTS_DIR)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{today}.md").write_text(markdown + "\n", encoding="utf-8")
        (out / f"{today}.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out / today}.md and .json", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------------------------------------------
# KV-cache decoding: K and V traffic (python -m kernels.tools.counts --decode)
# ----------------------------------------------------------------------------------------------------------------

#: (B, H, Hkv, D) of the decoding counts: GQA groups of 4 query heads
DECODE_SHAPE = (1, 8, 2, 64)
DECODE_LENGTHS = (256, 1024)


def decode_inputs(t: int, q_scale: float, seed: int, shape=DECODE_SHAPE, dtype=torch.float32):
    """q (B, H, 1, D) multiplied by ``q_scale``, full caches (B, Hkv, T, D) and ``cache_seqlens`` = T - 1 with one new
    k, v (B, Hkv, 1, D) to append: T attended keys per batch row, all N(0, 1) from ``seed``."""
    b, h, h_kv, d = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=generator) * q_scale
    k_cache, v_cache = (torch.randn(b, h_kv, t, d, generator=generator) for _ in range(2))
    k, v = (torch.randn(b, h_kv, 1, d, generator=generator) for _ in range(2))
    return (x.to(dtype) for x in (q, k_cache, v_cache)), torch.full((b,), t - 1, dtype=torch.int32), \
        (k.to(dtype), v.to(dtype))


def decode_v_rows_formula(weights: torch.Tensor, kv_heads: int, block_n: int) -> int:
    """V rows that the entmax decoding output kernel must load: per batch row and key head, the keys of every
    ``block_n``-key tile where some query of the GQA group has a nonzero probability (``weights`` (B, H, Tq, T),
    the attended keys only)."""
    b, h, tq, t = weights.shape
    nonzero = (weights > 0).view(b, kv_heads, (h // kv_heads) * tq, t).any(2)  # (B, Hkv, T)
    tiles = torch.nn.functional.pad(nonzero, (0, (-t) % block_n)).view(b, kv_heads, -1, block_n).any(-1)
    keys_per_tile = torch.full((tiles.shape[-1],), block_n)
    keys_per_tile[-1] = t - block_n * (tiles.shape[-1] - 1)
    return int((tiles * keys_per_tile).sum())


def count_decode_traffic(t: int, q_scale: float, seed: int, alpha: float = 1.5, shape=DECODE_SHAPE) -> dict:
    """One decoding step (Tq = 1, T attended keys) of ``entmax_attention_with_kvcache`` and of
    ``block_causal_attention_with_kvcache`` under the counter: K and V elements loaded per kernel, against the
    formulas K = Hkv T D per batch row (read once) and, for entmax, V = Dv x the rows of tiles holding a nonzero
    probability (:func:`decode_v_rows_formula`); softmax reads all of V."""
    from kernels import kvcache

    (q, k_cache, v_cache), seqlens, (k, v) = decode_inputs(t, q_scale, seed, shape)
    b, h, h_kv, d = shape
    caches = k_cache.clone(), v_cache.clone()
    with use_backend("triton"), InterpreterCounter({"k": k_cache, "v": v_cache}) as counter:
        kvcache.entmax_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, alpha=alpha)
    with use_backend("triton"), InterpreterCounter({"k": caches[0], "v": caches[1]}) as softmax_counter:
        kvcache.block_causal_attention_with_kvcache(q, *caches, seqlens, k=k, v=v)
    # the weights of the attended keys, from the reference on the appended caches
    visible = kvcache._visible_keys(seqlens + 1, 1, t, causal=True)
    scores = kvcache._masked_scores(q.double(), k_cache.double(), visible, None, torch.float64)
    weights = kvcache._entmax_weights(scores, alpha)
    block_n = kvcache._decode_tiles(q.dtype).block_n
    v_rows = decode_v_rows_formula(weights, h_kv, block_n)
    return {"T": t, "q_scale": q_scale, "alpha": alpha, "B": b, "H": h, "Hkv": h_kv, "D": d, "block_n": block_n,
            "k_loaded": counter.loaded("k"), "k_formula": b * h_kv * t * d,
            "v_loaded": counter.loaded("v"), "v_formula": v_rows * d, "v_dense": b * h_kv * t * d,
            "k_per_kernel": counter.loaded_per_kernel("k"), "v_per_kernel": counter.loaded_per_kernel("v"),
            "softmax_k_loaded": softmax_counter.loaded("k"), "softmax_v_loaded": softmax_counter.loaded("v"),
            "nonzero_probabilities": int((weights > 0).sum()), "scores": b * h * t}


def decode_rows(lengths: Tuple[int, ...] = DECODE_LENGTHS, log: Callable[[str], None] = print) -> List[dict]:
    rows = []
    for t in lengths:
        for q_scale, seed in DISTRIBUTIONS:
            start = time.perf_counter()
            row = count_decode_traffic(t, q_scale, seed)
            row["wall_s"] = round(time.perf_counter() - start, 1)
            log(f"decode T={t} q x{q_scale:g}: K {row['k_loaded']} (formula {row['k_formula']}), V {row['v_loaded']} "
                f"(formula {row['v_formula']}, dense {row['v_dense']}) ({row['wall_s']} s)")
            rows.append(row)
    return rows


def render_decode_markdown(rows: List[dict]) -> str:
    b, h, h_kv, d = DECODE_SHAPE
    header = ["T", "q scale", "K loaded / (Hkv T D)", "V loaded", "V formula", "V loaded / dense",
              "p > 0 / scores", "softmax K, V / dense"]
    body = [[str(r["T"]), f"x{r['q_scale']:g}", f"{r['k_loaded'] / r['k_formula']:.3f}", str(r["v_loaded"]),
             str(r["v_formula"]), f"{r['v_loaded'] / r['v_dense']:.3f}",
             f"{r['nonzero_probabilities'] / r['scores']:.3f}",
             f"{r['softmax_k_loaded'] / r['v_dense']:.3f}, {r['softmax_v_loaded'] / r['v_dense']:.3f}"] for r in rows]
    return "\n".join([f"### KV-cache decoding traffic (Tq = 1, B = {b}, H = {h}, Hkv = {h_kv}, D = Dv = {d}, entmax-1.5, "
                      f"{rows[0]['block_n'] if rows else '?'}-key tiles, fp32)", "",
                      "K is read once (Hkv T D per batch row); V only in key tiles where some query of the GQA group "
                      "has p > 0 (V formula: Dv x the keys of those tiles).", "", _table(header, body)])


# ----------------------------------------------------------------------------------------------------------------
# K traffic of the forward at any alpha (python -m kernels.tools.counts --alphas 1.25 2)
# ----------------------------------------------------------------------------------------------------------------

#: sequence lengths of ``--alphas`` (the GENERAL solver's passes cost interpreter time: T = 1,024 takes tens of minutes)
ALPHA_LENGTHS = (256,)


def alpha_k_traffic_rows(lengths: Tuple[int, ...], alphas: Tuple[float, ...], head_dim: int = 64,
                         log: Callable[[str], None] = print) -> List[dict]:
    """Forward K traffic (:func:`count_forward_k_traffic`, single flash passes) of causal ``entmax_attention`` at each
    alpha, length and q distribution, with the threshold kernel's passes over K per program
    (:func:`counted_solver_passes`)."""
    rows = []
    for t in lengths:
        for alpha in alphas:
            for q_scale, seed in DISTRIBUTIONS:
                q, k, v = sample_qkv(t, head_dim, head_dim, q_scale, seed)
                start = time.perf_counter()
                with torch.no_grad(), InterpreterCounter({"k": k}, track_distinct=True) as counter:
                    ours_at(alpha)(q, k, v)
                fa = flash_attention_k_elements(t, head_dim)
                passes = list(counted_solver_passes(counter, "_entmax_tau_kernel").values())
                row = {"T": t, "D": head_dim, "alpha": alpha, "q_scale": q_scale, "seed": seed,
                       "k_elements": counter.loaded("k"), "fa_k_elements": fa, "ratio": counter.loaded("k") / fa,
                       "per_kernel": counter.loaded_per_kernel("k"),
                       "solver_passes_mean": sum(passes) / len(passes), "solver_passes_max": max(passes),
                       "wall_s": round(time.perf_counter() - start, 1)}
                rows.append(row)
                log(f"K traffic T={t} alpha={alpha:g} q x{q_scale:g}: {row['ratio']:.2f} flash passes, solver passes "
                    f"mean {row['solver_passes_mean']:.2f} max {row['solver_passes_max']:g} ({row['wall_s']} s)")
    return rows


def render_alpha_markdown(rows: List[dict]) -> str:
    header = ["T", "alpha", "q scale", "K loaded / flash pass", "solver passes per program (mean / max)"]
    body = [[str(r["T"]), f"{r['alpha']:g}", f"x{r['q_scale']:g}", f"{r['ratio']:.2f}",
             f"{r['solver_passes_mean']:.2f} / {r['solver_passes_max']:g}"] for r in rows]
    return "\n".join(["### K traffic of the causal forward at any alpha (fp32, B = H = 1, D = 64, default tiles)", "",
                      "Elements loaded from K by every forward kernel / one flash-attention pass with 64-row query "
                      "tiles; alpha other than 1.5 runs the kernels' GENERAL variants.", "", _table(header, body)])


def alpha_main(lengths: Tuple[int, ...], alphas: Tuple[float, ...]) -> List[dict]:
    """``--alphas``: print the any-alpha K traffic table (no file written)."""
    rows = alpha_k_traffic_rows(lengths, alphas, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(render_alpha_markdown(rows))
    return rows


def decode_main(lengths: Tuple[int, ...]) -> List[dict]:
    """``--decode``: print the decoding traffic table (no file written)."""
    rows = decode_rows(lengths, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(render_decode_markdown(rows))
    return rows


if __name__ == "__main__":
    if not triton_interpreter_enabled():
        # Triton decides at decoration time, i.e. when ``kernels`` was imported, whether kernels are interpreted
        os.execve(sys.executable, [sys.executable, "-m", "kernels.tools.counts", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    main()
