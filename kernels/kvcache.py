"""Decoding with a KV cache: entmax attention and block-causal (softmax) attention of a few new queries over a cache.

Both ops follow FlashAttention's ``flash_attn_with_kvcache`` contract, with caches laid out ``(B, Hkv, Tmax, .)``:

- ``q`` (B, H, Tq, D): the new queries (Tq = 1 to decode one step, a few for a new utterance);
- ``k_cache`` (B, Hkv, Tmax, D), ``v_cache`` (B, Hkv, Tmax, Dv): Hkv divides H, query head h reads key head
  ``h // (H / Hkv)`` (grouped-query attention);
- ``cache_seqlens`` int32 (B,): the number of keys already in each batch row's cache;
- ``k`` (B, Hkv, Tq, D), ``v`` (B, Hkv, Tq, Dv), optional together: written into the caches in place at positions
  ``cache_seqlens[b] + (0 .. Tq - 1)`` before attending; the attended keys of batch row b are then its first
  ``cache_seqlens[b] + Tq`` ones, else its first ``cache_seqlens[b]``. The op does not advance ``cache_seqlens``:
  the caller does (``cache_seqlens += Tq``) once the step is accepted.

The caller must keep ``cache_seqlens[b] + Tq <= Tmax``; it is checked when ``cache_seqlens`` is on the CPU (reading
it there costs nothing), not when it is on the GPU, where checking would stall the host on every decoding step.
Both ops are forward only (inference): they run without autograd, and outputs never require grad. They run in the
caches' dtype. Under ``torch.autocast`` the caches, written in place, are not cast: ``q``, ``k`` and ``v`` are cast
to the caches' dtype (e.g. bf16 projections appended to fp32 caches), the op runs with autocast disabled, as it
would without autocast, and returns the caches' dtype. Outside autocast, every tensor must share one dtype.

``torch.compile(fullgraph=True)`` traces both ops without a graph break: the append is the torch.library op
``kernels::kvcache_append`` (mutating the caches), the Triton attention the functional ops
``kernels::entmax_attention_with_kvcache_fwd`` and ``kernels::block_causal_attention_with_kvcache_fwd`` (opaque,
with fake implementations); the reference path traces as plain PyTorch.

The Triton path (flash-decoding: the key range split across programs, no host synchronization) after the append:

- entmax: ``_entmax_decode_scores_kernel`` reads each K tile once for all G = H / Hkv query heads x Tq queries of its
  key head and writes fp32 scores to a scratch row per query (B, H, Tq, >= Tmax) with per-split row maxima;
  ``_entmax_decode_threshold_kernel`` solves each row's threshold over that scratch row (closed forms for alpha 1.5
  and 2, bracketed Newton / secant otherwise) and flags the key tiles that hold a nonzero probability;
  ``_entmax_decode_output_kernel`` accumulates ``p @ V`` per split, loading V (and the scores) only at flagged
  tiles; ``_decode_combine_kernel`` adds the splits and normalizes. K is read once; V only where p > 0.
- block-causal (softmax): ``_softmax_decode_split_kernel`` runs the online softmax over each split (K and V read
  once), ``_decode_combine_kernel`` merges the splits by their maxima and sums.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._autotune import launch
from ._checks import FLOAT_DTYPES, check_nonempty, check_same_dtype_and_device, check_scale, check_tensor
from ._triton_helpers import MAX_GRID_AXIS, dot_fp32acc, launch_device_of, upcast_dots_for
from .backend import use_triton
from .entmax import alpha_entmax, check_alpha

#: dtypes the references take (float64 for tests); the Triton kernels take ``FLOAT_DTYPES``
_REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)

Alpha = Union[float, Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks and the cache append (shared by the kernels' launchers and the references)
# ----------------------------------------------------------------------------------------------------------------


def _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, dtypes) -> None:
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, tensor, ndim=4, dtypes=dtypes)
    check_same_dtype_and_device(q=q, k_cache=k_cache, v_cache=v_cache)
    check_nonempty(q=q, k_cache=k_cache, v_cache=v_cache)
    batch, heads, tq, d = q.shape
    _, kv_heads, t_max, _ = k_cache.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must have shape (B, Hkv, Tmax, D) with q's B = {batch} and D = {d}, got "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must match k_cache in (B, Hkv, Tmax) = {tuple(k_cache.shape[:3])}, got shape "
                         f"{tuple(v_cache.shape)}")
    if heads % kv_heads:
        raise ValueError(f"the cache's heads Hkv = {kv_heads} must divide q's heads H = {heads}")
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must have dtype int32, got {str(cache_seqlens.dtype).replace('torch.', '')}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({batch},), got {tuple(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append) or both be None")
    if k is not None:
        check_tensor("k", k, ndim=4, dtypes=dtypes)
        check_tensor("v", v, ndim=4, dtypes=dtypes)
        check_same_dtype_and_device(k_cache=k_cache, k=k, v=v)
        if k.shape != (batch, kv_heads, tq, d):
            raise ValueError(f"k must have shape (B, Hkv, Tq, D) = {(batch, kv_heads, tq, d)}, got {tuple(k.shape)}")
        if v.shape != (batch, kv_heads, tq, v_cache.shape[3]):
            raise ValueError(f"v must have shape (B, Hkv, Tq, Dv) = {(batch, kv_heads, tq, v_cache.shape[3])}, got "
                             f"{tuple(v.shape)}")
    check_scale(scale)
    if cache_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        lengths = cache_seqlens.tolist()  # one read of the lengths
        shortest, longest = min(lengths), max(lengths)
        if shortest < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens.tolist()}")
        appended = tq if k is not None else 0
        if longest + appended > t_max:
            raise ValueError(f"cache_seqlens + {appended} new keys must fit the cache (Tmax = {t_max}), got "
                             f"cache_seqlens = {cache_seqlens.tolist()}")


def _cacheable(device: torch.device) -> bool:
    """Whether a constant tensor built now may be kept for later calls: not while torch.compile traces (the graph
    builds it) nor while a CUDA graph is captured (its kernels only run at replay)."""
    if torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=64)
def _cached_arange(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


def _arange(n: int, device: torch.device) -> Tensor:
    """``torch.arange(n)`` on ``device``, built once per (n, device) and only read; a decoding loop asks for the
    same ranges at every step."""
    return _cached_arange(n, device) if _cacheable(device) else torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def _cached_uniform_alpha(alpha: float, heads: int, device: torch.device) -> Tensor:
    return torch.full((heads,), alpha, device=device, dtype=torch.float32)


def _uniform_alpha(alpha: float, heads: int, device: torch.device) -> Tensor:
    """The (H,) float32 tensor of one alpha for every head, built once per (alpha, H, device) and only read."""
    if _cacheable(device):
        return _cached_uniform_alpha(alpha, heads, device)
    return torch.full((heads,), alpha, device=device, dtype=torch.float32)


def _kvcache_append(k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k: Tensor, v: Tensor) -> None:
    """Write ``k``, ``v`` (B, Hkv, Tq, .) into the caches at ``cache_seqlens[b] + (0 .. Tq - 1)`` (in place, on the
    caches' device, no host read)."""
    tq = k.shape[2]
    if _on_host(cache_seqlens):
        lengths = set(cache_seqlens.tolist())
        if len(lengths) == 1:  # rows of one length (a single stream): a slice, no scatter
            length = lengths.pop()
            k_cache[:, :, length:length + tq] = k
            v_cache[:, :, length:length + tq] = v
            return
    positions = cache_seqlens.to(device=k_cache.device, dtype=torch.int64)[:, None] \
        + _arange(tq, k_cache.device)  # (B, Tq)
    index = positions[:, None, :, None]
    k_cache.scatter_(2, index.expand(k.shape), k)
    v_cache.scatter_(2, index.expand(v.shape), v)


# The append is its own op, mutating the caches (torch.compile functionalizes it and keeps the write in place under
# inductor); the attention that follows is functional: it reads the caches after the append.
_kvcache_append_op = torch.library.custom_op(
    "kernels::kvcache_append", mutates_args=("k_cache", "v_cache"),
    schema="(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor k, Tensor v) -> ()",
)(_kvcache_append)


@_kvcache_append_op.register_fake
def _(k_cache, v_cache, cache_seqlens, k, v):
    return None


def _append_to_cache(k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k: Optional[Tensor],
                     v: Optional[Tensor]) -> Tensor:
    """Append ``k``, ``v`` when given (``kernels::kvcache_append``) and return the attended lengths (B,) int32 on the
    caches' device, contiguous: ``cache_seqlens`` plus the Tq appended keys."""
    if k is None:
        return cache_seqlens.to(device=k_cache.device).contiguous()
    _traced_as_op(_kvcache_append_op, _kvcache_append)(k_cache, v_cache, cache_seqlens, k, v)
    if cache_seqlens.device != k_cache.device:
        cache_seqlens = cache_seqlens.to(device=k_cache.device)
    return cache_seqlens + k.shape[2]


def _traced_as_op(op, implementation):
    """``op`` (a torch.library op) while torch.compile traces, else its ``implementation`` called directly: the same
    computation without the op's Python dispatch, which costs more host time than a decoding step's append."""
    return op if torch.compiler.is_compiling() else implementation


def _caches_dtype_under_autocast(fn):
    """Under ``torch.autocast`` (enabled on the caches' device), cast the floating-point ``q``, ``k``, ``v`` to the
    caches' dtype (the caches, written in place, cannot be cast) and run ``fn`` with autocast disabled, so that the
    op computes as without autocast and returns the caches' dtype; outside autocast the arguments pass unchanged."""

    @functools.wraps(fn)
    def wrapper(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, **options):
        if not isinstance(k_cache, Tensor) or not torch.is_autocast_enabled(k_cache.device.type):
            return fn(q, k_cache, v_cache, cache_seqlens, k=k, v=v, **options)

        def cast(value):
            if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != k_cache.dtype:
                return value.to(k_cache.dtype)
            return value

        with torch.autocast(k_cache.device.type, enabled=False):
            return fn(cast(q), k_cache, v_cache, cache_seqlens, k=cast(k), v=cast(v), **options)

    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

# Every split kernel has grid (n_splits, B * Hkv): program (s, b * Hkv + kv) owns keys [s * SPLIT, (s + 1) * SPLIT)
# of key head kv in batch row b (SPLIT = tiles_per_split * BN) and holds all G * Tq queries of that key head's query
# heads as the rows of one tile (row r: head kv * G + r // Tq, new query r % Tq), so each key tile is loaded once for
# the whole GQA group. Programs whose split starts at or past the row's attended length return at once. Per-row
# scratch (fp32) is indexed by ``row = (b * H + h) * Tq + i``.
_NOT_SPECIALIZED = ["H", "Hkv", "G", "Tq", "n_splits", "n_tiles", "tiles_per_split", "causal"]
#: ``ALPHA_KIND`` constexpr: the power ``y^(1 / (alpha - 1))`` in closed form for 1.5 (square) and 2 (identity)
_GENERAL_ALPHA, _ENTMAX15, _SPARSEMAX = 0, 1, 2
#: Threshold passes before the solver stops: rows converge in 1-10 passes (random rows of 30 to 32k keys, alpha 1.1
#: to 2: flat 32k-key rows are the slowest, 7 passes at 1.5, 9-10 near 2); a stalled or collapsed bracket ends it
_MAX_PASSES = 48


@triton.jit
def _group_rows(i_bkv, Hkv, G, Tq, H, BM: tl.constexpr):
    """The rows of a split program: batch row, key head, and per row [BM] its query head, new-query index, validity
    and scratch row index (int64)."""
    i_b = i_bkv // Hkv
    i_kv = i_bkv % Hkv
    o_r = tl.arange(0, BM)
    m_r = o_r < G * Tq
    i_g = o_r // Tq
    i_q = o_r % Tq
    i_h = i_kv * G + i_g
    row = (i_b.to(tl.int64) * H + i_h) * Tq + i_q
    return i_b, i_kv, i_h, i_q, m_r, row


@triton.jit
def _attended_count(length, Tq, i_q, causal):
    """Keys new query ``i_q`` sees among the ``length`` attended ones: all, or up to its own position (causal,
    bottom-right aligned)."""
    return tl.where(causal != 0, length - Tq + i_q + 1, length)


@triton.jit
def _key_tile_scores(b_q, p_k, stride_kt, stride_kd, o_n, length, D, BD: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """``q . k`` [BM, BN] fp32 of the rows ``b_q`` [BM, BD] against keys ``o_n`` (rows past ``length``: zeros)."""
    o_d = tl.arange(0, BD)
    b_k = tl.load(p_k + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :] * stride_kd,
                  mask=(o_n[:, None] < length) & (o_d[None, :] < D), other=0.0)  # [BN, BD]
    # fp32: tf32x3 keeps ~fp32 accuracy on tensor cores; 16-bit products are exact whatever the flag
    return dot_fp32acc(b_q, tl.trans(b_k), "tf32x3", UPCAST_DOTS)


@triton.jit
def _load_group_queries(q, stride_qb, stride_qh, stride_qt, stride_qd, i_b, i_h, i_q, m_r, D, BD: tl.constexpr):
    o_d = tl.arange(0, BD)
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64)[:, None] * stride_qh \
        + i_q.to(tl.int64)[:, None] * stride_qt + o_d[None, :] * stride_qd
    return tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)  # [BM, BD]


