"""Static performance report: what a GPU launch of each op compiles, measured without a GPU.

    python -m kernels.tools.report                 # every op and peer at the benchmark shapes, sm_90 and sm_80 (minutes)
    python -m kernels.tools.report --quick         # the models' shapes only (fp32; CARN's entmax bf16 too)
    python -m kernels.tools.report --ops moe_top2 --targets 80 --no-peers --jobs 2

How: each public op runs forward and backward on CPU tensors while Triton's launch is intercepted
(``triton.knobs.runtime.jit_cache_hook``, called by ``JITFunction.run`` right before it would compile, returns True
so nothing compiles or runs). Triton's own launcher code therefore binds the arguments and derives the variant a
GPU would compile (constexprs, integers equal to 1, 16-divisible integers and pointers unless ``do_not_specialize``,
launch options for that target), under a stand-in driver that names the target. An autotuned kernel
(``triton.autotune``) reports every candidate config that its own pruning keeps, labelled. Outputs of the skipped kernels are zero-filled
allocations, so data-dependent host code (MoE expert ids) stays in range. Each distinct variant is then compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and ``("cuda", 80, 32)``, with the ptxas Triton picks for
that target (``ptxas-blackwell`` for sm_90), and read back:

- ``ptxas -v``: registers per thread, spill store/load bytes, stack frame;
- ``cuobjdump -res-usage``: static shared memory; Triton's ``metadata.shared`` is the dynamic shared memory its
  launcher requests;
- ``cuobjdump -sass``: tensor-core instructions (HMMA, HGMMA, IMMA) and async tile copies (LDGSTS = cp.async,
  UTMALDG / UBLKCP = TMA);
- theoretical occupancy (warps per SM) from registers, shared memory and warps per block, with the SM limits of
  ``SM_LIMITS`` and the rules of CUDA's occupancy calculator (``cuda_occupancy.h``).

Each of our variants is also looked up among the configurations that ``python -m kernels.aot`` compiles ahead of time
(same types, constexprs, 16-divisible arguments and launch options: ``kernels.aot.variant_key``).

Writes ``bench/results/static/<date>.{md,json}``. ``--check-budget`` fails (exit 1) when a kernel spills more than
``kernels/tools/spill_budget.json`` allows, a budgeted kernel is missing, or a launched variant of ours is not compiled
ahead of time; ``--write-budget`` writes that file from the
run. Both concern only what the run covers (the ``--ops``, the shapes, ``--targets``): other entries are neither
checked nor rewritten. Run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be captured or compiled).
Written against Triton 3.9.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import datetime
import json
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch

from kernels.aot import ASYNC_COPY_OPS, _cuobjdump, compiled_variants, parse_ptxas_log, parse_sass, variant_key

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "static"
BUDGET_PATH = Path(__file__).resolve().parent / "spill_budget.json"
OPS = ("entmax15_attention", "block_causal_attention", "moe_top2")
PEERS = ("adasplash2",)


class SMLimits(NamedTuple):
    """Per-SM limits of one GPU (CUDA C++ Programming Guide, compute capabilities table; cuda_occupancy.h)."""

    gpu: str
    max_warps: int = 64  # 2048 threads per SM on sm_80 and sm_90
    max_blocks: int = 32
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of 256
    max_registers_per_thread: int = 255
    sub_partitions: int = 4  # each holds registers / 4; a warp's registers live in one
    shared_memory: int = 0  # bytes per SM at the largest carveout
    shared_memory_per_block: int = 0  # opt-in maximum per block
    shared_unit: int = 128  # shared memory allocation granularity
    reserved_shared_per_block: int = 1024  # the driver reserves 1 KB per block (sm_80 and later)


SM_LIMITS = {
    90: SMLimits("H100", shared_memory=228 * 1024, shared_memory_per_block=227 * 1024),
    80: SMLimits("A100", shared_memory=164 * 1024, shared_memory_per_block=163 * 1024),
}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(registers: int, shared_bytes: int, num_warps: int, limits: SMLimits) -> tuple[int, str]:
    """Resident warps per SM for a kernel using ``registers`` per thread, ``shared_bytes`` of shared memory (static
    + dynamic) per block and ``num_warps`` warps per block, and the limiting factor(s)."""
    regs_per_warp = _round_up(max(registers, 1) * 32, limits.register_unit)
    # the launch check assumes a block's warps are rounded up to whole sub-partitions (65536 registers per block)
    if (registers > limits.max_registers_per_thread
            or regs_per_warp * _round_up(num_warps, limits.sub_partitions) > limits.registers):
        by_registers = 0
    else:
        warps_per_partition = (limits.registers // limits.sub_partitions) // regs_per_warp
        by_registers = warps_per_partition * limits.sub_partitions // num_warps
    shared = _round_up(shared_bytes + limits.reserved_shared_per_block, limits.shared_unit)
    too_big = shared > limits.shared_memory_per_block + limits.reserved_shared_per_block
    by_shared = 0 if too_big else limits.shared_memory // shared
    by_blocks = {"registers": by_registers, "shared memory": by_shared, "warps": limits.max_warps // num_warps,
                 "blocks": limits.max_blocks}
    blocks = min(by_blocks.values())
    return blocks * num_warps, "+".join(name for name, value in by_blocks.items() if value == blocks)


# ---------------------------------------------------------------------------------------------------------------
# Capture: what the public ops launch
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One intercepted launch, specialized by Triton's launcher for one target."""

    kernel: Any  # the JITFunction
    key: str  # Triton's own cache key of the variant (specialization + options)
    signature: Dict[str, str]
    constants: Dict[tuple, Any]
    attrs: Dict[tuple, Any]
    options: Dict[str, Any]
    config: str  # "" or the autotune candidate, e.g. "autotune 3/30 BLOCK_M=128 num_warps=4 num_stages=2"

    @property
    def kernel_name(self) -> str:
        return self.kernel.fn.__qualname__

    def specialized_args(self) -> tuple[list[str], list[str]]:
        """(arguments specialized as 16-divisible, integer arguments equal to 1 made constexpr)."""
        names = list(self.signature)
        divisible = [names[path[0]] for path, attr in self.attrs.items() if ["tt.divisibility", 16] in map(list, attr)]
        ones = [name for name, ty in self.signature.items() if ty == "constexpr" and not self.kernel.params[
            names.index(name)].is_constexpr and self.constants.get((names.index(name),)) == 1]
        return divisible, ones

    def constexprs(self) -> Dict[str, Any]:
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constants.items()
                if self.kernel.params[path[0]].is_constexpr}

    def variant_key(self) -> tuple:
        """``kernels.aot.variant_key`` of this launch: equal to an ahead-of-time configuration's if it compiles the
        same code."""
        names = list(self.signature)
        return variant_key(self.kernel, self.signature, {names[path[0]]: v for path, v in self.constants.items()},
                           self.specialized_args()[0], self.options)


