"""Causal entmax-1.5 attention, fused flash-style in Triton (docs/design.md sections 1-2).

``entmax15_attention(q, k, v)`` equals ``entmax.entmax15(scores, dim=-1) @ v`` with
``scores = q k^T * scale`` (``-inf`` where ``j > i`` when causal) without ever forming the T x T matrix:

1. ``_entmax_tau_kernel`` solves each row's threshold tau of ``z = scores / 2`` exactly: Newton steps from
   ``max z - 1`` (left of the root, so they rise monotonically) until the support ``{z > tau}`` is identified,
   then the closed form on that support. Rows that fit one key tile keep their scores in registers; longer rows
   recompute them on every pass. tau (B, H, T) is the only per-row state the forward keeps.
2. ``_entmax_fwd_kernel``: ``o = sum_j max(z_j - tau, 0)^2 v_j`` over the visible key tiles, skipping tiles whose
   probabilities are all zero. For training it also stores ``w_i = sum_j G_ij v_j / sum_j G_ij``
   (``G = max(z - tau, 0)``), from which the backward gets ``c_i = dO_i . w_i`` with one row-wise product.
3. ``_entmax_bwd_dq_kernel`` (per query tile) and ``_entmax_bwd_dkdv_kernel`` (per key tile): flash-attention's
   backward with ``dS = G (dP - c)`` (the gradient w.r.t. the unhalved scores), skipping hidden and all-zero tiles.

Every kernel takes strides (inputs may be non-contiguous views), accumulates in fp32 and loops over the
feature dimensions in chunks, so D and Dv may be any size.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from ._checks import check_mha_unsupported, check_nonempty, check_same_dtype_and_device, check_scale, check_tensor
from .aot import AotConfig
from ._triton_helpers import check_batch_heads, dot_fp32acc, launch_device_of, upcast_dots_for
from ._amp import autocast_op
from .backend import use_triton


class Tiles(NamedTuple):
    """Block sizes of one call. Rows of at most ``row_block_n`` keys are solved in registers (``row_block_m`` rows
    per program); longer rows use ``block_m`` x ``block_n`` tiles. Features go in chunks of ``block_d``/``block_dv``."""

    block_m: int = 64
    block_n: int = 64
    block_d: int = 64
    block_dv: int = 64
    row_block_m: int = 32
    row_block_n: int = 128


_DEFAULT_TILES = Tiles()
#: Tests set tiny tiles here so that short sequences cover several, partial and skipped tiles.
_TILE_OVERRIDE: Optional[Tiles] = None
#: Newton passes before the tau solver gives up on a row (only reached through rounding or NaN input).
_MAX_PASSES = 32
_NUM_WARPS = 4
_NUM_STAGES = 1
#: CUDA limits grid axes 1 and 2 to this; the batch-head axis is one of them.


def _tiles() -> Tiles:
    return _TILE_OVERRIDE if _TILE_OVERRIDE is not None else _DEFAULT_TILES


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_dots(p_a, stride_at, stride_ak, p_b, stride_bt, stride_bk, o_m, o_n, T, K,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """``a[o_m] . b[o_n]`` over K features in chunks of BK, in fp32; rows outside [0, T) read as zeros."""
    m_m = o_m < T
    m_n = o_n < T
    o_m64 = o_m.to(tl.int64)
    o_n64 = o_n.to(tl.int64)
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(p_a + o_m64[:, None] * stride_at + o_k[None, :] * stride_ak,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_b = tl.load(p_b + o_n64[None, :] * stride_bt + o_k[:, None] * stride_bk,
                      mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        # fp32 inputs: tf32x3 keeps ~fp32 accuracy on tensor cores (plain tf32 costs ~1e-3 relative, and "ieee"
        # compiles to huge FMA code); fp16/bf16 products are exact whatever the precision flag
        b_acc += dot_fp32acc(b_a, b_b, "tf32x3", UPCAST_DOTS)
    return b_acc


@triton.jit
def _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, o_n, T, D, half_scale, causal,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """Halved scores ``z = scale / 2 * q . k``, ``-inf`` outside [0, T) and where the causal mask hides the key."""
    b_z = _row_dots(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, o_n, T, D, BM, BN, BD,
                    UPCAST_DOTS) * half_scale
    m_visible = (o_m[:, None] < T) & (o_n[None, :] < T) & ((o_n[None, :] <= o_m[:, None]) | (causal == 0))
    return tl.where(m_visible, b_z, float("-inf"))  # [BM, BN]


@triton.jit
def _visible_keys_end(i_m, T, causal, BM: tl.constexpr):
    """End of the keys that query tile ``i_m`` can see: key tiles past it are hidden and never visited."""
    return tl.where(causal != 0, tl.minimum((i_m + 1) * BM, T), T)


@triton.jit
def _seeing_queries_start(i_n, causal, BM: tl.constexpr, BN: tl.constexpr):
    """Start (a multiple of BM) of the query tiles that can see key tile ``i_n``."""
    return tl.where(causal != 0, (i_n * BN) // BM * BM, 0)


@triton.jit
def _support_stats(b_z, b_tau):
    """Per row, with ``w = z - tau``: over the support ``w > 0`` the count, sum w, sum w^2 and min w; and the
    largest w off the support (``-inf`` if none)."""
    b_w = b_z - b_tau[:, None]  # [BM, BN]
    m_s = b_w > 0
    b_ws = tl.where(m_s, b_w, 0.0)
    b_cnt = tl.sum(m_s.to(tl.float32), 1)
    b_a1 = tl.sum(b_ws, 1)
    b_a2 = tl.sum(b_ws * b_ws, 1)
    b_wmin = tl.min(tl.where(m_s, b_w, float("inf")), 1)
    b_wout = tl.max(tl.where(m_s, float("-inf"), b_w), 1)
    return b_cnt, b_a1, b_a2, b_wmin, b_wout


@triton.jit
def _threshold_step(b_tau, b_done, b_cnt, b_a1, b_a2, b_wmin, b_wout):
    """One solver pass from the support statistics of ``tau``: the exact threshold where the support is identified,
    else a Newton step on ``f(tau) = sum max(z - tau, 0)^2 - 1``. Returns (tau, done)."""
    b_f = b_a2 - 1.0  # f(tau) >= 0 left of the root
    b_disc = b_a1 * b_a1 - b_cnt * b_f
    # left of the root the support is never empty; rows already done may have none: keep their arithmetic finite
    b_a1 = tl.where(b_cnt > 0, b_a1, 1.0)
    # smaller root of sum_S (w - delta)^2 = 1, rationalized so that it does not cancel as f -> 0
    b_delta = b_f / (b_a1 + tl.sqrt(tl.maximum(b_disc, 0.0)))
    # the support of tau + delta is exactly S: S stays above it and every other key stays below
    b_exact = (b_disc >= 0) & (b_wmin >= b_delta) & (b_wout <= b_delta)
    b_next = tl.where(b_exact, b_tau + b_delta, b_tau + b_f / (2.0 * b_a1))
    return tl.where(b_done, b_tau, b_next), b_done | b_exact


@triton.jit(do_not_specialize=["H", "T", "D", "causal"])  # no variant per runtime value 1
def _entmax_tau_kernel(q, k, tau,
                       stride_qb, stride_qh, stride_qt, stride_qd,
                       stride_kb, stride_kh, stride_kt, stride_kd,
                       H, T, D, half_scale, causal,
                       ROW_IN_REGISTERS: tl.constexpr, MAX_PASSES: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """tau (B*H, T) fp32 of ``z = scale / 2 * q k^T``: ``sum_j max(z_ij - tau_i, 0)^2 = 1``. NaN rows get NaN.
    Grid (cdiv(T, BM), B*H). ROW_IN_REGISTERS (scores scored once, kept on chip) needs T <= BN."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    o_m = i_m * BM + tl.arange(0, BM)
    hi = _visible_keys_end(i_m, T, causal, BM)

    if ROW_IN_REGISTERS:
        b_z = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, tl.arange(0, BN), T, D,
                      half_scale, causal, BM, BN, BD, UPCAST_DOTS)  # [BM, BN]
        b_nan = tl.max((b_z != b_z).to(tl.int32), 1) > 0
        b_max = tl.max(tl.where(b_z == b_z, b_z, float("-inf")), 1)
    else:
        b_nan = tl.zeros([BM], dtype=tl.int32) > 0
        b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
        for n0 in range(0, hi, BN):
            b_zt = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, n0 + tl.arange(0, BN), T, D,
                           half_scale, causal, BM, BN, BD, UPCAST_DOTS)  # [BM, BN]
            b_nan = b_nan | (tl.max((b_zt != b_zt).to(tl.int32), 1) > 0)
            b_max = tl.maximum(b_max, tl.max(tl.where(b_zt == b_zt, b_zt, float("-inf")), 1))

    # f(max z - 1) >= 0: every Newton step stays left of the root. Rows past T (no visible key) start at 0, not -inf.
    b_tau = tl.where(o_m < T, b_max - 1.0, 0.0)
    b_done = (o_m >= T) | b_nan  # NaN rows stop at once: the solver terminates on any input
    i_pass = 0
    while (i_pass < MAX_PASSES) & (tl.min(b_done.to(tl.int32), 0) == 0):
        if ROW_IN_REGISTERS:
            b_cnt, b_a1, b_a2, b_wmin, b_wout = _support_stats(b_z, b_tau)
        else:
            b_cnt = tl.zeros([BM], dtype=tl.float32)
            b_a1 = tl.zeros([BM], dtype=tl.float32)
            b_a2 = tl.zeros([BM], dtype=tl.float32)
            b_wmin = tl.full([BM], float("inf"), dtype=tl.float32)
            b_wout = tl.full([BM], float("-inf"), dtype=tl.float32)
            for n0 in range(0, hi, BN):
                b_zt = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, n0 + tl.arange(0, BN),
                               T, D, half_scale, causal, BM, BN, BD, UPCAST_DOTS)  # [BM, BN]
                t_cnt, t_a1, t_a2, t_wmin, t_wout = _support_stats(b_zt, b_tau)
                b_cnt += t_cnt
                b_a1 += t_a1
                b_a2 += t_a2
                b_wmin = tl.minimum(b_wmin, t_wmin)
                b_wout = tl.maximum(b_wout, t_wout)
        b_tau, b_done = _threshold_step(b_tau, b_done, b_cnt, b_a1, b_a2, b_wmin, b_wout)
        i_pass += 1

    b_tau = tl.where(b_nan, float("nan"), b_tau)
    tl.store(tau + i_bh.to(tl.int64) * T + o_m, b_tau, mask=o_m < T)


