"""Launches per call: what one forward + backward of each op and module costs the host at the models' shapes, counted
without a GPU.

    python -m kernels.tools.launches                  # markdown table of every case, fp32 and bf16
    python -m kernels.tools.launches --check          # ... and exit 1 where a count exceeds its ceiling
    python -m kernels.tools.launches --quick --check  # without the cases slow on a CPU (SLOW_ON_CPU): seconds
    python -m kernels.tools.launches --json out.json

At T = 110 each kernel runs for microseconds and each launch costs several: the models are launch-bound on a GPU
unless the host does little besides launching the kernels. Each case runs once (warming what is cached per shape),
then once more, counted, on CPU tensors under two instruments:

- **Triton launches**: ``JITFunction.run`` is intercepted (``triton.knobs.runtime.jit_cache_hook``, as
  ``kernels.tools.report`` does, under a stand-in driver for sm_90): each launch is counted and nothing compiles or
  runs. An autotuned launch counts once (its default candidate), as a tuned launch does after its first.
- **Other device operations**: ``torch.profiler`` records the aten operators on the CPU. An operator counts once,
  with everything it calls, unless it is in ``NO_LAUNCH`` (views, metadata, allocations without a fill: nothing is
  launched on a GPU) or in ``TRANSPARENT`` (dispatching wrappers that may or may not do work: ``aten::to``,
  ``aten::reshape``, ``aten::contiguous``, ``aten::linear``, ...: the operators they call are counted instead).
  Events outside aten (autograd nodes, the ``kernels::`` custom ops) are looked through the same way. ``gemm``
  counts the matrix products among them (``GEMMS``): a module's projections, which are not host overhead.

Outputs of the intercepted kernels are the allocations' contents; ``torch.empty`` and friends are zero-filled
(outside the count) so that data-dependent host code (the MoE's expert ids) stays in range. Leaves' gradients are
reset to None before the counted call, as ``optimizer.zero_grad()`` does, and the backward gets its cotangents
ready-made: the count is the op's own. ``CEILINGS`` holds the committed ceilings (``tests/test_launch_counts.py``
fails when a count rises past one).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Callable, Dict, Iterator, List, NamedTuple, Sequence

import torch

#: aten operators that launch nothing on a GPU: views, metadata, allocations that fill nothing, autograd bookkeeping
NO_LAUNCH = frozenset(f"aten::{name}" for name in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
    "view", "view_as", "_unsafe_view", "_reshape_alias", "as_strided", "alias", "lift_fresh", "detach", "detach_",
    "t", "transpose", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "select", "slice", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "unflatten", "movedim", "diagonal", "view_as_real", "real", "conj",
    "resolve_conj", "resolve_neg", "numpy_T", "mT", "result_type", "size", "stride", "numel", "dim", "is_same_size",
    "_has_compatible_shallow_copy_type", "requires_grad_", "retain_grad", "output_nr", "_version", "_fw_primal",
    "is_floating_point", "is_complex", "to_padded_tensor", "_nested_tensor_size", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "storage_offset", "_is_zerotensor",
))
#: aten wrappers that dispatch to other operators, or to none (``aten::to`` to the same dtype): their callees count
TRANSPARENT = frozenset(f"aten::{name}" for name in (
    "to", "type_as", "contiguous", "reshape", "flatten", "matmul", "linear", "einsum", "dropout", "feature_dropout",
    "softmax", "log_softmax", "layer_norm", "group_norm", "tensor_split",
))
_FILL = "kernels.tools.launches: zero fill"  # the instrument's own fills (record_function), left out of the count
#: matrix products: counted with the rest and shown apart (``gemm``)
GEMMS = frozenset(f"aten::{name}" for name in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot"))


class Count(NamedTuple):
    triton: int  # Triton kernel launches
    other: int  # other device operations (GEMMs included)
    gemm: int  # of which matrix products
    operators: Dict[str, int]  # other device operations by aten name


def count_events(events) -> Dict[str, int]:
    """{aten operator: count} over the profiler's ``events`` (FunctionEvents with ``cpu_children``): outermost
    operators, looking through ``TRANSPARENT`` ones and non-aten events, skipping ``NO_LAUNCH`` ones and the
    instrument's own fills."""
    counts: Dict[str, int] = {}

    def visit(event) -> None:
        name = event.name
        if name in NO_LAUNCH or name == _FILL:
            return
        if name.startswith("aten::") and name not in TRANSPARENT:
            counts[name] = counts.get(name, 0) + 1
            return
        for child in event.cpu_children:
            visit(child)

    for event in events:
        if event.cpu_parent is None:
            visit(event)
    return counts


