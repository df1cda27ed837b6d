"""Ahead-of-time compilation of every kernel configuration for NVIDIA targets, without a GPU.

Triton's interpreter accepts programs that a GPU compiler rejects (layouts, shared memory, dot shapes),
so the tests also compile every configuration a launcher can choose, for sm_80 and sm_90:

    python -m kernels.aot --capability 80 90 [--op entmax15_attention]

Each op module lists its configurations with ``aot_configurations() -> list[AotConfig]``.
Run this without ``TRITON_INTERPRET=1``: interpreted kernels cannot be compiled.

What is compiled here: every kernel x dtype x constexpr tile configuration, with integer arguments as plain i32.
At launch Triton also specializes integers equal to 1 and 16-byte-aligned pointers and strides; the kernels mark
their runtime flags and sizes ``do_not_specialize`` so that those never make a new variant, and leave the strides
and pointers specialized (unit strides give vectorized loads), so those variants are not compiled here:
``python -m kernels.report`` compiles exactly the variants that the public ops launch at given shapes, those
specializations included, and reports their registers, spills and occupancy.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Sequence

#: op name -> module that defines ``aot_configurations()``
OP_MODULES = {
    "entmax15_attention": "kernels.entmax_attention",
    "block_causal_attention": "kernels.block_causal_attention",
    "moe_top2": "kernels.moe",
}


class AotConfig(NamedTuple):
    """One launchable kernel configuration: the kernel, its argument types and its constexpr values.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``, ``"i32"``, ...,
    ``"constexpr"`` for compile-time arguments); ``constexprs`` gives the constexpr values.
    ``num_warps``/``num_stages`` are the launch options the launcher uses with it.
    """

    label: str
    kernel: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2


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


def compile_config(config: AotConfig, capability: int):
    """Compile one configuration to PTX and a cubin for ``sm_<capability>``; returns Triton's kernel."""
    from triton.compiler import ASTSource

    source = ASTSource(config.kernel, config.signature, config.constexprs)
    return compile_source(source, capability, {"num_warps": config.num_warps, "num_stages": config.num_stages})


def configurations(op: str) -> List[AotConfig]:
    if op not in OP_MODULES:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OP_MODULES)}")
    return list(importlib.import_module(OP_MODULES[op]).aot_configurations())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(OP_MODULES), help="op to compile (default: all)")
    parser.add_argument("--capability", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    args = parser.parse_args(argv)

    from kernels.backend import triton_interpreter_enabled

    if triton_interpreter_enabled():
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    failures = 0
    for op in args.op or sorted(OP_MODULES):
        for config in configurations(op):
            for capability in args.capability:
                start = time.perf_counter()
                try:
                    compiled = compile_config(config, capability)
                    status = f"ok   {len(compiled.asm['cubin']):>7d} B cubin"
                except Exception as error:  # report every failing configuration, not just the first
                    failures += 1
                    status = f"FAIL {type(error).__name__}: {error}".replace("\n", " ")[:2000]
                print(f"{op} sm_{capability} {config.label}: {status} ({time.perf_counter() - start:.1f}s)", flush=True)
    print(f"{failures} failed" if failures else "all configurations compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