@triton.jit(do_not_specialize=["H", "T", "D", "Dv", "causal", "store_w"])  # no variant per runtime value 1
def _entmax_fwd_kernel(q, k, v, tau, o, w,
                       stride_qb, stride_qh, stride_qt, stride_qd,
                       stride_kb, stride_kh, stride_kt, stride_kd,
                       stride_vb, stride_vh, stride_vt, stride_vd,
                       H, T, D, Dv, half_scale, causal, store_w,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                       UPCAST_DOTS: tl.constexpr):
    """o[:, :, :, chunk] (B, H, T, Dv) = p @ v with ``p = max(z - tau, 0)^2``; if ``store_w``, also
    w (B, H, T, Dv) fp32 = ``(G @ v) / rowsum(G)``, ``G = max(z - tau, 0)``. Grid (cdiv(T, BM), cdiv(Dv, BDV), B*H)."""
    i_m, i_dv, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_dv = i_dv * BDV + tl.arange(0, BDV)
    m_dv = o_dv < Dv

    b_tau = tl.load(tau + i_bh.to(tl.int64) * T + o_m, mask=m_m, other=float("inf"))  # [BM]
    b_o = tl.zeros([BM, BDV], dtype=tl.float32)
    b_u = tl.zeros([BM, BDV], dtype=tl.float32)
    b_gsum = tl.zeros([BM], dtype=tl.float32)
    for n0 in range(0, _visible_keys_end(i_m, T, causal, BM), BN):
        o_n = n0 + tl.arange(0, BN)
        b_z = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, o_n, T, D,
                      half_scale, causal, BM, BN, BD, UPCAST_DOTS)  # [BM, BN]
        b_g = tl.where(b_z > b_tau[:, None], b_z - b_tau[:, None], 0.0)  # [BM, BN]
        if tl.max(tl.max(b_g, 1), 0) > 0:  # a tile of zero probabilities contributes nothing: skip its V
            b_v = tl.load(p_v + o_n.to(tl.int64)[:, None] * stride_vt + o_dv[None, :] * stride_vd,
                          mask=(o_n[:, None] < T) & m_dv[None, :], other=0.0)  # [BN, BDV]
            b_o += dot_fp32acc((b_g * b_g).to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
            if store_w != 0:
                b_u += dot_fp32acc(b_g.to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
                b_gsum += tl.sum(b_g, 1)

    # a NaN row has NaN tau and no support: give it NaN, not zeros
    b_o = tl.where((b_tau == b_tau)[:, None], b_o, float("nan"))
    o_out = (i_bh.to(tl.int64) * T + o_m)[:, None] * Dv + o_dv[None, :]
    m_out = m_m[:, None] & m_dv[None, :]
    tl.store(o + o_out, b_o.to(o.dtype.element_ty), mask=m_out)
    if store_w != 0:
        b_w = b_u / tl.where(b_gsum > 0, b_gsum, 1.0)[:, None]  # rows past T have no support: no 0 / 0
        tl.store(w + o_out, tl.where((b_tau == b_tau)[:, None], b_w, float("nan")), mask=m_out)


@triton.jit(do_not_specialize=["H", "T", "D", "Dv", "causal"])  # no variant per runtime value 1
def _entmax_bwd_dq_kernel(q, k, v, do, tau, c, dq,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_ob, stride_oh, stride_ot, stride_od,
                          H, T, D, Dv, half_scale, scale, causal,
                          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                          UPCAST_DOTS: tl.constexpr):
    """dq[:, :, :, chunk] (B, H, T, D) = scale * dS @ k with ``dS = G (dO v^T - c)``.
    Grid (cdiv(T, BM), cdiv(D, BD), B*H)."""
    i_m, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    p_do = do + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D

    b_tau = tl.load(tau + i_bh.to(tl.int64) * T + o_m, mask=m_m, other=float("inf"))  # [BM]
    b_c = tl.load(c + i_bh.to(tl.int64) * T + o_m, mask=m_m, other=0.0)  # [BM]
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(0, _visible_keys_end(i_m, T, causal, BM), BN):
        o_n = n0 + tl.arange(0, BN)
        b_z = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, o_n, T, D,
                      half_scale, causal, BM, BN, BD, UPCAST_DOTS)  # [BM, BN]
        b_g = tl.where(b_z > b_tau[:, None], b_z - b_tau[:, None], 0.0)  # [BM, BN]
        if tl.max(tl.max(b_g, 1), 0) > 0:
            b_dp = _row_dots(p_do, stride_ot, stride_od, p_v, stride_vt, stride_vd, o_m, o_n, T, Dv,
                             BM, BN, BDV, UPCAST_DOTS)  # [BM, BN]
            b_ds = tl.where(b_g > 0, b_g * (b_dp - b_c[:, None]), 0.0)
            b_k = tl.load(p_k + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :] * stride_kd,
                          mask=(o_n[:, None] < T) & m_d[None, :], other=0.0)  # [BN, BD]
            b_dq += dot_fp32acc(b_ds.to(b_k.dtype), b_k, "tf32x3", UPCAST_DOTS)

    o_out = (i_bh.to(tl.int64) * T + o_m)[:, None] * D + o_d[None, :]
    tl.store(dq + o_out, (b_dq * scale).to(dq.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["H", "T", "D", "Dv", "causal"])  # no variant per runtime value 1
def _entmax_bwd_dkdv_kernel(q, k, v, do, tau, c, dk, dv,
                            stride_qb, stride_qh, stride_qt, stride_qd,
                            stride_kb, stride_kh, stride_kt, stride_kd,
                            stride_vb, stride_vh, stride_vt, stride_vd,
                            stride_ob, stride_oh, stride_ot, stride_od,
                            H, T, D, Dv, half_scale, scale, causal,
                            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                            UPCAST_DOTS: tl.constexpr):
    """For one key tile, feature chunk i_c of dk (B, H, T, D) = scale * dS^T @ q and of dv (B, H, T, Dv) = p^T @ dO,
    sharing the scores. Grid (cdiv(T, BN), max(cdiv(D, BD), cdiv(Dv, BDV)), B*H)."""
    i_n, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    p_do = do + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < T
    o_d = i_c * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_dv = i_c * BDV + tl.arange(0, BDV)
    m_dv = o_dv < Dv
    # when D != Dv, the programs past the narrower one skip its half
    has_dk = i_c * BD < D
    has_dv = i_c * BDV < Dv

    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BDV], dtype=tl.float32)
    for m0 in range(_seeing_queries_start(i_n, causal, BM, BN), T, BM):
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < T
        b_tau = tl.load(tau + i_bh.to(tl.int64) * T + o_m, mask=m_m, other=float("inf"))  # [BM]
        b_z = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, o_n, T, D,
                      half_scale, causal, BM, BN, BD, UPCAST_DOTS)  # [BM, BN]
        b_g = tl.where(b_z > b_tau[:, None], b_z - b_tau[:, None], 0.0)  # [BM, BN]
        if tl.max(tl.max(b_g, 1), 0) > 0:
            if has_dk:
                b_c = tl.load(c + i_bh.to(tl.int64) * T + o_m, mask=m_m, other=0.0)  # [BM]
                b_dp = _row_dots(p_do, stride_ot, stride_od, p_v, stride_vt, stride_vd, o_m, o_n, T, Dv,
                                 BM, BN, BDV, UPCAST_DOTS)  # [BM, BN]
                b_ds = tl.where(b_g > 0, b_g * (b_dp - b_c[:, None]), 0.0)
                b_q = tl.load(p_q + o_m.to(tl.int64)[:, None] * stride_qt + o_d[None, :] * stride_qd,
                              mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
                b_dk += dot_fp32acc(tl.trans(b_ds.to(b_q.dtype)), b_q, "tf32x3", UPCAST_DOTS)
            if has_dv:
                b_do = tl.load(p_do + o_m.to(tl.int64)[:, None] * stride_ot + o_dv[None, :] * stride_od,
                               mask=m_m[:, None] & m_dv[None, :], other=0.0)  # [BM, BDV]
                b_dv += dot_fp32acc(tl.trans((b_g * b_g).to(b_do.dtype)), b_do, "tf32x3", UPCAST_DOTS)

    o_row = i_bh.to(tl.int64) * T + o_n
    tl.store(dk + o_row[:, None] * D + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty),
             mask=m_n[:, None] & m_d[None, :])
    tl.store(dv + o_row[:, None] * Dv + o_dv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_n[:, None] & m_dv[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _launch_options():
    return {"num_warps": _NUM_WARPS, "num_stages": _NUM_STAGES}


def _entmax_attention_fwd(q, k, v, causal: bool, scale: float, store_w: bool):
    """Launch the tau and forward kernels. Returns o (B, H, T, Dv) in v's dtype, tau (B, H, T) fp32 and, with
    ``store_w``, w (B, H, T, Dv) fp32 for the backward (else None)."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    tiles = _tiles()
    half_scale = 0.5 * scale
    tau = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    in_registers = T <= tiles.row_block_n
    block_m, block_n = (tiles.row_block_m, tiles.row_block_n) if in_registers else (tiles.block_m, tiles.block_n)
    _entmax_tau_kernel[(triton.cdiv(T, block_m), B * H)](
        q, k, tau, *q.stride(), *k.stride(), H, T, D, half_scale, int(causal),
        ROW_IN_REGISTERS=in_registers, MAX_PASSES=_MAX_PASSES, BM=block_m, BN=block_n, BD=tiles.block_d,
        UPCAST_DOTS=upcast_dots_for(q.dtype), **_launch_options())

    o = torch.empty((B, H, T, Dv), dtype=v.dtype, device=v.device)
    w = torch.empty((B, H, T, Dv), dtype=torch.float32, device=v.device) if store_w else None
    grid = (triton.cdiv(T, tiles.block_m), triton.cdiv(Dv, tiles.block_dv), B * H)
    _entmax_fwd_kernel[grid](
        q, k, v, tau, o, tau if w is None else w,  # w unused without store_w: any fp32 pointer
        *q.stride(), *k.stride(), *v.stride(), H, T, D, Dv, half_scale,
        int(causal), int(store_w), BM=tiles.block_m, BN=tiles.block_n, BD=tiles.block_d,
        BDV=tiles.block_dv, UPCAST_DOTS=upcast_dots_for(q.dtype), **_launch_options())
    return o, tau, w


def _entmax_attention_bwd(do, q, k, v, tau, w, causal: bool, scale: float):
    """Launch the two backward kernels. Returns dq, dk (B, H, T, D) and dv (B, H, T, Dv) in the inputs' dtype."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    tiles = _tiles()
    half_scale = 0.5 * scale
    # c_i = sum_j G_ij dP_ij / sum_j G_ij = dO_i . w_i: flash-attention's rowsum(dO * O) for entmax
    c = torch.einsum("bhtd,bhtd->bht", do.float(), w).contiguous()
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, T, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, T, Dv), dtype=v.dtype, device=v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    blocks = dict(BM=tiles.block_m, BN=tiles.block_n, BD=tiles.block_d, BDV=tiles.block_dv,
                  UPCAST_DOTS=upcast_dots_for(q.dtype))
    _entmax_bwd_dq_kernel[(triton.cdiv(T, tiles.block_m), triton.cdiv(D, tiles.block_d), B * H)](
        q, k, v, do, tau, c, dq, *strides, H, T, D, Dv, half_scale, scale, int(causal), **blocks, **_launch_options())
    chunks = max(triton.cdiv(D, tiles.block_d), triton.cdiv(Dv, tiles.block_dv))
    _entmax_bwd_dkdv_kernel[(triton.cdiv(T, tiles.block_n), chunks, B * H)](
        q, k, v, do, tau, c, dk, dv, *strides, H, T, D, Dv, half_scale, scale, int(causal),
        **blocks, **_launch_options())
    return dq, dk, dv


# torch.library ops (docs/design.md section 5): opaque to torch.compile, with fake (meta) implementations and the
# fused backward registered as their autograd formula. Saved per call: q, k, v, tau (B, H, T) and w (B, H, T, Dv).


@torch.library.custom_op("kernels::entmax15_attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, bool causal, float scale, bool store_w) "
                                "-> (Tensor, Tensor, Tensor)")
def _entmax15_attention_fwd_op(q, k, v, causal, scale, store_w):
    """Triton forward: (o, tau, w); w is empty (0,) without ``store_w``."""
    with launch_device_of(q):
        o, tau, w = _entmax_attention_fwd(q, k, v, causal, scale, store_w)
    return o, tau, w if w is not None else tau.new_zeros(0)


@_entmax15_attention_fwd_op.register_fake
def _(q, k, v, causal, scale, store_w):
    B, H, T, _ = q.shape
    shape_w = (B, H, T, v.shape[-1]) if store_w else (0,)
    return (v.new_empty((B, H, T, v.shape[-1])), q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty(shape_w, dtype=torch.float32))


@torch.library.custom_op("kernels::entmax15_attention_bwd", mutates_args=(),
                         schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor tau, Tensor w, bool causal, "
                                "float scale) -> (Tensor, Tensor, Tensor)")
def _entmax15_attention_bwd_op(do, q, k, v, tau, w, causal, scale):
    """Triton backward: (dq, dk, dv)."""
    with launch_device_of(q):
        return _entmax_attention_bwd(do, q, k, v, tau, w, causal, scale)


@_entmax15_attention_bwd_op.register_fake
def _(do, q, k, v, tau, w, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _entmax15_attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale, _ = inputs
    _, tau, w = output
    ctx.save_for_backward(q, k, v, tau, w)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(tau, w)


def _entmax15_attention_backward(ctx, do, _d_tau, _d_w):
    q, k, v, tau, w = ctx.saved_tensors
    dq, dk, dv = _entmax15_attention_bwd_op(do, q, k, v, tau, w, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_entmax15_attention_fwd_op.register_autograd(_entmax15_attention_backward,
                                             setup_context=_entmax15_attention_setup_context)


@torch.library.custom_op("kernels::entmax15", mutates_args=(), schema="(Tensor scores) -> Tensor")
def _entmax15_last_dim(scores):
    """``entmax.entmax15(scores, dim=-1)`` as an op that torch.compile can trace (the package's Function cannot)."""
    import entmax

    with torch.no_grad():
        return entmax.entmax15(scores, dim=-1)


@_entmax15_last_dim.register_fake
def _(scores):
    return torch.empty_like(scores)


def _entmax15_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _entmax15_backward(ctx, grad):
    """The entmax package's backward (docs/design.md section 2): dS = G (dP - c) with G = sqrt(p)."""
    (probabilities,) = ctx.saved_tensors
    root = probabilities.sqrt()
    d_scores = grad * root
    return d_scores - (d_scores.sum(-1, keepdim=True) / root.sum(-1, keepdim=True)) * root


_entmax15_last_dim.register_autograd(_entmax15_backward, setup_context=_entmax15_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


@autocast_op
def entmax15_attention_weights(q: Tensor, k: Tensor, *, causal: bool = True,
                               scale: Optional[float] = None) -> Tensor:
    """The attention matrix ``entmax15(mask(q k^T * scale))`` (B, H, T, T), with the ``entmax`` package, computed in
    float32 or in the inputs' dtype if wider (float64 for tests). For references and drawing only: O(T^2) memory."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * scale
    if causal:
        t = q.shape[-2]
        hidden = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return _entmax15_last_dim(scores)


@autocast_op
def entmax15_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                                 scale: Optional[float] = None) -> Tensor:
    """``entmax15(mask(q k^T * scale)) @ v`` (B, H, T, Dv) in plain PyTorch, computed in float32 (float64 for
    float64 inputs) and returned in v's dtype."""
    weights = entmax15_attention_weights(q, k, causal=causal, scale=scale)
    return (weights @ v.to(weights.dtype)).to(v.dtype)


def tau_solver_passes(q, k, *, causal=True, scale=None, block_m=64, block_n=64) -> torch.Tensor:
    """Passes over K that ``_entmax_tau_kernel`` makes per query tile, (B, H, cdiv(T, block_m)) int64: a PyTorch
    mirror of the solver's pass count, for lengths where the interpreter is too slow to count it (``kernels.counts``;
    ``tests/test_counts.py`` proves it equal to the kernel's own count on small shapes).

    ``block_m`` x ``block_n`` are the call's tiles: the launcher's ``(row_block_m, row_block_n)`` when
    ``T <= row_block_n``, else ``(block_m, block_n)``. A tile of rows longer than one key tile (``T > block_n``)
    makes 1 pass for the row max plus one per Newton / closed-form step until all its rows are solved (at most
    ``_MAX_PASSES``); rows that fit one key tile keep their scores in registers: 1 pass (K is read once, however many
    steps the solver takes). Computed in float32 like the kernel, a chunk of query rows at a time.
    """
    _check_attention_inputs(q, k, k, causal, scale)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    B, H, T, D = q.shape
    tiles = triton.cdiv(T, block_m)
    if T <= block_n:
        return torch.ones((B, H, tiles), dtype=torch.int64, device=q.device)
    half_scale = 0.5 * (D ** -0.5 if scale is None else float(scale))
    rows_per_chunk = max(1, (1 << 24) // (T * block_m)) * block_m  # ~64 MB of scores per chunk
    passes = torch.zeros((B, H, tiles * block_m), dtype=torch.int64, device=q.device)
    for b in range(B):
        for h in range(H):
            for start in range(0, T, rows_per_chunk):
                stop = min(start + rows_per_chunk, T)
                keys = stop if causal else T
                z = (q[b, h, start:stop].float() @ k[b, h, :keys].float().T) * half_scale  # [rows, keys]
                if causal:
                    o_n = torch.arange(keys, device=q.device)
                    o_m = torch.arange(start, stop, device=q.device)
                    z = z.masked_fill(o_n[None, :] > o_m[:, None], float("-inf"))
                passes[b, h, start:stop] = _newton_passes(z)
    return 1 + passes.view(B, H, tiles, block_m).amax(dim=-1)


def _newton_passes(z: torch.Tensor) -> torch.Tensor:
    """Per row of halved scores z (rows, keys) fp32: the passes ``_threshold_step`` takes from ``max z - 1`` until
    the row's support is identified (0 for NaN rows, at most ``_MAX_PASSES``)."""
    done = torch.isnan(z).any(dim=1)
    tau = torch.where(torch.isnan(z), float("-inf"), z).amax(dim=1) - 1.0
    passes = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
    for _ in range(_MAX_PASSES):
        if bool(done.all()):
            break
        w = z - tau[:, None]
        support = w > 0
        w_support = torch.where(support, w, 0.0)
        count = support.sum(dim=1, dtype=torch.float32)
        a1, a2 = w_support.sum(dim=1), (w_support * w_support).sum(dim=1)
        w_min = torch.where(support, w, float("inf")).amin(dim=1)
        w_out = torch.where(support, float("-inf"), w).amax(dim=1)
        f = a2 - 1.0
        disc = a1 * a1 - count * f
        a1 = torch.where(count > 0, a1, 1.0)
        delta = f / (a1 + torch.sqrt(disc.clamp(min=0.0)))
        exact = (disc >= 0) & (w_min >= delta) & (w_out <= delta)
        passes += (~done).long()
        tau = torch.where(done, tau, torch.where(exact, tau + delta, tau + f / (2.0 * a1)))
        done = done | exact
    return passes


def _check_attention_inputs(q, k, v, causal, scale) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor, ndim=4)
    check_same_dtype_and_device(q=q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, H, T, D) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in (B, H, T) = {tuple(q.shape[:3])}, got shape {tuple(v.shape)}")
    check_nonempty(q=q, k=k, v=v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_scale(scale)


@autocast_op
def entmax15_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                       scale: Optional[float] = None) -> Tensor:
    """Entmax-1.5 attention: ``entmax15(mask(q k^T * scale)) @ v``.

    q, k: (B, H, T, D); v: (B, H, T, Dv); fp32, fp16 or bf16 (any strides). Returns (B, H, T, Dv) in the inputs'
    dtype. ``causal`` hides keys j > i; ``scale`` defaults to ``D ** -0.5``. Differentiable in q, k and v.
    Runs the Triton kernels or the reference as ``kernels.backend.use_triton`` decides.
    """
    _check_attention_inputs(q, k, v, causal, scale)
    if not use_triton(q, k, v):
        return entmax15_attention_reference(q, k, v, causal=causal, scale=scale)
    check_batch_heads(q.shape[0] * q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    store_w = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # the backward needs w
    return _entmax15_attention_fwd_op(q, k, v, causal, scale, store_w)[0]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: pointer arguments that hold fp32 whatever the input dtype
_FP32_POINTERS = ("tau", "w", "c")
_FLOAT_SCALARS = ("half_scale", "scale")


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    pointers = {"q", "k", "v", "do", "o", "dq", "dk", "dv"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in pointers:
            signature[name] = f"*{dtype}"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def aot_configurations() -> List[AotConfig]:
    """Every (kernel, dtype, constexpr) combination the launchers can launch with the default tiles on a GPU (causal
    and store_w are runtime flags; UPCAST_DOTS is set only under the interpreter)."""
    t = _DEFAULT_TILES
    blocks = dict(BM=t.block_m, BN=t.block_n, BD=t.block_d, BDV=t.block_dv, UPCAST_DOTS=False)
    variants = [
        ("tau registers", _entmax_tau_kernel,
         dict(ROW_IN_REGISTERS=True, MAX_PASSES=_MAX_PASSES, BM=t.row_block_m, BN=t.row_block_n, BD=t.block_d,
              UPCAST_DOTS=False)),
        ("tau passes", _entmax_tau_kernel,
         dict(ROW_IN_REGISTERS=False, MAX_PASSES=_MAX_PASSES, BM=t.block_m, BN=t.block_n, BD=t.block_d,
              UPCAST_DOTS=False)),
        ("fwd", _entmax_fwd_kernel, blocks),
        ("bwd dq", _entmax_bwd_dq_kernel, blocks),
        ("bwd dkdv", _entmax_bwd_dkdv_kernel, blocks),
    ]
    configs = []
    for dtype in _TRITON_DTYPES.values():
        for label, kernel, constexprs in variants:
            configs.append(AotConfig(
                label=f"{label} {dtype}", kernel=kernel, signature=_signature(kernel, dtype, constexprs),
                constexprs=constexprs, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES))
    return configs


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


class EntmaxAttentionOutput(NamedTuple):
    """``output`` (B, T, E); ``context`` = A @ x averaged over heads (B, T, E) or None; ``weights`` A (B, H, T, T)
    or None."""

    output: torch.Tensor
    context: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]


class EntmaxCausalAttention(torch.nn.Module):
    """Multi-head entmax-1.5 self-attention on the reference op; ``FusedEntmaxCausalAttention`` is its Triton twin
    with the same arguments and ``state_dict`` keys.

    Constructor: ``(embed_dim, num_heads=1, dropout=0.0, bias=True, *, out_proj=True, causal=True,
    batch_first=True)``; ``dropout`` is ``nn.MultiheadAttention``'s positional argument and must be 0 (entmax
    weights are not dropped); ``batch_first=False`` takes (T, B, E).

    ``forward(query, key=None, value=None, *, key_padding_mask=None, need_weights=False, average_attn_weights=True)``
    returns ``(output, weights or None)`` like ``nn.MultiheadAttention``: self-attention only (key and value None or
    query itself); output (B, T, E); weights (B, T, T) averaged over heads or (B, H, T, T), recomputed by the
    reference formula. Right-padded batches need no ``key_padding_mask`` under the causal mask (a valid query never
    sees a later, padded key); any other mask, ``attn_mask`` and ``is_causal`` are refused.

    ``forward_with_context(x, *, need_weights=False)`` returns ``EntmaxAttentionOutput(output, context, weights)``
    (three fields, so it cannot be unpacked as the pair above): ``context = A @ x`` averaged over heads (CARN's causal
    parents) comes from the same attention call, with x appended to every head's values; weights (B, H, T, T).
    """

    _attention = staticmethod(entmax15_attention_reference)

    def __init__(self, embed_dim: int, num_heads: int = 1, dropout: float = 0.0, bias: bool = True, *,
                 out_proj: bool = True, causal: bool = True, batch_first: bool = True):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if dropout != 0.0:
            raise ValueError(f"dropout must be 0.0: entmax attention weights are not dropped, got {dropout}")
        for name, flag in (("causal", causal), ("batch_first", batch_first)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.embed_dim, self.num_heads, self.causal, self.batch_first = embed_dim, num_heads, causal, batch_first
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias) if out_proj else None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, "
                f"out_proj={self.out_proj is not None}, batch_first={self.batch_first}")

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                *, key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        check_mha_unsupported(attn_mask=attn_mask, is_causal=is_causal, key_padding_mask=key_padding_mask)
        for name, other in (("key", key), ("value", value)):
            if other is not None and other is not query:
                raise ValueError(f"{name} must be None or query itself: {type(self).__name__} is self-attention")
        result = self._attend(query, return_context=False, need_weights=need_weights)
        weights = result.weights
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return result.output, weights

    def forward_with_context(self, x: torch.Tensor, *, need_weights: bool = False) -> EntmaxAttentionOutput:
        return self._attend(x, return_context=True, need_weights=need_weights)

    def _attend(self, x: torch.Tensor, *, return_context: bool, need_weights: bool) -> EntmaxAttentionOutput:
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have embed_dim = {self.embed_dim} features, got shape {tuple(x.shape)}")
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            x = x.transpose(0, 1)
        b, t, e = x.shape
        h, dh = self.num_heads, e // self.num_heads
        q, k, v = (proj(x).view(b, t, h, dh).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if return_context:
            v = torch.cat([v, x.to(v.dtype).unsqueeze(1).expand(b, h, t, e)], dim=-1)  # v is bf16 under autocast
        attended = self._attention(q, k, v, causal=self.causal)  # (B, H, T, dh [+ E])
        output = attended[..., :dh].transpose(1, 2).reshape(b, t, e)
        if self.out_proj is not None:
            output = self.out_proj(output)
        context = attended[..., dh:].mean(dim=1) if return_context else None
        weights = entmax15_attention_weights(q, k, causal=self.causal).to(output.dtype) if need_weights else None
        if not self.batch_first:
            output, context = output.transpose(0, 1), None if context is None else context.transpose(0, 1)
        return EntmaxAttentionOutput(output, context, weights)


class FusedEntmaxCausalAttention(EntmaxCausalAttention):
    """``EntmaxCausalAttention`` on the fused op (Triton kernels where ``kernels.backend`` selects them)."""

    _attention = staticmethod(entmax15_attention)
