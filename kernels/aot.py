"""Ahead-of-time compilation of every kernel configuration for NVIDIA targets, without a GPU.

Triton's interpreter accepts programs that a GPU compiler rejects (layouts, shared memory, dot shapes),
so the tests also compile every configuration a launcher can choose, for sm_80 and sm_90:

    python -m kernels.aot --capability 80 90 [--op entmax15_attention] [--ptxas]

Each op module lists its configurations with ``aot_configurations() -> list[AotConfig]``.
Run this without ``TRITON_INTERPRET=1``: interpreted kernels cannot be compiled.

What is compiled here: every kernel x dtype x constexpr configuration that a launcher can choose (every autotune
candidate of each architecture's list, ``kernels._autotune``), for the architectures that list it. Integer
arguments are plain i32 unless a configuration says otherwise: ``divisible`` names the pointers, strides and sizes
that Triton's launcher specializes as multiples of 16 (16-byte-aligned pointers: ``tt.divisibility``), and unit
strides may be given as the constexpr 1, as a launch on dense tensors does. Those specializations are what lets
16-bit tiles load as 16-byte vectors and stream through async copies (cp.async), so the variants compiled here are
the ones a launch on aligned tensors makes. The kernels mark their runtime flags and sizes ``do_not_specialize`` so
that those never make a new variant. Each line reports the cubin's size and the shared memory a launch requests
(Triton's ``metadata.shared``, which its launcher compares with the device's per-block maximum; Triton's kernels
declare no static shared memory); with ``--ptxas`` also its registers and spill bytes (``ptxas -v``), a spill counting
as a failure. ``python -m kernels.tools.report`` captures exactly the variants that the public ops
launch at given shapes, reports their registers, spills, occupancy and async copies, and checks that each is one of
the configurations listed here (``variant_key``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

#: op name -> module that defines ``aot_configurations()``
OP_MODULES = {
    "entmax15_attention": "kernels.entmax",
    "block_causal_attention": "kernels.block_causal",
    "moe_top2": "kernels.moe",
    "kvcache": "kernels.kvcache",
}


class AotConfig(NamedTuple):
    """One launchable kernel configuration: the kernel, its argument types and its constexpr values.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``, ``"i32"``, ...,
    ``"constexpr"`` for compile-time arguments); ``constexprs`` gives the constexpr values.
    ``num_warps``/``num_stages`` (and ``maxnreg``, the cap on registers per thread, None: ptxas's choice) are the
    launch options the launcher uses with it. ``divisible``: arguments
    specialized as multiples of 16 (pointers: 16-byte aligned), as Triton's launcher does for aligned tensors.
    ``capabilities``: the compute capabilities whose candidate list holds it (empty: every one compiled).
    ``default``: part of the quick subset (``--defaults-only``, the tests): for ops with autotune candidates the
    default (first) candidate of those architectures, launched on aligned tensors; True for ops without them.
    """

    label: str
    kernel: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: Optional[int] = None
    divisible: Tuple[str, ...] = ()
    capabilities: Tuple[int, ...] = ()
    default: bool = True

    def attrs(self) -> Dict[tuple, list]:
        """``ASTSource`` attributes: ``tt.divisibility`` 16 on every ``divisible`` argument."""
        names = list(self.kernel.arg_names)
        unknown = [name for name in self.divisible if name not in names]
        if unknown:
            raise ValueError(f"{self.label}: divisible names {unknown} that are not arguments of the kernel")
        return {(names.index(name),): [["tt.divisibility", 16]] for name in self.divisible}


def compile_source(source, capability: int, options: Dict[str, Any], *, ptxas_log: bool = False):
    """``triton.compile(source)`` for ``sm_<capability>`` with launch ``options``; returns Triton's kernel, or with
    ``ptxas_log=True`` the pair (kernel, the ``ptxas -v`` log: registers, spills, stack), bypassing Triton's cache
    so that ptxas runs and logs (Triton prints the log under ``TRITON_DUMP_PTXAS_LOG``)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    if not ptxas_log:
        return triton.compile(source, target=target, options=options)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(source, target=target, options=options)
    return kernel, log.getvalue()


def compile_config(config: AotConfig, capability: int, *, ptxas_log: bool = False):
    """Compile one configuration to PTX and a cubin for ``sm_<capability>``; returns Triton's kernel (with
    ``ptxas_log``: and the ``ptxas -v`` log, as :func:`compile_source`)."""
    from triton.compiler import ASTSource

    source = ASTSource(config.kernel, config.signature, config.constexprs, config.attrs())
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return compile_source(source, capability, options, ptxas_log=ptxas_log)


def config_targets(config: AotConfig, capabilities: Sequence[int]) -> List[int]:
    """The ``capabilities`` that ``config`` is compiled for."""
    return [c for c in capabilities if not config.capabilities or c in config.capabilities]


def configurations(op: str, defaults_only: bool = False) -> List[AotConfig]:
    """``op``'s configurations; with ``defaults_only`` the default autotune candidates alone."""
    if op not in OP_MODULES:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OP_MODULES)}")
    configs = importlib.import_module(OP_MODULES[op]).aot_configurations()
    return [config for config in configs if config.default or not defaults_only]


