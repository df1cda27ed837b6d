"""Benchmarks of causal entmax-1.5 attention: ours vs the reference, the ``entmax`` package on dense scores,
AdaSplash (``adasplash``, GPU) and SDPA's flash causal softmax (the speed ceiling), forward and forward+backward.

Each ``benchmark.group`` is one (mode, shape); its members are the candidates. On a CPU only the tiny
reference-vs-entmax case runs; every GPU case skips with a reason. Run: ``pytest bench/ --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_call, requires_cuda
from kernels import FusedEntmaxCausalAttention, entmax15_attention, reference, use_backend

#: (B, H, T, D): the models' shapes (dialogues of <= 110 utterances) and long sequences
MODEL_SHAPES = [(32, 1, 110, 512), (32, 1, 110, 1024), (32, 8, 110, 64)]
LONG_SHAPES = [(4, 16, 1024, 64), (4, 8, 4096, 64), (2, 8, 4096, 128), (1, 8, 16384, 64), (1, 8, 32768, 64)]
GPU_SHAPES = [pytest.param(s, id="B{}-H{}-T{}-D{}".format(*s)) for s in MODEL_SHAPES + LONG_SHAPES]
MODES = [pytest.param(False, id="fwd"), pytest.param(True, id="fwd+bwd")]
GPU_DTYPE = torch.bfloat16


def _dense_entmax(q, k, v):
    """``entmax.entmax15`` on the dense masked scores in the inputs' dtype: the package peer."""
    import entmax

    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return entmax.entmax15(scores, dim=-1) @ v


def _reference(q, k, v):
    return reference.entmax15_attention_reference(q, k, v)


def _ours(q, k, v):
    with use_backend("triton"):
        return entmax15_attention(q, k, v)


def _adasplash(q, k, v):
    from adasplash import adasplash

    return adasplash(q, k, v, is_causal=True)


def _skip_unless_adasplash_runs(shape):
    pytest.importorskip("adasplash", reason="AdaSplash (PyPI adasplash) is not installed")
    _, _, t, d = shape
    if t & (t - 1) or not 16 <= d <= 256 or d & (d - 1):
        pytest.skip(f"AdaSplash takes power-of-two T and head dims 16-256, not T={t}, D={d}")


def _sdpa_flash(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


CANDIDATES = {"ours": _ours, "reference": _reference, "entmax": _dense_entmax, "adasplash": _adasplash,
              "sdpa-flash": _sdpa_flash}


def _inputs(shape, device, dtype, backward):
    b, h, t, d = shape
    generator = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(b, h, t, d, device=device, dtype=dtype, generator=generator).requires_grad_(backward)
            for _ in range(3)]


def _run(benchmark, fn, q, k, v, backward):
    def step():
        out = fn(q, k, v)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    try:
        bench_call(benchmark, step)
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory at this shape: {str(error).splitlines()[0]}")


@requires_cuda
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("candidate", list(CANDIDATES))
def test_entmax_attention_gpu(benchmark, device, candidate, shape, backward):
    benchmark.group = "entmax15_attention {} B{}-H{}-T{}-D{} bf16".format(
        "fwd+bwd" if backward else "fwd", *shape)
    if candidate == "adasplash":
        _skip_unless_adasplash_runs(shape)
    q, k, v = _inputs(shape, device, GPU_DTYPE, backward)
    _run(benchmark, CANDIDATES[candidate], q, k, v, backward)


@requires_cuda
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("embed_dim", [512, 1024])
@pytest.mark.parametrize("fused", [pytest.param(True, id="ours"), pytest.param(False, id="reference")])
def test_entmax_module_with_context_gpu(benchmark, device, fused, embed_dim, backward):
    """CARN's use: one head over 512/1024 features, with the causal context from the same call."""
    benchmark.group = "FusedEntmaxCausalAttention {} B32-T110-E{} context bf16".format(
        "fwd+bwd" if backward else "fwd", embed_dim)
    cls = FusedEntmaxCausalAttention if fused else reference.EntmaxCausalAttention
    module = cls(embed_dim, num_heads=1, out_proj=False).to(device=device, dtype=GPU_DTYPE)
    x = torch.randn(32, 110, embed_dim, device=device, dtype=GPU_DTYPE, requires_grad=backward)

    def step():
        out = module(x, return_context=True)
        if backward:
            (out.output.float().sum() + out.context.float().sum()).backward()
        return out

    bench_call(benchmark, step)


@pytest.mark.parametrize("candidate", ["reference", "entmax"])
def test_entmax_attention_tiny_cpu(benchmark, candidate):
    """The one case that also runs on a CPU (reference side only; Triton kernels are timed on GPUs)."""
    benchmark.group = "entmax15_attention fwd+bwd B2-H2-T32-D16 fp32 cpu"
    q, k, v = _inputs((2, 2, 32, 16), torch.device("cpu"), torch.float32, True)
    _run(benchmark, CANDIDATES[candidate], q, k, v, True)

