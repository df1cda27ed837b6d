"""Block-causal softmax attention (docs/design.md sections 1 and 3): Triton forward and backward, references, modules.

Query i may see key j iff ``j // G <= i // G`` (G = ``group_size``; G = 1 is causal attention). Flash-attention
style: the forward keeps an online softmax per query row and saves the log-sum-exp (natural log, fp32); the
backward recomputes the probabilities tile by tile. Key tiles are classified per query tile (and query tiles per
key tile in the dK/dV kernel) as fully visible (no element mask), partial (element mask) or hidden (outside the
loop bounds, never loaded).

Two layouts share the kernels: padded ``(B, H, T, D)`` and packed variable-length ``(total, H, D)`` with
``cu_seqlens``; a runtime flag picks where a sequence starts and how long it is, so one compiled kernel serves both.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl
from torch import nn

from ._checks import (check_mha_unsupported, check_nonempty, check_same_dtype_and_device, check_scale, check_tensor,
                      checked_cu_seqlens)
from ._triton_helpers import (check_batch_heads, dot_fp32acc, fp32_dot_precision, launch_device_of, tma_launch,
                              tma_scratch, upcast_dots_for)
from ._autotune import ARCH_CAPABILITY, aot_candidates, launch, launch_arch, pick, shape_bucket
from ._amp import autocast_op
from ._packing import pack_padding, sequence_ids
from .backend import use_triton

#: largest head dimension (of q/k and of v) the kernels take: one head row must fit in a register tile
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Layout-neutral: a sequence starts at row `bos` of a (batch, time, head, dim)-strided tensor; padded
# inputs have bos = 0 and length T, packed inputs stride_b = 0 and bos = cu_seqlens[i_b].
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _sequence_bounds(cu_seqlens, i_b, T, is_varlen):
    """(first row, length) of sequence i_b."""
    if is_varlen:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        seqlen = (tl.load(cu_seqlens + i_b + 1) - bos).to(tl.int32)
    else:
        bos = tl.zeros([], dtype=tl.int64)
        # a tensor even when the launcher specialized T == 1 to a constant: both branches must agree in type
        seqlen = tl.zeros([], dtype=tl.int32) + T
    return bos, seqlen


@triton.jit
def _store_nan_rows(p, stride_t, n_rows, width, BM: tl.constexpr, BD: tl.constexpr):
    """NaN into rows [0, n_rows) (none when n_rows <= 0) of the (rows, width) array at p (row stride stride_t, unit
    feature stride; a vector is width 1, stride 1)."""
    o_i = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    b_nan = tl.full([BM, BD], float("nan"), dtype=tl.float32).to(p.dtype.element_ty)
    for r0 in range(0, n_rows, BM):
        tl.store(p + o_i[:, None] * stride_t + o_d[None, :], b_nan,
                 mask=((r0 + o_i) < n_rows)[:, None] & (o_d < width)[None, :])
        p += BM * stride_t


@triton.jit
def _sequence_descriptor(p, seqlen, width, stride_t, ROWS: tl.constexpr, BD: tl.constexpr):
    """TMA descriptor of one sequence's (seqlen, width) rows at p (row stride stride_t, unit feature stride),
    loading (ROWS, BD) tiles: rows past the sequence and columns past width read as zeros, as the masked pointer
    loads do. Needs p and stride_t 16-byte aligned (the launchers check: ``_uses_tma``)."""
    return tl.make_tensor_descriptor(p, shape=[seqlen, width], strides=[stride_t, 1], block_shape=[ROWS, BD])


# Runtime sizes and flags, and the strides of the (B, H, T) row statistics (T in disguise): never specialized, so that
# no sequence length or value 1 makes a variant of its own. D and DV are left specializable: a head dim divisible by
# 16 (all real ones) lets the head-dim mask stay constant over 16 lanes, so 16-bit tiles load as 16-byte vectors and
# stream through async copies (cp.async, TMA); with a runtime-opaque D the mask split every 16-bit load to 2 bytes,
# which no async copy takes.
_NOT_SPECIALIZED = ["T", "H", "G", "is_varlen", "stride_lb", "stride_lh"]


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def block_causal_attn_fwd_kernel(
    q, k, v, o, lse, cu_seqlens,
    scale, T, H, G, D, DV, is_varlen,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One program per (query tile, batch * head): o = softmax(mask(q k^T * scale)) v and the row log-sum-exp."""
    # heaviest query tiles (they see the most keys) first, so the last wave is short
    i_m, i_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    bos, seqlen = _sequence_bounds(cu_seqlens, i_b, T, is_varlen)
    m0 = i_m * BM
    if m0 >= seqlen:
        return
    m1 = tl.minimum(m0 + BM, seqlen)
    # int64 row offsets (row x stride may pass 2^31); offsets inside a tile stay int32
    row0 = bos + m0
    q += i_b * stride_qb + row0 * stride_qt + i_h * stride_qh
    k += i_b * stride_kb + bos * stride_kt + i_h * stride_kh
    v += i_b * stride_vb + bos * stride_vt + i_h * stride_vh
    o += i_b * stride_ob + row0 * stride_ot + i_h * stride_oh
    lse += i_b * stride_lb + row0 + i_h * stride_lh

    o_i = tl.arange(0, BM)  # rows of the tile
    o_j = tl.arange(0, BN)  # keys of a key tile
    o_m = m0 + o_i
    o_d = tl.arange(0, BD)
    m_m = o_m < seqlen
    m_d, m_dv = o_d < D, o_d < DV
    b_q = tl.load(q + o_i[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.)
    qk_scale = scale * 1.4426950408889634  # scores in log2 units: exp2 is the fast path
    b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)

    # keys below (m0 // G + 1) * G are visible to every row of the tile; keys from the hidden start on to none
    n_visible_end = (tl.minimum((m0 // G + 1) * G, seqlen) // BN) * BN
    n_hidden_start = tl.minimum(((m1 - 1) // G + 1) * G, seqlen)
    if USE_TMA:
        k_desc = _sequence_descriptor(k, seqlen, D, stride_kt, BN, BD)
        v_desc = _sequence_descriptor(v, seqlen, DV, stride_vt, BN, BD)
    # one loop over visible and partial tiles (two loops compile ~1.5x slower): only partial tiles build a mask;
    # every row sees key 0, in the first tile, so b_max is finite after it and no row gets NaN
    p_k, p_v = k, v  # the key tile's first row: 64-bit pointers advance, offsets inside a tile stay int32
    for n0 in range(0, n_hidden_start, BN):
        o_n = n0 + o_j
        m_n = o_n < seqlen
        if USE_TMA:
            b_kt = tl.trans(k_desc.load([n0, 0]))  # [BD, BN]: a transposed view of the tile in shared memory
            b_v = v_desc.load([n0, 0])  # [BN, BD]
        else:
            b_kt = tl.load(p_k + o_j[None, :] * stride_kt + o_d[:, None], mask=m_d[:, None] & m_n[None, :],
                           other=0.)  # [BD, BN]
            b_v = tl.load(p_v + o_j[:, None] * stride_vt + o_d[None, :], mask=m_n[:, None] & m_dv[None, :],
                          other=0.)  # [BN, BD]
        b_s = dot_fp32acc(b_q, b_kt, DOT_PRECISION, UPCAST_DOTS) * qk_scale  # [BM, BN]
        if n0 >= n_visible_end:
            m_allowed = ((o_n[None, :] // G) <= (o_m[:, None] // G)) & m_n[None, :]
            b_s = tl.where(m_allowed, b_s, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_max_new[:, None])
        b_alpha = tl.exp2(b_max - b_max_new)
        b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + dot_fp32acc(b_p.to(b_v.dtype), b_v, DOT_PRECISION, UPCAST_DOTS)
        b_max = b_max_new
        p_k += BN * stride_kt
        p_v += BN * stride_vt

    b_o = b_acc / b_sum[:, None]
    tl.store(o + o_i[:, None] * stride_ot + o_d[None, :], b_o.to(o.dtype.element_ty),
             mask=m_m[:, None] & m_dv[None, :])
    tl.store(lse + o_i, (b_max + tl.log2(b_sum)) * 0.6931471805599453, mask=m_m)
    if i_m == tl.num_programs(0) - 1:
        # a sequence longer than the grid (max_seqlen below its length on unchecked offsets): the last tile's
        # program makes the rows that no program reaches NaN, so they never read as stale memory
        _store_nan_rows(o + BM * stride_ot, stride_ot, seqlen - m1, DV, BM, BD)
        _store_nan_rows(lse + BM, 1, seqlen - m1, 1, BM, BD)


@triton.jit
def _dq_key_tile(b_q, b_lse, k_desc, v_desc, p_k, p_v, n0, n_visible_end, o_j, o_d, o_m, m_d, m_dv, seqlen,
                 stride_kt, stride_vt, qk_scale, G, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """Key tile n0 of a pass of the dQ kernel: K and V transposed, [BD, BN] each (through the descriptors with
    ``USE_TMA``, else from the tile's first rows ``p_k``, ``p_v``), and the probabilities P [BM, BN] of the rows
    (log2-unit ``b_lse``), zero on the keys the block-causal mask hides."""
    o_n = n0 + o_j
    m_n = o_n < seqlen
    if USE_TMA:
        b_kt = tl.trans(k_desc.load([n0, 0]))
        b_vt = tl.trans(v_desc.load([n0, 0]))
    else:
        b_kt = tl.load(p_k + o_j[None, :] * stride_kt + o_d[:, None], mask=m_d[:, None] & m_n[None, :], other=0.)
        b_vt = tl.load(p_v + o_j[None, :] * stride_vt + o_d[:, None], mask=m_dv[:, None] & m_n[None, :], other=0.)
    b_p = tl.exp2(dot_fp32acc(b_q, b_kt, DOT_PRECISION, UPCAST_DOTS) * qk_scale - b_lse[:, None])
    if n0 >= n_visible_end:
        m_allowed = ((o_n[None, :] // G) <= (o_m[:, None] // G)) & m_n[None, :]
        b_p = tl.where(m_allowed, b_p, 0.)
    return b_kt, b_vt, b_p


@triton.jit(do_not_specialize=_NOT_SPECIALIZED + ["need_dq"])
def block_causal_attn_bwd_dq_kernel(
    q, k, v, do, dq, lse, delta, cu_seqlens,
    scale, T, H, G, D, DV, is_varlen, need_dq,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One program per (query tile, batch * head): delta = sum_j P * dP per row, stored for the dK/dV kernel, then
    (when need_dq) dQ = scale * sum_j P * (dP - delta) k_j over the tile's visible and partial key tiles.

    delta is the sum of the very P and dP (fp32) that dS = P * (dP - delta) subtracts it from, not rowsum(dO * O):
    O is rounded to the input dtype (and P to it before P @ V), and on peaked rows, where dP - delta nearly
    cancels, that rounding swamped dS in bf16. It costs a first pass with two of the three dots per key tile."""
    i_m, i_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    bos, seqlen = _sequence_bounds(cu_seqlens, i_b, T, is_varlen)
    m0 = i_m * BM
    if m0 >= seqlen:
        return
    m1 = tl.minimum(m0 + BM, seqlen)
    row0 = bos + m0
    q += i_b * stride_qb + row0 * stride_qt + i_h * stride_qh
    k += i_b * stride_kb + bos * stride_kt + i_h * stride_kh
    v += i_b * stride_vb + bos * stride_vt + i_h * stride_vh
    do += i_b * stride_dob + row0 * stride_dot + i_h * stride_doh
    dq += i_b * stride_dqb + row0 * stride_dqt + i_h * stride_dqh
    lse += i_b * stride_lb + row0 + i_h * stride_lh
    delta += i_b * stride_lb + row0 + i_h * stride_lh

    o_i = tl.arange(0, BM)
    o_j = tl.arange(0, BN)
    o_m = m0 + o_i
    o_d = tl.arange(0, BD)
    m_m = o_m < seqlen
    m_d, m_dv = o_d < D, o_d < DV
    b_q = tl.load(q + o_i[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.)
    b_do = tl.load(do + o_i[:, None] * stride_dot + o_d[None, :], mask=m_m[:, None] & m_dv[None, :],
                   other=0.)  # [BM, BD]
    # +inf on rows past the end makes their probabilities exactly 0
    b_lse = tl.load(lse + o_i, mask=m_m, other=float("inf")) * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634
    n_visible_end = (tl.minimum((m0 // G + 1) * G, seqlen) // BN) * BN
    n_hidden_start = tl.minimum(((m1 - 1) // G + 1) * G, seqlen)
    if USE_TMA:
        k_desc = _sequence_descriptor(k, seqlen, D, stride_kt, BN, BD)
        v_desc = _sequence_descriptor(v, seqlen, DV, stride_vt, BN, BD)
    else:
        k_desc, v_desc = None, None

    b_delta = tl.zeros([BM], dtype=tl.float32)
    p_k, p_v = k, v
    for n0 in range(0, n_hidden_start, BN):  # first pass: delta
        b_kt, b_vt, b_p = _dq_key_tile(b_q, b_lse, k_desc, v_desc, p_k, p_v, n0, n_visible_end, o_j, o_d, o_m,
                                       m_d, m_dv, seqlen, stride_kt, stride_vt, qk_scale, G, DOT_PRECISION,
                                       UPCAST_DOTS, USE_TMA)
        b_delta += tl.sum(b_p * dot_fp32acc(b_do, b_vt, DOT_PRECISION, UPCAST_DOTS), 1)
        p_k += BN * stride_kt
        p_v += BN * stride_vt
    tl.store(delta + o_i, b_delta, mask=m_m)
    if i_m == tl.num_programs(0) - 1:  # rows past the grid: NaN, as in the forward
        _store_nan_rows(delta + BM, 1, seqlen - m1, 1, BM, BD)
        if need_dq != 0:
            _store_nan_rows(dq + BM * stride_dqt, stride_dqt, seqlen - m1, D, BM, BD)
    if need_dq == 0:  # only dK/dV asked for: they need delta alone
        return

    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    p_k, p_v = k, v
    for n0 in range(0, n_hidden_start, BN):  # second pass: visible, then partial key tiles
        b_kt, b_vt, b_p = _dq_key_tile(b_q, b_lse, k_desc, v_desc, p_k, p_v, n0, n_visible_end, o_j, o_d, o_m,
                                       m_d, m_dv, seqlen, stride_kt, stride_vt, qk_scale, G, DOT_PRECISION,
                                       UPCAST_DOTS, USE_TMA)
        b_dp = dot_fp32acc(b_do, b_vt, DOT_PRECISION, UPCAST_DOTS)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += dot_fp32acc(b_ds.to(b_kt.dtype), tl.trans(b_kt), DOT_PRECISION, UPCAST_DOTS)
        p_k += BN * stride_kt
        p_v += BN * stride_vt

    tl.store(dq + o_i[:, None] * stride_dqt + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def block_causal_attn_bwd_dkdv_kernel(
    q, k, v, do, dk, dv, lse, delta, cu_seqlens,
    scale, T, H, G, D, DV, is_varlen,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One program per (key tile, batch * head): dV = sum_i P^T dO_i and dK = scale * sum_i dS^T q_i over the query
    tiles that see the key tile (query i sees key j iff i >= (j // G) * G)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    bos, seqlen = _sequence_bounds(cu_seqlens, i_b, T, is_varlen)
    n0 = i_n * BN
    if n0 >= seqlen:
        return
    n1 = tl.minimum(n0 + BN, seqlen)
    row0 = bos + n0
    q += i_b * stride_qb + bos * stride_qt + i_h * stride_qh
    k += i_b * stride_kb + row0 * stride_kt + i_h * stride_kh
    v += i_b * stride_vb + row0 * stride_vt + i_h * stride_vh
    do += i_b * stride_dob + bos * stride_dot + i_h * stride_doh
    dk += i_b * stride_dkb + row0 * stride_dkt + i_h * stride_dkh
    dv += i_b * stride_dvb + row0 * stride_dvt + i_h * stride_dvh
    lse += i_b * stride_lb + bos + i_h * stride_lh
    delta += i_b * stride_lb + bos + i_h * stride_lh

    o_j = tl.arange(0, BN)  # keys of the tile
    o_i = tl.arange(0, BM)  # rows of a query tile
    o_n = n0 + o_j
    o_d = tl.arange(0, BD)
    m_n = o_n < seqlen
    m_d, m_dv = o_d < D, o_d < DV
    b_k = tl.load(k + o_j[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.)
    b_v = tl.load(v + o_j[:, None] * stride_vt + o_d[None, :], mask=m_n[:, None] & m_dv[None, :], other=0.)
    qk_scale = scale * 1.4426950408889634
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)

    # rows from (n0 // G) * G on see part of the tile; rows from ((n1 - 1) // G) * G on see all of it
    m_partial_start = (((n0 // G) * G) // BM) * BM
    m_visible_start = tl.minimum(tl.cdiv(((n1 - 1) // G) * G, BM) * BM, seqlen)
    # partial, then visible query tiles. Past the end, q = dO = 0 and lse = +inf make a row's contribution 0,
    # except where a key holds an infinity (0 * inf = NaN): the last query tile, the one holding such rows, is masked
    p_q = q + m_partial_start.to(tl.int64) * stride_qt  # 64-bit pointers advance, offsets in a tile stay int32
    p_do = do + m_partial_start.to(tl.int64) * stride_dot
    if USE_TMA:
        q_desc = _sequence_descriptor(q, seqlen, D, stride_qt, BM, BD)
        do_desc = _sequence_descriptor(do, seqlen, DV, stride_dot, BM, BD)
    for m0 in range(m_partial_start, seqlen, BM):
        o_m = m0 + o_i
        m_m = o_m < seqlen
        if USE_TMA:  # one copy of each tile in shared memory, which the dots read in both orientations
            b_q = q_desc.load([m0, 0])  # [BM, BD]
            b_do = do_desc.load([m0, 0])  # [BM, BD]
            b_qt, b_dot = tl.trans(b_q), tl.trans(b_do)  # [BD, BM]
        else:
            # each tile is loaded in the orientation of each dot that reads it: a tile read transposed in registers
            # (tl.trans) cannot stream through async copies; the second read of a tile hits L2
            b_qt = tl.load(p_q + o_i[None, :] * stride_qt + o_d[:, None], mask=m_d[:, None] & m_m[None, :],
                           other=0.)  # [BD, BM]
            b_q = tl.load(p_q + o_i[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None] & m_d[None, :],
                          other=0.)  # [BM, BD]
            b_dot = tl.load(p_do + o_i[None, :] * stride_dot + o_d[:, None], mask=m_dv[:, None] & m_m[None, :],
                            other=0.)  # [BD, BM]
            b_do = tl.load(p_do + o_i[:, None] * stride_dot + o_d[None, :], mask=m_m[:, None] & m_dv[None, :],
                           other=0.)  # [BM, BD]
        b_lse = tl.load(lse + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634
        b_delta = tl.load(delta + o_m, mask=m_m, other=0.)
        b_pt = tl.exp2(dot_fp32acc(b_k, b_qt, DOT_PRECISION, UPCAST_DOTS) * qk_scale - b_lse[None, :])  # [BN, BM]
        if (m0 < m_visible_start) | (m0 + BM > seqlen):
            m_allowed = ((o_n[:, None] // G) <= (o_m[None, :] // G)) & m_m[None, :]
            b_pt = tl.where(m_allowed, b_pt, 0.)
        b_dv += dot_fp32acc(b_pt.to(b_do.dtype), b_do, DOT_PRECISION, UPCAST_DOTS)
        b_dpt = dot_fp32acc(b_v, b_dot, DOT_PRECISION, UPCAST_DOTS)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += dot_fp32acc(b_dst.to(b_q.dtype), b_q, DOT_PRECISION, UPCAST_DOTS)
        p_q += BM * stride_qt
        p_do += BM * stride_dot

    tl.store(dk + o_j[:, None] * stride_dkt + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty),
             mask=m_n[:, None] & m_d[None, :])
    tl.store(dv + o_j[:, None] * stride_dvt + o_d[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_n[:, None] & m_dv[None, :])
    if i_n == tl.num_programs(0) - 1:  # keys past the grid: NaN, as in the forward
        _store_nan_rows(dk + BN * stride_dkt, stride_dkt, seqlen - n1, D, BN, BD)
        _store_nan_rows(dv + BN * stride_dvt, stride_dvt, seqlen - n1, DV, BN, BD)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


class _Tiles(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int

    def config(self) -> triton.Config:
        return triton.Config({"BM": self.block_m, "BN": self.block_n}, num_warps=self.num_warps,
                             num_stages=self.num_stages)


#: head-dim tile widths the launchers choose from (D and Dv share one tile width, padded up and masked)
_HEAD_DIM_BLOCKS = (64, 128, 256)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_forced_tiles: Optional[tuple[int, int]] = None


def _head_dim_block(d: int, dv: int) -> int:
    return next(block for block in _HEAD_DIM_BLOCKS if max(d, dv) <= block)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 takes TF32 tensor cores by default (see ``fp32_dot_precision``); 16-bit inputs multiply exactly."""
    return fp32_dot_precision() if dtype == torch.float32 else "ieee"


#: (kernel, fp32?, head-dim tile) -> autotune candidates per architecture (``kernels._autotune``), the
#: default first. The defaults were chosen from launch-specialized ahead-of-time compiles at CaM-HG's layer (B 32,
#: T 330, H 8, D 64; fp32 and bf16) and at T 4096, D 64/128 (bf16, fp16): two pipeline stages (async copies)
#: everywhere; see docs/ops.md, "Launch configurations". Every candidate compiles without register spills at those
#: shapes (``python -m kernels.tools.report``, ``kernels/tools/spill_budget.json``). On sm_90, 64-row tiles use wgmma;
#: 32-row tiles fall back to mma.sync, still tensor cores. The sm_80 defaults fit the 99 KB of shared memory per block
#: of compute capability 8.6 / 8.9 (``SMALLEST_SHARED_MEMORY``), where they launch untuned; the fp32 backward's A100
#: tiles at
#: D 128 (dQ 32 x 64 in 8 warps: 112 KB, dK/dV 32 x 32: 100 KB) come second, behind tiles that read K/V (dQ: 32
#: query rows) or Q/dO (dK/dV: 32 keys) as often in about half the shared memory (56 and 66 KB), and the autotuner
#: times them there as infinitely slow.
#: sm_90 float32 (TF32) candidates of 64- and 128-wide heads: 64 query rows per warpgroup (forward, dQ) and 64 key
#: rows (dK/dV), which Triton compiles to Hopper's warpgroup MMA (HGMMA); 32 rows fall back to Ampere's HMMA
_CANDIDATE_TILES = {
    ("fwd", True, 64): {"sm_80": [_Tiles(32, 64, 4, 2), _Tiles(32, 32, 4, 3)],
                        "sm_90": [_Tiles(64, 64, 4, 2), _Tiles(64, 64, 8, 2), _Tiles(64, 32, 4, 3)]},
    ("fwd", True, 128): {"sm_80": [_Tiles(32, 64, 4, 2), _Tiles(32, 32, 4, 3)],
                         "sm_90": [_Tiles(64, 32, 4, 2), _Tiles(64, 32, 4, 3)]},
    ("fwd", False, 64): {"sm_80": [_Tiles(64, 64, 4, 2), _Tiles(128, 64, 8, 2), _Tiles(64, 64, 4, 3)],
                         "sm_90": [_Tiles(64, 64, 4, 2), _Tiles(128, 64, 8, 2), _Tiles(64, 64, 4, 3)]},
    ("fwd", False, 128): {"sm_80": [_Tiles(64, 64, 8, 2), _Tiles(128, 64, 8, 2), _Tiles(64, 32, 4, 3)],
                          "sm_90": [_Tiles(64, 64, 8, 2), _Tiles(128, 64, 8, 2), _Tiles(64, 32, 4, 3)]},
    ("bwd_dq", True, 64): {"sm_80": [_Tiles(32, 64, 4, 2), _Tiles(32, 32, 4, 3)],
                           "sm_90": [_Tiles(64, 64, 8, 2), _Tiles(64, 32, 4, 2)]},
    ("bwd_dq", True, 128): {"sm_80": [_Tiles(32, 16, 4, 2), _Tiles(32, 64, 8, 2)],
                            "sm_90": [_Tiles(64, 64, 8, 2), _Tiles(64, 32, 8, 2)]},
    ("bwd_dq", False, 64): {"sm_80": [_Tiles(64, 64, 4, 2), _Tiles(64, 64, 8, 2), _Tiles(64, 32, 4, 3)],
                            "sm_90": [_Tiles(64, 64, 4, 2), _Tiles(64, 64, 8, 2), _Tiles(64, 32, 4, 3)]},
    ("bwd_dq", False, 128): {"sm_80": [_Tiles(64, 64, 8, 2), _Tiles(64, 32, 4, 2)],
                             "sm_90": [_Tiles(64, 64, 8, 2), _Tiles(64, 32, 4, 2)]},
    ("bwd_dkdv", True, 64): {"sm_80": [_Tiles(32, 32, 4, 2), _Tiles(32, 32, 4, 3)],
                             "sm_90": [_Tiles(32, 64, 4, 2), _Tiles(32, 64, 4, 3)]},
    ("bwd_dkdv", True, 128): {"sm_80": [_Tiles(16, 32, 4, 2), _Tiles(32, 32, 4, 2)],  # 3 stages: 168 KB
                              "sm_90": [_Tiles(32, 64, 8, 2), _Tiles(16, 64, 8, 2)]},
    ("bwd_dkdv", False, 64): {"sm_80": [_Tiles(32, 64, 4, 2), _Tiles(32, 64, 4, 3)],
                              "sm_90": [_Tiles(32, 64, 4, 2), _Tiles(64, 64, 8, 2), _Tiles(32, 64, 4, 3)]},
    ("bwd_dkdv", False, 128): {"sm_80": [_Tiles(32, 64, 8, 2), _Tiles(32, 32, 4, 2)],
                               "sm_90": [_Tiles(32, 64, 4, 2), _Tiles(32, 64, 8, 2)]},
    # 256-wide heads (no measured target): one tile that fits shared memory, fp32 forward in one stage. The
    # backward's sm_90 tiles need 128 KB (dQ) and 192 KB (dK/dV) in fp32, 100 and 164.5 KB in 16 bits; on sm_80
    # smaller ones fit 99 KB without spilling (fp32: 80 and 97 KB, 16-bit: 84 and 65 KB). 8 warps where 4 spill
    # (``python -m kernels.aot --ptxas``: 16-1,172 B at 255 registers; 8 warps: 176-224 registers, no spill, the
    # same shared memory): the sm_80 forward, sm_90's fp32 backward and 16-bit dK/dV
    ("fwd", True, 256): {"sm_80": [_Tiles(32, 32, 8, 1)], "sm_90": [_Tiles(32, 32, 4, 1)]},
    ("fwd", False, 256): {"sm_80": [_Tiles(64, 32, 8, 2)], "sm_90": [_Tiles(64, 32, 4, 2)]},
    ("bwd_dq", True, 256): {"sm_80": [_Tiles(16, 16, 4, 2)], "sm_90": [_Tiles(32, 32, 8, 1)]},
    ("bwd_dq", False, 256): {"sm_80": [_Tiles(64, 16, 4, 2)], "sm_90": [_Tiles(64, 32, 4, 2)]},
    ("bwd_dkdv", True, 256): {"sm_80": [_Tiles(16, 16, 4, 2)], "sm_90": [_Tiles(32, 32, 8, 1)]},
    ("bwd_dkdv", False, 256): {"sm_80": [_Tiles(16, 32, 4, 2)], "sm_90": [_Tiles(64, 32, 8, 2)]},
}
_CONFIGS = {key: {arch: [tiles.config() for tiles in listed] for arch, listed in per_arch.items()}
            for key, per_arch in _CANDIDATE_TILES.items()}


def _candidates(kernel: str, dtype: torch.dtype, block_d: int, arch: str) -> list[triton.Config]:
    """Autotune candidates of one kernel (``"fwd"``, ``"bwd_dq"``, ``"bwd_dkdv"``) for a dtype, head-dim tile and
    architecture (``sm_80``, ``sm_90`` or ``fallback``, see ``kernels._autotune``), the default first."""
    fp32 = dtype == torch.float32
    return pick(_CONFIGS[(kernel, fp32, block_d)], arch)


@contextlib.contextmanager
def forced_tiles(block_m: int, block_n: int) -> Iterator[None]:
    """TEST ONLY: run every kernel with (block_m, block_n) tiles (the default candidate's warps and stages), so that
    tiny inputs span several tiles in the interpreter. Not listed in ``aot_configurations()``: GPU launches never
    go through it."""
    global _forced_tiles
    previous, _forced_tiles = _forced_tiles, (block_m, block_n)
    try:
        yield
    finally:
        _forced_tiles = previous


def _launch_candidates(kernel: str, q: torch.Tensor, block_d: int) -> list[triton.Config]:
    """The candidates of a launch; exact fp32 products (``KERNELS_FP32_PRECISION=ieee``, an accuracy mode) take
    the default alone."""
    candidates = _candidates(kernel, q.dtype, block_d, launch_arch(q.device))
    if _dot_precision(q.dtype) == "ieee" and q.dtype == torch.float32:
        candidates = candidates[:1]
    if _forced_tiles is not None:
        default = candidates[0]
        return [triton.Config({"BM": _forced_tiles[0], "BN": _forced_tiles[1]}, num_warps=default.num_warps,
                              num_stages=default.num_stages)]
    return candidates


def _bucket(layout: "_Layout") -> tuple[int, int]:
    """The tuning key besides dtypes: longest sequence and batch * heads, each rounded up to a power of two."""
    return shape_bucket(layout.max_seqlen), shape_bucket(layout.batch * layout.heads)


def _bth_strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, time, head) strides of a (B, H, T, D) tensor, or of a packed (total, H, D) one (batch stride 0).
    The kernels take unit-stride head dims (see :func:`_unit_stride_last_dim`)."""
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(2), x.stride(1)


def _unit_stride_last_dim(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels index the head dim with unit stride (vectorized loads); the rare tensor whose last dim is
    strided is copied once. Every other stride pattern (transposed views, slices) is used as is."""
    return [t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in tensors]


class _Layout(NamedTuple):
    """Where the sequences are: padded (B, H, T, D) or packed (total, H, D) with cu_seqlens."""

    batch: int
    heads: int
    rows: int  # T when padded, total when packed: the row count of lse and delta
    max_seqlen: int  # bounds the grid; programs past a sequence's end return at once
    cu_seqlens: torch.Tensor  # int32 offsets, or a 1-element placeholder when padded
    varlen: bool

    def lse_strides(self) -> tuple[int, int]:
        """(batch, head) strides of lse/delta: (B, H, T) when padded, (H, total) when packed."""
        return (0, self.rows) if self.varlen else (self.heads * self.rows, self.rows)

    def lse_shape(self) -> tuple[int, ...]:
        return (self.heads, self.rows) if self.varlen else (self.batch, self.heads, self.rows)


def _uses_tma(device: torch.device, *streamed: torch.Tensor) -> bool:
    """``tma_launch`` for a launch on ``device`` (``launch_arch``, so the static report's capture chooses as a GPU
    would) of the ``streamed`` tiles (forward and dQ: K, V; dK/dV: Q, dO)."""
    return tma_launch(launch_arch(device), *streamed)


def _launch(kernel, grid, args, options: dict, candidates: list[triton.Config], layout: "_Layout",
            streamed: tuple[torch.Tensor, ...]) -> None:
    """``kernels._autotune.launch`` with ``USE_TMA`` chosen by :func:`_uses_tma` (a tuning key of its own) and the
    descriptors' scratch memory when it is set."""
    device = streamed[0].device
    use_tma = _uses_tma(device, *streamed)
    with tma_scratch(use_tma):
        launch(kernel, grid, args, {**options, "USE_TMA": use_tma}, candidates, device=device,
               bucket=(*_bucket(layout), use_tma))


def block_causal_attention_fwd(q, k, v, layout: _Layout, group_size: int, scale: float):
    """o like v (same strides when v is dense) and lse (float32, ``layout.lse_shape()``)."""
    varlen = layout.varlen
    d, dv = q.shape[-1], v.shape[-1]
    block_d = _head_dim_block(d, dv)
    o = torch.empty_like(v)
    lse = torch.empty(layout.lse_shape(), dtype=torch.float32, device=q.device)
    _launch(block_causal_attn_fwd_kernel, lambda meta: (triton.cdiv(layout.max_seqlen, meta["BM"]),
                                                        layout.batch * layout.heads),
            (q, k, v, o, lse, layout.cu_seqlens,
             scale, layout.rows, layout.heads, group_size, d, dv, int(varlen),
             *_bth_strides(q, varlen), *_bth_strides(k, varlen), *_bth_strides(v, varlen), *_bth_strides(o, varlen),
             *layout.lse_strides()),
            dict(BD=block_d, DOT_PRECISION=_dot_precision(q.dtype), UPCAST_DOTS=upcast_dots_for(q.dtype)),
            _launch_candidates("fwd", q, block_d), layout, streamed=(k, v))
    return o, lse


def block_causal_attention_bwd(q, k, v, lse, do, layout: _Layout, group_size: int, scale: float, *,
                               need_dq: bool = True, need_dkdv: bool = True):
    """(dq, dk, dv), None where not needed. The dQ kernel always runs: it writes delta = rowsum(P * dP), which
    the dK/dV kernel reads; with ``need_dq=False`` it stops there. ``need_dkdv=False`` skips the dK/dV kernel."""
    varlen = layout.varlen
    (do,) = _unit_stride_last_dim(do)
    d, dv_dim = q.shape[-1], v.shape[-1]
    block_d = _head_dim_block(d, dv_dim)
    precision = _dot_precision(q.dtype)
    dq = torch.empty_like(q) if need_dq else None
    delta = torch.empty_like(lse)
    common = (scale, layout.rows, layout.heads, group_size, d, dv_dim, int(varlen))

    dq_or_q = q if dq is None else dq  # an unwritten stand-in when dq is not needed
    options = dict(BD=block_d, DOT_PRECISION=precision, UPCAST_DOTS=upcast_dots_for(q.dtype))
    _launch(block_causal_attn_bwd_dq_kernel, lambda meta: (triton.cdiv(layout.max_seqlen, meta["BM"]),
                                                           layout.batch * layout.heads),
            (q, k, v, do, dq_or_q, lse, delta, layout.cu_seqlens, *common, int(need_dq),
             *_bth_strides(q, varlen), *_bth_strides(k, varlen), *_bth_strides(v, varlen),
             *_bth_strides(do, varlen), *_bth_strides(dq_or_q, varlen), *layout.lse_strides()),
            options, _launch_candidates("bwd_dq", q, block_d), layout, streamed=(k, v))
    if not need_dkdv:
        return dq, None, None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _launch(block_causal_attn_bwd_dkdv_kernel, lambda meta: (triton.cdiv(layout.max_seqlen, meta["BN"]),
                                                             layout.batch * layout.heads),
            (q, k, v, do, dk, dv, lse, delta, layout.cu_seqlens, *common,
             *_bth_strides(q, varlen), *_bth_strides(k, varlen), *_bth_strides(v, varlen),
             *_bth_strides(do, varlen), *_bth_strides(dk, varlen), *_bth_strides(dv, varlen),
             *layout.lse_strides()),
            options, _launch_candidates("bwd_dkdv", q, block_d), layout, streamed=(q, do))
    return dq, dk, dv


# torch.library ops (docs/design.md section 5): opaque to torch.compile, with fake (meta) implementations and the
# fused backward registered as their autograd formula. The layout travels as (cu_seqlens, batch, max_seqlen, varlen).
# The backward computes only the gradients asked for: no dQ pass without q's, no dK/dV kernel without k's and v's
# (dV alone still computes dK alongside); a gradient not computed comes back as an empty (0,) tensor.


def _layout_of(q: torch.Tensor, cu_seqlens: torch.Tensor, batch: int, max_seqlen: int, varlen: bool) -> _Layout:
    rows = q.shape[0] if varlen else q.shape[2]
    return _Layout(batch, q.shape[1], rows, max_seqlen, cu_seqlens, varlen)


@torch.library.custom_op("kernels::block_causal_attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int batch, int max_seqlen, "
                                "bool varlen, int group_size, float scale) -> (Tensor, Tensor)")
def _block_causal_fwd_op(q, k, v, cu_seqlens, batch, max_seqlen, varlen, group_size, scale):
    """Triton forward on unit-stride head dims: (o like v, lse float32)."""
    with launch_device_of(q):
        return block_causal_attention_fwd(q, k, v, _layout_of(q, cu_seqlens, batch, max_seqlen, varlen),
                                          group_size, scale)


@_block_causal_fwd_op.register_fake
def _(q, k, v, cu_seqlens, batch, max_seqlen, varlen, group_size, scale):
    layout = _layout_of(q, cu_seqlens, batch, max_seqlen, varlen)
    return torch.empty_like(v), q.new_empty(layout.lse_shape(), dtype=torch.float32)


@torch.library.custom_op("kernels::block_causal_attention_bwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor lse, Tensor do, Tensor cu_seqlens, "
                                "int batch, int max_seqlen, bool varlen, int group_size, float scale, bool need_dq, "
                                "bool need_dkdv) -> (Tensor, Tensor, Tensor)")
def _block_causal_bwd_op(q, k, v, lse, do, cu_seqlens, batch, max_seqlen, varlen, group_size, scale, need_dq,
                         need_dkdv):
    """Triton backward: (dq, dk, dv) like q, k, v; empty (0,) where not needed."""
    with launch_device_of(q):
        grads = block_causal_attention_bwd(q, k, v, lse, do, _layout_of(q, cu_seqlens, batch, max_seqlen, varlen),
                                           group_size, scale, need_dq=need_dq, need_dkdv=need_dkdv)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@_block_causal_bwd_op.register_fake
def _(q, k, v, lse, do, cu_seqlens, batch, max_seqlen, varlen, group_size, scale, need_dq, need_dkdv):
    return (torch.empty_like(q) if need_dq else q.new_empty(0),
            *((torch.empty_like(k), torch.empty_like(v)) if need_dkdv else (k.new_empty(0), v.new_empty(0))))


def _block_causal_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, batch, max_seqlen, varlen, group_size, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, lse, cu_seqlens)
    ctx.layout_args, ctx.group_size, ctx.scale = (batch, max_seqlen, varlen), group_size, scale
    ctx.mark_non_differentiable(lse)


def _block_causal_backward(ctx, do, _d_lse):
    q, k, v, lse, cu_seqlens = ctx.saved_tensors
    need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
    dq, dk, dv = _block_causal_bwd_op(q, k, v, lse, do, cu_seqlens, *ctx.layout_args, ctx.group_size, ctx.scale,
                                      need_dq, need_dk or need_dv)
    return (dq if need_dq else None, dk if need_dk else None, dv if need_dv else None,
            None, None, None, None, None, None)


_block_causal_fwd_op.register_autograd(_block_causal_backward, setup_context=_block_causal_setup_context)


def _block_causal_attention_triton(q, k, v, layout: _Layout, group_size: int, scale: float) -> torch.Tensor:
    q, k, v = _unit_stride_last_dim(q, k, v)
    return _block_causal_fwd_op(q, k, v, layout.cu_seqlens, layout.batch, layout.max_seqlen, layout.varlen,
                                group_size, scale)[0]


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def block_causal_mask(t: int, group_size: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where query i may see key j: ``j // group_size <= i // group_size``."""
    index = torch.arange(t, device=device) // group_size
    return index[None, :] <= index[:, None]


@autocast_op
def block_causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, group_size: int = 3,
                                     scale: Optional[float] = None) -> Tensor:
    """Dense mask + softmax, in float64 for float64 inputs and float32 otherwise.
    q, k: (B, H, T, D); v: (B, H, T, Dv) -> (B, H, T, Dv) in v's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~block_causal_mask(q.shape[-2], group_size, q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(compute)).to(v.dtype)


def varlen_block_causal_mask(cu_seqlens: torch.Tensor, total: int, group_size: int) -> torch.Tensor:
    """(total, total) bool, True where packed row i may see packed row j: same sequence and block-causal in the
    positions counted from the sequence's start. Built on the offsets' device without reading them on the host."""
    rows = torch.arange(total, device=cu_seqlens.device)
    sequence = sequence_ids(cu_seqlens, total)
    block = (rows - cu_seqlens.long()[sequence]) // group_size
    return (sequence[:, None] == sequence[None, :]) & (block[None, :] <= block[:, None])


@autocast_op
def block_causal_attention_varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *,
                                            group_size: int = 3, scale: Optional[float] = None) -> Tensor:
    """:func:`block_causal_attention_reference` per packed sequence, q, k: (total, H, D), v: (total, H, Dv), as one
    dense masked attention over all rows (O(total^2) memory; no host read of the offsets, so it compiles)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_h, k_h, v_h = (x.to(compute).transpose(0, 1) for x in (q, k, v))  # (H, total, D)
    scores = (q_h @ k_h.transpose(-1, -2)) * scale
    allowed = varlen_block_causal_mask(cu_seqlens.to(q.device), q.shape[0], group_size)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v_h).transpose(0, 1).to(v.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def _check_qkv(q, k, v, ndim: int) -> None:
    """q, k: (..., T, H?, D) alike; v: same leading dims, any Dv; shared dtype/device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim)
    check_same_dtype_and_device(q=q, k=k, v=v)
    check_nonempty(q=q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must have shape {tuple(q.shape[:-1]) + ('Dv',)}, got {tuple(v.shape)}")


def _check_kernel_head_dims(q, v) -> None:
    """The Triton kernels hold a whole head in one tile: D, Dv <= MAX_HEAD_DIM (the reference has no limit)."""
    for name, t in (("q", q), ("v", v)):
        if t.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"{name} head dimension must be <= {MAX_HEAD_DIM} for the Triton kernels, got "
                             f"{t.shape[-1]}")


@autocast_op
def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, *, group_size: int = 3,
                           scale: Optional[float] = None) -> Tensor:
    """Block-causal attention: query i sees key j iff ``j // group_size <= i // group_size``.

    q, k: (B, H, T, D); v: (B, H, T, Dv) -> (B, H, T, Dv) in q's dtype. k and v may come from another sequence
    of the same length (cross-attention). ``scale`` defaults to ``D ** -0.5``. Any strides; no host sync.
    """
    _check_qkv(q, k, v, ndim=4)
    _check_group_size(group_size)
    check_scale(scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q, k, v):
        return block_causal_attention_reference(q, k, v, group_size=group_size, scale=scale)
    _check_kernel_head_dims(q, v)
    b, h, t, _ = q.shape
    check_batch_heads(b * h)
    layout = _Layout(b, h, t, t, q.new_zeros(1, dtype=torch.int32), varlen=False)
    return _block_causal_attention_triton(q, k, v, layout, group_size, scale)


@autocast_op
def block_causal_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *,
                                  max_seqlen: Optional[int] = None, group_size: int = 3,
                                  scale: Optional[float] = None, validate: Optional[bool] = None) -> Tensor:
    """Block-causal attention on packed sequences: q, k: (total, H, D); v: (total, H, Dv) -> (total, H, Dv).

    ``cu_seqlens`` (num_seqs + 1,) int32 tensor (any stride): sequence s is rows ``cu_seqlens[s]:cu_seqlens[s + 1]``
    and attends only within itself, with positions counted from its start. ``max_seqlen`` (at least the longest
    sequence) sizes the grid; when None it is read from CPU offsets, or taken as ``total`` for GPU offsets (no host
    sync; programs past a sequence's end return at once). ``validate`` checks the offsets (start at 0, strictly
    increasing, end at total) and that ``max_seqlen`` is at least the longest sequence (``ValueError`` otherwise);
    None means "when cu_seqlens is on the CPU", since checking GPU offsets syncs with the host. Unchecked, a
    ``max_seqlen`` below a sequence's length leaves that sequence's rows past the grid (rounded up to whole tiles)
    unreached: the kernels make them NaN in the output and in every gradient, never stale memory.
    """
    _check_qkv(q, k, v, ndim=3)
    _check_group_size(group_size)
    check_scale(scale)
    total = q.shape[0]
    cu_seqlens = checked_cu_seqlens(cu_seqlens, total, validate, max_seqlen)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q, k, v):
        return block_causal_attention_varlen_reference(q, k, v, cu_seqlens, group_size=group_size, scale=scale)
    _check_kernel_head_dims(q, v)
    check_batch_heads((cu_seqlens.numel() - 1) * q.shape[1])
    if max_seqlen is None:  # a host read of CPU offsets; compiled code and GPU offsets bound the grid by total
        on_host = cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if on_host else total
    layout = _Layout(cu_seqlens.numel() - 1, q.shape[1], total, max_seqlen,
                     cu_seqlens.to(q.device, non_blocking=True), varlen=True)
    return _block_causal_attention_triton(q, k, v, layout, group_size, scale)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


def _block_causal_attention_with_weight_dropout(q, k, v, cu_seqlens, group_size: int, dropout: float):
    """Dense fallback for training with attention-weight dropout, which the fused kernels do not do."""
    if cu_seqlens is not None:  # packed (total, H, D): one dense masked attention over all rows
        allowed = varlen_block_causal_mask(cu_seqlens.to(q.device), q.shape[0], group_size)
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    else:
        allowed = block_causal_mask(q.shape[-2], group_size, q.device)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = nn.functional.dropout(scores.softmax(dim=-1), p=dropout, training=True) @ v
    return out if cu_seqlens is None else out.transpose(0, 1)


class BlockCausalMultiheadAttention(nn.Module):
    """Multi-head block-causal attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight`` (3E, E),
    ``in_proj_bias`` (3E,), ``out_proj``) and call conventions, so state dicts load both ways with
    ``nn.MultiheadAttention(E, H, batch_first=True)``; that module given ``attn_mask=~block_causal_mask(T, G)``
    computes the same output.

    Constructor as ``nn.MultiheadAttention``'s (``dropout`` positional; ``batch_first`` defaults to True here and
    False is supported; ``add_bias_kv``, ``add_zero_attn`` and other ``kdim``/``vdim`` are refused) plus the
    keyword ``group_size``. ``dropout`` drops attention weights in training, as nn.MultiheadAttention does; that
    runs a dense (non-fused) path, so leave it 0 where speed matters.

    forward(query, key=None, value=None, *, key_padding_mask=None, need_weights=False, average_attn_weights=True,
    cu_seqlens=None, max_seqlen=None) -> (output, weights or None) like ``nn.MultiheadAttention``: (B, T, E) (or
    (T, B, E) without ``batch_first``), or packed (total, E) with ``cu_seqlens`` and optionally ``max_seqlen`` (at
    least the longest sequence: pass it with GPU offsets, or the grid is sized by the packed length; a smaller one
    raises on checked offsets and gives NaN rows otherwise, see :func:`block_causal_attention_varlen`); key defaults
    to query and value to key (same length as query).
    ``key_padding_mask`` (B, T) bool, True = padding, marks the padded positions of query and key alike:
    the valid tokens of each row form its sequence (positions counted among them) and run through the packed kernels
    (unpad, varlen, pad back), so padded batches of any lengths are right; padded positions output exactly 0 (no
    ``out_proj`` bias) and pass no gradient, in every attention module of this package (``nn.MultiheadAttention``
    computes them from the valid keys; its users ignore them). The packing is built on the device: no host read of
    the lengths, so ``torch.compile(fullgraph=True)`` traces it. Weights
    (B, T, T) averaged over heads, or (B, H, T, T), are computed densely when asked for. ``attn_mask`` and
    ``is_causal`` are refused: the mask is block-causal by construction.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = True, device=None, dtype=None, *,
                 group_size: int = 3):
        super().__init__()
        if num_heads <= 0 or embed_dim <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_mha_unsupported(add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim not in (None, embed_dim):
                raise ValueError(f"{name} must be None or embed_dim ({embed_dim}): keys and values share the "
                                 f"queries' width, got {dim}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
        _check_group_size(group_size)
        self.embed_dim, self.num_heads, self.group_size, self.dropout = embed_dim, num_heads, group_size, dropout
        self.batch_first = batch_first
        factory = dict(device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialization."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, group_size={self.group_size}, "
                f"dropout={self.dropout}, bias={self.in_proj_bias is not None}, batch_first={self.batch_first}")

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                *, key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        check_mha_unsupported(attn_mask=attn_mask, is_causal=is_causal)
        key = query if key is None else key
        value = key if value is None else value
        if cu_seqlens is not None:
            if key_padding_mask is not None:
                raise ValueError("pass key_padding_mask (padded batch) or cu_seqlens (packed), not both")
            for name, x in (("query", query), ("key", key), ("value", value)):
                check_tensor(name, x, ndim=2)
            return self._attend(query, key, value, cu_seqlens, need_weights, average_attn_weights, max_seqlen)
        for name, x in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, x, ndim=3)
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
            raise ValueError(f"key and value must have query's (batch, length) {tuple(query.shape[:2])} (block-causal "
                             f"positions are shared), got {tuple(key.shape[:2])} and {tuple(value.shape[:2])}")
        if key_padding_mask is None:
            out, weights = self._attend(query, key, value, None, need_weights, average_attn_weights)
        else:
            out, weights = self._attend_padded(query, key, value, key_padding_mask, need_weights,
                                               average_attn_weights)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _attend_padded(self, query, key, value, key_padding_mask, need_weights, average_attn_weights):
        """Unpad the valid tokens, attend packed, pad back (zeros at padded positions)."""
        b, t = query.shape[:2]
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if key_padding_mask.shape != (b, t):
            raise ValueError(f"key_padding_mask must have shape {(b, t)} (batch, length), got "
                             f"{tuple(key_padding_mask.shape)}")
        valid = ~key_padding_mask.to(query.device)
        # each row's valid tokens, then its padding, as sequences of a static total B * T: no host read, so it
        # compiles; the padding sequences (maybe empty, which the offset check refuses) are discarded
        packing = pack_padding(valid)
        out, _ = self._attend(*(packing.pack(x) for x in (query, key, value)), packing.cu_seqlens, False,
                              average_attn_weights, max_seqlen=t, validate=False)
        out = packing.unpack(out)
        weights = None
        if need_weights:
            position = valid.cumsum(dim=1) - 1  # position among the row's valid tokens
            allowed = (valid[:, :, None] & valid[:, None, :]
                       & (position[:, None, :] // self.group_size <= position[:, :, None] // self.group_size))
            weights = self._dense_weights(query, key, allowed[:, None], average_attn_weights)
        return out, weights

    def _split_heads(self, query, key, value, packed: bool):
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        h, head_dim = self.num_heads, self.embed_dim // self.num_heads
        # (B, T, E) -> (B, H, T, Dh) as a strided view, or packed (total, E) -> (total, H, Dh): no copies
        split = (lambda x: x.unflatten(-1, (h, head_dim))) if packed else (
            lambda x: x.unflatten(-1, (h, head_dim)).transpose(1, 2))
        return (split(nn.functional.linear(query, w_q, b_q)), split(nn.functional.linear(key, w_k, b_k)),
                split(nn.functional.linear(value, w_v, b_v)))

    def _attend(self, query, key, value, cu_seqlens, need_weights, average_attn_weights, max_seqlen=None,
                validate=None):
        q, k, v = self._split_heads(query, key, value, packed=cu_seqlens is not None)
        if self.training and self.dropout > 0:
            out = _block_causal_attention_with_weight_dropout(q, k, v, cu_seqlens, self.group_size, self.dropout)
        elif cu_seqlens is None:
            out = block_causal_attention(q, k, v, group_size=self.group_size)
        else:
            out = block_causal_attention_varlen(q, k, v, cu_seqlens, max_seqlen=max_seqlen,
                                                group_size=self.group_size, validate=validate)
        out = out.transpose(1, 2).flatten(-2) if cu_seqlens is None else out.flatten(-2)
        weights = None
        if need_weights:
            if cu_seqlens is None:
                allowed = block_causal_mask(query.shape[-2], self.group_size, query.device)
            else:
                allowed = varlen_block_causal_mask(cu_seqlens.to(query.device), query.shape[0], self.group_size)
            weights = self._dense_weights(query, key, allowed, average_attn_weights)
        return self.out_proj(out), weights

    def _dense_weights(self, query, key, allowed, average_attn_weights):
        """softmax(mask(q k^T / sqrt(Dh))) (.., H, T, T), zero rows where nothing is allowed; averaged over heads
        when ``average_attn_weights``. Packed inputs give (H, total, total) (or (total, total))."""
        packed = query.dim() == 2
        q, k, _ = self._split_heads(query, key, key, packed=packed)
        if packed:
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0).to(query.dtype)
        return weights.mean(dim=-3) if average_attn_weights else weights


class BlockCausalTransformerLayer(nn.Module):
    """Transformer layer over :class:`BlockCausalMultiheadAttention`: attention, GELU feed-forward, residuals and
    LayerNorm (post-norm, or pre-norm with ``norm_first``).

    forward(x, context=None, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None): x (B, T, d_model)
    (key_padding_mask (B, T) as in :class:`BlockCausalMultiheadAttention`) or packed (total, d_model) with
    ``cu_seqlens`` (and ``max_seqlen``, as in :class:`BlockCausalMultiheadAttention`). Self-attention
    when ``context`` is None; otherwise x's queries attend ``context``'s keys/values (same length: hyperedges
    attend nodes and back, CaM-HG eq. 10). ``dropout`` applies to the residual branches and inside the
    feed-forward, not to the attention weights, so training keeps the fused kernel.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: Optional[int] = None, dropout: float = 0.1, *,
                 group_size: int = 3, norm_first: bool = False):
        super().__init__()
        dim_feedforward = dim_feedforward or 4 * d_model
        self.norm_first = norm_first
        self.attn = BlockCausalMultiheadAttention(d_model, nhead, group_size=group_size)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *,
                key_padding_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None) -> torch.Tensor:
        attend = lambda q, kv: self.attn(q, kv, kv, key_padding_mask=key_padding_mask,  # noqa: E731
                                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[0]
        if self.norm_first:
            query = self.norm1(x)
            # keys/values from another sequence get the same pre-norm as the queries
            context = query if context is None else self.norm1(context)
            x = x + self.dropout1(attend(query, context))
            return x + self.dropout2(self.ff(self.norm2(x)))
        context = x if context is None else context
        x = self.norm1(x + self.dropout1(attend(x, context)))
        return self.norm2(x + self.dropout2(self.ff(x)))


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (kernels.aot)
# ----------------------------------------------------------------------------------------------------------------


def aot_configurations():
    """Every (kernel, dtype, head-dim tile, fp32 dot precision, candidate) the launchers can launch, each for the
    architectures whose candidate list holds it, with the 16-divisibility of pointers, head dims and q/k/v/o
    strides that a launch on aligned tensors gets (lse/delta strides follow T: left plain); the default candidates
    also without it (odd head dims). ``default`` marks the aligned default candidates (the tests' quick subset)."""
    from .aot import AotConfig

    kernels = {
        "fwd": (block_causal_attn_fwd_kernel, ("q", "k", "v", "o"), ("lse",)),
        "bwd_dq": (block_causal_attn_bwd_dq_kernel, ("q", "k", "v", "do", "dq"), ("lse", "delta")),
        "bwd_dkdv": (block_causal_attn_bwd_dkdv_kernel, ("q", "k", "v", "do", "dk", "dv"), ("lse", "delta")),
    }
    configs = []
    for name, (kernel, tensors, fp32_tensors) in kernels.items():
        signature, aligned = {}, []
        for arg in kernel.arg_names:
            if arg in tensors:
                signature[arg] = "*{dtype}"
            elif arg in fp32_tensors:
                signature[arg] = "*fp32"
            elif arg == "cu_seqlens":
                signature[arg] = "*i32"
            elif arg == "scale":
                signature[arg] = "fp32"
            elif arg in ("BM", "BN", "BD", "DOT_PRECISION", "UPCAST_DOTS", "USE_TMA"):
                signature[arg] = "constexpr"
            else:
                signature[arg] = "i32"
            if signature[arg].startswith("*") or arg in ("D", "DV") or (
                    arg.startswith("stride_") and not arg.startswith("stride_l")):
                aligned.append(arg)
        for dtype, type_name in _DTYPES.items():
            typed = {arg: kind.format(dtype=type_name) for arg, kind in signature.items()}
            for block_d in _HEAD_DIM_BLOCKS:
                # IEEE fp32 (KERNELS_FP32_PRECISION=ieee) launches the default candidate only and compiles up to
                # ~110 s per kernel at D 128 (sm_90): only D <= 64 is compiled ahead of time
                ieee_too = dtype == torch.float32 and block_d == 64
                base_precision = "tf32" if dtype == torch.float32 else "ieee"
                for config, archs, default in aot_candidates(lambda arch: _candidates(name, dtype, block_d, arch)):
                    for precision in ("tf32", "ieee") if ieee_too and default else (base_precision,):
                        constexprs = {**config.kwargs, "BD": block_d, "DOT_PRECISION": precision,
                                      "UPCAST_DOTS": False, "USE_TMA": False}
                        label = (f"{name}-{type_name}-d{block_d}-{precision}-m{config.kwargs['BM']}"
                                 f"n{config.kwargs['BN']}w{config.num_warps}s{config.num_stages}")
                        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
                        # aligned tensors stream through TMA on sm_90 (``_uses_tma``), through pointer loads
                        # elsewhere; unaligned ones through pointer loads everywhere
                        for use_tma in (False, True):
                            on = tuple(c for c in archs if (c == ARCH_CAPABILITY["sm_90"]) == use_tma)
                            if on:
                                configs.append(AotConfig(label + ("-tma" if use_tma else "") + "-aligned", kernel,
                                                         typed, {**constexprs, "USE_TMA": use_tma},
                                                         divisible=tuple(aligned), default=default,
                                                         capabilities=on, **options))
                        if default:
                            configs.append(AotConfig(label, kernel, typed, constexprs, default=False,
                                                     capabilities=archs, **options))
    return configs
