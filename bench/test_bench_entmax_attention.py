"""Benchmarks of causal entmax-1.5 attention: ours vs the reference, the ``entmax`` package on dense scores,
AdaSplash-2 (``adasplash``, GPU) and SDPA's flash causal softmax (the speed ceiling), forward and forward+backward;
then grouped-query heads and query chunks against a longer key history (vs SDPA with ``enable_gqa``), and other
alpha (1.25, 2: vs ``entmax.entmax_bisect`` / ``entmax.sparsemax`` on dense scores and AdaSplash v1's any-alpha
kernel where installed).

Each ``benchmark.group`` is one (mode, shape); its members are the candidates. AdaSplash takes power-of-two
lengths: at the dialogues' T = 110 it gets inputs already padded to 128 with ``varlen`` = 110 (padding untimed).
On a CPU only the tiny reference-vs-entmax case runs; every GPU case skips with a reason. Run:
``pytest bench/ --benchmark-only``. The budgeted run (``BENCH_QUICK=1``, bench/gpu.sh) times ``QUICK_SHAPES`` and the
dense candidates up to T = 4096 only.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_call, requires_cuda, skip_in_quick_run
from kernels import FusedEntmaxCausalAttention, entmax15_attention, entmax_attention, reference, use_backend

#: (B, H, T, D): the models' shapes (dialogues of <= 110 utterances; CARN's head is 256 wide) and long sequences
MODEL_SHAPES = [(32, 1, 110, 256), (32, 8, 110, 64), (32, 1, 110, 512), (32, 1, 110, 1024)]
LONG_SHAPES = [(4, 16, 1024, 64), (4, 8, 4096, 64), (2, 8, 4096, 128), (1, 8, 16384, 64), (1, 8, 32768, 64)]
QUICK_SHAPES = [(32, 1, 110, 256), (32, 8, 110, 64), (4, 8, 4096, 64), (2, 8, 4096, 128), (1, 8, 16384, 64)]
#: candidates that form the T x T matrix: the budgeted run times them up to this length
DENSE_CANDIDATES, QUICK_DENSE_MAX_T = ("reference", "entmax"), 4096
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


def _adasplash(q, k, v, varlen=None):
    from adasplash import adasplash

    return adasplash(q, k, v, is_causal=True, varlen=varlen)


#: the candidates that are packages of their own, which a Python environment may lack: a case of one that is not
#: installed skips (with the reason), it does not fail
PEER_PACKAGES = {"entmax": "the entmax package (PyPI entmax) is not installed",
                 "adasplash": "AdaSplash (PyPI adasplash) is not installed"}


def skip_unless_installed(candidate: str) -> None:
    """Skip the case when ``candidate`` is a peer package (``PEER_PACKAGES``) that this Python cannot import."""
    if candidate in PEER_PACKAGES:
        pytest.importorskip(candidate, reason=PEER_PACKAGES[candidate])


def _skip_unless_adasplash_runs(shape):
    d = shape[3]
    if not 16 <= d <= 256 or d & (d - 1):
        pytest.skip(f"AdaSplash takes head dims 16, 32, ..., 256, not D={d}")


def _adasplash_padded(shape, device, dtype, backward):
    """AdaSplash at a T that is no power of two: q, k, v padded to the next one (at least 64) beforehand, the true
    length passed as ``varlen``. Returns the call and its inputs."""
    b, _, t, _ = shape
    padded_t = max(64, 1 << (t - 1).bit_length())
    q, k, v = _inputs(shape[:2] + (padded_t,) + shape[3:], device, dtype, backward)
    varlen = torch.full((b,), t, dtype=torch.int32, device=device)
    return (lambda q, k, v: _adasplash(q, k, v, varlen)), (q, k, v)


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
    skip_in_quick_run(shape in QUICK_SHAPES, f"shapes other than {QUICK_SHAPES}")
    skip_in_quick_run(candidate not in DENSE_CANDIDATES or shape[2] <= QUICK_DENSE_MAX_T,
                      f"{DENSE_CANDIDATES} beyond T = {QUICK_DENSE_MAX_T}")
    skip_unless_installed(candidate)
    if candidate == "adasplash":
        _skip_unless_adasplash_runs(shape)
    t = shape[2]
    if candidate == "adasplash" and (t & (t - 1) or t < 64):
        fn, (q, k, v) = _adasplash_padded(shape, device, GPU_DTYPE, backward)
    else:
        fn, (q, k, v) = CANDIDATES[candidate], _inputs(shape, device, GPU_DTYPE, backward)
    _run(benchmark, fn, q, k, v, backward)


@requires_cuda
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("embed_dim, dtype", [pytest.param(256, torch.float32, id="E256-fp32"),
                                              pytest.param(1024, torch.bfloat16, id="E1024-bf16")])
@pytest.mark.parametrize("fused", [pytest.param(True, id="ours"), pytest.param(False, id="reference")])
def test_entmax_module_with_context_gpu(benchmark, device, fused, embed_dim, dtype, backward):
    """CARN's use: one head over the hidden state (256 wide in fp32, as carn/model.py trains; 1024 in bf16), with
    the causal context from the same call."""
    benchmark.group = "FusedEntmaxCausalAttention {} B32-T110-E{} context {}".format(
        "fwd+bwd" if backward else "fwd", embed_dim, str(dtype).replace("torch.", ""))
    cls = FusedEntmaxCausalAttention if fused else reference.EntmaxCausalAttention
    module = cls(embed_dim, num_heads=1, out_proj=False).to(device=device, dtype=dtype)
    x = torch.randn(32, 110, embed_dim, device=device, dtype=dtype, requires_grad=backward)

    def step():
        out = module.forward_with_context(x)
        if backward:
            (out.output.float().sum() + out.context.float().sum()).backward()
        return out

    bench_call(benchmark, step)


@pytest.mark.parametrize("candidate", ["reference", "entmax"])
def test_entmax_attention_tiny_cpu(benchmark, candidate):
    """The one case that also runs on a CPU (reference side only; Triton kernels are timed on GPUs)."""
    benchmark.group = "entmax15_attention fwd+bwd B2-H2-T32-D16 fp32 cpu"
    skip_unless_installed(candidate)
    q, k, v = _inputs((2, 2, 32, 16), torch.device("cpu"), torch.float32, True)
    _run(benchmark, CANDIDATES[candidate], q, k, v, True)



#: (B, H, Hkv, Tq, Tk, D): grouped-query prefill, and a chunk of queries against a longer history (chunked prefill)
GQA_SHAPES = [pytest.param((4, 16, 4, 4096, 4096, 64), id="B4-H16-Hkv4-T4096-D64"),
              pytest.param((1, 16, 4, 512, 8192, 64), id="B1-H16-Hkv4-Tq512-Tk8192-D64")]


def _gqa_inputs(shape, device, dtype, backward):
    b, h, h_kv, t_q, t_k, d = shape
    generator = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(b, heads, t, d, device=device, dtype=dtype, generator=generator).requires_grad_(backward)
            for heads, t in ((h, t_q), (h_kv, t_k), (h_kv, t_k))]


def _sdpa_flash_gqa(q, k, v):
    """SDPA's causal softmax with grouped-query heads, aligned bottom-right as ours (an explicit mask when Tq != Tk:
    SDPA's ``is_causal`` aligns top-left)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _ours_gqa(q, k, v):
    with use_backend("triton"):
        return entmax_attention(q, k, v)


