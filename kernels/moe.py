"""Top-2 mixture-of-experts dispatch (docs/design.md sections 1 and 4), Triton forward and backward.

``moe_top2(x, gate_weight, w1, b1, w2, b2)``: x (N, d), gate_weight (E, d), w1 (E, d, h), b1 (E, h),
w2 (E, h, d_out), b2 (E, d_out) -> y (N, d_out)::

    logits = x @ gate_weight.T                      # (N, E), float32
    e_1, e_2 = top-2 experts of each row            # ties: the lower expert index first
    alpha = softmax(logits[e_1], logits[e_2])
    y = sum_k alpha_k * (gelu(x @ w1[e_k] + b1[e_k]) @ w2[e_k] + b2[e_k])     # gelu: exact (erf) form

Router rules, the same on both backends: among equal logits the lower expert index ranks first (so a row of equal
logits goes to experts 0 and 1); a row with a NaN or infinite logit (NaN or inf in x or gate_weight, or overflow)
goes to experts (0, 1) with NaN weights, so its output row is NaN, and so are the gradients that flow through it.

How the Triton path runs (no host-device synchronization anywhere, no atomics, deterministic):

1. ``_moe_route_kernel``: gate logits with float32 accumulation, top-2 and the softmax over the two.
2. The 2N (row, slot) pairs are grouped by expert with a stable device sort (``torch.sort``, i.e. CUB's
   radix sort) and per-expert offsets (``torch.searchsorted``); no capacity, no dropped rows.
3. ``_moe_grouped_matmul_kernel``: grouped GEMMs over the sorted pairs. The grid is the upper bound
   ``cdiv(2N, BM) + E`` pair tiles; each program finds its expert from the offsets on the device and programs
   beyond the last expert's rows exit. The first GEMM gathers x's rows and applies bias + GELU in its
   epilogue, the second reads the hidden rows in sorted order.
4. ``_moe_combine_kernel``: y[n] = alpha_1 * Y[pos(n, 1)] + alpha_2 * Y[pos(n, 2)] by a gather.
5. ``_moe_aux_loss_kernel``: the load-balancing loss (``MoERouting``) in one program (a deterministic sum), the
   routed fractions read from the expert offsets. The routing weights are the router's alpha: no torch op computes
   routing outside the kernels.

The backward reuses the grouped GEMM (dH = (alpha * dy) @ w2^T * gelu'(H_pre), dX = dH @ w1^T),
``_moe_grouped_wgrad_kernel`` for dW1/db1 and dW2/db2 (one program per output tile of one expert reduces over all
of that expert's pairs: deterministic), and ``_moe_router_grad_kernel`` for the gate logits' whole gradient:
``d logit_k = alpha_k * (g_k - sum_l alpha_l g_l)`` with ``g_k = dy . expert_k(x) + d weight_k``, zero for unchosen
experts, plus the aux loss's softmax term on every logit. The gate matmuls (N x d x E with E <= 64, a few percent of
the experts' work) use torch: ``dx += dlogits @ gate`` and ``dgate = dlogits^T @ x`` are plain dense GEMMs that
cuBLAS already runs at its best. Host-side work per forward + backward: these 11 kernels, the sort, searchsorted and
inverse-permutation scatter of step 2, and the two gate GEMMs (``python -m kernels.tools.launches``).

``row_mask`` (N,) bool leaves rows out (padding): their pairs get expert -1, which the stable sort puts before
every expert's pairs, so no GEMM tile, weight gradient or load-balancing term sees them (the grouped GEMM's first
tiles write zeros there); they output zeros and get zero gradients.

Float32 inputs multiply on TF32 tensor cores by default; ``KERNELS_FP32_PRECISION=ieee`` selects exact float32
products (see ``kernels._triton_helpers.fp32_dot_precision``).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
import triton
import triton.language as tl
from torch import nn

from ._checks import FLOAT_DTYPES, check_nonempty, check_same_dtype_and_device, check_tensor
from .aot import AotConfig
from ._autotune import ARCHS, FALLBACK, aot_candidates, config_label, launch, launch_arch, shape_bucket
from ._triton_helpers import dot_fp32acc, fp32_dot_precision, launch_device_of, upcast_dots_for
from ._amp import autocast_op
from .backend import use_triton

#: the router kernel holds all logits of a row in one [BM, MAX_EXPERTS] tile
MAX_EXPERTS = 64


class MoERouting(NamedTuple):
    """What the router chose, returned by ``moe_top2(..., return_routing=True)``.

    experts: (N, 2) long, each row's two experts, the higher logit first (ties: the lower index first; (0, 1) for a
    row with a non-finite logit); -1 on rows that ``row_mask`` leaves out.
    weights: (N, 2) float32, softmax over the two chosen logits (differentiable through the gate); NaN for a row with
    a non-finite logit; 0 on rows left out.
    aux_loss: scalar float32, the Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``, with f_e the
    fraction of the 2N' routed (row, expert) pairs that go to expert e and P_e the mean over rows of the
    softmax over ALL E logits, both over the N' rows that ``row_mask`` keeps (all rows without a mask; 0 when
    it keeps none). It is 1 for a perfectly balanced router and up to E / 2 when two experts take
    every row; add ``coefficient * aux_loss`` to the training loss (gradient flows through P_e only).
    """

    experts: torch.Tensor
    weights: torch.Tensor
    aux_loss: torch.Tensor


class MoETiles(NamedTuple):
    """Tile sizes and launch options of every MoE kernel for one dtype: one autotune candidate.

    Grouped GEMM: [block_m pairs, block_n outputs] tiles reducing over block_k features. Weight gradient:
    [block_m, block_n] tiles of dW reducing over block_k pairs. Router: block_m rows, block_k features.
    Combine and router gradient (memory-bound gathers, no matmul): [block_rows rows, block_n features],
    one pipeline stage; larger row blocks would only add register pressure.
    """

    block_m: int
    block_n: int
    block_k: int
    block_rows: int
    num_warps: int
    num_stages: int


#: autotune candidates per (architecture, dtype) (architectures: ``kernels._autotune``), the default first; each
#: kernel tunes among the distinct parts of them that it reads (``_kernel_candidates``). Tests replace this mapping
#: with tiny tiles to exercise several and partial tiles. The defaults were chosen from launch-specialized
#: ahead-of-time compiles at N 3,520, d = h = 512, E 4 (see docs/ops.md, "Launch configurations"): async copies in every streaming kernel;
#: 16-bit tiles take 8 warps (with 4 the weight-gradient kernel spilled on sm_80 and the grouped GEMM sat at 255
#: registers). Every candidate compiles without register spills at that shape (``python -m kernels.tools.report``).
_HALF_CANDIDATES = {
    "sm_80": (MoETiles(64, 128, 64, 16, 8, 3), MoETiles(128, 128, 32, 16, 8, 3), MoETiles(64, 64, 64, 16, 4, 3)),
    "sm_90": (MoETiles(64, 128, 64, 16, 8, 3), MoETiles(128, 128, 64, 16, 8, 3), MoETiles(64, 64, 64, 16, 4, 4)),
}
#: float32 (TF32 dots): on sm_90 every candidate has 64-row tiles per warpgroup of 4 warps, which Triton compiles to
#: Hopper's warpgroup MMA (HGMMA); 32-row tiles fall back to Ampere's HMMA there
_FP32_CANDIDATES = {
    "sm_80": (MoETiles(64, 64, 32, 16, 4, 2), MoETiles(64, 128, 32, 16, 8, 2), MoETiles(32, 64, 32, 16, 4, 3)),
    "sm_90": (MoETiles(64, 64, 32, 16, 4, 2), MoETiles(64, 128, 32, 16, 8, 2), MoETiles(64, 64, 32, 16, 4, 3)),
}
TILES = {
    (arch, dtype): (_FP32_CANDIDATES if dtype == torch.float32 else _HALF_CANDIDATES)[arch]
    for arch in ARCHS for dtype in (torch.float16, torch.bfloat16, torch.float32)
}


@functools.lru_cache(maxsize=None)
def _kernel_candidates(kind: str, candidates: tuple[MoETiles, ...]) -> list[triton.Config]:
    """The distinct configs of kernel ``kind`` (``route``, ``grouped_matmul``, ``grouped_wgrad``, ``combine``,
    ``router_grad``, ``aux_loss``) among ``candidates``, in their order: the parts of the tiles that the kernel
    reads."""
    configs = []
    for t in candidates:
        if kind == "route":
            config = triton.Config({"BM": t.block_m, "BK": t.block_k}, num_warps=t.num_warps, num_stages=t.num_stages)
        elif kind in ("grouped_matmul", "grouped_wgrad"):
            config = triton.Config({"BM": t.block_m, "BN": t.block_n, "BK": t.block_k}, num_warps=t.num_warps,
                                   num_stages=t.num_stages)
        elif kind == "aux_loss":  # one program over all rows, block_m at a time
            config = triton.Config({"BM": t.block_m}, num_warps=t.num_warps, num_stages=1)
        else:  # gathers: one pipeline stage
            config = triton.Config({"BM": t.block_rows, "BN": t.block_n}, num_warps=t.num_warps, num_stages=1)
        if config not in configs:
            configs.append(config)
    return configs


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _gelu(b_x):
    return 0.5 * b_x * (1.0 + tl.math.erf(b_x * 0.7071067811865476))


@triton.jit
def _gelu_grad(b_x):
    # d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
    return 0.5 * (1.0 + tl.math.erf(b_x * 0.7071067811865476)) + b_x * 0.3989422804014327 * tl.exp(-0.5 * b_x * b_x)


# The row count N is never specialized (do_not_specialize): batches of every size run the same compiled kernels.
@triton.jit(do_not_specialize=["N", "has_row_mask"])
def _moe_route_kernel(
    x, gate, logits, experts, alpha, row_mask,
    N, D, E,
    stride_xn, stride_xd, stride_ge, stride_gd,
    has_row_mask,
    BM: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    """Rows [i_m * BM, ...): logits (N, E) fp32, top-2 experts (N, 2) int64, softmax weights (N, 2) fp32.
    With has_row_mask, rows whose row_mask (N,) bool is False get experts -1 and weights 0."""
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_e = tl.arange(0, BE)
    m_m = o_m < N
    m_e = o_e < E
    b_logits = tl.zeros([BM, BE], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < D
        p_x = x + o_m[:, None].to(tl.int64) * stride_xn + o_k[None, :] * stride_xd
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        p_g = gate + o_e[None, :] * stride_ge + o_k[:, None] * stride_gd
        b_g = tl.load(p_g, mask=m_e[None, :] & m_k[:, None], other=0.0)  # [BK, BE]
        b_logits += dot_fp32acc(b_x, b_g, DOT_PRECISION, UPCAST_DOTS)
    p_logits = logits + o_m[:, None].to(tl.int64) * E + o_e[None, :]
    tl.store(p_logits, b_logits, mask=m_m[:, None] & m_e[None, :])

    # a row with a NaN or infinite logit goes to experts (0, 1) with NaN weights (module docstring)
    b_nonfinite = (b_logits != b_logits) | (tl.abs(b_logits) == float("inf"))
    b_bad = tl.max(tl.where(m_e[None, :] & b_nonfinite, 1, 0), axis=1) > 0  # [BM]
    b_scores = tl.where(m_e[None, :] & ~b_nonfinite, b_logits, float("-inf"))  # [BM, BE]
    b_first = tl.argmax(b_scores, axis=1, tie_break_left=True)  # [BM]; ties: the lower index
    b_top1 = tl.max(b_scores, axis=1)
    b_scores = tl.where(o_e[None, :] == b_first[:, None], float("-inf"), b_scores)
    b_second = tl.argmax(b_scores, axis=1, tie_break_left=True)
    b_top2 = tl.max(b_scores, axis=1)
    # softmax over the two logits; top2 <= top1, so the exponent cannot overflow
    b_ratio = tl.exp(b_top2 - b_top1)
    b_alpha1 = tl.where(b_bad, float("nan"), 1.0 / (1.0 + b_ratio))
    b_alpha2 = tl.where(b_bad, float("nan"), b_ratio / (1.0 + b_ratio))
    b_first = tl.where(b_bad, 0, b_first)
    b_second = tl.where(b_bad, 1, b_second)
    if has_row_mask != 0:  # rows left out: expert -1 (sorted before every expert's pairs), weight 0
        b_keep = tl.load(row_mask + o_m, mask=m_m, other=0) != 0
        b_first, b_second = tl.where(b_keep, b_first, -1), tl.where(b_keep, b_second, -1)
        b_alpha1, b_alpha2 = tl.where(b_keep, b_alpha1, 0.0), tl.where(b_keep, b_alpha2, 0.0)
    o_pair = o_m.to(tl.int64) * 2
    tl.store(experts + o_pair, b_first.to(tl.int64), mask=m_m)
    tl.store(experts + o_pair + 1, b_second.to(tl.int64), mask=m_m)
    tl.store(alpha + o_pair, b_alpha1, mask=m_m)
    tl.store(alpha + o_pair + 1, b_alpha2, mask=m_m)


# The mode flags of the next kernels are runtime arguments, not constexprs: their branches sit outside the
# inner loops (or are a select inside), and one compiled kernel per dtype keeps the ahead-of-time compile
# of every configuration within CI's time budget. do_not_specialize keeps the value 1 from being baked in.
@triton.jit(do_not_specialize=["gather_a", "scale_rows", "has_bias", "epilogue"])
def _moe_grouped_matmul_kernel(
    a, sorted_pairs, pair_weights, w, bias, c, c_pre, expert_offsets,
    E, K, NC,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_cm, stride_cn,
    gather_a, scale_rows, has_bias, epilogue,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    """C[p] = epilogue(A[row(p)] @ W[e(p)] (* weight[p]) (+ bias[e(p)])) for the sorted pairs p of one tile.

    Pairs are sorted by expert; expert e owns sorted pairs [expert_offsets[e], expert_offsets[e + 1]). The first
    cdiv(expert_offsets[0], BM) tiles cover the pairs of rows left out by the row mask (sorted first): they store
    zeros in C (and c_pre with epilogue 1), so that every output is defined.
    gather_a: A is indexed by the pair's source row (sorted_pairs[p] // 2), else by p itself.
    scale_rows: multiply row p by pair_weights[sorted_pairs[p]] (the pair's alpha).
    epilogue: 0 none; 1 GELU, storing the pre-activation in c_pre; 2 multiply by gelu'(c_pre) (backward).
    """
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < NC
    left_out = tl.load(expert_offsets)  # pairs of rows left out: sorted positions [0, left_out)
    left_out_tiles = tl.cdiv(left_out, BM)
    if i_t < left_out_tiles:
        o_p = i_t * BM + tl.arange(0, BM)
        o_c = o_p[:, None].to(tl.int64) * stride_cm + o_n[None, :] * stride_cn
        m_c = (o_p < left_out)[:, None] & m_n[None, :]
        b_zero = tl.zeros([BM, BN], dtype=c.dtype.element_ty)
        tl.store(c + o_c, b_zero, mask=m_c)
        if epilogue == 1:
            tl.store(c_pre + o_c, b_zero, mask=m_c)
        return
    i_t -= left_out_tiles
    # find this tile's expert: expert e owns tiles [tile_end[e] - cdiv(count_e, BM), tile_end[e])
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_start = tl.load(expert_offsets + o_e, mask=m_e, other=0)  # [BE]
    b_end = tl.load(expert_offsets + o_e + 1, mask=m_e, other=0)
    b_tiles = tl.cdiv(b_end - b_start, BM)
    b_tile_end = tl.cumsum(b_tiles, axis=0)
    i_e = tl.sum((m_e & (b_tile_end <= i_t)).to(tl.int32), axis=0)
    if i_e >= E:  # the grid is an upper bound on the number of tiles
        return
    m_this = o_e == i_e
    pair_start = tl.sum(tl.where(m_this, b_start, 0), axis=0)
    pair_end = tl.sum(tl.where(m_this, b_end, 0), axis=0)
    tile_begin = tl.sum(tl.where(m_this, b_tile_end - b_tiles, 0), axis=0)

    o_p = pair_start + (i_t - tile_begin) * BM + tl.arange(0, BM)  # [BM] sorted pair indices (int64)
    m_p = o_p < pair_end
    o_src = tl.load(sorted_pairs + o_p, mask=m_p, other=0)  # [BM] the pairs' (row, slot) indices
    o_a = tl.where(gather_a != 0, o_src // 2, o_p)
    p_w_e = w + i_e.to(tl.int64) * stride_we

    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(a + o_a[:, None] * stride_am + o_k[None, :] * stride_ak,
                      mask=m_p[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_w = tl.load(p_w_e + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn,
                      mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        b_acc += dot_fp32acc(b_a, b_w, DOT_PRECISION, UPCAST_DOTS)

    if scale_rows != 0:
        b_acc *= tl.load(pair_weights + o_src, mask=m_p, other=0.0)[:, None]
    if has_bias != 0:
        b_bias = tl.load(bias + i_e.to(tl.int64) * stride_be + o_n * stride_bn, mask=m_n, other=0.0)
        b_acc += b_bias.to(tl.float32)[None, :]
    o_c = o_p[:, None] * stride_cm + o_n[None, :] * stride_cn  # [BM, BN]
    m_c = m_p[:, None] & m_n[None, :]
    if epilogue == 1:
        tl.store(c_pre + o_c, b_acc.to(c_pre.dtype.element_ty), mask=m_c)
        b_acc = _gelu(b_acc)
    if epilogue == 2:
        b_pre = tl.load(c_pre + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_acc *= _gelu_grad(b_pre)
    tl.store(c + o_c, b_acc.to(c.dtype.element_ty), mask=m_c)


@triton.jit(do_not_specialize=["gather_a", "gather_b", "scale_b"])
def _moe_grouped_wgrad_kernel(
    a, b, sorted_pairs, pair_weights, dw, db, expert_offsets,
    K, NC,
    stride_am, stride_ak, stride_bm, stride_bn, stride_dwe, stride_dwk, stride_dwn, stride_dbe, stride_dbn,
    gather_a, gather_b, scale_b,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    """dW[e] = A[pairs of e]^T @ B[pairs of e] (K, NC) and db[e] = column sums of B[pairs of e].

    One program per (expert, [BM, BN] tile of dW) loops over all of the expert's pairs, BK at a time.
    gather_a / gather_b: the operand is indexed by the pair's source row, else by the sorted pair index.
    scale_b: B's rows are multiplied by the pair's alpha (pair_weights[sorted_pairs[p]]).
    """
    i_e, i_kn = tl.program_id(0), tl.program_id(1)
    n_tiles_n = tl.cdiv(NC, BN)
    i_k, i_n = i_kn // n_tiles_n, i_kn % n_tiles_n
    o_k = i_k * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_k = o_k < K
    m_n = o_n < NC
    pair_start = tl.load(expert_offsets + i_e)
    pair_end = tl.load(expert_offsets + i_e + 1)

    b_dw = tl.zeros([BM, BN], dtype=tl.float32)
    b_db = tl.zeros([BN], dtype=tl.float32)
    for p0 in range(pair_start, pair_end, BK):
        o_p = p0 + tl.arange(0, BK)  # [BK] sorted pair indices
        m_p = o_p < pair_end
        o_src = tl.load(sorted_pairs + o_p, mask=m_p, other=0)
        o_a = tl.where(gather_a != 0, o_src // 2, o_p)
        o_b = tl.where(gather_b != 0, o_src // 2, o_p)
        b_at = tl.load(a + o_a[None, :] * stride_am + o_k[:, None] * stride_ak,
                       mask=m_p[None, :] & m_k[:, None], other=0.0)  # [BM, BK]: A^T
        b_b = tl.load(b + o_b[:, None] * stride_bm + o_n[None, :] * stride_bn,
                      mask=m_p[:, None] & m_n[None, :], other=0.0).to(tl.float32)  # [BK, BN]
        if scale_b != 0:
            b_b *= tl.load(pair_weights + o_src, mask=m_p, other=0.0)[:, None]
        b_db += tl.sum(b_b, axis=0)
        b_dw += dot_fp32acc(b_at, b_b.to(b_at.dtype), DOT_PRECISION, UPCAST_DOTS)

    p_dw = dw + i_e.to(tl.int64) * stride_dwe + o_k[:, None] * stride_dwk + o_n[None, :] * stride_dwn
    tl.store(p_dw, b_dw.to(dw.dtype.element_ty), mask=m_k[:, None] & m_n[None, :])
    if i_k == 0:
        p_db = db + i_e.to(tl.int64) * stride_dbe + o_n * stride_dbn
        tl.store(p_db, b_db.to(db.dtype.element_ty), mask=m_n)


@triton.jit(do_not_specialize=["N", "weighted"])
def _moe_combine_kernel(
    src, pair_position, alpha, expert_offsets, out,
    N, C,
    stride_sm, stride_sc, stride_on, stride_oc,
    weighted,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """out[n] = w_1 * src[pos(n, 1)] + w_2 * src[pos(n, 2)], w = alpha[n] if weighted else 1 (a gather, no atomics).
    Rows left out by the row mask (their pairs sort before expert_offsets[0]) read nothing and output 0."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    o_pair = o_m.to(tl.int64) * 2
    o_first = tl.load(pair_position + o_pair, mask=o_m < N, other=0)
    o_second = tl.load(pair_position + o_pair + 1, mask=o_m < N, other=0)
    # a row's two pairs are left out together
    m_m = (o_m < N) & (o_first >= tl.load(expert_offsets))
    m_c = m_m[:, None] & (o_n < C)[None, :]
    b_first = tl.load(src + o_first[:, None] * stride_sm + o_n[None, :] * stride_sc, mask=m_c, other=0.0)
    b_second = tl.load(src + o_second[:, None] * stride_sm + o_n[None, :] * stride_sc, mask=m_c, other=0.0)
    b_first = b_first.to(tl.float32)  # [BM, BN]
    b_second = b_second.to(tl.float32)
    if weighted != 0:
        b_first *= tl.load(alpha + o_pair, mask=m_m, other=0.0)[:, None]
        b_second *= tl.load(alpha + o_pair + 1, mask=m_m, other=0.0)[:, None]
    p_out = out + o_m[:, None].to(tl.int64) * stride_on + o_n[None, :] * stride_oc
    tl.store(p_out, (b_first + b_second).to(out.dtype.element_ty), mask=(o_m < N)[:, None] & (o_n < C)[None, :])


@triton.jit
def _routing_fractions(expert_offsets, N, E, BE: tl.constexpr):
    """(f [BE] fp32: the fraction of the routed pairs that go to each expert, rows: the rows kept, at least 1)."""
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_counts = tl.load(expert_offsets + o_e + 1, mask=m_e, other=0) - tl.load(expert_offsets + o_e, mask=m_e, other=0)
    rows = tl.maximum((2 * N - tl.load(expert_offsets)) // 2, 1).to(tl.float32)
    return b_counts.to(tl.float32) / (2.0 * rows), rows


@triton.jit
def _row_probabilities(logits, o_m, m_keep, E, BE: tl.constexpr):
    """[BM, BE] softmax over all E logits of rows o_m; 0 on rows not in m_keep and beyond E."""
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_logits = tl.load(logits + o_m[:, None].to(tl.int64) * E + o_e[None, :], mask=m_keep[:, None] & m_e[None, :],
                       other=0.0)
    b_logits = tl.where(m_e[None, :], b_logits, float("-inf"))  # rows left out stay finite: no NaN to discard
    b_exp = tl.exp(b_logits - tl.max(b_logits, axis=1)[:, None])
    b_p = b_exp / tl.sum(b_exp, axis=1)[:, None]
    return tl.where(m_keep[:, None] & m_e[None, :], b_p, 0.0)


@triton.jit(do_not_specialize=["N"])
def _moe_aux_loss_kernel(logits, experts, expert_offsets, aux_loss, N, E, BM: tl.constexpr, BE: tl.constexpr):
    """aux_loss (scalar fp32) = E * sum_e f_e * P_e (MoERouting), by one program (a deterministic order): f_e from
    the expert offsets, P_e the mean softmax probability of expert e over the rows kept (experts[n, 0] >= 0)."""
    b_fraction, rows = _routing_fractions(expert_offsets, N, E, BE)
    b_p = tl.zeros([BE], dtype=tl.float32)
    for m0 in range(0, N, BM):
        o_m = m0 + tl.arange(0, BM)
        m_keep = (o_m < N) & (tl.load(experts + o_m.to(tl.int64) * 2, mask=o_m < N, other=-1) >= 0)
        b_p += tl.sum(_row_probabilities(logits, o_m, m_keep, E, BE), axis=0)
    tl.store(aux_loss, E * tl.sum(b_fraction * b_p, axis=0) / rows)


@triton.jit(do_not_specialize=["N", "stride_wn", "stride_wk", "has_d_weights", "has_d_aux"])
def _moe_router_grad_kernel(
    dy, y_pairs, pair_position, alpha, d_weights, d_aux, logits, experts, expert_offsets, d_logits,
    N, C, E,
    stride_dn, stride_dc, stride_ym, stride_yc, stride_wn, stride_wk,
    has_d_weights, has_d_aux,
    BM: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr,
):
    """d_logits (N, E), in its dtype: the gradient of the gate logits from y, the routing weights and the aux loss.

    Row n's k-th expert gets alpha_k * (g_k - sum_l alpha_l g_l), g_k = dy[n] . Y_k[n] + d_weights[n, k] (with
    has_d_weights); with has_d_aux every logit gets d_aux * E / rows * p_ne * (f_e - sum_l f_l p_nl) (the aux loss's
    softmax, see _moe_aux_loss_kernel). 0 on rows left out by the row mask (pairs before expert_offsets[0])."""
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_pair = o_m.to(tl.int64) * 2
    o_first = tl.load(pair_position + o_pair, mask=o_m < N, other=0)
    o_second = tl.load(pair_position + o_pair + 1, mask=o_m < N, other=0)
    m_m = (o_m < N) & (o_first >= tl.load(expert_offsets))
    b_g1 = tl.zeros([BM], dtype=tl.float32)
    b_g2 = tl.zeros([BM], dtype=tl.float32)
    if has_d_weights != 0:
        p_dw = d_weights + o_m.to(tl.int64) * stride_wn  # any strides: autograd may pass an expanded gradient
        b_g1 += tl.load(p_dw, mask=m_m, other=0.0).to(tl.float32)
        b_g2 += tl.load(p_dw + stride_wk, mask=m_m, other=0.0).to(tl.float32)
    for c0 in range(0, C, BN):
        o_c = c0 + tl.arange(0, BN)
        m_c = m_m[:, None] & (o_c < C)[None, :]
        b_dy = tl.load(dy + o_m[:, None].to(tl.int64) * stride_dn + o_c[None, :] * stride_dc,
                       mask=m_c, other=0.0).to(tl.float32)  # [BM, BN]
        b_y1 = tl.load(y_pairs + o_first[:, None] * stride_ym + o_c[None, :] * stride_yc, mask=m_c, other=0.0)
        b_y2 = tl.load(y_pairs + o_second[:, None] * stride_ym + o_c[None, :] * stride_yc, mask=m_c, other=0.0)
        b_g1 += tl.sum(b_dy * b_y1.to(tl.float32), axis=1)
        b_g2 += tl.sum(b_dy * b_y2.to(tl.float32), axis=1)
    b_alpha1 = tl.load(alpha + o_pair, mask=m_m, other=0.0)
    b_alpha2 = tl.load(alpha + o_pair + 1, mask=m_m, other=0.0)
    # with two experts, alpha_1 (g_1 - alpha_1 g_1 - alpha_2 g_2) = alpha_1 alpha_2 (g_1 - g_2) = -d logit of e_2
    b_d = b_alpha1 * b_alpha2 * (b_g1 - b_g2)
    o_e = tl.arange(0, BE)
    b_first = tl.load(experts + o_pair, mask=m_m, other=-1)
    b_second = tl.load(experts + o_pair + 1, mask=m_m, other=-1)
    b_dlogits = (tl.where(o_e[None, :] == b_first[:, None], b_d[:, None], 0.0)
                 - tl.where(o_e[None, :] == b_second[:, None], b_d[:, None], 0.0))  # [BM, BE]
    if has_d_aux != 0:
        b_fraction, rows = _routing_fractions(expert_offsets, N, E, BE)
        b_p = _row_probabilities(logits, o_m, m_m, E, BE)
        b_mean = tl.sum(b_p * b_fraction[None, :], axis=1)
        b_dlogits += tl.load(d_aux).to(tl.float32) * E / rows * b_p * (b_fraction[None, :] - b_mean[:, None])
    p_out = d_logits + o_m[:, None].to(tl.int64) * E + o_e[None, :]
    tl.store(p_out, b_dlogits.to(d_logits.dtype.element_ty), mask=(o_m < N)[:, None] & (o_e < E)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _dot_options(dtype):
    """float32: TF32 tensor cores unless ``KERNELS_FP32_PRECISION=ieee`` (``fp32_dot_precision``); 16-bit inputs
    multiply exactly. See _triton_helpers for UPCAST_DOTS (the interpreter's bfloat16 dot workaround, never on a
    GPU)."""
    precision = fp32_dot_precision() if dtype == torch.float32 else "ieee"
    return dict(DOT_PRECISION=precision, UPCAST_DOTS=upcast_dots_for(dtype))


def _launch_tiles(x) -> tuple[MoETiles, ...]:
    """The candidates of a launch on x's device and dtype (a ``fallback`` GPU launches the first that fits it,
    ``kernels._autotune.launch``); exact fp32 products (``KERNELS_FP32_PRECISION=ieee``, an accuracy mode) take the
    default alone."""
    arch = launch_arch(x.device)
    candidates = TILES[("sm_80" if arch == FALLBACK else arch, x.dtype)]  # fallback: the sm_80 list, checked to fit
    if x.dtype == torch.float32 and fp32_dot_precision() == "ieee":
        return candidates[:1]
    return candidates


def _launch(kernel, kind, grid, args, kwargs, tiles, device, bucket):
    """``kernels._autotune.launch`` among kernel ``kind``'s candidates in ``tiles`` (see ``_kernel_candidates``)."""
    launch(kernel, grid, args, kwargs, _kernel_candidates(kind, tiles), device=device, bucket=bucket)


_constants: dict = {}  # (what, device) -> a tensor that depends on the device (and a size) only: made once


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)`` (int64) on device, sliced from one cached range that grows to the largest n asked."""
    cached = _constants.get(("arange", device))
    if cached is None or cached.numel() < n:
        cached = _constants[("arange", device)] = torch.arange(max(n, 1024), device=device)
    return cached[:n]


def _no_row_mask(device: torch.device) -> torch.Tensor:
    """The one-element bool stand-in that the route kernel gets (and never reads) when there is no row mask."""
    cached = _constants.get(("no row mask", device))
    if cached is None:
        cached = _constants[("no row mask", device)] = torch.ones(1, device=device, dtype=torch.bool)
    return cached


def _route(x, gate_weight, row_mask, tiles):
    """logits (N, E) fp32, experts (N, 2) int64, alpha (N, 2) fp32; experts -1 and alpha 0 where row_mask is
    False (row_mask: (N,) bool or None)."""
    n, d = x.shape
    e = gate_weight.shape[0]
    logits = torch.empty(n, e, device=x.device, dtype=torch.float32)
    experts = torch.empty(n, 2, device=x.device, dtype=torch.int64)
    alpha = torch.empty(n, 2, device=x.device, dtype=torch.float32)
    _launch(_moe_route_kernel, "route", lambda meta: (triton.cdiv(n, meta["BM"]),),
            (x, gate_weight, logits, experts, alpha, _no_row_mask(x.device) if row_mask is None else row_mask, n, d, e,
             x.stride(0), x.stride(1), gate_weight.stride(0), gate_weight.stride(1), int(row_mask is not None)),
            dict(BE=MAX_EXPERTS, **_dot_options(x.dtype)), tiles, x.device, (shape_bucket(n), d))
    return logits, experts, alpha


class _PairGroups(NamedTuple):
    """The 2N (row, slot) pairs sorted by expert; pair q = 2 * row + slot. Pairs of rows left out (expert -1)
    come first, in positions [0, offsets[0])."""

    sorted_pairs: torch.Tensor  # (2N,) int64: the pair at each sorted position (stable: row order per expert)
    expert_offsets: torch.Tensor  # (E + 1,) int64: expert e owns sorted positions [offsets[e], offsets[e + 1])
    pair_position: torch.Tensor  # (2N,) int64: the sorted position of each pair (inverse of sorted_pairs)


def _group_pairs(experts, num_experts):
    """Three device operations: the stable sort, the offsets and the inverse permutation (ranges cached)."""
    flat = experts.reshape(-1)
    sorted_experts, sorted_pairs = torch.sort(flat, stable=True)
    expert_offsets = torch.searchsorted(sorted_experts, _arange(num_experts + 1, flat.device))
    pair_position = torch.empty_like(sorted_pairs).scatter_(0, sorted_pairs, _arange(flat.numel(), flat.device))
    return _PairGroups(sorted_pairs, expert_offsets, pair_position)


def _grouped_matmul(a, groups, w, alpha, *, gather_a, tiles, scale_rows=False, bias=None, epilogue=0, pre=None):
    """(2N, NC) in sorted pair order: epilogue(A[rows] @ W[e] (* alpha of the pair) (+ bias[e])); 0 on the pairs of
    rows left out by the row mask.

    w: (E, K, NC) view (may be a transposed view of the stored weight). epilogue 1 also fills ``pre`` (the
    pre-activation, allocated here and returned); epilogue 2 reads ``pre``.
    """
    num_pairs = groups.sorted_pairs.numel()
    num_experts, k, nc = w.shape
    out = torch.empty(num_pairs, nc, device=a.device, dtype=a.dtype)
    if epilogue == 1:
        pre = torch.empty_like(out)
    # pointers the flags leave unread still need a tensor of the right dtype: w for bias, out for pre
    bias_or_w = w if bias is None else bias
    flags = (int(gather_a), int(scale_rows), int(bias is not None), epilogue)
    _launch(_moe_grouped_matmul_kernel, "grouped_matmul",
            lambda meta: (triton.cdiv(num_pairs, meta["BM"]) + num_experts + 1, triton.cdiv(nc, meta["BN"])),
            (a, groups.sorted_pairs, alpha, w, bias_or_w, out, out if pre is None else pre, groups.expert_offsets,
             num_experts, k, nc,
             a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
             0 if bias is None else bias.stride(0), 1 if bias is None else bias.stride(1),  # unit: one variant
             out.stride(0), out.stride(1), *flags),
            dict(BE=MAX_EXPERTS, **_dot_options(a.dtype)), tiles, a.device,
            (shape_bucket(num_pairs), k, nc, w.stride(1) == 1, *flags))
    return (out, pre) if epilogue == 1 else out


def _grouped_wgrad(a, b, groups, alpha, num_experts, *, gather_a, gather_b, scale_b, tiles):
    """dW (E, K, NC) = per-expert A^T @ B and db (E, NC) = per-expert column sums of B, in A's dtype."""
    k, nc = a.shape[1], b.shape[1]
    dw = torch.empty(num_experts, k, nc, device=a.device, dtype=a.dtype)
    db = torch.empty(num_experts, nc, device=a.device, dtype=a.dtype)
    flags = (int(gather_a), int(gather_b), int(scale_b))
    _launch(_moe_grouped_wgrad_kernel, "grouped_wgrad",
            lambda meta: (num_experts, triton.cdiv(k, meta["BM"]) * triton.cdiv(nc, meta["BN"])),
            (a, b, groups.sorted_pairs, alpha, dw, db, groups.expert_offsets, k, nc,
             a.stride(0), a.stride(1), b.stride(0), b.stride(1),
             dw.stride(0), dw.stride(1), dw.stride(2), db.stride(0), db.stride(1), *flags),
            _dot_options(a.dtype), tiles, a.device, (shape_bucket(groups.sorted_pairs.numel()), k, nc, *flags))
    return dw, db


def _combine(src, groups, alpha, *, weighted, tiles):
    """(N, C): each row's two pair results, weighted by alpha or summed."""
    n, c = groups.pair_position.numel() // 2, src.shape[1]
    out = torch.empty(n, c, device=src.device, dtype=src.dtype)
    _launch(_moe_combine_kernel, "combine", lambda meta: (triton.cdiv(n, meta["BM"]), triton.cdiv(c, meta["BN"])),
            (src, groups.pair_position, alpha, groups.expert_offsets, out, n, c,
             src.stride(0), src.stride(1), out.stride(0), out.stride(1), int(weighted)),
            {}, tiles, src.device, (shape_bucket(n), c))
    return out


def _aux_loss(logits, experts, groups, tiles):
    """The load-balancing loss (scalar fp32, MoERouting) of the routing: one program."""
    n, e = logits.shape
    aux_loss = torch.empty((), device=logits.device, dtype=torch.float32)
    _launch(_moe_aux_loss_kernel, "aux_loss", lambda meta: (1,),
            (logits, experts, groups.expert_offsets, aux_loss, n, e), dict(BE=MAX_EXPERTS), tiles, logits.device,
            (shape_bucket(n),))
    return aux_loss


def _router_grad(dy, d_weights, d_aux, logits, experts, y_pairs, groups, alpha, dtype, tiles):
    """(N, E) in ``dtype``: the gradient of the gate logits (``_moe_router_grad_kernel``); d_weights (N, 2) and
    d_aux (scalar) may be None (no gradient)."""
    n, c = dy.shape
    e = logits.shape[1]
    d_logits = torch.empty(n, e, device=dy.device, dtype=dtype)
    _launch(_moe_router_grad_kernel, "router_grad", lambda meta: (triton.cdiv(n, meta["BM"]),),
            (dy, y_pairs, groups.pair_position, alpha, alpha if d_weights is None else d_weights,
             alpha if d_aux is None else d_aux, logits, experts, groups.expert_offsets, d_logits, n, c, e,
             dy.stride(0), dy.stride(1), y_pairs.stride(0), y_pairs.stride(1),
             *((0, 0) if d_weights is None else d_weights.stride()), int(d_weights is not None), int(d_aux is not None)),
            dict(BE=MAX_EXPERTS), tiles, dy.device, (shape_bucket(n), c))
    return d_logits


# torch.library ops (docs/design.md section 5): opaque to torch.compile, with fake (meta) implementations and the
# backward kernels registered as their autograd formula. The forward returns y (N, d_out), the routing weights alpha
# (N, 2) fp32 and the aux loss (scalar fp32), differentiable, then what the backward needs: the logits (N, E) fp32,
# the experts (N, 2) int64, the pair groups (sorted_pairs (2N,), expert_offsets (E + 1,), pair_position (2N,)
# int64) and the per-pair h_pre, h_act (2N, h) and y_pairs (2N, d_out) in x's dtype.
# row_mask: (N,) bool or None (not differentiable).


@torch.library.custom_op("kernels::moe_top2_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor gate_weight, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
                                "Tensor? row_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                                "Tensor, Tensor, Tensor)")
def _moe_top2_fwd_op(x, gate_weight, w1, b1, w2, b2, row_mask):
    n, num_experts, d_out = x.shape[0], gate_weight.shape[0], w2.shape[2]
    if n == 0:  # nothing to route; the backward returns zero gradients
        pair_index = torch.zeros(0, device=x.device, dtype=torch.int64)
        hidden = x.new_zeros(0, w1.shape[2])
        return (x.new_zeros(0, d_out), x.new_zeros(0, 2, dtype=torch.float32), x.new_zeros((), dtype=torch.float32),
                x.new_zeros(0, num_experts, dtype=torch.float32), torch.zeros(0, 2, device=x.device, dtype=torch.int64),
                pair_index, torch.zeros(num_experts + 1, device=x.device, dtype=torch.int64), pair_index.clone(),
                hidden, hidden.clone(), x.new_zeros(0, d_out))
    with launch_device_of(x):
        tiles = _launch_tiles(x)
        logits, experts, alpha = _route(x, gate_weight, row_mask, tiles)
        groups = _group_pairs(experts, num_experts)
        pair_alpha = alpha.reshape(-1)
        h_act, h_pre = _grouped_matmul(x, groups, w1, pair_alpha, gather_a=True, bias=b1, epilogue=1, tiles=tiles)
        y_pairs = _grouped_matmul(h_act, groups, w2, pair_alpha, gather_a=False, bias=b2, tiles=tiles)
        y = _combine(y_pairs, groups, pair_alpha, weighted=True, tiles=tiles)
        aux_loss = _aux_loss(logits, experts, groups, tiles)
    return (y, alpha, aux_loss, logits, experts, *groups, h_pre, h_act, y_pairs)


@_moe_top2_fwd_op.register_fake
def _(x, gate_weight, w1, b1, w2, b2, row_mask):
    n, num_experts, hidden, d_out = x.shape[0], gate_weight.shape[0], w1.shape[2], w2.shape[2]
    index, fp32 = dict(dtype=torch.int64), dict(dtype=torch.float32)
    return (x.new_empty(n, d_out), x.new_empty(n, 2, **fp32), x.new_empty((), **fp32),
            x.new_empty(n, num_experts, **fp32), x.new_empty(n, 2, **index), x.new_empty(2 * n, **index),
            x.new_empty(num_experts + 1, **index), x.new_empty(2 * n, **index), x.new_empty(2 * n, hidden),
            x.new_empty(2 * n, hidden), x.new_empty(2 * n, d_out))


@torch.library.custom_op("kernels::moe_top2_bwd", mutates_args=(),
                         schema="(Tensor dy, Tensor? d_weights, Tensor? d_aux, Tensor x, Tensor gate_weight, "
                                "Tensor w1, Tensor w2, Tensor logits, Tensor experts, Tensor alpha, "
                                "Tensor sorted_pairs, Tensor expert_offsets, Tensor pair_position, Tensor h_pre, "
                                "Tensor h_act, Tensor y_pairs, bool[] needs) "
                                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _moe_top2_bwd_op(dy, d_weights, d_aux, x, gate_weight, w1, w2, logits, experts, alpha, sorted_pairs,
                     expert_offsets, pair_position, h_pre, h_act, y_pairs, needs):
    """(dx, d_gate, dw1, db1, dw2, db2); a gradient that ``needs`` does not ask for is an empty (0,) tensor.
    d_weights / d_aux None: the routing weights / the aux loss get no gradient."""
    need_x, need_gate, need_w1, need_b1, need_w2, need_b2 = needs
    num_experts, hidden, d_out = gate_weight.shape[0], w1.shape[2], w2.shape[2]
    shapes = (x.shape, gate_weight.shape, w1.shape, (num_experts, hidden), w2.shape, (num_experts, d_out))
    if x.shape[0] == 0:
        return tuple(x.new_zeros(shape if need else (0,)) for shape, need in zip(shapes, needs))
    groups = _PairGroups(sorted_pairs, expert_offsets, pair_position)
    tiles = _launch_tiles(x)
    pair_alpha = alpha.reshape(-1)
    dx = d_gate = dw1 = db1 = dw2 = db2 = None
    with launch_device_of(dy):
        if need_x or need_gate:  # the gate logits' gradient, in x's dtype (the GEMMs below multiply in it)
            d_logits = _router_grad(dy, d_weights, d_aux, logits, experts, y_pairs, groups, alpha, x.dtype, tiles)
        if need_gate:
            d_gate = d_logits.t() @ x
        if need_x or need_w1 or need_b1:
            # d pre-activation of the hidden layer, in sorted pair order: (alpha * dy) @ w2^T * gelu'(h_pre)
            dh = _grouped_matmul(dy, groups, w2.transpose(1, 2), pair_alpha, gather_a=True, scale_rows=True,
                                 epilogue=2, pre=h_pre, tiles=tiles)
            if need_x:
                dx_pairs = _grouped_matmul(dh, groups, w1.transpose(1, 2), pair_alpha, gather_a=False, tiles=tiles)
                dx_experts = _combine(dx_pairs, groups, pair_alpha, weighted=False, tiles=tiles)
                dx = torch.addmm(dx_experts, d_logits, gate_weight)
            if need_w1 or need_b1:
                dw1, db1 = _grouped_wgrad(x, dh, groups, pair_alpha, num_experts, gather_a=True, gather_b=False,
                                          scale_b=False, tiles=tiles)
        if need_w2 or need_b2:
            dw2, db2 = _grouped_wgrad(h_act, dy, groups, pair_alpha, num_experts, gather_a=False, gather_b=True,
                                      scale_b=True, tiles=tiles)
    grads = (dx, d_gate, dw1, db1, dw2, db2)
    return tuple(g if need else x.new_zeros(0) for g, need in zip(grads, needs))


@_moe_top2_bwd_op.register_fake
def _(dy, d_weights, d_aux, x, gate_weight, w1, w2, logits, experts, alpha, sorted_pairs, expert_offsets,
      pair_position, h_pre, h_act, y_pairs, needs):
    num_experts, hidden, d_out = gate_weight.shape[0], w1.shape[2], w2.shape[2]
    shapes = (x.shape, gate_weight.shape, w1.shape, (num_experts, hidden), w2.shape, (num_experts, d_out))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _moe_top2_setup_context(ctx, inputs, output):
    x, gate_weight, w1, _, w2, _, _ = inputs
    _, alpha, _, *rest = output
    ctx.save_for_backward(x, gate_weight, w1, w2, *rest[:2], alpha, *rest[2:])
    ctx.mark_non_differentiable(*output[3:])
    ctx.set_materialize_grads(False)  # outputs without a gradient get none (no zero-filled stand-ins)


def _moe_top2_backward(ctx, dy, d_weights, d_aux, *_non_differentiable):
    needs = list(ctx.needs_input_grad[:6])
    x, _, _, w2, *_ = ctx.saved_tensors
    if dy is None:  # only the routing was used
        dy = x.new_zeros(x.shape[0], w2.shape[2])
    grads = _moe_top2_bwd_op(dy, d_weights, d_aux, *ctx.saved_tensors, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)  # no gradient for row_mask


_moe_top2_fwd_op.register_autograd(_moe_top2_backward, setup_context=_moe_top2_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public op and reference
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(x, gate_weight, w1, b1, w2, b2, dtypes):
    for name, value, ndim in (("x", x, 2), ("gate_weight", gate_weight, 2), ("w1", w1, 3), ("b1", b1, 2),
                              ("w2", w2, 3), ("b2", b2, 2)):
        check_tensor(name, value, ndim=ndim, dtypes=dtypes)
    check_same_dtype_and_device(x=x, gate_weight=gate_weight, w1=w1, b1=b1, w2=w2, b2=b2)
    check_nonempty(gate_weight=gate_weight, w1=w1, w2=w2)
    num_experts, d = gate_weight.shape
    if not 2 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"gate_weight must have 2 to {MAX_EXPERTS} experts (rows), got {num_experts}")
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} features but gate_weight expects {d} (shape {tuple(gate_weight.shape)})")
    h, d_out = w1.shape[2], w2.shape[2]
    for name, value, shape in (("w1", w1, (num_experts, d, h)), ("b1", b1, (num_experts, h)),
                               ("w2", w2, (num_experts, h, d_out)), ("b2", b2, (num_experts, d_out))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (E, d, h, d_out from gate_weight, w1 and w2), "
                             f"got {tuple(value.shape)}")


def _top2_experts(logits):
    """(N, 2) experts of (N, E) logits by the router rules of the module docstring (ties: the lower index first,
    which ``torch.topk`` does not promise; ``torch.argmax`` returns the first maximal index)."""
    first = logits.argmax(dim=-1, keepdim=True)
    second = logits.scatter(1, first, float("-inf")).argmax(dim=-1, keepdim=True)
    experts = torch.cat([first, second], dim=1)
    fallback = torch.tensor([[0, 1]], device=logits.device, dtype=experts.dtype)
    return torch.where(_nonfinite_rows(logits), fallback, experts)


def _nonfinite_rows(logits):
    """(N, 1) bool: rows with a NaN or infinite logit."""
    return ~torch.isfinite(logits).all(dim=-1, keepdim=True)


def _softmax_of_chosen(logits, experts):
    """(N, 2) softmax over the two chosen logits; NaN on rows with a non-finite logit (gradients included)."""
    poison = torch.where(_nonfinite_rows(logits), float("nan"), 1.0)
    return logits.gather(1, experts).softmax(dim=-1) * poison


def _routing_summary(logits, experts, row_mask=None):
    """MoERouting from the (N, E) float logits and the (N, 2) chosen experts (-1 on rows that the (N,) bool
    row_mask leaves out); see MoERouting for the aux loss. No host sync."""
    n, num_experts = logits.shape
    weights = _softmax_of_chosen(logits, experts.clamp(min=0))
    probabilities = logits.softmax(dim=-1)
    pair_counts = torch.zeros(num_experts, device=logits.device, dtype=torch.int64)
    if row_mask is None:
        pair_counts.scatter_add_(0, experts.reshape(-1), torch.ones_like(experts.reshape(-1)))
        rows = max(n, 1)
    else:
        keep = row_mask[:, None]
        weights, probabilities = torch.where(keep, weights, 0.0), torch.where(keep, probabilities, 0.0)
        pair_counts.scatter_add_(0, experts.clamp(min=0).reshape(-1), keep.expand(n, 2).reshape(-1).long())
        rows = row_mask.sum().clamp(min=1)
    fraction_routed = pair_counts.to(logits.dtype) / (2 * rows)
    mean_probability = probabilities.sum(dim=0) / rows
    aux_loss = num_experts * (fraction_routed * mean_probability).sum()
    return MoERouting(experts, weights, aux_loss)


def _reference_parts(x, gate_weight, w1, b1, w2, b2, row_mask=None):
    """(y, logits, experts) by a per-expert loop in float32 (float64 for float64 inputs); rows that row_mask
    leaves out get experts -1 and output 0. Every expert runs on every row and keeps the rows that chose it (no
    data-dependent shapes, so it compiles); the two terms of a row are added in expert order, like the kernels'
    combine."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x_c = x.to(compute)
    logits = x_c @ gate_weight.to(compute).t()
    experts = _top2_experts(logits)
    alpha = _softmax_of_chosen(logits, experts)
    if row_mask is not None:
        experts = experts.masked_fill(~row_mask[:, None], -1)
    y = x_c.new_zeros(x.shape[0], w2.shape[-1])
    kept, index = experts >= 0, experts.clamp(min=0)  # rows left out: experts -1, chosen nowhere
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, kept)  # (N, E)
    row_weights = torch.zeros_like(logits).scatter(1, index, torch.where(kept, alpha, 0.0))  # alpha where chosen
    for e in range(gate_weight.shape[0]):
        rows = torch.where(chosen[:, e, None], x_c, 0.0)  # rows of other experts: no gradient, even from NaN rows
        hidden = nn.functional.gelu(rows @ w1[e].to(compute) + b1[e].to(compute))
        out = hidden @ w2[e].to(compute) + b2[e].to(compute)
        y = y + torch.where(chosen[:, e, None], row_weights[:, e, None] * out, 0.0)
    return y.to(x.dtype), logits, experts


def _check_row_mask(row_mask, x) -> None:
    if row_mask is None:
        return
    check_tensor("row_mask", row_mask, ndim=1, dtypes=(torch.bool,))
    if row_mask.shape[0] != x.shape[0]:
        raise ValueError(f"row_mask must have shape ({x.shape[0]},) (one flag per row of x), got "
                         f"{tuple(row_mask.shape)}")
    if row_mask.device != x.device:
        raise ValueError(f"row_mask is on {row_mask.device} but x is on {x.device}; they must match")


@autocast_op
def moe_top2_reference(x: Tensor, gate_weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, *,
                       row_mask: Optional[Tensor] = None,
                       return_routing: bool = False) -> Union[Tensor, tuple[Tensor, MoERouting]]:
    """Per-expert loop reference of ``moe_top2`` (float32 math; float64 for float64 inputs). Same signature."""
    _check_inputs(x, gate_weight, w1, b1, w2, b2, dtypes=FLOAT_DTYPES + (torch.float64,))
    _check_row_mask(row_mask, x)
    y, logits, experts = _reference_parts(x, gate_weight, w1, b1, w2, b2, row_mask)
    return (y, _routing_summary(logits, experts, row_mask)) if return_routing else y


@autocast_op
def moe_top2(x: Tensor, gate_weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, *,
             row_mask: Optional[Tensor] = None,
             return_routing: bool = False) -> Union[Tensor, tuple[Tensor, MoERouting]]:
    """Top-2 mixture of experts: x (N, d) -> y (N, d_out); see the module docstring for the math.

    gate_weight (E, d) with 2 <= E <= 64, w1 (E, d, h), b1 (E, h), w2 (E, h, d_out), b2 (E, d_out); float32,
    float16 or bfloat16, all alike, on one device. Differentiable in every tensor. ``row_mask`` (N,) bool, None
    for all rows: rows where it is False (padding) take no part in routing or the load-balancing loss, output
    zeros and get zero gradients. With ``return_routing=True`` returns ``(y, MoERouting(experts, weights,
    aux_loss))``. N = 0 gives an empty (0, d_out) result.
    """
    _check_inputs(x, gate_weight, w1, b1, w2, b2, dtypes=FLOAT_DTYPES)
    _check_row_mask(row_mask, x)
    if use_triton(x, gate_weight, w1, b1, w2, b2):
        y, weights, aux_loss, _, experts = _moe_top2_fwd_op(x, gate_weight, w1, b1, w2, b2, row_mask)[:5]
        return (y, MoERouting(experts, weights, aux_loss)) if return_routing else y
    y, logits, experts = _reference_parts(x, gate_weight, w1, b1, w2, b2, row_mask)
    return (y, _routing_summary(logits, experts, row_mask)) if return_routing else y


class Top2MoE(nn.Module):
    """Gate + E expert MLPs (d_model -> hidden -> d_out, exact GELU) with top-2 routing, on ``moe_top2``.

    ``hidden`` defaults to ``2 * d_model`` (CaM-HG passes its own ``expert_hidden``, d by default) and ``d_out`` to
    ``d_model``.
    Parameters: gate_weight (E, d), w1 (E, d, h), b1 (E, h), w2 (E, h, d_out), b2 (E, d_out), initialised like
    ``nn.Linear``: uniform in +-1/sqrt(fan_in). forward(x (..., d), *, row_mask=None, return_routing=False) ->
    (..., d_out), or (y, MoERouting) with experts/weights shaped (..., 2); row_mask (...) bool marks the rows
    that take part (see ``moe_top2``).
    """

    def __init__(self, d_model: int, num_experts: int = 4, hidden: Optional[int] = None,
                 d_out: Optional[int] = None):
        super().__init__()
        if not 2 <= num_experts <= MAX_EXPERTS:
            raise ValueError(f"num_experts must be in 2..{MAX_EXPERTS}, got {num_experts}")
        hidden = hidden or 2 * d_model
        d_out = d_out or d_model
        self.d_model, self.num_experts, self.hidden, self.d_out = d_model, num_experts, hidden, d_out
        self.gate_weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for parameters, fan_in in (((self.gate_weight, self.w1, self.b1), self.d_model), ((self.w2, self.b2), self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            for parameter in parameters:
                nn.init.uniform_(parameter, -bound, bound)

    def _op(self, *args, row_mask, return_routing):
        return moe_top2(*args, row_mask=row_mask, return_routing=return_routing)

    def forward(self, x: Tensor, *, row_mask: Optional[Tensor] = None,
                return_routing: bool = False) -> Union[Tensor, tuple[Tensor, MoERouting]]:
        flat = x.reshape(-1, x.shape[-1])
        if row_mask is not None:
            check_tensor("row_mask", row_mask, dtypes=(torch.bool,))
            if row_mask.shape != x.shape[:-1]:
                raise ValueError(f"row_mask must have x's leading shape {tuple(x.shape[:-1])}, got "
                                 f"{tuple(row_mask.shape)}")
            row_mask = row_mask.reshape(-1)
        result = self._op(flat, self.gate_weight, self.w1, self.b1, self.w2, self.b2, row_mask=row_mask,
                          return_routing=return_routing)
        y, routing = result if return_routing else (result, None)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        if routing is None:
            return y
        lead = x.shape[:-1]
        return y, MoERouting(routing.experts.reshape(*lead, 2), routing.weights.reshape(*lead, 2), routing.aux_loss)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, hidden={self.hidden}, d_out={self.d_out}"


class Top2MoEReference(Top2MoE):
    """The reference twin of ``Top2MoE``: same constructor and state_dict, always the per-expert loop."""

    def _op(self, *args, row_mask, return_routing):
        return moe_top2_reference(*args, row_mask=row_mask, return_routing=return_routing)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation
# ----------------------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: per kernel and layout: (argument types, "{t}" = the dtype; "1": the strides that are 1 on dense tensors; the
#: constexprs besides the tiles), as the launches of ``moe_top2`` forward and backward specialize them
#: (``tests/test_static_report.py`` checks them against captured launches). Every other pointer, stride and feature
#: size is a multiple of 16 at the model's shapes, as Triton's launcher specializes it.
_AOT_KERNELS = {
    "route": (_moe_route_kernel,
              dict(x="*{t}", gate="*{t}", logits="*fp32", experts="*i64", alpha="*fp32", row_mask="*u1", N="i32",
                   D="i32+", E="i32", stride_xn="i32+", stride_xd="1", stride_ge="i32+", stride_gd="1",
                   has_row_mask="i32"), dict(BE=MAX_EXPERTS)),
    "grouped_matmul": (_moe_grouped_matmul_kernel,
                       dict(a="*{t}", sorted_pairs="*i64", pair_weights="*fp32", w="*{t}", bias="*{t}", c="*{t}",
                            c_pre="*{t}", expert_offsets="*i64", E="i32", K="i32+", NC="i32+", stride_am="i32+",
                            stride_ak="1", stride_we="i32+", stride_wk="i32+", stride_wn="1", stride_be="i32+",
                            stride_bn="1", stride_cm="i32+", stride_cn="1", gather_a="i32", scale_rows="i32",
                            has_bias="i32", epilogue="i32"), dict(BE=MAX_EXPERTS)),
    # the backward's products with the transposed weight views (dY W2^T, dH W1^T): unit stride_wk
    "grouped_matmul backward": (_moe_grouped_matmul_kernel,
                                dict(a="*{t}", sorted_pairs="*i64", pair_weights="*fp32", w="*{t}", bias="*{t}",
                                     c="*{t}", c_pre="*{t}", expert_offsets="*i64", E="i32", K="i32+", NC="i32+",
                                     stride_am="i32+", stride_ak="1", stride_we="i32+", stride_wk="1",
                                     stride_wn="i32+", stride_be="i32+", stride_bn="1", stride_cm="i32+",
                                     stride_cn="1", gather_a="i32", scale_rows="i32", has_bias="i32", epilogue="i32"),
                                dict(BE=MAX_EXPERTS)),
    "grouped_wgrad": (_moe_grouped_wgrad_kernel,
                      dict(a="*{t}", b="*{t}", sorted_pairs="*i64", pair_weights="*fp32", dw="*{t}", db="*{t}",
                           expert_offsets="*i64", K="i32+", NC="i32+", stride_am="i32+", stride_ak="1",
                           stride_bm="i32+", stride_bn="1", stride_dwe="i32+", stride_dwk="i32+", stride_dwn="1",
                           stride_dbe="i32+", stride_dbn="1", gather_a="i32", gather_b="i32", scale_b="i32"), {}),
    "combine": (_moe_combine_kernel,
                dict(src="*{t}", pair_position="*i64", alpha="*fp32", expert_offsets="*i64", out="*{t}", N="i32",
                     C="i32+", stride_sm="i32+", stride_sc="1", stride_on="i32+", stride_oc="1", weighted="i32"), {}),
    "router_grad": (_moe_router_grad_kernel,
                    dict(dy="*{t}", y_pairs="*{t}", pair_position="*i64", alpha="*fp32", d_weights="*fp32",
                         d_aux="*fp32", logits="*fp32", experts="*i64", expert_offsets="*i64", d_logits="*{t}",
                         N="i32", C="i32+", E="i32", stride_dn="i32+", stride_dc="1", stride_ym="i32+", stride_yc="1",
                         stride_wn="i32", stride_wk="i32", has_d_weights="i32", has_d_aux="i32"),
                    dict(BE=MAX_EXPERTS)),
    "aux_loss": (_moe_aux_loss_kernel,
                 dict(logits="*fp32", experts="*i64", expert_offsets="*i64", aux_loss="*fp32", N="i32", E="i32"),
                 dict(BE=MAX_EXPERTS)),
}


def _plain_type(spec: str, t: str) -> str:
    """The Triton type of an ``_AOT_KERNELS`` entry without specializations ("1" and "i32+" are i32)."""
    return "i32" if spec in ("1", "i32+") else spec.format(t=t)


def aot_configurations():
    """Every (kernel, dtype, fp32 dot precision, candidate) the launchers above can launch, for the architectures
    whose candidates hold it, with the specializations of a launch on dense tensors at the model's shapes (unit
    strides, 16-divisible pointers, strides and feature sizes; ``_AOT_KERNELS``); the default candidate also with
    every argument plain (odd sizes, strided inputs); ``default`` marks the aligned default candidates (the tests'
    quick subset); the grouped GEMM in both layouts (the backward's transposed weight views: unit ``stride_wk``).
    The mode flags and the row count are runtime arguments: one compiled kernel per dtype and layout covers every
    mode and batch size."""
    configs, listed = [], set()
    for kind, (kernel, types, extra) in _AOT_KERNELS.items():
        for dtype, t in _TRITON_TYPES.items():
            dots = "DOT_PRECISION" in kernel.arg_names
            tuned = kind.split()[0]  # the kernel's candidate list
            for config, archs, default in aot_candidates(lambda arch: _kernel_candidates(tuned, TILES[(arch, dtype)])):
                if not any("{t}" in ty for ty in types.values()):  # the same kernel for every dtype: listed once
                    if (kind, str(config), archs, default) in listed:
                        continue
                    listed.add((kind, str(config), archs, default))
                # GPU launches never upcast (the interpreter workaround), whatever process lists the configurations
                precisions = ("tf32", "ieee") if dtype == torch.float32 and default else (
                    "tf32" if dtype == torch.float32 else "ieee",)
                for precision in precisions if dots else (None,):
                    constexprs = {**config.kwargs, **extra}
                    if dots:
                        constexprs.update(DOT_PRECISION=precision, UPCAST_DOTS=False)
                    label = " ".join([kind, t, *([precision] if dots else []), "/".join(f"sm{c}" for c in archs),
                                      config_label(config)])
                    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, capabilities=archs)
                    plain = {arg: "constexpr" if arg in constexprs else _plain_type(types[arg], t)
                             for arg in kernel.arg_names}
                    aligned = {**plain, **{arg: "constexpr" for arg, ty in types.items() if ty == "1"}}
                    configs.append(AotConfig(label + " aligned", kernel, aligned,
                                             {**constexprs, **{arg: 1 for arg, ty in types.items() if ty == "1"}},
                                             divisible=tuple(arg for arg, ty in types.items()
                                                             if ty.startswith("*") or ty.endswith("+")),
                                             default=default, **options))
                    if default:
                        configs.append(AotConfig(label, kernel, plain, constexprs, default=False, **options))
    return configs