@contextlib.contextmanager
def counting_triton_launches(capability: int = 90) -> Iterator[List[str]]:
    """Within the block Triton launches are counted, not run, and the public ops take their Triton path on CPU
    tensors; yields the list of launched kernels' names (one entry per launch). Allocations are zero-filled."""
    from kernels.tools.report import intercepting_launches

    launched: List[str] = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        launched.append(fn.jit_function.fn.__name__)
        return True  # "handled": nothing compiles or launches

    def run_default(self, *args, **kwargs):  # a tuned launch runs one candidate
        self.nargs = dict(zip(self.arg_names, args))
        try:
            return self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())
        finally:
            self.nargs = None

    def zero_filled(factory):  # the fill is marked, so that the profiler's count leaves it out
        def allocate(*args, **kwargs):
            tensor = factory(*args, **kwargs)
            with torch.profiler.record_function(_FILL):
                tensor.zero_()
            return tensor

        return allocate

    with intercepting_launches(capability, hook, run_default, zero_filled):
        yield launched


def count(step: Callable[[], None], leaves: Sequence[torch.Tensor]) -> Count:
    """Launches of ``step()`` (a forward + backward), run once to warm up and once counted, with the gradients of
    ``leaves`` reset to None before each."""
    from torch.profiler import ProfilerActivity, profile

    with counting_triton_launches() as launched:
        for leaf in leaves:
            leaf.grad = None
        step()
        for leaf in leaves:
            leaf.grad = None
        launched.clear()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()
        triton_launches = len(launched)
    operators = count_events(profiler.events())
    gemm = sum(n for name, n in operators.items() if name in GEMMS)
    return Count(triton_launches, sum(operators.values()), gemm, dict(sorted(operators.items())))


# ---------------------------------------------------------------------------------------------------------------
# The cases: each op and module forward + backward at the models' shapes
# ---------------------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    name: str  # the key of CEILINGS
    shape: str
    make: Callable[[torch.dtype], tuple]  # dtype -> (step, leaves)


def _forward_backward(forward: Callable[[], Sequence[torch.Tensor]], leaves: Sequence[torch.Tensor]) -> tuple:
    """(step, leaves): ``step`` runs ``forward()`` and backpropagates ready-made cotangents (made on a first,
    uncounted call) through every output."""
    cotangents: List[torch.Tensor] = []

    def step() -> None:
        outputs = [o for o in forward() if o.requires_grad]
        if not cotangents:
            cotangents.extend(torch.ones_like(o) for o in outputs)
        torch.autograd.backward(outputs, cotangents)

    return step, list(leaves)


def _leaf(*shape, dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).requires_grad_()


def _entmax15_attention(dtype):
    from kernels import entmax15_attention

    q, k, v = (_leaf(16, 1, 110, 64, dtype=dtype) for _ in range(3))
    return _forward_backward(lambda: [entmax15_attention(q, k, v)], [q, k, v])


def _entmax15_attention_long_rows(dtype):
    from kernels import entmax15_attention

    q, k, v = (_leaf(2, 4, 1024, 64, dtype=dtype) for _ in range(3))
    return _forward_backward(lambda: [entmax15_attention(q, k, v)], [q, k, v])


def _carn_causal_cue(dtype):
    from kernels import FusedEntmaxCausalAttention

    attention = FusedEntmaxCausalAttention(256, 1, out_proj=False).to(dtype)
    x = _leaf(4, 110, 256, dtype=dtype)  # CARN's batch is 32: the counts do not depend on it, the CPU's time does

    def forward():
        result = attention.forward_with_context(x)
        return [result.output, result.context]

    return _forward_backward(forward, [x, *attention.parameters()])


def _block_causal_attention(dtype):
    from kernels import block_causal_attention

    q, k, v = (_leaf(32, 8, 330, 64, dtype=dtype) for _ in range(3))
    return _forward_backward(lambda: [block_causal_attention(q, k, v, group_size=3)], [q, k, v])


def _block_causal_layer(dtype):
    from kernels import BlockCausalTransformerLayer

    layer = BlockCausalTransformerLayer(512, 8, group_size=3).to(dtype)
    x = _leaf(2, 330, 512, dtype=dtype)  # CaM-HG's batch is 32: the counts do not depend on it, the CPU's time does
    return _forward_backward(lambda: [layer(x)], [x, *layer.parameters()])


