"""Per-architecture launch configurations, autotuned on the GPU (docs/design.md section 6).

Each kernel that streams tiles has a short list of candidate configurations (``triton.Config``: tile constexprs,
``num_warps``, ``num_stages``) per architecture: ``sm_80`` (compute capability 8.x), ``sm_90`` (9.x) and
``fallback`` (any other GPU: 7.x, 10.x, 12.x, ...: the sm_80 list, checked to fit, see :func:`fitting_config`). The
first candidate of a list is its default. The sm_80 defaults
fit ``SMALLEST_SHARED_MEMORY`` (``tests/test_aot_compile.py``), the 99 KB per block of 8.6 and 8.9; other sm_80
candidates may need up to A100's 163 KB: on 8.6 / 8.9 Triton's autotuner times one that does not fit
(``OutOfResources`` at its first launch, before anything runs) as infinitely slow, so it is never chosen.
:func:`launch` runs a kernel with one of them:

- on a GPU, ``triton.autotune`` times every candidate of the device's list at the first launch of each key (the
  tensors' dtypes plus a shape bucket chosen by the launcher, e.g. the sequence length rounded up to a power of
  two) and keeps the fastest; later launches of that key only look it up (no host sync). No block-causal or MoE
  kernel accumulates into its outputs or writes its inputs, so their repeated timing launches need no
  ``reset_to_zero`` / ``restore_value``; a kernel that does passes them to :func:`launch`;
- on a ``fallback`` GPU it launches the first candidate (then the same ones in one pipeline stage) whose shared
  memory fits the device's per-block maximum, chosen once per key by compiling them (:func:`fitting_config`);
- under ``TRITON_INTERPRET=1`` and with ``KERNELS_AUTOTUNE=0`` it launches the default, deterministically;
- under ``kernels.tools.report``'s capture (CPU tensors, a stand-in driver naming the target) it goes through the
  autotuner, which the report replaces by a capture of every candidate of the target's list.

Every candidate of the sm_80 and sm_90 lists is compiled ahead of time by ``kernels.aot`` (``aot_configurations()``
of each op) and measured by ``kernels.tools.report``; tuning on first use can therefore not hit a compile error. The
first launch of a key costs ~0.1 s per candidate (``triton.testing.do_bench``); set ``KERNELS_AUTOTUNE=0``, or
launch once before, when that cannot happen (CUDA-graph capture). :func:`recording_choices` lists what was chosen.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import triton

from . import backend
from ._triton_helpers import _KERNELS_INTERPRETED

#: the architectures with their own candidate lists, compiled ahead of time; other GPUs take ``FALLBACK``
ARCHS = ("sm_80", "sm_90")
FALLBACK = "fallback"
ARCH_CAPABILITY = {"sm_80": 80, "sm_90": 90}
_ARCH_OF_MAJOR = {8: "sm_80", 9: "sm_90"}  # compute capability's major -> candidate list
#: bytes of shared memory per block on compute capability 8.6 and 8.9 (RTX 30xx / 40xx, A6000, L40; A100 has 163 KB):
#: an sm_80 default must fit, being what launches there without tuning (``KERNELS_AUTOTUNE=0``, IEEE fp32, lists of
#: one candidate)
SMALLEST_SHARED_MEMORY = 99 * 1024
#: bytes of shared memory one block may request (the opt-in maximum) per compute capability: what a candidate must
#: fit. A GPU reports its own (``shared_memory_per_block_optin``), which :func:`launch` uses; this table names the
#: architectures and lets the fit check be tested without them
SHARED_MEMORY_PER_BLOCK = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024,
                           89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}

_tuners: Dict[tuple, Any] = {}  # (kernel, candidates, bucket, reset_to_zero, restore_value) -> triton Autotuner
_fitting: Dict[tuple, triton.Config] = {}  # (kernel, candidates, bucket, device index) -> fallback GPUs' choice
_recording: Optional[List[Dict[str, Any]]] = None  # see ``recording_choices``


def autotune_enabled() -> bool:
    """``KERNELS_AUTOTUNE`` (read at every launch): ``1`` (default) autotunes on GPUs, ``0`` launches the default
    candidate everywhere."""
    value = os.environ.get("KERNELS_AUTOTUNE", "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"KERNELS_AUTOTUNE must be 0 or 1, got {value!r}")
    return value == "1"


def launch_arch(device: torch.device) -> str:
    """Which candidate list a launch on ``device`` uses: ``sm_90`` for compute capability 9.x, ``sm_80`` for 8.x,
    ``fallback`` for other GPUs; for CPU tensors the target of ``kernels.tools.report``'s capture, else ``sm_80`` (the
    interpreter)."""
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    if backend._capturing_launches:
        from triton.runtime.driver import driver

        major = driver.active.get_current_target().arch // 10
        return _ARCH_OF_MAJOR.get(major, FALLBACK)
    return "sm_80"


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    """``launch_arch`` of CUDA device ``index``, read once (every launch asks)."""
    return _ARCH_OF_MAJOR.get(torch.cuda.get_device_capability(index)[0], FALLBACK)


def pick(candidates: Dict[str, Sequence[triton.Config]], arch: str) -> List[triton.Config]:
    """The candidate list of ``arch``; ``fallback`` (not listed) takes the sm_80 list, which :func:`launch` checks
    against the device's shared memory (:func:`fitting_config`)."""
    if arch == FALLBACK and FALLBACK not in candidates:
        return list(candidates["sm_80"])
    return list(candidates[arch])