_autotune_label: contextvars.ContextVar[str] = contextvars.ContextVar("autotune_label", default="")


def _capture_driver(capability: int):
    """A Triton driver that only names the target: enough for ``JITFunction.run`` to bind and specialize."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CaptureDriver(DriverBase):
        target = GPUTarget("cuda", capability, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("kernels.tools.report never runs a kernel")

        def get_current_device(self):
            return capability  # JITFunction caches its binder (and target) per device: one device per target

        def get_current_stream(self, device=None):
            return 0

    return CaptureDriver()


def _run_every_autotune_config(self, *args, **kwargs):
    """Replaces ``Autotuner.run`` during capture: launch (i.e. capture) every candidate config instead of timing."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    try:
        for i, config in enumerate(configs):
            settings = " ".join(f"{k}={v}" for k, v in config.all_kwargs().items())
            token = _autotune_label.set(f"autotune {i + 1}/{len(configs)} {settings}")
            try:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                _autotune_label.reset(token)
    finally:
        self.nargs = None


def _zero_filled(factory):
    def allocate(*args, **kwargs):
        return factory(*args, **kwargs).zero_()

    return allocate


@contextlib.contextmanager
def intercepting_launches(capability: int, hook: Callable, autotune_run: Callable = _run_every_autotune_config,
                          zero_filled: Callable = _zero_filled) -> Iterator[None]:
    """Within the block, every Triton launch, specialized for ``sm_<capability>``, goes to ``hook`` (Triton's
    ``jit_cache_hook``: returning True means nothing compiles or runs), ``Autotuner.run`` is ``autotune_run``,
    ``torch.empty`` and its kin allocate through ``zero_filled``, and the public ops take their Triton path on CPU
    tensors. The entmax op's shape-only tensors are forgotten on entry and exit (:func:`kernels.entmax
    .clear_shape_constants`)."""
    from triton import knobs
    from triton.runtime import autotuner
    from triton.runtime.driver import driver

    from kernels.backend import capturing_launches, triton_interpreter_enabled, use_backend
    from kernels.entmax import clear_shape_constants

    if triton_interpreter_enabled():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be captured or compiled")
    previous_driver = driver._active
    saved = (autotuner.Autotuner.run, torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
    driver.set_active(_capture_driver(capability))
    autotuner.Autotuner.run = autotune_run
    torch.empty, torch.empty_like, torch.empty_strided = map(zero_filled, saved[1:4])
    torch.Tensor.new_empty = zero_filled(saved[4])
    clear_shape_constants()  # shape-only tensors are built (and their kernels launched) inside the block
    try:
        with knobs.runtime.scope(), capturing_launches(), use_backend("triton"):
            knobs.runtime.jit_cache_hook = hook
            yield
    finally:
        driver._active = previous_driver
        autotuner.Autotuner.run = saved[0]
        torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty = saved[1:]
        clear_shape_constants()  # built by kernels that did not run: never used after the block


@contextlib.contextmanager
def capturing(capability: int) -> Iterator[List[Launch]]:
    """Within the block, Triton launches are recorded (specialized for ``sm_<capability>``) instead of run, and the
    public ops take their Triton path on CPU tensors; yields the list the launches are appended to."""
    launches: List[Launch] = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        data = json.loads(compile["specialization_data"])
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
        launches.append(Launch(fn.jit_function, str(key), dict(compile["signature"]), dict(compile["constants"]),
                               dict(compile["configs"][0]), options, _autotune_label.get()))
        return True  # "handled": JITFunction.run returns without compiling or launching

    with intercepting_launches(capability, hook):
        yield launches


# ---------------------------------------------------------------------------------------------------------------
# The shapes: each case runs one public op (or peer) forward and backward
# ---------------------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LONG_T, LONG_D = (4096, 16384), (64, 128)
LONG_B, LONG_H = 1, 2  # specialization depends on divisibility only: keep CPU memory small
ANY_ALPHA = 1.25  # any alpha other than 1.5 compiles the same GENERAL variants
GQA_H, GQA_HKV = 8, 2  # grouped-query attention: 4 query heads per key head


class Case(NamedTuple):
    op: str
    name: str  # shape and dtype, e.g. "T=4096 D=64 bf16"
    dtype: str
    run: Callable[[], None]
    quick: bool = False  # part of --quick (the models' own shapes, fp32; CARN's entmax in bf16 too)


def _backward(*outputs: torch.Tensor) -> None:
    """Backward from dense random cotangents, as a loss through later layers gives (``.sum()`` would give expanded
    gradients of stride 0, which specialize the backward's kernels differently)."""
    torch.autograd.backward(outputs, [torch.randn_like(o) for o in outputs])


def _qkv(b, h, t, d, dv, dtype):
    q, k = (torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, torch.randn(b, h, t, dv, dtype=dtype, requires_grad=True)


def _carn_entmax(dtype, alpha=1.5, learn_alpha=False):
    """CARN's causal-cue encoder: ``FusedEntmaxCausalAttention(256, 1, out_proj=False)`` with its context (v gets x
    appended: D = 256, Dv = 512), IEMOCAP batch (32 dialogues x 110 utterances), fp32 (carn/model.py); in bf16 for
    the 16-bit wide-Dv kernels. ``alpha`` other than 1.5: the kernels' GENERAL variants (``learn_alpha``: those
    that also compute alpha's gradient)."""
    from kernels import FusedEntmaxCausalAttention

    attention = FusedEntmaxCausalAttention(256, 1, out_proj=False, alpha=alpha, learn_alpha=learn_alpha).to(dtype)
    result = attention.forward_with_context(torch.randn(32, 110, 256, dtype=dtype))
    _backward(result.output, result.context)


def _camhg_layer(dtype):
    """CaM-HG's hypergraph layer ``BlockCausalTransformerLayer(512, 8, group_size=3)`` on 32 x 330 nodes."""
    from kernels import BlockCausalTransformerLayer

    layer = BlockCausalTransformerLayer(512, 8, group_size=3).to(dtype)
    _backward(layer(torch.randn(32, 330, 512, dtype=dtype, requires_grad=True)))


def _camhg_moe(dtype):
    """CaM-HG's imputation ``Top2MoE(512, 4 experts, hidden 512)`` on 3,520 rows (32 dialogues x 110 utterances)."""
    from kernels import Top2MoE

    moe = Top2MoE(512, num_experts=4, hidden=512).to(dtype)
    _backward(moe(torch.randn(3520, 512, dtype=dtype, requires_grad=True)))


def _long_entmax(t, d, dtype):
    from kernels import entmax15_attention

    _backward(entmax15_attention(*_qkv(LONG_B, LONG_H, t, d, d, dtype)))


def _long_entmax_any(t, d, dtype, alpha, heads, kv_heads, learn_alpha=False):
    """``entmax_attention`` at ``alpha`` (other than 1.5: GENERAL variants; ``learn_alpha``: one per head requiring
    grad, the variants that also compute alpha's gradient) with ``kv_heads`` key heads of ``heads`` query heads
    (fewer: grouped-query attention)."""
    from kernels import entmax_attention

    q = torch.randn(LONG_B, heads, t, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(LONG_B, kv_heads, t, d, dtype=dtype, requires_grad=True) for _ in range(2))
    if learn_alpha:
        alpha = torch.full((heads,), alpha, requires_grad=True)
    _backward(entmax_attention(q, k, v, alpha=alpha))


def _long_block_causal(t, d, dtype):
    from kernels import block_causal_attention

    _backward(block_causal_attention(*_qkv(LONG_B, LONG_H, t, d, d, dtype), group_size=3))


def _adasplash2(b, h, t, d, dv, dtype):
    from adasplash import adasplash_v2  # AdaSplash-2: causal entmax-1.5

    _backward(adasplash_v2(*_qkv(b, h, t, d, dv, dtype)))


def cases(quick: bool = False, all_peer_shapes: bool = True) -> List[Case]:
    """Every (op or peer, shape, dtype) of the report; ``quick`` keeps the models' own shapes; without
    ``all_peer_shapes`` the peers' long shapes are T=4096 bf16 only (AdaSplash-2 makes T a constexpr and autotunes
    over 30 + 5 x 6 configs: some 130 compiles per shape and target)."""
    # quick: CARN's entmax in both dtypes (16-bit inputs take tiles and launch options of their own), CaM-HG's in fp32
    out = [Case("entmax15_attention", f"CARN B=32 H=1 T=110 D=256 Dv=512 {n}", n,
                lambda dt=DTYPES[n]: _carn_entmax(dt), True) for n in ("fp32", "bf16")]
    out += [Case("block_causal_attention", f"CaM-HG layer(512, 8 heads, group 3) B=32 T=330 {n}", n,
                 lambda dt=DTYPES[n]: _camhg_layer(dt), n == "fp32") for n in ("fp32", "bf16")]
    out += [Case("moe_top2", f"CaM-HG Top2MoE N=3520 d=512 h=512 E=4 {n}", n,
                 lambda dt=DTYPES[n]: _camhg_moe(dt), n == "fp32") for n in ("fp32", "bf16")]
    for op, run in (("entmax15_attention", _long_entmax), ("block_causal_attention", _long_block_causal)):
        out += [Case(op, f"B={LONG_B} H={LONG_H} T={t} D={d} {n}", n,
                     lambda t=t, d=d, dt=DTYPES[n], run=run: run(t, d, dt))
                for t in LONG_T for d in LONG_D for n in DTYPES]
    # any alpha: a float alpha (no alpha gradient: the output kernel's STORE_S=False) and a learned one
    learned = ((False, ""), (True, " learned"))
    out += [Case("entmax15_attention", f"CARN B=32 H=1 T=110 D=256 Dv=512 alpha={ANY_ALPHA}{name} {n}", n,
                 lambda dt=DTYPES[n], learn=learn: _carn_entmax(dt, ANY_ALPHA, learn))
            for learn, name in learned for n in ("fp32", "bf16")]
    t, d = LONG_T[0], LONG_D[1]
    out += [Case("entmax15_attention", f"B={LONG_B} H={LONG_H} T={t} D={d} alpha={ANY_ALPHA}{name} {n}", n,
                 lambda dt=DTYPES[n], learn=learn: _long_entmax_any(t, d, dt, ANY_ALPHA, LONG_H, LONG_H, learn))
            for learn, name in learned for n in ("fp32", "bf16")]
    # D = Dv = 64 (fp32: other tiles without alpha's gradient than at 128)
    out += [Case("entmax15_attention", f"B={LONG_B} H={LONG_H} T={t} D={LONG_D[0]} alpha={ANY_ALPHA} fp32", "fp32",
                 lambda: _long_entmax_any(t, LONG_D[0], torch.float32, ANY_ALPHA, LONG_H, LONG_H))]
    out += [Case("entmax15_attention", f"GQA B={LONG_B} H={GQA_H} Hkv={GQA_HKV} T={t} D={d} bf16", "bf16",
                 lambda: _long_entmax_any(t, d, torch.bfloat16, 1.5, GQA_H, GQA_HKV))]
    out += [Case("adasplash2", "CARN B=32 H=1 T=110 D=256 Dv=512 fp32", "fp32",
                 lambda: _adasplash2(32, 1, 110, 256, 512, torch.float32))]
    out += [Case("adasplash2", f"B={LONG_B} H={LONG_H} T={t} D={d} {n}", n,
                 lambda t=t, d=d, dt=DTYPES[n]: _adasplash2(LONG_B, LONG_H, t, d, d, dt))
            for t in LONG_T for d in LONG_D for n in DTYPES if all_peer_shapes or (t, n) == (LONG_T[0], "bf16")]
    return [case for case in out if case.quick or not quick]


def adasplash_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adasplash")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Compile and read back
# ---------------------------------------------------------------------------------------------------------------

def analyze(launch: Launch, capability: int) -> Dict[str, Any]:
    """Compile ``launch``'s variant for ``sm_<capability>`` and measure it."""
    from triton.compiler import ASTSource

    from kernels.aot import compile_source

    if launch.options["arch"] != f"sm{capability}":
        raise ValueError(f"{launch.kernel_name} was specialized for {launch.options['arch']}, not sm{capability}")
    start = time.perf_counter()
    source = ASTSource(launch.kernel, launch.signature, launch.constants, launch.attrs)
    compiled, log = compile_source(source, capability, launch.options, ptxas_log=True)
    row: Dict[str, Any] = parse_ptxas_log(log)
    usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    static = re.search(r"SHARED:(\d+)", usage)
    row["shared_static_bytes"] = int(static.group(1)) if static else 0
    row["shared_dynamic_bytes"] = int(compiled.metadata.shared)
    row.update(parse_sass(_cuobjdump(compiled.asm["cubin"], "-sass")))
    warps = int(compiled.metadata.num_warps)
    row["occupancy_warps_per_sm"], row["occupancy_limited_by"] = occupancy(
        row["registers"], row["shared_static_bytes"] + row["shared_dynamic_bytes"], warps, SM_LIMITS[capability])
    row["compile_seconds"] = round(time.perf_counter() - start, 2)
    return row


_PENDING: List[tuple] = []  # (launch, capability) for the worker processes (inherited by fork)


def _analyze_pending(index: int) -> Dict[str, Any]:
    launch, capability = _PENDING[index]
    return analyze(launch, capability)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def capture_variants(selected: Sequence[Case], capabilities: Sequence[int]) -> tuple[list, list]:
    """Run every case under capture for every target; returns (variants, unsupported cases).

    A variant is a dict holding the launch and the cases (shapes) that launch it, deduplicated by Triton's own
    cache key per kernel and target."""
    variants: Dict[tuple, Dict[str, Any]] = {}
    unsupported = []
    for capability in capabilities:
        for case in selected:
            torch.manual_seed(0)
            try:
                with capturing(capability) as launches:
                    case.run()
            except (AssertionError, ValueError, ImportError) as error:  # a peer's shape limits, a missing peer
                if case.op not in PEERS:
                    raise
                if capability == capabilities[0]:
                    unsupported.append({"op": case.op, "case": case.name,
                                        "reason": f"{type(error).__name__}: {error}".strip()})
                continue
            for launch in launches:
                identity = (case.op, launch.kernel.fn.__module__, launch.kernel_name, launch.key, launch.config,
                            capability)
                variant = variants.setdefault(identity, {"launch": launch, "op": case.op, "capability": capability,
                                                         "cases": [], "dtypes": []})
                if case.name not in variant["cases"]:
                    variant["cases"].append(case.name)
                    variant["dtypes"].append(case.dtype)
    return list(variants.values()), unsupported


def compile_variants(variants: list, jobs: int) -> None:
    """Compile and measure every variant (adds ``row``/``error`` to each), with a progress bar."""
    from tqdm import tqdm

    variants.sort(key=lambda v: v["op"] in PEERS)  # ours first
    _PENDING[:] = [(v["launch"], v["capability"]) for v in variants]
    progress = tqdm(total=len(variants), desc="compiling", unit="variant", file=sys.stderr)

    def record(index, result=None, error=None):
        if error is not None:
            variants[index]["error"] = f"{type(error).__name__}: {error}"[:2000]
        else:
            variants[index]["row"] = result
        progress.update()

    if jobs <= 1:
        for index in range(len(variants)):
            try:
                record(index, _analyze_pending(index))
            except Exception as error:  # report every failing variant, not just the first
                record(index, error=error)
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_analyze_pending, index): index for index in range(len(variants))}
            for future in as_completed(futures):
                try:
                    record(futures[future], future.result())
                except Exception as error:
                    record(futures[future], error=error)
    progress.close()