def _top2_moe(dtype):
    from kernels import Top2MoE

    moe = Top2MoE(512, num_experts=4, hidden=512).to(dtype)
    x = _leaf(32, 110, 512, dtype=dtype)
    valid = torch.arange(110) < torch.randint(40, 111, (32, 1))  # dialogues of 40 to 110 utterances, as CaM-HG pads

    def forward():
        y, routing = moe(x, row_mask=valid, return_routing=True)
        return [y, routing.weights, routing.aux_loss]

    return _forward_backward(forward, [x, *moe.parameters()])


CASES = [
    Case("entmax15_attention", "B=16 H=1 T=110 D=64", _entmax15_attention),
    Case("entmax15_attention long rows", "B=2 H=4 T=1024 D=64 (rows in passes, support mask)",
         _entmax15_attention_long_rows),
    Case("CARN causal-cue attention", "FusedEntmaxCausalAttention(256, 1) with context, B=4 T=110", _carn_causal_cue),
    Case("block_causal_attention", "B=32 H=8 T=330 D=64 group 3", _block_causal_attention),
    Case("BlockCausalTransformerLayer", "(512, 8 heads, group 3), B=2 T=330", _block_causal_layer),
    Case("Top2MoE", "(512, 4 experts, hidden 512), row mask and routing, N=32x110", _top2_moe),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: (case, dtype) -> the most other device operations (``Count.other``, GEMMs included) one forward + backward may
#: take; ``tests/test_launch_counts.py`` checks them. Lower one when the op gets cheaper; never raise one silently.
CEILINGS = {
    ("entmax15_attention", "fp32"): 2,
    ("entmax15_attention", "bf16"): 2,
    ("entmax15_attention long rows", "fp32"): 3,
    ("entmax15_attention long rows", "bf16"): 3,
    ("CARN causal-cue attention", "fp32"): 10,
    ("CARN causal-cue attention", "bf16"): 10,
    ("block_causal_attention", "fp32"): 2,
    ("block_causal_attention", "bf16"): 2,
    ("BlockCausalTransformerLayer", "fp32"): 52,
    ("BlockCausalTransformerLayer", "bf16"): 52,
    ("Top2MoE", "fp32"): 5,
    ("Top2MoE", "bf16"): 5,
}


#: (case, dtype) pairs that ``--quick`` leaves out: the layer's bf16 GEMMs take a minute on a CPU (its count is fp32's)
SLOW_ON_CPU = {("BlockCausalTransformerLayer", "bf16")}


def measure(names: Sequence[str] = (), dtypes: Sequence[str] = tuple(DTYPES), quick: bool = False) -> List[Dict]:
    """One row per (case, dtype): the counts and the ceiling. ``names``: the cases to run (all when empty); ``quick``:
    without ``SLOW_ON_CPU``."""
    rows = []
    for case in CASES:
        if names and case.name not in names:
            continue
        for dtype in dtypes:
            if quick and (case.name, dtype) in SLOW_ON_CPU:
                continue
            torch.manual_seed(0)
            result = count(*case.make(DTYPES[dtype]))
            rows.append({"case": case.name, "shape": case.shape, "dtype": dtype, "triton": result.triton,
                         "other": result.other, "gemm": result.gemm, "ceiling": CEILINGS.get((case.name, dtype)),
                         "operators": result.operators})
    return rows


def markdown(rows: Sequence[Dict]) -> str:
    lines = ["| case | shape | dtype | Triton launches | other device ops | of which GEMMs | ceiling | other ops |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ops = ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in row["operators"].items())
        lines.append(f"| {row['case']} | {row['shape']} | {row['dtype']} | {row['triton']} | {row['other']} | "
                     f"{row['gemm']} | {'' if row['ceiling'] is None else row['ceiling']} | {ops} |")
    return "\n".join(lines) + "\n"


def over_ceiling(rows: Sequence[Dict]) -> List[str]:
    return [f"{row['case']} {row['dtype']}: {row['other']} device operations > ceiling {row['ceiling']}"
            for row in rows if row["ceiling"] is not None and row["other"] > row["ceiling"]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=[], help=f"of: {', '.join(c.name for c in CASES)}")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="leave out SLOW_ON_CPU (seconds instead of a minute)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a count exceeds its ceiling (CEILINGS)")
    args = parser.parse_args(argv)
    rows = measure(args.cases, args.dtypes, args.quick)
    print(markdown(rows), end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(rows, file, indent=1)
    failures = over_ceiling(rows)
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