def variant_key(kernel, signature: Dict[str, str], constexprs: Dict[str, Any], divisible: Sequence[str],
                options: Dict[str, Any]) -> tuple:
    """What makes a compiled variant of ``kernel``: every argument's type ("constexpr" included), the constexpr
    values (integers specialized as 1 among them), the 16-divisible arguments and the launch options (num_warps,
    num_stages, maxnreg). A launch and a configuration with the same key compile the same code."""
    return (kernel.fn.__module__, kernel.fn.__qualname__, tuple(sorted(signature.items())),
            tuple(sorted((name, repr(value)) for name, value in constexprs.items())), tuple(sorted(divisible)),
            *(options.get(name) for name in ("num_warps", "num_stages", "maxnreg")))


def config_key(config: AotConfig) -> tuple:
    """``variant_key`` of a configuration."""
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "maxnreg": config.maxnreg}
    return variant_key(config.kernel, config.signature, config.constexprs, config.divisible, options)


def compiled_variants(capability: int) -> set:
    """``variant_key`` of every configuration of every op compiled for ``sm_<capability>``."""
    return {config_key(config) for op in OP_MODULES for config in configurations(op)
            if config_targets(config, [capability])}


TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "DMMA")
ASYNC_COPY_OPS = {"LDGSTS": "cp.async", "UTMALDG": "TMA", "UBLKCP": "TMA"}
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)")


def parse_ptxas_log(log: str) -> Dict[str, int]:
    """Registers, spill store/load and stack bytes from ``ptxas -v`` (one kernel)."""
    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    if not re.search(r"Used \d+ registers", log):
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    return {"registers": number(r"Used (\d+) registers"), "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame")}


def parse_sass(sass: str) -> Dict[str, Any]:
    """Tensor-core instructions (kind -> count) and async-copy instructions (opcode -> count) in ``cuobjdump -sass``."""
    opcodes = Counter(_SASS_OPCODE.findall(sass))
    mma = {op: n for op, n in opcodes.items() if op.split(".")[0] in TENSOR_CORE_OPS}
    copies = {op: n for op, n in opcodes.items() if op.split(".")[0] in ASYNC_COPY_OPS}
    return {"instructions": sum(opcodes.values()), "tensor_core": dict(sorted(mma.items())),
            "async_copies": dict(sorted(copies.items()))}


def _cuobjdump(cubin: bytes, flag: str) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, str(path)], check=True, capture_output=True,
                              text=True).stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(OP_MODULES), help="op to compile (default: all)")
    parser.add_argument("--capability", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the default autotune candidate of each list (the tests' quick subset)")
    parser.add_argument("--match", help="only configurations whose label contains this text")
    parser.add_argument("--async-copies", action="store_true",
                        help="count each cubin's async-copy instructions (cuobjdump -sass; see kernels.tools.report)")
    parser.add_argument("--ptxas", action="store_true",
                        help="report each cubin's registers and spill bytes (ptxas -v); a configuration that spills "
                        "fails")
    args = parser.parse_args(argv)

    from kernels.backend import triton_interpreter_enabled

    if triton_interpreter_enabled():
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    failures = 0
    for op in args.op or sorted(OP_MODULES):
        for config in configurations(op, defaults_only=args.defaults_only):
            if args.match and args.match not in config.label:
                continue
            for capability in config_targets(config, args.capability):
                start = time.perf_counter()
                try:
                    compiled = compile_config(config, capability, ptxas_log=args.ptxas)
                    if args.ptxas:
                        compiled, log = compiled
                        usage = parse_ptxas_log(log)
                        spills = usage["spill_store_bytes"] + usage["spill_load_bytes"]
                        failures += spills > 0
                    status = ("SPILL" if args.ptxas and spills else "ok   ") + (
                        f"{len(compiled.asm['cubin']):>7d} B cubin, {compiled.metadata.shared:>6d} B shared memory")
                    if args.ptxas:
                        status += (f", {usage['registers']} registers, {usage['spill_store_bytes']} / "
                                   f"{usage['spill_load_bytes']} B spill stores / loads")
                    if args.async_copies:
                        copies = parse_sass(_cuobjdump(compiled.asm["cubin"], "-sass"))["async_copies"]
                        status += f", {sum(copies.values())} async copies"
                except Exception as error:  # report every failing configuration, not just the first
                    failures += 1
                    status = f"FAIL {type(error).__name__}: {error}".replace("\n", " ")[:2000]
                print(f"{op} sm_{capability} {config.label}: {status} ({time.perf_counter() - start:.1f}s)", flush=True)
    print(f"{failures} failed" + (" or spilled" if args.ptxas else "") if failures else "all configurations compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