def rows_of(variants: list) -> List[Dict[str, Any]]:
    """One row per variant; ours say whether ``kernels.aot`` compiles that variant ahead of time."""
    rows, listed = [], {}
    for v in variants:
        launch: Launch = v["launch"]
        divisible, ones = launch.specialized_args()
        row = {"op": v["op"], "kernel": launch.kernel_name, "target": f"sm_{v['capability']}",
               "gpu": SM_LIMITS[v["capability"]].gpu, "dtype": "/".join(sorted(set(v["dtypes"]))),
               "cases": v["cases"], "config": launch.config, "num_warps": launch.options["num_warps"],
               "num_stages": launch.options["num_stages"], "constexprs": launch.constexprs(),
               "divisible_by_16": divisible, "equal_to_1": ones}
        if v["op"] not in PEERS:
            if v["capability"] not in listed:
                listed[v["capability"]] = compiled_variants(v["capability"])
            row["ahead_of_time"] = launch.variant_key() in listed[v["capability"]]
        row.update(v.get("row", {}))
        if "error" in v:
            row["error"] = v["error"]
        rows.append(row)
    rows.sort(key=lambda r: (r["op"] in PEERS, r["op"], r["kernel"], r["dtype"], r["target"], r["config"]))
    return rows


def budget_key(op: str, case: str, kernel: str, target: str) -> str:
    return f"{op} | {case} | {kernel} | {target}"