def fallback_order(candidates: Sequence[triton.Config]) -> List[triton.Config]:
    """What a ``fallback`` GPU tries, in order: the candidates, then those of them with several pipeline stages in one
    stage (no prefetch buffers: the least shared memory a tile shape needs)."""
    single_stage = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=1, maxnreg=c.maxnreg)
                    for c in candidates if c.num_stages > 1]
    return list(candidates) + single_stage


def fitting_config(candidates: Sequence[triton.Config], shared_bytes: Callable[[triton.Config], int],
                   limit: int) -> triton.Config:
    """The first config of ``fallback_order(candidates)`` whose shared memory (``shared_bytes(config)``: bytes, e.g.
    Triton's ``metadata.shared`` of the kernel compiled for the device) is at most ``limit`` bytes (the device's
    per-block maximum, ``SHARED_MEMORY_PER_BLOCK``). Raises ValueError when none fits."""
    tried = []
    for config in fallback_order(candidates):
        size = shared_bytes(config)
        if size <= limit:
            return config
        tried.append(f"{config_label(config)}: {size} B")
    raise ValueError(f"no launch configuration fits this GPU's {limit} B of shared memory per block ({'; '.join(tried)}"
                     "); use the reference backend (KERNELS_BACKEND=reference)")


def shape_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: sizes in one bucket share a tuning result."""
    return triton.next_power_of_2(max(int(n), 1))


def launch(kernel, grid: Callable[[Dict[str, Any]], tuple], args: Sequence[Any], kwargs: Dict[str, Any],
           candidates: Sequence[triton.Config], *, device: torch.device, bucket: tuple = (),
           reset_to_zero: Sequence[str] = (), restore_value: Sequence[str] = ()) -> None:
    """``kernel[grid](*args, **kwargs)`` with one of ``candidates`` (the first is the default; see the module
    docstring for which). ``grid`` maps the launch's arguments (the candidate's constexprs included) to the grid;
    ``bucket`` (hashable) keys the tuning result besides the tensors' dtypes. ``reset_to_zero`` / ``restore_value``:
    names of tensor arguments that the timing launches must zero before each run (outputs accumulated with
    atomics) or restore after it (tensors written in place), as in ``triton.autotune``."""
    on_gpu = device.type == "cuda" and not _KERNELS_INTERPRETED
    if on_gpu and launch_arch(device) == FALLBACK:
        key = (kernel, tuple(candidates), bucket, device.index)
        if key not in _fitting:
            def shared_bytes(config):
                return kernel.warmup(*args, grid=grid, **kwargs, **config.all_kwargs()).metadata.shared

            limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
            _fitting[key] = fitting_config(candidates, shared_bytes, limit)
        kernel[grid](*args, **kwargs, **_fitting[key].all_kwargs())
        return
    tune = backend._capturing_launches or (on_gpu and len(candidates) > 1 and autotune_enabled())
    if not tune:
        kernel[grid](*args, **kwargs, **candidates[0].all_kwargs())
        return
    key = (kernel, tuple(candidates), bucket, tuple(reset_to_zero), tuple(restore_value))
    tuner = _tuners.get(key)
    if tuner is None:
        tuner = _tuners[key] = triton.autotune(configs=list(candidates), key=[], reset_to_zero=list(reset_to_zero),
                                               restore_value=list(restore_value))(kernel)
    tuner[grid](*args, **kwargs)
    if _recording is not None and not backend._capturing_launches:
        _recording.append(_choice(kernel, candidates, bucket, tuner.best_config))


def aot_candidates(candidates_of: Callable[[str], Sequence[triton.Config]]) -> List[tuple]:
    """``(config, compute capabilities, default?)`` for every candidate of the ``ARCHS`` lists
    (``candidates_of(arch)``), once per role: a config that is the default of one architecture and an alternative
    of another is listed twice, so that the default candidates alone can be compiled (``kernels.aot``)."""
    roles: Dict[tuple, tuple] = {}
    for arch in ARCHS:
        for rank, config in enumerate(candidates_of(arch)):
            roles[(config, rank == 0)] = roles.get((config, rank == 0), ()) + (ARCH_CAPABILITY[arch],)
    return [(config, capabilities, default) for (config, default), capabilities in roles.items()]


def config_label(config: triton.Config) -> str:
    """``BM=64 BN=64 num_warps=4 num_stages=2``: a candidate in one line."""
    return " ".join(f"{k}={v}" for k, v in {**config.kwargs, "num_warps": config.num_warps,
                                             "num_stages": config.num_stages}.items())


def _choice(kernel, candidates, bucket, config) -> Dict[str, Any]:
    return {"kernel": kernel.fn.__name__, "bucket": list(bucket), "config": config_label(config),
            "rank": candidates.index(config) + 1, "candidates": len(candidates)}


@contextlib.contextmanager
def recording_choices() -> Iterator[List[Dict[str, Any]]]:
    """Within the block, every autotuned launch appends what it ran to the yielded list: kernel, shape bucket,
    the candidate (``config_label``), its rank in the list (1 = the default) and the list's length. Launches of
    the default without tuning (interpreter, ``KERNELS_AUTOTUNE=0``, one candidate) add nothing."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous
