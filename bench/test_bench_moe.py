"""Top-2 MoE dispatch: ours vs the per-expert loop vs ``torch._grouped_mm``, forward and forward+backward.

Run with ``pytest bench/test_bench_moe.py --benchmark-only``. GPU cases run in bfloat16 (what
``torch._grouped_mm`` takes); the 64k-row cases also record achieved TFLOP/s and the fraction of this GPU's dense
bf16 matmul rate (an 8192^3 ``torch.mm`` timed in the same run) in ``extra_info``. On CPU only a tiny
reference case runs.
"""
import functools

import pytest
import torch
from torch import nn

from conftest import bench_call, requires_cuda
from kernels import moe_top2
from kernels.moe import moe_top2_reference

SHAPES = [  # id, rows, d (= d_out), hidden, experts
    pytest.param(32 * 110, 512, 512, 4, id="model-N3520-d512-h512-E4"),  # CaM-HG: one row per utterance
    pytest.param(65536, 1024, 2048, 8, id="N65536-d1024-h2048-E8"),
    pytest.param(65536, 2048, 4096, 8, id="N65536-d2048-h4096-E8"),
]
MODES = ["fwd", "fwd+bwd"]


def make_inputs(n, d, h, num_experts, device, dtype=torch.bfloat16, requires_grad=False):
    generator = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device=device)  # noqa: E731
    tensors = (randn(n, d), randn(num_experts, d) / d**0.5, randn(num_experts, d, h) / d**0.5,
               randn(num_experts, h) * 0.1, randn(num_experts, h, d) / h**0.5, randn(num_experts, d) * 0.1)
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors]


def grouped_mm_moe(x, gate_weight, w1, b1, w2, b2):
    """The same op from torch building blocks around ``torch._grouped_mm`` (routing and sorting in torch)."""
    top_logits, experts = (x @ gate_weight.t()).float().topk(2, dim=-1)
    alpha = top_logits.softmax(dim=-1)
    sorted_experts, order = experts.reshape(-1).sort(stable=True)
    group_ends = torch.searchsorted(sorted_experts, torch.arange(1, gate_weight.shape[0] + 1, device=x.device))
    offsets = group_ends.to(torch.int32)
    rows = order // 2
    hidden = torch._grouped_mm(x[rows], w1, offs=offsets) + b1[sorted_experts]
    out = torch._grouped_mm(nn.functional.gelu(hidden), w2, offs=offsets) + b2[sorted_experts]
    weighted = out.float() * alpha.reshape(-1)[order, None]
    return torch.zeros(x.shape[0], w2.shape[2], device=x.device).index_add_(0, rows, weighted).to(x.dtype)


def _skip_unless_grouped_mm(device, backward):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    if torch.cuda.get_device_capability(device) != (9, 0):
        pytest.skip("torch._grouped_mm runs on sm_90 only")
    if backward:
        probe = make_inputs(64, 64, 64, 4, device, requires_grad=True)
        try:
            grouped_mm_moe(*probe).sum().backward()
        except RuntimeError as error:
            pytest.skip(f"torch._grouped_mm has no backward in this build: {error}")


CANDIDATES = {"ours": moe_top2, "per-expert loop": moe_top2_reference, "torch._grouped_mm": grouped_mm_moe}


def _run(op, inputs, mode):
    """The timed call: the forward alone (no autograd graph), or the forward and the gradients of every input."""

    def forward():
        with torch.no_grad():
            return op(*inputs)

    def forward_backward():
        return torch.autograd.grad(op(*inputs).float().square().sum(), inputs)

    return forward if mode == "fwd" else forward_backward


def _model_flops(n, d, h, mode):
    forward = 2 * (2 * n) * (d * h + h * d)  # two experts per row, two matmuls per expert
    return forward if mode == "fwd" else 3 * forward


@functools.lru_cache(maxsize=None)
def _dense_matmul_tflops(device):
    """This GPU's dense bf16 matmul rate, measured: 8192^3 torch.mm, best of 20."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / best / 1e12


@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n, d, h, num_experts", SHAPES)
@pytest.mark.parametrize("candidate", list(CANDIDATES))
def test_moe_gpu(benchmark, device, candidate, n, d, h, num_experts, mode):
    benchmark.group = f"moe {mode} N{n}-d{d}-h{h}-E{num_experts}"
    if candidate == "torch._grouped_mm":
        _skip_unless_grouped_mm(device, backward=mode != "fwd")
    inputs = make_inputs(n, d, h, num_experts, device, requires_grad=mode != "fwd")
    bench_call(benchmark, _run(CANDIDATES[candidate], inputs, mode))
    seconds = benchmark.stats.stats.min
    tflops = _model_flops(n, d, h, mode) / seconds / 1e12
    benchmark.extra_info["TFLOP/s"] = round(tflops, 1)
    if n >= 65536:
        dense = _dense_matmul_tflops(device)
        benchmark.extra_info["dense bf16 matmul TFLOP/s"] = round(dense, 1)
        benchmark.extra_info["fraction of dense matmul rate"] = round(tflops / dense, 3)
        print(f"\n{benchmark.group} {candidate}: {tflops:.1f} TFLOP/s = {tflops / dense:.1%} of dense bf16 matmul")


@pytest.mark.parametrize("mode", MODES)
def test_moe_cpu_reference_tiny(benchmark, mode):
    """The only CPU case: the per-expert loop at a tiny shape (the Triton kernels are timed on the GPU only)."""
    benchmark.group = f"moe {mode} cpu-tiny N256-d32-h64-E4"
    inputs = make_inputs(256, 32, 64, 4, torch.device("cpu"), dtype=torch.float32, requires_grad=mode != "fwd")
    bench_call(benchmark, _run(moe_top2_reference, inputs, mode))