@triton.jit
def _chunked_key_tile_scores(q, stride_qb, stride_qh, stride_qt, stride_qd, i_b, i_h, i_q, m_r, p_k, stride_kt,
                             stride_kd, o_n, length, D, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                             UPCAST_DOTS: tl.constexpr):
    """:func:`_key_tile_scores` of a head wider than one tile: D in chunks of BD, the queries' chunks reloaded per
    key tile (they stay in cache), each chunk of K loaded once."""
    b_s = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        b_q = _load_group_queries(q + d0 * stride_qd, stride_qb, stride_qh, stride_qt, stride_qd, i_b, i_h, i_q, m_r,
                                  D - d0, BD)
        b_s += _key_tile_scores(b_q, p_k + d0 * stride_kd, stride_kt, stride_kd, o_n, length, D - d0, BD,
                                UPCAST_DOTS)
    return b_s


@triton.jit
def _entmax_power(b_y, b_gamma, ALPHA_KIND: tl.constexpr):
    """``y^gamma`` for ``y >= 0`` (0 at 0), ``gamma = 1 / (alpha - 1)``: a square for entmax-1.5, y for sparsemax."""
    if ALPHA_KIND == 1:
        b_p = b_y * b_y
    elif ALPHA_KIND == 2:
        b_p = b_y
    else:
        b_p = tl.where(b_y > 0, tl.exp2(b_gamma * tl.log2(tl.where(b_y > 0, b_y, 1.0))), 0.0)
    return b_p


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _entmax_decode_scores_kernel(q, k_cache, lengths, scores, split_max,
                                 stride_qb, stride_qh, stride_qt, stride_qd,
                                 stride_kb, stride_kh, stride_kt, stride_kd,
                                 H, Hkv, G, Tq, D, W, n_splits, tiles_per_split, scale, causal,
                                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST_DOTS: tl.constexpr,
                                 D_CHUNKED: tl.constexpr):
    """Scores ``scale * q . k`` (B, H, Tq, W) fp32, ``-inf`` at hidden keys, of the keys of one split (each key tile
    read once for the G * Tq rows of its GQA group), and each row's maximum over the split, split_max
    (B * H * Tq, n_splits) fp32. D_CHUNKED: D in chunks of BD (else D <= BD, the queries held whole)."""
    i_s, i_bkv = tl.program_id(0), tl.program_id(1)
    i_b, i_kv, i_h, i_q, m_r, row = _group_rows(i_bkv, Hkv, G, Tq, H, BM)
    length = tl.load(lengths + i_b)
    start = i_s * tiles_per_split * BN
    if start < length:
        if not D_CHUNKED:
            b_q = _load_group_queries(q, stride_qb, stride_qh, stride_qt, stride_qd, i_b, i_h, i_q, m_r, D, BD)
        p_k = k_cache + i_b.to(tl.int64) * stride_kb + i_kv.to(tl.int64) * stride_kh
        n_row = _attended_count(length, Tq, i_q, causal)  # [BM]
        b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
        for n0 in range(start, tl.minimum(start + tiles_per_split * BN, length), BN):
            o_n = n0 + tl.arange(0, BN)
            if D_CHUNKED:
                b_s = _chunked_key_tile_scores(q, stride_qb, stride_qh, stride_qt, stride_qd, i_b, i_h, i_q, m_r,
                                               p_k, stride_kt, stride_kd, o_n, length, D, BM, BN, BD,
                                               UPCAST_DOTS) * scale
            else:
                b_s = _key_tile_scores(b_q, p_k, stride_kt, stride_kd, o_n, length, D, BD, UPCAST_DOTS) * scale
            b_s = tl.where(o_n[None, :] < n_row[:, None], b_s, float("-inf"))  # [BM, BN]
            tl.store(scores + row[:, None] * W + o_n[None, :], b_s, mask=m_r[:, None])
            b_max = tl.maximum(b_max, tl.max(b_s, 1))
        tl.store(split_max + row * n_splits + i_s, b_max, mask=m_r)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _entmax_decode_threshold_kernel(scores, split_max, lengths, alpha, rowmax, tau, rowsum, flags,
                                    H, Tq, W, n_splits, n_tiles, tiles_per_split, causal,
                                    ALPHA_KIND: tl.constexpr, MAX_PASSES: tl.constexpr, BT: tl.constexpr,
                                    BN: tl.constexpr, BS: tl.constexpr):
    """Per row (grid: B * H * Tq), the threshold of alpha-entmax over its scores (the scratch row, not K): with
    ``x = (alpha - 1) (s - rowmax)``, tau solves ``f(tau) = sum_j [x_j - tau]_+^gamma = 1``, ``gamma = 1 / (alpha -
    1)``; the root lies in ``[-1, -n^(1 - alpha)]`` (n keys seen). Each pass over the row evaluates f and f' at the
    bracket's left end lo and f at its right end hi; on ``g = f^(alpha - 1)`` (convex and decreasing) Newton from lo
    is a lower bound, the secant of the bracket an upper bound. On the support S = {x > lo}, entmax-1.5 also gets the smaller root of
    ``sum_S (x - t)^2 = 1`` and sparsemax ``(sum_S x - 1) / |S|`` (its Newton step): exact once no x of S falls
    below it. Other alpha iterate to fp32 rounding. Stores rowmax, tau (relative to rowmax, scaled by alpha - 1),
    rowsum = f(tau) + 1 (the output divides by it) and flags (B * H * Tq, n_tiles) int8: 1 where a BN-key tile
    holds a nonzero probability. Rows that see no key store nothing."""
    row = tl.program_id(0).to(tl.int64)
    i_b = row // (H * Tq)
    i_h = (row // Tq) % H
    i_q = row % Tq
    length = tl.load(lengths + i_b)
    n = _attended_count(length, Tq, i_q, causal)
    if n > 0:
        split_len = tiles_per_split * BN
        b_smax = tl.full([BS], float("-inf"), dtype=tl.float32)
        for s0 in range(0, tl.cdiv(n, split_len), BS):
            o_s = s0 + tl.arange(0, BS)
            b_smax = tl.maximum(b_smax, tl.load(split_max + row * n_splits + o_s, mask=o_s * split_len < n,
                                                other=float("-inf")))
        s_max = tl.max(b_smax, 0)
        a_1 = tl.load(alpha + i_h) - 1.0
        gamma = 1.0 / a_1
        p_s = scores + row * W
        lo = tl.full([], -1.0, dtype=tl.float32)
        hi = -tl.exp2(-a_1 * tl.log2(n.to(tl.float32)))
        done = hi <= lo  # one key: tau = -1 exactly
        i_pass = 0
        while (i_pass < MAX_PASSES) & (done == 0):
            b_f_lo = tl.zeros([BT], dtype=tl.float32)
            b_df_lo = tl.zeros([BT], dtype=tl.float32)
            b_f_hi = tl.zeros([BT], dtype=tl.float32)
            b_cnt = tl.zeros([BT], dtype=tl.float32)
            b_a1 = tl.zeros([BT], dtype=tl.float32)
            b_umin = tl.full([BT], float("inf"), dtype=tl.float32)
            for n0 in range(0, n, BT):
                o_n = n0 + tl.arange(0, BT)
                b_x = a_1 * (tl.load(p_s + o_n, mask=o_n < n, other=float("-inf")) - s_max)
                b_u = b_x - lo
                m_on = b_u > 0
                b_y = tl.where(m_on, b_u, 0.0)
                b_p = _entmax_power(b_y, gamma, ALPHA_KIND)
                b_f_lo += b_p
                b_df_lo += tl.where(m_on, gamma * b_p / tl.where(m_on, b_y, 1.0), 0.0)
                b_f_hi += _entmax_power(tl.maximum(b_x - hi, 0.0), gamma, ALPHA_KIND)
                b_cnt += m_on.to(tl.float32)
                b_a1 += b_y
                b_umin = tl.minimum(b_umin, tl.where(m_on, b_u, float("inf")))
            f_lo = tl.sum(b_f_lo, 0) - 1.0  # >= 0: lo is a lower bound (up to rounding)
            df_lo = tl.sum(b_df_lo, 0)
            f_hi = tl.sum(b_f_hi, 0) - 1.0  # <= 0
            cnt = tl.sum(b_cnt, 0)
            a1 = tl.sum(b_a1, 0)
            u_min = tl.min(b_umin, 0)
            # Newton and the secant on g = (f + 1)^(alpha - 1), a norm of [x - t]_+: convex and decreasing like f but
            # nearly linear (exactly so on equal scores), so that flat rows take a few passes, not a dozen
            g_lo = tl.exp2(a_1 * tl.log2(f_lo + 1.0))
            g_hi = tl.exp2(a_1 * tl.log2(f_hi + 1.0))
            new_lo = lo + (g_lo - 1.0) * (f_lo + 1.0) / (a_1 * g_lo * df_lo)  # a lower bound
            g_drop = tl.where(g_lo > g_hi, g_lo - g_hi, 1.0)
            new_hi = tl.where(g_lo > g_hi, lo + (g_lo - 1.0) * (hi - lo) / g_drop, hi)  # an upper bound
            exact = False  # other alpha: no closed form
            solution = lo
            if ALPHA_KIND == 1:
                # smaller root of sum_S (u - t)^2 = 1, rationalized so that it does not cancel as f -> 0; an upper
                # bound when S is wider than the root's support, the root when it is not
                disc = a1 * a1 - cnt * f_lo
                delta = f_lo / (a1 + tl.sqrt(tl.maximum(disc, 0.0)))
                exact = (disc >= 0) & (u_min >= delta) & (f_lo >= 0)
                solution = lo + delta
                new_hi = tl.where(disc >= 0, tl.minimum(new_hi, solution), new_hi)
            if ALPHA_KIND == 2:
                exact = (u_min >= f_lo / cnt) & (f_lo >= 0)  # the Newton step kept its support
                solution = new_lo
            new_hi = tl.minimum(new_hi, hi)
            stalled = (f_lo <= 0) | (new_lo <= lo) | (new_hi <= new_lo) | (f_hi >= 0)
            lo = tl.where(exact, solution, tl.where(f_hi >= 0, hi, tl.where(f_lo <= 0, lo, new_lo)))
            hi = new_hi
            done = exact | stalled
            i_pass += 1
        # the last pass over the row: f(tau) + 1 (the normalizer) and the tiles holding a nonzero probability
        b_sum = tl.zeros([BT], dtype=tl.float32)
        for n0 in range(0, n, BT):
            o_n = n0 + tl.arange(0, BT)
            b_x = a_1 * (tl.load(p_s + o_n, mask=o_n < n, other=float("-inf")) - s_max)
            b_p = _entmax_power(tl.maximum(b_x - lo, 0.0), gamma, ALPHA_KIND)
            b_sum += b_p
            b_hit = tl.max(tl.reshape((b_p > 0).to(tl.int32), [BT // BN, BN]), 1)  # [BT // BN]
            o_t = n0 // BN + tl.arange(0, BT // BN)
            tl.store(flags + row * n_tiles + o_t, b_hit.to(tl.int8), mask=o_t * BN < n)
        tl.store(rowmax + row, s_max)
        tl.store(tau + row, lo)
        tl.store(rowsum + row, tl.sum(b_sum, 0))


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _entmax_decode_output_kernel(scores, v_cache, lengths, alpha, rowmax, tau, flags, partial,
                                 stride_vb, stride_vh, stride_vt, stride_vd,
                                 H, Hkv, G, Tq, Dv, W, n_splits, n_tiles, tiles_per_split, causal,
                                 ALPHA_KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BDV: tl.constexpr,
                                 UPCAST_DOTS: tl.constexpr):
    """Partial outputs ``sum_j p_j v_j`` over one split, partial (B * H * Tq, n_splits, Dv) fp32 (unnormalized:
    the combine kernel divides by rowsum), features [i * BDV, (i + 1) * BDV) in program (s, b * Hkv + kv, i). A key
    tile that no row of the group flags is skipped: neither its scores nor its V tile are loaded."""
    i_s, i_bkv, i_dv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_kv, i_h, i_q, m_r, row = _group_rows(i_bkv, Hkv, G, Tq, H, BM)
    length = tl.load(lengths + i_b)
    start = i_s * tiles_per_split * BN
    if start < length:
        n_row = _attended_count(length, Tq, i_q, causal)  # [BM]
        m_seen = m_r & (n_row > 0)
        b_max = tl.load(rowmax + row, mask=m_seen, other=0.0)
        b_tau = tl.load(tau + row, mask=m_seen, other=0.0)
        b_a1 = tl.load(alpha + i_h, mask=m_r, other=2.0) - 1.0
        b_gamma = 1.0 / b_a1
        p_v = v_cache + i_b.to(tl.int64) * stride_vb + i_kv.to(tl.int64) * stride_vh
        o_dv = i_dv * BDV + tl.arange(0, BDV)
        b_o = tl.zeros([BM, BDV], dtype=tl.float32)
        for n0 in range(start, tl.minimum(start + tiles_per_split * BN, length), BN):
            b_flag = tl.load(flags + row * n_tiles + n0 // BN, mask=m_r & (n0 < n_row), other=0)
            if tl.max(b_flag, 0) > 0:  # tiles of zero probabilities: no scores, no V
                o_n = n0 + tl.arange(0, BN)
                m_vis = m_r[:, None] & (o_n[None, :] < n_row[:, None])
                b_s = tl.load(scores + row[:, None] * W + o_n[None, :], mask=m_vis, other=float("-inf"))
                b_y = tl.maximum(b_a1[:, None] * (b_s - b_max[:, None]) - b_tau[:, None], 0.0)
                b_p = _entmax_power(b_y, b_gamma[:, None], ALPHA_KIND)  # [BM, BN]
                b_v = tl.load(p_v + o_n.to(tl.int64)[:, None] * stride_vt + o_dv[None, :] * stride_vd,
                              mask=(o_n[:, None] < length) & (o_dv[None, :] < Dv), other=0.0)  # [BN, BDV]
                b_o += dot_fp32acc(b_p.to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
        tl.store(partial + (row * n_splits + i_s)[:, None] * Dv + o_dv[None, :], b_o,
                 mask=m_r[:, None] & (o_dv[None, :] < Dv))


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _softmax_decode_split_kernel(q, k_cache, v_cache, lengths, partial, split_max, split_sum,
                                 stride_qb, stride_qh, stride_qt, stride_qd,
                                 stride_kb, stride_kh, stride_kt, stride_kd,
                                 stride_vb, stride_vh, stride_vt, stride_vd,
                                 H, Hkv, G, Tq, D, Dv, n_splits, tiles_per_split, scale_log2,
                                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                                 UPCAST_DOTS: tl.constexpr, D_CHUNKED: tl.constexpr):
    """Flash-decoding's split: over one split's keys (all visible to every new query), the online softmax's running
    maximum split_max and sum split_sum (B * H * Tq, n_splits) fp32 (base 2) and the unnormalized partial output
    partial (B * H * Tq, n_splits, Dv) fp32, each K and V tile loaded once for the GQA group's G * Tq rows.
    Program (s, b * Hkv + kv, i) writes features [i * BDV, (i + 1) * BDV) of the partial output (and the maximum and
    sum, the same in every chunk's program): a Dv wider than BDV reads K once per chunk. D_CHUNKED: D in chunks of BD
    (:func:`_chunked_key_tile_scores`)."""
    i_s, i_bkv, i_dv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_kv, i_h, i_q, m_r, row = _group_rows(i_bkv, Hkv, G, Tq, H, BM)
    length = tl.load(lengths + i_b)
    start = i_s * tiles_per_split * BN
    if start < length:
        if not D_CHUNKED:
            b_q = _load_group_queries(q, stride_qb, stride_qh, stride_qt, stride_qd, i_b, i_h, i_q, m_r, D, BD)
        p_k = k_cache + i_b.to(tl.int64) * stride_kb + i_kv.to(tl.int64) * stride_kh
        p_v = v_cache + i_b.to(tl.int64) * stride_vb + i_kv.to(tl.int64) * stride_vh
        o_dv = i_dv * BDV + tl.arange(0, BDV)
        b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_o = tl.zeros([BM, BDV], dtype=tl.float32)
        for n0 in range(start, tl.minimum(start + tiles_per_split * BN, length), BN):
            o_n = n0 + tl.arange(0, BN)
            if D_CHUNKED:
                b_s = _chunked_key_tile_scores(q, stride_qb, stride_qh, stride_qt, stride_qd, i_b, i_h, i_q, m_r,
                                               p_k, stride_kt, stride_kd, o_n, length, D, BM, BN, BD,
                                               UPCAST_DOTS) * scale_log2
            else:
                b_s = _key_tile_scores(b_q, p_k, stride_kt, stride_kd, o_n, length, D, BD, UPCAST_DOTS) * scale_log2
            b_s = tl.where(o_n[None, :] < length, b_s, float("-inf"))  # [BM, BN]
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # finite: the split's first key is attended
            b_rescale = tl.exp2(b_m - b_m_new)
            b_p = tl.exp2(b_s - b_m_new[:, None])
            b_l = b_l * b_rescale + tl.sum(b_p, 1)
            b_v = tl.load(p_v + o_n.to(tl.int64)[:, None] * stride_vt + o_dv[None, :] * stride_vd,
                          mask=(o_n[:, None] < length) & (o_dv[None, :] < Dv), other=0.0)  # [BN, BDV]
            b_o = b_o * b_rescale[:, None] + dot_fp32acc(b_p.to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
            b_m = b_m_new
        tl.store(split_max + row * n_splits + i_s, b_m, mask=m_r)  # every Dv chunk's program: the same values
        tl.store(split_sum + row * n_splits + i_s, b_l, mask=m_r)
        tl.store(partial + (row * n_splits + i_s)[:, None] * Dv + o_dv[None, :], b_o,
                 mask=m_r[:, None] & (o_dv[None, :] < Dv))


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _decode_combine_kernel(partial, split_max, split_sum, rowsum, lengths, o,
                           H, Tq, Dv, n_splits, tiles_per_split, causal,
                           SOFTMAX: tl.constexpr, BN: tl.constexpr, BDV: tl.constexpr):
    """o (B, H, Tq, Dv), contiguous, per row (grid: B * H * Tq) from the partial outputs of the splits that hold
    the row's attended keys: softmax rescales each by ``2^(split_max - max)`` and divides by the rescaled
    split_sum; entmax adds them and divides by rowsum. Rows that see no key are zeros. Grid (B * H * Tq,
    cdiv(Dv, BDV)): program (row, i) writes features [i * BDV, (i + 1) * BDV)."""
    row = tl.program_id(0).to(tl.int64)
    i_b = row // (H * Tq)
    i_q = row % Tq
    n = _attended_count(tl.load(lengths + i_b), Tq, i_q, causal)
    o_dv = tl.program_id(1) * BDV + tl.arange(0, BDV)
    m_dv = o_dv < Dv
    b_o = tl.zeros([BDV], dtype=tl.float32)
    if n > 0:
        used = tl.cdiv(n, tiles_per_split * BN)
        p_part = partial + row * n_splits * Dv
        if SOFTMAX:
            m_all = tl.load(split_max + row * n_splits)
            for i_s in range(1, used):
                m_all = tl.maximum(m_all, tl.load(split_max + row * n_splits + i_s))
            l_all = tl.full([], 0.0, dtype=tl.float32)
            for i_s in range(0, used):
                weight = tl.exp2(tl.load(split_max + row * n_splits + i_s) - m_all)
                l_all += weight * tl.load(split_sum + row * n_splits + i_s)
                b_o += weight * tl.load(p_part + i_s * Dv + o_dv, mask=m_dv, other=0.0)
            b_o = b_o / l_all
        else:
            for i_s in range(0, used):
                b_o += tl.load(p_part + i_s * Dv + o_dv, mask=m_dv, other=0.0)
            b_o = b_o / tl.load(rowsum + row)
    tl.store(o + row * Dv + o_dv, b_o.to(o.dtype.element_ty), mask=m_dv)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


class DecodeTiles(NamedTuple):
    """Block sizes of the decoding kernels. ``block_n`` keys per tile (the unit of skipping); the threshold kernel
    reads a row's scores in chunks of ``block_t`` (a multiple of ``block_n``). ``tiles_per_split`` (None: chosen
    from the GPU's SM count so that about ``programs_per_sm`` split programs run per SM) tiles per split. A head of
    at most ``whole_d`` features (D or Dv) is one tile; a wider one goes in chunks of ``block_d``: D in a loop
    (K still read once), Dv over a third grid axis (V read once; the softmax split reads K once per Dv chunk)."""

    block_n: int
    block_t: int
    num_warps: int  # split and combine kernels, heads wider than 64
    threshold_num_warps: int
    narrow_num_warps: int = 4  # split and combine kernels, heads of at most 64 features
    programs_per_sm: int = 4
    tiles_per_split: Optional[int] = None
    whole_d: int = 128
    block_d: int = 128

    def split_warps(self, width: int) -> int:
        """Warps of the split and combine kernels whose widest head tile is ``width``."""
        return self.num_warps if width > 64 else self.narrow_num_warps


#: 64-key tiles for 16-bit caches (8 warps for heads wider than 64, else 4), 32-key tiles in 4 warps for fp32: with
#: 16 group rows every kernel compiles without spills for sm_80 and sm_90 at D = Dv = 128 and 64 (ptxas,
#: ``aot_configurations``): the split kernels hold 72-248 registers per thread (the general-alpha output kernel the
#: most; 16-bit ones spill 16-116 bytes at D 128 in 4 warps, 4 bytes at D 64 on sm_90 in 8), the threshold kernel
#: 64-96, the combine kernel 22-32. Heads wider than 128 go in chunks of 128 features (16-bit) or 64 (fp32: its
#: softmax split spills 8-184 bytes with 128-feature chunks of D, whose score loop holds a query and a key chunk).
_DEFAULT_TILES = {
    torch.float16: DecodeTiles(block_n=64, block_t=1024, num_warps=8, threshold_num_warps=4),
    torch.bfloat16: DecodeTiles(block_n=64, block_t=1024, num_warps=8, threshold_num_warps=4),
    torch.float32: DecodeTiles(block_n=32, block_t=1024, num_warps=4, threshold_num_warps=4, block_d=64),
}
#: Tests set tiny tiles here so that short caches cover several splits, skipped tiles and the reduction.
_TILE_OVERRIDE: Optional[DecodeTiles] = None
_SPLIT_MAXIMA_BLOCK = 64  # BS: split maxima read at once by the threshold kernel


def _decode_tiles(dtype: torch.dtype) -> DecodeTiles:
    return _TILE_OVERRIDE if _TILE_OVERRIDE is not None else _DEFAULT_TILES[dtype]


class _Splits(NamedTuple):
    """How the key range [0, Tmax) is cut: ``n_splits`` splits of ``tiles_per_split`` tiles of ``block_n`` keys;
    ``width`` = n_splits * tiles_per_split * block_n >= Tmax (the scratch rows' width), ``n_tiles`` its tiles."""

    n_splits: int
    tiles_per_split: int
    width: int
    n_tiles: int


@functools.lru_cache(maxsize=256)
def _splits(t_max: int, programs: int, device: torch.device, tiles: DecodeTiles) -> _Splits:
    """Enough splits that ``programs`` (B * Hkv) x splits fill the GPU; decided from Tmax, not from the lengths,
    which stay on the device (cached: a decoding loop calls with the same shapes at every step)."""
    n_tiles = triton.cdiv(t_max, tiles.block_n)
    if tiles.tiles_per_split is not None:
        per_split = tiles.tiles_per_split
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        n_splits = max(1, min(n_tiles, triton.cdiv(tiles.programs_per_sm * sms, programs)))
        per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, per_split)
    return _Splits(n_splits, per_split, n_splits * per_split * tiles.block_n, n_splits * per_split)


def _dim_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _head_block(d: int, tiles: DecodeTiles) -> int:
    """The tile of a head of ``d`` features: the whole head up to ``tiles.whole_d``, else chunks of ``block_d``."""
    return _dim_block(d) if d <= tiles.whole_d else tiles.block_d


def _alpha_kind(alpha: Alpha) -> int:
    if isinstance(alpha, Tensor):
        return _GENERAL_ALPHA
    return {1.5: _ENTMAX15, 2.0: _SPARSEMAX}.get(float(alpha), _GENERAL_ALPHA)


@functools.lru_cache(maxsize=None)
def _config(num_warps: int) -> tuple:
    return (triton.Config({}, num_warps=num_warps, num_stages=1),)


def _combine(partial, split_max, split_sum, rowsum, lengths, shape, dtype, splits: _Splits, causal: bool,
             softmax: bool, tiles: DecodeTiles, device) -> Tensor:
    batch, heads, tq, dv = shape
    out = torch.empty(shape, dtype=dtype, device=device)
    block_dv = _head_block(dv, tiles)
    launch(_decode_combine_kernel, lambda meta: (batch * heads * tq, triton.cdiv(dv, block_dv)),
           (partial, split_max, split_sum, rowsum, lengths, out, heads, tq, dv, splits.n_splits,
            splits.tiles_per_split, int(causal)),
           dict(SOFTMAX=softmax, BN=tiles.block_n, BDV=block_dv), _config(tiles.split_warps(block_dv)),
           device=device)
    return out


def _entmax_decode(q, k_cache, v_cache, lengths, alpha: Alpha, causal: bool, scale: float) -> Tensor:
    """The Triton path of :func:`entmax_attention_with_kvcache` after the append (``lengths``: the attended ones,
    int32 on the device): scores, thresholds, outputs of the splits, combine. Four launches, no host read of the
    lengths."""
    batch, heads, tq, d = q.shape
    _, kv_heads, t_max, dv = v_cache.shape
    groups = heads // kv_heads
    device = q.device
    tiles = _decode_tiles(q.dtype)
    splits = _splits(t_max, batch * kv_heads, device, tiles)
    if isinstance(alpha, Tensor):
        alpha_heads = alpha.to(device=device, dtype=torch.float32)
    else:
        alpha_heads = _uniform_alpha(float(alpha), heads, device)
    kind = _alpha_kind(alpha)
    rows = batch * heads * tq
    block_m = _dim_block(groups * tq)
    block_d, block_dv = _head_block(d, tiles), _head_block(dv, tiles)
    upcast = upcast_dots_for(q.dtype)
    scores = torch.empty(batch, heads, tq, splits.width, dtype=torch.float32, device=device)
    split_max = torch.empty(rows, splits.n_splits, dtype=torch.float32, device=device)
    rowmax, tau, rowsum = (torch.empty(rows, dtype=torch.float32, device=device) for _ in range(3))
    flags = torch.empty(rows, splits.n_tiles, dtype=torch.int8, device=device)
    partial = torch.empty(rows, splits.n_splits, dv, dtype=torch.float32, device=device)
    grid = (splits.n_splits, batch * kv_heads)
    common = (heads, kv_heads, groups, tq)
    with launch_device_of(q):
        launch(_entmax_decode_scores_kernel, lambda meta: grid,
               (q, k_cache, lengths, scores, split_max, *q.stride(), *k_cache.stride(), *common, d, splits.width,
                splits.n_splits, splits.tiles_per_split, scale, int(causal)),
               dict(BM=block_m, BN=tiles.block_n, BD=block_d, UPCAST_DOTS=upcast, D_CHUNKED=d > tiles.whole_d),
               _config(tiles.split_warps(block_d)), device=device)
        launch(_entmax_decode_threshold_kernel, lambda meta: (rows,),
               (scores, split_max, lengths, alpha_heads, rowmax, tau, rowsum, flags, heads, tq, splits.width,
                splits.n_splits, splits.n_tiles, splits.tiles_per_split, int(causal)),
               dict(ALPHA_KIND=kind, MAX_PASSES=_MAX_PASSES, BT=tiles.block_t, BN=tiles.block_n,
                    BS=_SPLIT_MAXIMA_BLOCK), _config(tiles.threshold_num_warps), device=device)
        launch(_entmax_decode_output_kernel, lambda meta: (*grid, triton.cdiv(dv, block_dv)),
               (scores, v_cache, lengths, alpha_heads, rowmax, tau, flags, partial, *v_cache.stride(), *common, dv,
                splits.width, splits.n_splits, splits.n_tiles, splits.tiles_per_split, int(causal)),
               dict(ALPHA_KIND=kind, BM=block_m, BN=tiles.block_n, BDV=block_dv, UPCAST_DOTS=upcast),
               _config(tiles.split_warps(block_dv)), device=device)
        return _combine(partial, split_max, split_max, rowsum, lengths, (batch, heads, tq, dv), v_cache.dtype,
                        splits, causal, False, tiles, device)


def _softmax_decode(q, k_cache, v_cache, lengths, scale: float) -> Tensor:
    """The Triton path of :func:`block_causal_attention_with_kvcache` after the append: flash-decoding's splits,
    then the combine. Two launches, no host read of the lengths."""
    batch, heads, tq, d = q.shape
    _, kv_heads, t_max, dv = v_cache.shape
    groups = heads // kv_heads
    device = q.device
    tiles = _decode_tiles(q.dtype)
    splits = _splits(t_max, batch * kv_heads, device, tiles)
    rows = batch * heads * tq
    block_d, block_dv = _head_block(d, tiles), _head_block(dv, tiles)
    split_max, split_sum = (torch.empty(rows, splits.n_splits, dtype=torch.float32, device=device)
                            for _ in range(2))
    partial = torch.empty(rows, splits.n_splits, dv, dtype=torch.float32, device=device)
    with launch_device_of(q):
        launch(_softmax_decode_split_kernel,
               lambda meta: (splits.n_splits, batch * kv_heads, triton.cdiv(dv, block_dv)),
               (q, k_cache, v_cache, lengths, partial, split_max, split_sum, *q.stride(), *k_cache.stride(),
                *v_cache.stride(), heads, kv_heads, groups, tq, d, dv, splits.n_splits, splits.tiles_per_split,
                scale * _LOG2E),
               dict(BM=_dim_block(groups * tq), BN=tiles.block_n, BD=block_d, BDV=block_dv,
                    UPCAST_DOTS=upcast_dots_for(q.dtype), D_CHUNKED=d > tiles.whole_d),
               _config(tiles.split_warps(max(block_d, block_dv))), device=device)
        return _combine(partial, split_max, split_sum, split_sum, lengths, (batch, heads, tq, dv), v_cache.dtype,
                        splits, False, True, tiles, device)


# torch.library ops of the Triton path (opaque to torch.compile, with fake implementations), after the append: they
# read the caches and the attended lengths (B,) int32 on the caches' device and mutate nothing.
@torch.library.custom_op("kernels::entmax_attention_with_kvcache_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? alpha_heads, "
                                "float alpha, bool causal, float scale) -> Tensor")
def _entmax_decode_op(q, k_cache, v_cache, lengths, alpha_heads, alpha, causal, scale):
    """:func:`_entmax_decode` with ``alpha_heads`` (H,) per-head values, or None: ``alpha`` for every head."""
    return _entmax_decode(q, k_cache, v_cache, lengths, alpha if alpha_heads is None else alpha_heads, causal, scale)


@_entmax_decode_op.register_fake
def _(q, k_cache, v_cache, lengths, alpha_heads, alpha, causal, scale):
    return v_cache.new_empty((*q.shape[:3], v_cache.shape[3]))


@torch.library.custom_op("kernels::block_causal_attention_with_kvcache_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor")
def _softmax_decode_op(q, k_cache, v_cache, lengths, scale):
    return _softmax_decode(q, k_cache, v_cache, lengths, scale)


@_softmax_decode_op.register_fake
def _(q, k_cache, v_cache, lengths, scale):
    return v_cache.new_empty((*q.shape[:3], v_cache.shape[3]))


_LOG2E = 1.4426950408889634


def _check_kernel_arguments(k_cache: Tensor) -> None:
    """The kernels put B * Hkv on grid axis 1."""
    batch_kv_heads = k_cache.shape[0] * k_cache.shape[1]
    if batch_kv_heads > MAX_GRID_AXIS:
        raise ValueError(f"the caches have B * Hkv = {batch_kv_heads} batch-heads; the Triton kernels take at most "
                         f"{MAX_GRID_AXIS}")


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def _on_host(lengths: Tensor) -> bool:
    """Whether the lengths may be read on the host: CPU tensors outside torch.compile (no device sync)."""
    return lengths.device.type == "cpu" and not torch.compiler.is_compiling()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The references' arithmetic: float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without the call when x has that dtype (the references run once per decoding step)."""
    return x if x.dtype == dtype else x.to(dtype)


def _attend_whole_caches(lengths: Tensor, v_cache: Tensor) -> bool:
    """Whether every row attends all the caches' Tmax positions (read on the host, :func:`_on_host`; a stream passes
    views of the attended positions): no mask and no unwritten position then."""
    return _on_host(lengths) and all(length == v_cache.shape[2] for length in lengths.tolist())


def _visible_keys(lengths: Tensor, tq: int, t_max: int, causal: bool) -> Tensor:
    """(B, 1, Tq, Tmax) bool: key j is attended by new query i of batch row b: ``j < lengths[b]`` and, when causal
    (bottom-right aligned), ``j <= lengths[b] - Tq + i``."""
    j = _arange(t_max, lengths.device)
    length = lengths.to(torch.int64)[:, None, None]
    visible = (j < length).expand(-1, tq, -1)
    if causal:
        i = _arange(tq, lengths.device)[:, None]
        visible = visible & (j <= length - tq + i)
    return visible[:, None]


def _masked_scores(q: Tensor, k_cache: Tensor, visible: Optional[Tensor], scale: Optional[float],
                   compute: torch.dtype):
    """(B, H, Tq, Tmax) scores ``q k^T * scale`` of each query head against its key head, ``-inf`` where hidden
    (``visible`` None: every key visible)."""
    groups = q.shape[1] // k_cache.shape[1]
    keys = _as_dtype(k_cache, compute)
    keys = keys if groups == 1 else keys.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (_as_dtype(q, compute) @ keys.transpose(-1, -2)) * scale
    return scores if visible is None else scores.masked_fill(~visible, float("-inf"))


def _weighted_values(weights: Tensor, v_cache: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """``weights @ v`` per key head group, with cache rows beyond ``lengths`` (never written, maybe NaN) as zeros
    (``lengths`` None: every position is written)."""
    groups = weights.shape[1] // v_cache.shape[1]
    values = _as_dtype(v_cache, weights.dtype)
    if lengths is not None:
        written = _arange(v_cache.shape[2], v_cache.device) < lengths.to(torch.int64)[:, None]
        values = torch.where(written[:, None, :, None], values, 0.0)
    return weights @ (values if groups == 1 else values.repeat_interleave(groups, dim=1))


def _entmax_weights(scores: Tensor, alpha: Alpha, masked: bool = True) -> Tensor:
    """alpha-entmax of the masked scores along the last dimension (B, H, Tq, keys); rows that see no key are zeros
    (``masked`` False: no score is masked)."""
    row_alpha = alpha.to(scores.dtype)[:, None, None] if isinstance(alpha, Tensor) else alpha
    weights = alpha_entmax(scores, row_alpha)
    return torch.where(torch.isfinite(scores).any(-1, keepdim=True), weights, 0.0) if masked else weights


def _entmax_attend_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, alpha: Alpha,
                             causal: bool, scale: Optional[float]) -> Tensor:
    """The reference after the append (``lengths``: the attended ones): dense masked scores over the whole cache."""
    compute = _compute_dtype(q.dtype)
    whole = _attend_whole_caches(lengths, v_cache)
    # the whole caches attended, one query per row (or no causal mask): every key visible, nothing to mask
    unmasked = whole and (q.shape[2] == 1 or not causal)
    visible = None if unmasked else _visible_keys(lengths, q.shape[2], k_cache.shape[2], causal)
    scores = _masked_scores(q, k_cache, visible, scale, compute)
    weights = _entmax_weights(scores, alpha.to(q.device) if isinstance(alpha, Tensor) else alpha, masked=not unmasked)
    return _as_dtype(_weighted_values(weights, v_cache, None if whole else lengths), v_cache.dtype)


def _softmax_attend_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                              scale: Optional[float]) -> Tensor:
    """The softmax reference after the append: every attended key is visible."""
    compute = _compute_dtype(q.dtype)
    if _attend_whole_caches(lengths, v_cache):  # nothing to mask: one fused attention
        return _as_dtype(torch.nn.functional.scaled_dot_product_attention(
            _as_dtype(q, compute), _as_dtype(k_cache, compute), _as_dtype(v_cache, compute), scale=scale,
            enable_gqa=q.shape[1] != k_cache.shape[1]), v_cache.dtype)
    visible = _visible_keys(lengths, q.shape[2], k_cache.shape[2], causal=False)
    scores = _masked_scores(q, k_cache, visible, scale, compute)
    weights = torch.where(visible, scores.softmax(dim=-1), 0.0)  # rows that see no key: zeros, not NaN
    return _as_dtype(_weighted_values(weights, v_cache, lengths), v_cache.dtype)


@_caches_dtype_under_autocast
@torch.no_grad()
def entmax_attention_with_kvcache_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                                            k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                            alpha: Alpha = 1.5, causal: bool = True,
                                            scale: Optional[float] = None) -> Tensor:
    """:func:`entmax_attention_with_kvcache` in plain PyTorch: the cache append, then dense masked scores over the
    whole cache, computed in float32 (float64 for float64 inputs) and returned in v_cache's dtype."""
    _check_entmax_arguments(q, k_cache, v_cache, cache_seqlens, k, v, alpha, causal, scale, _REFERENCE_DTYPES)
    lengths = _append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    return _entmax_attend_reference(q, k_cache, v_cache, lengths, alpha, causal, scale)


@_caches_dtype_under_autocast
@torch.no_grad()
def block_causal_attention_with_kvcache_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                                                  *, k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                                  scale: Optional[float] = None) -> Tensor:
    """:func:`block_causal_attention_with_kvcache` in plain PyTorch: the cache append, then a softmax over every
    attended key, computed in float32 (float64 for float64 inputs) and returned in v_cache's dtype."""
    _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, _REFERENCE_DTYPES)
    lengths = _append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    return _softmax_attend_reference(q, k_cache, v_cache, lengths, scale)


def _check_entmax_arguments(q, k_cache, v_cache, cache_seqlens, k, v, alpha, causal, scale, dtypes) -> None:
    _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, dtypes)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_alpha(alpha, q.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
# Each argument check runs once per call: the public functions check, then run the append and the reference's or
# the kernels' attention (not the checked public references).


@_caches_dtype_under_autocast
@torch.no_grad()
def entmax_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                                  k: Optional[Tensor] = None, v: Optional[Tensor] = None, alpha: Alpha = 1.5,
                                  causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """alpha-entmax attention of the new queries ``q`` (B, H, Tq, D) over a KV cache (see the module docstring for
    the layout, the in-place append of ``k``/``v``, ``cache_seqlens`` and autocast). Returns (B, H, Tq, Dv) in the
    caches' dtype.

    With L_b attended keys in batch row b, new query i sees key j iff ``j < L_b`` and, when ``causal``
    (bottom-right aligned, as when the Tq queries are the last Tq positions), ``j <= L_b - Tq + i``; a query that
    sees no key returns zeros. ``alpha``: a float in (1, 2] (1.5: entmax-1.5, 2: sparsemax) or an (H,) tensor of
    per-head values; ``scale`` defaults to ``D ** -0.5``. Forward only (no autograd), no host synchronization.
    """
    _check_entmax_arguments(q, k_cache, v_cache, cache_seqlens, k, v, alpha, causal, scale, FLOAT_DTYPES)
    kernels = use_triton(q, k_cache, v_cache)
    if kernels:
        _check_kernel_arguments(k_cache)
    lengths = _append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    if not kernels:
        return _entmax_attend_reference(q, k_cache, v_cache, lengths, alpha, causal, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not torch.compiler.is_compiling():
        return _entmax_decode(q, k_cache, v_cache, lengths, alpha, causal, scale)  # _traced_as_op
    if isinstance(alpha, Tensor):
        return _entmax_decode_op(q, k_cache, v_cache, lengths, alpha, 0.0, causal, scale)
    return _entmax_decode_op(q, k_cache, v_cache, lengths, None, float(alpha), causal, scale)


@_caches_dtype_under_autocast
@torch.no_grad()
def block_causal_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                                        k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                        scale: Optional[float] = None) -> Tensor:
    """Block-causal (softmax) attention of one new group of Tq queries ``q`` (B, H, Tq, D) over a KV cache (see the
    module docstring for the layout, the in-place append of ``k``/``v``, ``cache_seqlens`` and autocast): every new
    query sees every attended key, i.e. all cached keys and the group's own Tq keys, as the last group of
    :func:`kernels.block_causal_attention` with ``group_size = Tq`` does. Returns (B, H, Tq, Dv) in the caches'
    dtype; a query that sees no key returns zeros. Forward only (no autograd), no host synchronization.
    """
    _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, FLOAT_DTYPES)
    kernels = use_triton(q, k_cache, v_cache)
    if kernels:
        _check_kernel_arguments(k_cache)
    lengths = _append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    if not kernels:
        return _softmax_attend_reference(q, k_cache, v_cache, lengths, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _traced_as_op(_softmax_decode_op, _softmax_decode)(q, k_cache, v_cache, lengths, scale)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INPUT_POINTERS = ("q", "k_cache", "v_cache", "o")
_FP32_POINTERS = ("scores", "split_max", "split_sum", "rowmax", "tau", "rowsum", "partial", "alpha")
_FLOAT_SCALARS = ("scale", "scale_log2")
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd")
#: head sizes of the compiled variants (BD = BDV; 128 is the default set, 64 CaM-HG's and small models') and the GQA
#: group's rows (G * Tq <= 16)
_AOT_HEAD_DIMS = (128, 64)
_AOT_GROUP_ROWS = 16


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, tuple]:
    """(signature, the arguments a launch on aligned tensors specializes as multiples of 16: pointers and the
    batch, head and row strides of q and the caches)."""
    signature, aligned = {}, []
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INPUT_POINTERS:
            signature[name] = f"*{dtype}"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name == "lengths":
            signature[name] = "*i32"
        elif name == "flags":
            signature[name] = "*i8"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name == "W" or (name.startswith("stride_") and name[-1] in "bht"):
            aligned.append(name)
    return signature, tuple(aligned)


def aot_configurations() -> list:
    """Every decoding kernel x dtype x constexpr variant a launch with G * Tq <= 16 makes on a GPU (one
    configuration per kernel: no autotuning), for sm_80 and sm_90, with the unit feature strides and the
    16-divisibility of pointers and strides that dense, aligned tensors get, at head sizes 128 and 64 (wider heads
    run the 128-feature variants, the score loops' D_CHUNKED ones). ``default``
    (the tests' quick subset): the bfloat16 variants of D 128 and the threshold kernels of 64-key tiles."""
    configs = []
    for torch_dtype, dtype in _TRITON_DTYPES.items():
        t = _DEFAULT_TILES[torch_dtype]
        head = dict(BM=_AOT_GROUP_ROWS, BN=t.block_n, UPCAST_DOTS=False)
        for width in _AOT_HEAD_DIMS:
            # (label, kernel, constexprs, default)
            default = torch_dtype == torch.bfloat16 and width == _AOT_HEAD_DIMS[0]
            variants = []
            for chunked in (False, True) if width == t.block_d else (False,):  # wider heads: chunks of block_d
                variants += [
                    (f"scores D_CHUNKED={chunked}", _entmax_decode_scores_kernel,
                     dict(head, BD=width, D_CHUNKED=chunked), default),
                    (f"softmax split D_CHUNKED={chunked}", _softmax_decode_split_kernel,
                     dict(head, BD=width, BDV=width, D_CHUNKED=chunked), default),
                ]
            for kind in (_GENERAL_ALPHA, _ENTMAX15, _SPARSEMAX):
                variants.append((f"output alpha{kind}", _entmax_decode_output_kernel,
                                 dict(head, BDV=width, ALPHA_KIND=kind), default))
            for softmax in (False, True):
                variants.append((f"combine softmax={softmax}", _decode_combine_kernel,
                                 dict(SOFTMAX=softmax, BN=t.block_n, BDV=width), default))
            for label, kernel, constexprs, default in variants:
                num_warps = t.split_warps(width)
                configs.append(_aot_config(f"{label} {dtype} D{width} BN={t.block_n} w{num_warps}", kernel, dtype,
                                           constexprs, num_warps, default))
        if torch_dtype != torch.float16:  # scratch in fp32, no head size: the threshold kernel depends on BN alone
            for kind in (_GENERAL_ALPHA, _ENTMAX15, _SPARSEMAX):
                constexprs = dict(ALPHA_KIND=kind, MAX_PASSES=_MAX_PASSES, BT=t.block_t, BN=t.block_n,
                                  BS=_SPLIT_MAXIMA_BLOCK)
                configs.append(_aot_config(f"threshold alpha{kind} BN={t.block_n} w{t.threshold_num_warps}",
                                           _entmax_decode_threshold_kernel, dtype, constexprs,
                                           t.threshold_num_warps, torch_dtype == torch.bfloat16))
    return configs


def _aot_config(label: str, kernel, dtype: str, constexprs: dict, num_warps: int, default: bool):
    from .aot import AotConfig

    # dense q and caches: a launch specializes their unit feature strides as the constexpr 1
    constexprs = {**constexprs, **{name: 1 for name in _UNIT_STRIDES if name in kernel.arg_names}}
    signature, aligned = _signature(kernel, dtype, constexprs)
    return AotConfig(label, kernel, signature, constexprs, num_warps=num_warps, num_stages=1, divisible=aligned,
                     default=default)