def spill_budget(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """Per op, shape, kernel and target of our ops: the most spill store and load bytes of any variant."""
    budget: Dict[str, Dict[str, int]] = {}
    for row in rows:
        if row["op"] in PEERS or "error" in row:
            continue
        for case in row["cases"]:
            entry = budget.setdefault(budget_key(row["op"], case, row["kernel"], row["target"]),
                                      {"spill_store_bytes": 0, "spill_load_bytes": 0})
            for field in entry:
                entry[field] = max(entry[field], row[field])
    return dict(sorted(budget.items()))


def _ran(key: str, ran: Sequence[tuple[str, str]], targets: Sequence[str]) -> bool:
    """Whether the budget entry ``key`` belongs to this run: its (op, case) pair in ``ran`` and its target in
    ``targets`` (case names repeat across ops: the op counts too)."""
    op, case, _, target = key.split(" | ")
    return (op, case) in ran and target in targets


def check_budget(rows: Sequence[Dict[str, Any]], budget: Dict[str, Dict[str, int]], ran: Sequence[tuple[str, str]],
                 targets: Sequence[str]) -> List[str]:
    """Violations: a kernel spilling more than its budget (no entry: 0), or a budgeted kernel of an (op, case) pair
    of ``ran`` and a target of ``targets`` that launched no such kernel."""
    measured = spill_budget(rows)
    problems = []
    for key, spills in measured.items():
        allowed = budget.get(key, {"spill_store_bytes": 0, "spill_load_bytes": 0})
        for field, value in spills.items():
            if value > allowed.get(field, 0):
                problems.append(f"{key}: {field.replace('_', ' ')} {value} > budget {allowed.get(field, 0)}"
                                + ("" if key in budget else " (kernel not in the budget)"))
    for key in budget:
        if _ran(key, ran, targets) and key not in measured:
            problems.append(f"{key}: budgeted kernel missing from the run (renamed or no longer launched? "
                            f"rewrite the budget with --write-budget)")
    problems += [f"{row['op']} | {row['kernel']} | {row['target']}: failed to compile: {row['error']}"
                 for row in rows if "error" in row and row["op"] not in PEERS]
    return problems


def not_ahead_of_time(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Our launched variants that no configuration of ``kernels.aot`` compiles, each in a line."""
    return [f"{row['op']} | {'; '.join(row['cases'])} | {row['kernel']} | {row['target']}: "
            f"{row['config'] or 'untuned'}, constexprs {row['constexprs']}, =1 {row['equal_to_1']}, "
            f"divisible {row['divisible_by_16']}"
            for row in rows if row["op"] not in PEERS and not row["ahead_of_time"]]


def rewritten_budget(rows: Sequence[Dict[str, Any]], budget: Dict[str, Dict[str, int]],
                     ran: Sequence[tuple[str, str]], targets: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """``budget`` with the entries of this run (``ran``, ``targets``: as in ``check_budget``) replaced by what it
    measured; a run of some ops, shapes or targets keeps the others' entries."""
    kept = {key: value for key, value in budget.items() if not _ran(key, ran, targets)}
    return dict(sorted({**kept, **spill_budget(rows)}.items()))


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


#: the least number of our variants at the models' shapes (``--quick``) that issue HGMMA on sm_90:
#: ``tests/test_static_report.py`` fails when the count falls (raise it when kernels gain HGMMA)
SM90_HGMMA_FLOOR = 23
#: the least number of our variants at the models' shapes (``--quick``) that load through TMA on sm_90 (block-causal
#: attention's kernels and the entmax threshold and output kernels, every candidate): ``tests/test_static_report.py``
#: fails when the count falls
SM90_TMA_FLOOR = 21
#: async-copy opcodes of the Tensor Memory Accelerator (tensor descriptors), as opposed to cp.async (LDGSTS)
TMA_OPS = ("UTMALDG", "UBLKCP")


def mma_kind(row) -> str:
    """``HGMMA`` (Hopper's warpgroup MMA, wgmma) when a variant issues any, else ``HMMA`` (Ampere's warp MMA) when it
    issues that, else ``none`` (no dot, or no tensor cores)."""
    kinds = {opcode.split(".")[0] for opcode in row.get("tensor_core", {})}
    return "HGMMA" if "HGMMA" in kinds else "HMMA" if "HMMA" in kinds else "none"


def uses_tma(row) -> bool:
    return any(opcode.split(".")[0] in TMA_OPS for opcode in row.get("async_copies", {}))


def mma_summary(rows: Sequence[Dict[str, Any]], target: str = "sm_90") -> Dict[str, int]:
    """On ``target``: how many of our compiled variants issue HGMMA, HMMA only, or no tensor-core instruction, and
    how many load through TMA."""
    ours = [r for r in rows if r["op"] not in PEERS and "error" not in r and r["target"] == target]
    counts = Counter(mma_kind(r) for r in ours)
    return {"HGMMA": counts["HGMMA"], "HMMA": counts["HMMA"], "none": counts["none"],
            "TMA": sum(uses_tma(r) for r in ours)}


def _tensor_cores(row) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(row.get("tensor_core", {}).items())) or "none"


def _copy_kind(opcode: str) -> str:
    """``LDGSTS.E.BYPASS.128`` -> ``cp.async 128-bit``: the width of each copy (128-bit copies are vectorized,
    32-bit ones move one fp32 or two 16-bit elements each)."""
    base = opcode.split(".")[0]
    if base != "LDGSTS":
        return f"{ASYNC_COPY_OPS[base]} {base}"
    width = next((w for w in ("128", "64") if opcode.endswith("." + w)), "32")
    return f"cp.async {width}-bit"


def _copies(row) -> str:
    counts = Counter()
    for opcode, n in row.get("async_copies", {}).items():
        counts[_copy_kind(opcode)] += n
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items())) or "no"