@requires_cuda
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("shape", GQA_SHAPES)
@pytest.mark.parametrize("candidate", ["ours", "sdpa"])
def test_entmax_attention_grouped_heads_gpu(benchmark, device, candidate, shape, backward):
    benchmark.group = "entmax_attention GQA {} B{}-H{}-Hkv{}-Tq{}-Tk{}-D{} bf16".format(
        "fwd+bwd" if backward else "fwd", *shape)
    fn = _ours_gqa if candidate == "ours" else _sdpa_flash_gqa
    _run(benchmark, fn, *_gqa_inputs(shape, device, GPU_DTYPE, backward), backward)


ALPHAS = [pytest.param(1.25, id="alpha1.25"), pytest.param(2.0, id="alpha2")]
ALPHA_SHAPES = [pytest.param((4, 8, 1024, 64), id="B4-H8-T1024-D64"),
                pytest.param((32, 8, 110, 64), id="B32-H8-T110-D64")]


def _dense_alpha_entmax(q, k, v, alpha):
    """The ``entmax`` package on the dense masked scores: ``entmax_bisect`` (``sparsemax`` at alpha = 2)."""
    import entmax

    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    weights = entmax.sparsemax(scores, dim=-1) if alpha == 2 else entmax.entmax_bisect(scores, alpha, dim=-1)
    return weights @ v


def _adasplash_v1(q, k, v, alpha):
    """AdaSplash's any-alpha kernel (its Halley-bisection threshold)."""
    from adasplash import adasplash

    return adasplash(q, k, v, alpha=alpha, is_causal=True)


@requires_cuda
@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("shape", ALPHA_SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("candidate", ["ours", "reference", "entmax", "adasplash"])
def test_entmax_attention_other_alpha_gpu(benchmark, device, candidate, alpha, shape, backward):
    benchmark.group = "entmax_attention alpha={} {} B{}-H{}-T{}-D{} bf16".format(
        alpha, "fwd+bwd" if backward else "fwd", *shape)
    if candidate == "adasplash":
        _skip_unless_adasplash_runs(shape)
        if shape[2] & (shape[2] - 1):
            pytest.skip("AdaSplash takes power-of-two lengths")
    fns = {"ours": lambda q, k, v: _ours_alpha(q, k, v, alpha),
           "reference": lambda q, k, v: reference.entmax_attention_reference(q, k, v, alpha=alpha),
           "entmax": lambda q, k, v: _dense_alpha_entmax(q, k, v, alpha),
           "adasplash": lambda q, k, v: _adasplash_v1(q, k, v, alpha)}
    _run(benchmark, fns[candidate], *_inputs(shape, device, GPU_DTYPE, backward), backward)


def _ours_alpha(q, k, v, alpha):
    with use_backend("triton"):
        return entmax_attention(q, k, v, alpha=alpha)
