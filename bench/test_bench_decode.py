"""Benchmarks of decoding with a KV cache: one step of entmax-1.5 attention (Tq = 1) and of block-causal attention
(a new group of Tq = 3 queries) over caches of up to 32k keys with grouped-query heads, ours vs the references and
the softmax speed ceilings: SDPA over the attended keys (``enable_gqa``) and FlexAttention's decoding kernel
(``torch.nn.attention.flex_attention``, compiled), where available.

Each step appends the new keys and values at ``cache_seqlens`` = T - Tq (the same slots every round: the caches stay
the same) and attends to T keys. Each ``benchmark.group`` is one (op, shape); its members are the candidates. On a
CPU only the tiny reference case runs; every GPU case skips with a reason. Run: ``pytest bench/test_bench_decode.py
--benchmark-only``. The budgeted run (``BENCH_QUICK=1``, bench/gpu.sh) times ``QUICK_SHAPES`` only and the dense
reference up to T = 4096.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_call, requires_cuda, skip_in_quick_run
from kernels import block_causal_attention_with_kvcache, entmax_attention_with_kvcache, reference, use_backend

#: (B, H, Hkv, T, D): CaM-HG-like dialogue caches, and LLM-like GQA caches up to 32k keys
SHAPES = [(32, 8, 8, 512, 64), (1, 32, 8, 4096, 128), (8, 32, 8, 4096, 128), (1, 32, 8, 32768, 128),
          (8, 32, 8, 32768, 128)]
QUICK_SHAPES = [(32, 8, 8, 512, 64), (8, 32, 8, 4096, 128), (1, 32, 8, 32768, 128)]
QUICK_REFERENCE_MAX_T = 4096
GPU_SHAPES = [pytest.param(s, id="B{}-H{}-Hkv{}-T{}-D{}".format(*s)) for s in SHAPES]
GPU_DTYPE = torch.bfloat16
#: new queries per step: one token (entmax decoding), one utterance's group of nodes (block-causal)
ENTMAX_TQ, BLOCK_TQ = 1, 3


def _inputs(shape, tq, device, dtype):
    """q (B, H, Tq, D), caches (B, Hkv, T, D) holding T - Tq keys, new k, v (B, Hkv, Tq, D), cache_seqlens."""
    b, h, h_kv, t, d = shape
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype, generator=generator)

    q, k_cache, v_cache = randn(b, h, tq, d), randn(b, h_kv, t, d), randn(b, h_kv, t, d)
    k, v = randn(b, h_kv, tq, d), randn(b, h_kv, tq, d)
    return q, k_cache, v_cache, k, v, torch.full((b,), t - tq, dtype=torch.int32, device=device)


def _ours(op, q, k_cache, v_cache, k, v, seqlens):
    with use_backend("triton"):
        return op(q, k_cache, v_cache, seqlens, k=k, v=v)


def _reference(op, q, k_cache, v_cache, k, v, seqlens):
    return op(q, k_cache, v_cache, seqlens, k=k, v=v)


def _sdpa(q, k_cache, v_cache, k, v, seqlens):
    """Softmax over all T keys after the same append (every new query sees every key: no mask)."""
    t = k_cache.shape[2]
    k_cache[:, :, t - k.shape[2]:] = k
    v_cache[:, :, t - v.shape[2]:] = v
    return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(q, k_cache, v_cache, k, v, seqlens):
    t = k_cache.shape[2]
    k_cache[:, :, t - k.shape[2]:] = k
    v_cache[:, :, t - v.shape[2]:] = v
    return _compiled_flex()(q, k_cache, v_cache, enable_gqa=True)


CANDIDATES = {
    "entmax": {"ours": functools.partial(_ours, entmax_attention_with_kvcache),
               "reference": functools.partial(_reference, reference.entmax_attention_with_kvcache_reference)},
    "block_causal": {"ours": functools.partial(_ours, block_causal_attention_with_kvcache),
                     "reference": functools.partial(_reference,
                                                    reference.block_causal_attention_with_kvcache_reference)},
}
PEERS = {"sdpa": _sdpa, "flex": _flex}


def _run(benchmark, fn, inputs, peer: bool):
    try:
        bench_call(benchmark, lambda: fn(*inputs))
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory at this shape: {str(error).splitlines()[0]}")
    except Exception as error:  # a peer that does not take this shape (e.g. FlexAttention's decoding limits)
        if not peer:
            raise
        pytest.skip(f"{type(error).__name__} from the peer at this shape: {str(error).splitlines()[0][:300]}")


@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("candidate", ["ours", "reference", "sdpa", "flex"])
@pytest.mark.parametrize("op", ["entmax", "block_causal"])
def test_decode_gpu(benchmark, device, op, candidate, shape):
    tq = ENTMAX_TQ if op == "entmax" else BLOCK_TQ
    benchmark.group = "{} decode Tq{} B{}-H{}-Hkv{}-T{}-D{} bf16".format(op, tq, *shape)
    skip_in_quick_run(shape in QUICK_SHAPES, f"shapes other than {QUICK_SHAPES}")
    skip_in_quick_run(candidate != "reference" or shape[3] <= QUICK_REFERENCE_MAX_T,
                      f"the dense reference beyond T = {QUICK_REFERENCE_MAX_T}")
    if candidate == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention", reason="FlexAttention needs torch >= 2.5")
    fn = PEERS.get(candidate) or CANDIDATES[op][candidate]
    _run(benchmark, fn, _inputs(shape, tq, device, GPU_DTYPE), peer=candidate in PEERS)


@pytest.mark.parametrize("op", ["entmax", "block_causal"])
def test_decode_reference_cpu(benchmark, op):
    """The references on a tiny cache (CPU): what runs without a GPU."""
    tq = ENTMAX_TQ if op == "entmax" else BLOCK_TQ
    benchmark.group = f"{op} decode Tq{tq} B2-H4-Hkv2-T128-D32 fp32 (CPU)"
    inputs = _inputs((2, 4, 2, 128, 32), tq, "cpu", torch.float32)
    bench_call(benchmark, lambda: CANDIDATES[op]["reference"](*inputs))