def _copy_kinds(members) -> str:
    """Async-copy kinds over ``members``, with the dtypes that use each."""
    dtypes: Dict[str, set] = {}
    for r in members:
        for opcode in r["async_copies"]:
            dtypes.setdefault(_copy_kind(opcode), set()).add(r["dtype"])
    return "; ".join(f"{kind} ({', '.join(sorted(d))})" for kind, d in sorted(dtypes.items())) or "no"


def kernel_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The compact table (README): worst case per op, kernel and target over every shape, dtype and config."""
    lines = ["| op | kernel | target | dtypes | variants (spill-free) | registers (min) | worst spill stores / loads "
             "| warps/SM (min) | tensor cores | async copies |", "| --- " * 10 + "|"]
    groups: Dict[tuple, list] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["op"], row["kernel"], row["target"]), []).append(row)
    for (op, kernel, target), members in groups.items():
        worst = max(members, key=lambda r: (r["spill_store_bytes"] + r["spill_load_bytes"], -r["registers"]))
        spill_free = sum(1 for r in members if not (r["spill_store_bytes"] or r["spill_load_bytes"]))
        spill = (f"{worst['spill_store_bytes']} / {worst['spill_load_bytes']} B ({worst['dtype']}, "
                 f"{worst['registers']} regs)" if worst["spill_store_bytes"] or worst["spill_load_bytes"] else "0")
        mma = sorted({k.split(".")[0] + "." + ".".join(k.split(".")[2:]) if k.startswith("HMMA") else k.split(".")[0]
                      for r in members for k in r["tensor_core"]})
        lines.append(f"| {op} | {kernel} | {target} | {', '.join(sorted({r['dtype'] for r in members}))} "
                     f"| {len(members)} ({spill_free}) | {min(r['registers'] for r in members)} | {spill} "
                     f"| {min(r['occupancy_warps_per_sm'] for r in members)} | {', '.join(mma) or 'none'} "
                     f"| {_copy_kinds(members)} |")
    return lines


def markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: a summary per op, kernel and target (worst case), then every row."""
    rows = report["rows"]
    ours = [r for r in rows if r["op"] not in PEERS and "error" not in r]
    spilling = [r for r in ours if r["spill_store_bytes"] or r["spill_load_bytes"]]
    lines = [f"# Static kernel report, {report['date']}", "",
             f"`{report['command']}` ({report['wall_seconds']:.0f} s wall). Triton {report['triton']}, torch "
             f"{report['torch']}, ptxas {report['ptxas']['sm_80']} (sm_80) / {report['ptxas']['sm_90']} (sm_90), "
             f"AdaSplash {report['adasplash'] or 'not installed'}. No GPU: every variant that the public ops launch "
             f"at these shapes (forward + backward) is captured from Triton's launcher and compiled "
             f"(`kernels/tools/report.py`). Occupancy: resident warps per SM on {SM_LIMITS[90].gpu} (sm_90) and "
             f"{SM_LIMITS[80].gpu} (sm_80) from registers, shared memory and warps per block.", "",
             f"**Ours: {len(ours)} kernel variants x target, {len(spilling)} spill** (worst: {_worst(spilling)}); "
             f"{sum(r['ahead_of_time'] for r in ours)} of them compiled ahead of time (`python -m kernels.aot`).", "",
             *[f"**{target}: {m['HGMMA']} variants issue HGMMA (warpgroup MMA), {m['HMMA']} HMMA only, {m['none']} "
               f"no tensor-core instruction; {m['TMA']} load through TMA.**"
               for target in report["targets"] if target == "sm_90" for m in [mma_summary(rows, target)]], "",
             "## Per kernel and target (worst case over shapes, dtypes and configs)", "", *kernel_table(rows), "",
             "## Per kernel, dtype and target", "",
             "| op | kernel | dtype | target | variants (spill-free) | registers (min) | spill stores / loads (max) "
             "| shared memory (max) | warps/SM (min) | HGMMA / HMMA / no MMA variants | TMA variants "
             "| tensor cores (max count) | async copies |", "| --- " * 13 + "|"]
    groups: Dict[tuple, list] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["op"], row["kernel"], row["dtype"], row["target"]), []).append(row)
    for (op, kernel, dtype, target), members in groups.items():
        worst = max(members, key=lambda r: (r["spill_store_bytes"] + r["spill_load_bytes"], -r["registers"]))
        shared = max(r["shared_static_bytes"] + r["shared_dynamic_bytes"] for r in members)
        kinds = {k for r in members for k in r["tensor_core"]}
        mma = {k: max(r["tensor_core"].get(k, 0) for r in members) for k in kinds}
        spill_free = sum(1 for r in members if not (r["spill_store_bytes"] or r["spill_load_bytes"]))
        kinds_count = Counter(mma_kind(r) for r in members)
        lines.append(f"| {op} | {kernel} | {dtype} | {target} | {len(members)} ({spill_free}) "
                     f"| {min(r['registers'] for r in members)} "
                     f"| {worst['spill_store_bytes']} / {worst['spill_load_bytes']} B | {_kib(shared)} "
                     f"| {min(r['occupancy_warps_per_sm'] for r in members)} "
                     f"| {kinds_count['HGMMA']} / {kinds_count['HMMA']} / {kinds_count['none']} "
                     f"| {sum(uses_tma(r) for r in members)} | {_tensor_cores({'tensor_core': mma})} "
                     f"| {_copy_kinds(members)} |")
    if report["unsupported"]:
        lines += ["", "## Not compiled", ""]
        lines += [f"- {u['op']} at {u['case']}: {u['reason']}" for u in report["unsupported"]]
    if not report["adasplash"]:
        lines += ["", "AdaSplash-2 is not installed here: no peer rows (`pip install adasplash`)."]
    elif "adasplash2" in {c["op"] for c in report["cases"]}:
        shapes = "every long shape" if report["all_peer_shapes"] else "T=4096 bf16 only (`--all-peer-shapes`: all)"
        lines += ["", f"AdaSplash-2 ran at {shapes}; every autotune candidate is compiled, since the one it keeps is "
                  f"chosen by timing on the GPU."]
    lines += ["", "## Every variant", "",
              "Shapes: the cases that launch the variant. `=1`: integer arguments equal to 1 that Triton's launcher "
              "makes constexpr; the arguments it specializes as 16-divisible (pointers, strides, sizes) are in the "
              "JSON (`divisible_by_16`).", "",
              "| op | kernel | dtype | target | config | warps | stages | regs | spill st/ld (B) | stack (B) "
              "| smem static + dyn | warps/SM (limit) | tensor cores | async copies | constexprs | =1 | shapes |",
              "| --- " * 17 + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['op']} | {row['kernel']} | {row['dtype']} | {row['target']} | {row['config']} "
                         f"| {row['num_warps']} | {row['num_stages']} | compile failed: {row['error'][:200]} |"
                         + " |" * 9)
            continue
        constexprs = " ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        lines.append(
            f"| {row['op']} | {row['kernel']} | {row['dtype']} | {row['target']} | {row['config']} "
            f"| {row['num_warps']} | {row['num_stages']} | {row['registers']} "
            f"| {row['spill_store_bytes']} / {row['spill_load_bytes']} "
            f"| {row['stack_bytes']} | {row['shared_static_bytes']} + {row['shared_dynamic_bytes']} "
            f"| {row['occupancy_warps_per_sm']} ({row['occupancy_limited_by']}) | {_tensor_cores(row)} "
            f"| {_copies(row)} | {constexprs} | {', '.join(row['equal_to_1'])} | {'; '.join(row['cases'])} |")
    return "\n".join(lines) + "\n"


def _worst(spilling) -> str:
    if not spilling:
        return "none"
    r = max(spilling, key=lambda r: r["spill_store_bytes"] + r["spill_load_bytes"])
    return (f"{r['kernel']} {r['dtype']} {r['target']}, {r['spill_store_bytes']} B stores / {r['spill_load_bytes']} B "
            f"loads at {r['registers']} registers")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the models' shapes only (every kernel once per target)")
    parser.add_argument("--ops", nargs="+", choices=OPS + PEERS, help="ops and peers to report (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="leave out AdaSplash-2")
    parser.add_argument("--all-peer-shapes", action="store_true",
                        help="peers at every long shape and dtype (default: T=4096 bf16; each autotune candidate of "
                        "AdaSplash-2 is a compile, some 130 per shape and target)")
    parser.add_argument("--cases", nargs="+", metavar="SUBSTRING",
                        help="only the cases whose name contains one of these substrings")
    parser.add_argument("--targets", type=int, nargs="+", default=[90, 80], choices=sorted(SM_LIMITS),
                        help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of <date>.md and <date>.json")
    parser.add_argument("--check-budget", action="store_true",
                        help=f"exit 1 on spills over {BUDGET_PATH.name} or a variant not compiled ahead of time")
    parser.add_argument("--write-budget", action="store_true", help=f"write {BUDGET_PATH.name} from this run")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ops = args.ops or [op for op in OPS + PEERS if not (args.no_peers and op in PEERS)]
    selected = [case for case in cases(args.quick, args.all_peer_shapes) if case.op in ops
                and (not args.cases or any(part in case.name for part in args.cases))]
    print(f"capturing {len(selected)} cases x {len(args.targets)} targets", file=sys.stderr, flush=True)
    variants, unsupported = capture_variants(selected, args.targets)
    print(f"{len(variants)} distinct variants ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    compile_variants(variants, args.jobs)
    rows = rows_of(variants)
    ran = [(case.op, case.name) for case in selected]
    targets = [f"sm_{c}" for c in args.targets]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": "python -m kernels.tools.report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "triton": triton.__version__, "torch": torch.__version__, "adasplash": adasplash_version(),
        "ptxas": {f"sm_{c}": get_ptxas(c).version for c in (80, 90)},
        "sm_limits": {f"sm_{c}": limits._asdict() for c, limits in SM_LIMITS.items()},
        "targets": targets, "cases": [{"op": c.op, "case": c.name, "dtype": c.dtype} for c in selected],
        "all_peer_shapes": args.all_peer_shapes, "unsupported": unsupported, "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / report["date"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    ours = [r for r in rows if r["op"] not in PEERS and "error" not in r]
    print(f"{len(rows)} rows ({sum(1 for r in ours if r['spill_store_bytes'] or r['spill_load_bytes'])} of our "
          f"{len(ours)} spill), {sum('error' in r for r in rows)} failed to compile; wrote {stem}.md and .json "
          f"({report['wall_seconds']:.0f} s)", flush=True)
    if args.write_budget:
        budget = rewritten_budget(rows, json.loads(BUDGET_PATH.read_text()), ran, targets)
        BUDGET_PATH.write_text(json.dumps(budget, indent=1) + "\n")
        print(f"wrote {BUDGET_PATH}")
    if args.check_budget:
        budget = json.loads(BUDGET_PATH.read_text())
        problems = check_budget(rows, budget, ran, targets)
        for problem in problems:
            print(f"SPILL BUDGET: {problem}", flush=True)
        unlisted = not_ahead_of_time(rows)
        for variant in unlisted:
            print(f"NOT AHEAD OF TIME: {variant}", flush=True)
        if problems or unlisted:
            return 1
        print("spill budget kept; every launched variant is compiled ahead of time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
