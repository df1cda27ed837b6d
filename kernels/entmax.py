"""Causal alpha-entmax attention, fused flash-style in Triton (docs/design.md sections 1-2).

``entmax15_attention(q, k, v)`` equals ``entmax.entmax15(scores, dim=-1) @ v`` with
``scores = q k^T * scale`` (``-inf`` where ``j > i`` when causal) without ever forming the T x T matrix:

1. ``_entmax_tau_kernel`` solves each row's threshold exactly, relative to the row maximum (scores of any
   magnitude): one pass for the maximum, then passes that evaluate many candidate thresholds at once over the row's
   bracket ``[max - 1, max - n^-1/2]``, narrowing it, until some candidate's support is provably the root's; then
   the closed form on that support. Rows that fit one key tile keep their scores in registers; longer rows recompute
   them on every pass. rowmax and tau (B, H, T) are the only per-row state the forward keeps, with a per-tile
   support mask (1 byte per ``block_m`` x ``block_n`` tile pair) that the last candidate pass writes for free.
2. ``_entmax_fwd_kernel``: ``o = sum_j G_j^2 v_j`` with ``G = max(z - rowmax - tau, 0)`` over the visible key
   tiles, skipping QK^T and V of the tiles the mask leaves out (all probabilities zero). For training it also stores
   ``w_i = sum_j G_ij v_j / sum_j G_ij``, from which the backward gets ``c_i = dO_i . w_i`` with one row-wise product.
3. ``_entmax_bwd_kernel`` (per key tile, FA2's loop): flash-attention's backward with ``dS = G (dP - c)`` (the
   gradient w.r.t. the unhalved scores); QK^T and dP once per tile pair, dk and dv in registers, dq by atomic adds.
   It visits only the query tiles that the launcher lists: visible ones whose per-tile support mask entry is 1.

Every kernel takes strides (inputs may be non-contiguous views) and accumulates in fp32; D and Dv may be any size
(features in chunks where a tile cannot hold them whole). On sm_90 the threshold and output kernels load K (and V
chunks of at most ``TMA_MAX_BOX`` features), the backward with whole heads Q and dO, through TMA tensor descriptors
(``USE_TMA``) when those are 16-byte aligned (``tma_launch``); pointer loads (cp.async) otherwise and on other GPUs.

``entmax_attention(q, k, v, alpha=...)`` generalises it (same kernels):

- any alpha in (1, 2] (a float, or one per query head as a tensor, differentiable): the kernels' GENERAL constexpr
  (entmax-1.5 compiles without it, unchanged) scales scores by ``alpha - 1`` per row, solves
  ``sum_j max(z_j - tau, 0)^(1 / (alpha - 1)) = 1`` by bracketing passes (candidates plus Newton lower and secant
  upper bounds: f is convex) to fp32 rounding, and uses ``p = G^(1 / (alpha - 1))``, ``g = p^(2 - alpha)`` in
  place of ``G^2`` and G; alpha's gradient comes from per-row sums the output kernel stores (s, ent);
- grouped-query heads: the query heads that share a key head are packed as rows of that head (row ``t * G + g``),
  so every K/V tile a query tile loads serves the whole group;
- Tq != Tk and packed sequences with separate key offsets: each query row's visible keys ``[start, end)`` carry the
  sequence and the bottom-right causal limit (``causal`` then off in the kernels); a row with none gives zeros.
"""
from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from ._checks import (check_mha_unsupported, check_nonempty, check_same_dtype_and_device, check_scale, check_tensor,
                      checked_cu_seqlens)
from .aot import AotConfig
from ._autotune import ARCH_CAPABILITY, ARCHS, aot_candidates, launch, launch_arch, shape_bucket
from ._packing import pack_padding, sequence_ids
from ._triton_helpers import (TMA_MAX_BOX, check_batch_heads, dot_fp32acc, launch_device_of, tma_launch, tma_scratch,
                              upcast_dots_for)
from ._amp import autocast_op
from .backend import use_triton


class Tiles(NamedTuple):
    """Block sizes of one call. Rows of at most ``row_block_n`` keys are solved in registers (``row_block_m`` rows
    per program); longer rows use ``block_m`` x ``block_n`` tiles. Features go in chunks of ``block_d``/``block_dv``.
    The threshold solver evaluates ``candidates`` thresholds per row and pass: 16 keep it at most 3 passes over K on
    the benchmarks' scores (T = 2048, D = 64, q scaled x1/x4/x16; ``tau_solver_passes``), 8 need up to 4.
    The threshold kernel's long-row passes take D in chunks of ``tau_block_d`` (None: ``block_d``): the dots
    chain their 16-feature steps in the same order whatever the chunk (16-bit inputs: the same scores bit for bit;
    fp32's tf32x3 adds each chunk's three products to the sum, so its scores may differ in the last bits), and
    smaller chunks hold fewer operand registers; they stream K in key tiles of ``tau_block_n`` (None: ``block_n``;
    a divisor of it: the mask's tile is the OR of its key tiles). Both keep that kernel at 150-170 registers per
    thread (12 resident warps per SM with 64-row programs in 4 warps, 8 with 128-row ones in 8).
    ``block_m`` x ``block_n`` are also the tiles of the support mask (:func:`_entmax_tau`); K traffic of the forward
    scales with the query rows per program (every program streams its visible keys once per pass), not with
    ``block_n``. The threshold kernel's long-row passes take ``tau_block_m`` query rows per program (None:
    ``block_m``; a multiple of it: a program writes one mark per ``block_m`` rows), so that their passes over K,
    the bulk of the forward's, stream K once per ``tau_block_m`` rows.
    The output kernel (:func:`_forward_tiles`) takes Dv up to ``wide_block_dv`` in one chunk (its next power of two,
    at least ``block_dv``) with ``block_m``-row query tiles; a wider Dv in chunks of up to ``wide_dv_block_dv`` with
    ``wide_dv_block_m``-row query tiles (a divisor of ``block_m``: a tile reads the mask entry of the ``block_m`` tile
    that holds it; None: ``block_m`` / ``wide_block_dv``). Each chunk recomputes QK^T, and a [BM, BDV] accumulator
    (two with ``store_w``) must fit in registers: fewer rows make room for wider chunks (CARN's Dv = 512 in one
    chunk of 16 rows: QK^T once per score, not four times), at the cost of streaming K (and V) once per 16 rows.
    ``num_warps`` and ``num_stages`` (>= 2: K and V tiles streamed with async copies) are the default launch options
    of every kernel (the threshold kernel's long-row passes: ``tau_num_warps`` warps, None: ``num_warps``); on a GPU
    each kernel autotunes them among ``_ALTERNATIVES`` too (``kernels._autotune``), the wide-Dv output kernel its
    query rows and Dv chunk as well.
    The backward uses ``bwd_block_m`` x ``bwd_block_n`` tiles (None: ``block_m`` / ``block_n``; each must divide
    the support mask's ``block_m`` / ``block_n`` tile or be a multiple of it) and holds D and Dv whole when both
    (rounded up to powers of two) are at most ``bwd_whole_d``; wider heads reduce QK^T and dP in steps of
    ``bwd_block_d`` features (None: ``block_d``) streamed from memory and accumulate dk and dv of up to ``bwd_wide_d``
    / ``bwd_wide_dv`` features per program (wider: several programs, each recomputing QK^T).
    The output kernel of any alpha (GENERAL) with alpha's gradient (STORE_S) holds three [BM, BDV] fp32 accumulators
    (o, w's numerator and alpha's gradient sum s) where entmax-1.5 holds two (as any alpha without alpha's gradient
    does, at entmax-1.5's tiles): its tiles hold at most ``general_block_mdv`` elements
    (:func:`_forward_tiles`), by fewer query rows up to Dv = ``wide_block_dv`` (one chunk: QK^T once per score, K
    and V streamed once per BM rows, 32 at Dv = 128: twice entmax-1.5's K traffic of that kernel, where Dv chunks
    of 64 would stream K as often and compute QK^T twice) and above it by narrower Dv chunks of the
    ``wide_dv_block_m`` rows (16 rows cannot shrink further on tensor cores: Dv = 512 in two chunks of 256, QK^T
    twice per score). ``general_block_m`` (None: ``block_m``) caps those rows further (32: at Dv <= 64, 64 x 64 spills
    on sm_80, fp32 308 bytes, 16-bit 780-824; sm_90 keeps 64 rows as an autotune candidate).
    Without alpha's gradient it takes entmax-1.5's tiles, capped at ``fixed_alpha_block_mdv`` elements (None: no cap;
    fp32: 4,096, as 64 x 128 spills on sm_90 and 16 x 512 on sm_80), by fewer rows up to Dv = ``wide_block_dv`` and
    narrower Dv chunks above it."""

    block_m: int = 64
    block_n: int = 64
    block_d: int = 64
    block_dv: int = 64
    row_block_m: int = 32
    row_block_n: int = 128
    candidates: int = 16
    wide_block_dv: int = 128
    wide_dv_block_m: Optional[int] = None
    wide_dv_block_dv: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 2
    bwd_block_m: Optional[int] = None
    bwd_block_n: Optional[int] = None
    bwd_whole_d: int = 128
    bwd_block_d: Optional[int] = None
    bwd_wide_d: int = 256
    bwd_wide_dv: int = 512
    tau_block_d: Optional[int] = None
    tau_block_m: Optional[int] = None
    tau_block_n: Optional[int] = None
    tau_num_warps: Optional[int] = None
    tau_registers_maxnreg: Optional[int] = None
    general_tau_registers_maxnreg: Optional[int] = None
    general_block_mdv: int = 4096
    general_block_m: Optional[int] = None
    fixed_alpha_block_mdv: Optional[int] = None


#: Per input dtype, chosen by compiling for sm_80 and sm_90 as a launch specializes (D = 64, unit feature strides)
#: and reading the cubins' registers (cuobjdump -res-usage): 16-bit inputs fit 64 x 64 tiles (16 x 128 for rows in
#: registers, Dv chunks of 128 in the forward) in 8 warps without spilling; fp32 (tf32x3 dots, three products per
#: tile) fits 64-row tiles with 16-key tiles, 32-feature D chunks and Dv chunks of up to 128 in the forward (64 x 64
#: or 64 x 32 tiles spill in its output kernel on sm_80; 32 x 32 tiles double K traffic). The backward (read from
#: ``python -m kernels.tools.report``, which specializes as a launch does) holds D = Dv = 128 whole without spilling in
#: 32 x 32 tiles (16-bit) and 16 x 16 (fp32); for CARN's D = 256 / Dv = 512 one program per key tile holds dk and dv
#: whole and reduces QK^T and dP (each once per tile pair) in steps of 32 features in fp32 and 64 in 16-bit (8 warps,
#: 221-244 registers, no spills; 64-feature fp32 steps spill 8-48 bytes, 128-feature 16-bit ones 132-156 on sm_80,
#: where the former 64- / 128-feature dk/dv chunks computed QK^T 8 / 4 and dP 4 / 2 times per tile pair). The output
#: kernel holds a Dv above 128 whole up to 512 in 16-row query tiles (fp32 and 16-bit, 8 warps, 228-245 registers,
#: no spills; with 4 warps they spill 0.8-8.5 KB, and 64 rows with Dv chunks of 256 0.1-1.4 KB, except 16-bit on
#: sm_90). The threshold kernel's long-row passes take D in 16-feature chunks (``tau_block_d``; report, all dtypes,
#: sm_80 and sm_90: 64-feature chunks hold 170-226 registers at 8 warps and spill or reach 255 at 4) and K in 16-key
#: tiles (``tau_block_n``; fp32's mask tiles are 16 keys wide anyway) with 128 query rows per program in 8 warps
#: (``tau_block_m``): the per-thread share of 64 rows in 4 warps, 153-174 registers on both architectures, 8 resident
#: warps per SM where 64-row programs in 4 warps hold 12, for half their K traffic (capped at 128 registers, 16 per
#: SM: 16-bit without spills, an autotune candidate; fp32 spills 84-88 bytes; 16-bit 64-key tiles in 4 warps use 255
#: registers on sm_80 and spill under a cap of 168). The 64-row programs stay among the autotune candidates
#: (``_ALTERNATIVES``).
_DEFAULT_TILES = {
    torch.float16: Tiles(row_block_m=16, wide_dv_block_m=16, wide_dv_block_dv=512, bwd_block_m=32, bwd_block_n=32,
                         bwd_block_d=64, tau_block_d=16, tau_block_m=128, tau_block_n=16, tau_num_warps=8,
                         tau_registers_maxnreg=128, general_block_m=32),
    torch.bfloat16: Tiles(row_block_m=16, wide_dv_block_m=16, wide_dv_block_dv=512, bwd_block_m=32, bwd_block_n=32,
                          bwd_block_d=64, tau_block_d=16, tau_block_m=128, tau_block_n=16, tau_num_warps=8,
                          tau_registers_maxnreg=128, general_block_m=32),
    torch.float32: Tiles(block_n=16, block_d=32, block_dv=32, row_block_m=16, wide_dv_block_m=16,
                         wide_dv_block_dv=512, bwd_block_m=16, bwd_block_n=16, bwd_block_d=32, tau_block_d=16,
                         tau_block_m=128, tau_num_warps=8, general_tau_registers_maxnreg=168,
                         general_block_m=32, fixed_alpha_block_mdv=4096),
}
#: Tests set tiny tiles here so that short sequences cover several, partial and skipped tiles.
_TILE_OVERRIDE: Optional[Tiles] = None
#: Candidate passes before the tau solver gives up on a row (not reached in the tests: a bracket narrowed to one
#: float ends the search too).
_MAX_PASSES = 32


def _tiles(dtype: torch.dtype) -> Tiles:
    return _TILE_OVERRIDE if _TILE_OVERRIDE is not None else _DEFAULT_TILES[dtype]


def _tau_pass_tiles(tiles: Tiles) -> dict:
    """Tile constexprs (BM, BN, BD) of the threshold kernel's long-row passes."""
    block_m = tiles.block_m if tiles.tau_block_m is None else tiles.tau_block_m
    if block_m % tiles.block_m:
        raise ValueError(f"threshold query rows {block_m} must be a multiple of the support mask's {tiles.block_m}")
    block_n = tiles.block_n if tiles.tau_block_n is None else tiles.tau_block_n
    if tiles.block_n % block_n:
        raise ValueError(f"threshold key tile {block_n} must divide the support mask's {tiles.block_n}")
    return dict(BM=block_m, BN=block_n, BD=tiles.block_d if tiles.tau_block_d is None else tiles.tau_block_d)


#: Autotune alternatives (``kernels._autotune``) to each kernel's default launch options (:func:`_default_options`), per
#: kernel (``"tau registers"``, ``"tau passes"``: the threshold kernel's two modes, ``"fwd"``, ``"fwd wide"``: the
#: output kernel for Dv up to / above ``Tiles.wide_block_dv``, ``"bwd"``, ``"bwd chunked"``: the backward with D and Dv
#: whole / in chunks), fp32 or not, and architecture: (num_warps, num_stages) pairs, or triples whose third entry holds
#: ``maxnreg`` (a cap on the registers per thread) or, for the wide output kernel, its tiles ``BM`` (query rows) and
#: ``BDV`` (Dv chunk, at most the default's): its tiles are its own (it reads the support mask at the mask's tiles,
#: ``MASK_BM``); for the threshold passes, their key tile ``BN`` (a divisor of the mask's ``block_n``: each mask tile
#: is written as the OR of its key tiles, ``MASK_BN``) and their query rows ``BM`` (a multiple of the mask's
#: ``block_m``: one mark per mask tile of rows, ``MASK_BM``); for rows in registers, their query rows ``BM`` (the
#: launcher fills their mask). The other tiles are fixed: the support mask's (allocated before the threshold kernel
#: launches, read by the other two kernels at its tiles), the output kernel's for Dv <= 128 keep K traffic at one
#: stream per ``block_m`` rows, and the backward's query-tile lists are built for its tiles before it launches.
#: Every candidate compiles without register spills at the report's shapes (``python -m kernels.tools.report --ops
#: entmax15_attention``; docs/ops.md, "Launch configurations"); 4 warps spill in the output kernel (all dtypes), the
#: fp32 backward and the 16-bit chunked one (28-324 bytes), 3 stages in the 16-bit sm_90 backward (D 64); its 4-warp
#: sm_90 candidate takes maxnreg 255 (left to ptxas it stops at 168 and spills 12 bytes at D 64, 16-bit; with the limit
#: raised: 188, any alpha at D 128 236, no spill). Rows in registers, 16-bit sm_80: 4 warps use 96 registers unforced
#: and spill 8 bytes, 114 capped at 128 (16 resident warps per SM); the 8-warp default is capped at 128 too
#: (``Tiles.tau_registers_maxnreg``: 96 registers, 16 warps per SM; unforced, ptxas stops at 80 and spills 24 bytes at
#: CARN's D = 256 on sm_80); on sm_90, loading K through TMA, the 4-warp candidates of fp32 and of any alpha's 16-bit
#: list, unforced, stop at 96 and 80 registers and spill 12 bytes: capped at 128 they hold 127 and 116 (16 warps per
#: SM); sm_90's 64-row candidates issue warpgroup MMA (HGMMA) where 16 rows cannot (CARN,
#: T = 110: 16-bit 4 warps 178 registers, fp32 8 warps 238, no spills; 8 resident warps per SM, the 16-row defaults
#: 16-24). The threshold passes (16-feature chunks)
#: hold 8 resident warps per SM with every default (128 query rows, 8 warps, 16-key tiles: 153-174 registers), 16 with
#: its 16-bit twin capped at 128 registers (no spill; fp32 spills 84-88 bytes there), 12 with the 64-row candidates in 4
#: warps (the former defaults, 150-168 registers, twice the K traffic), 16 with the 16-bit sm_90 candidate (64 rows, 4
#: warps, 3 stages, maxnreg 128: 128, no spill; on sm_80 it spills 16 bytes, fp32 112-140), 8 with the 64-row 8-warp
#: ones (142-212); the 16-bit 64-key candidates keep wider MMA tiles (sm_90: 4 warps capped at 168 hold 12). The wide
#: alternatives trade FLOPs for rows: 32 rows with Dv chunks of 256 compute QK^T twice per score (at Dv = 512), 64 rows
#: on sm_90 (HGMMA) with chunks of 256 (16-bit) twice, with chunks of 128 (fp32) four times.
#: Any alpha (the GENERAL kernels) has lists of its own (`` general`` keys), measured the same way at the report's
#: any-alpha cases (``--cases alpha=1.25``): its threshold kernel (more code per pass: the powers, sparsemax's closed
#: form) spills (4-48 bytes of stores) with the 16-bit 64/16 4-warp 3-stage candidate on sm_80, the maxnreg-capped sm_90
#: ones and fp32's 8 warps on sm_80 (128 registers), which its lists leave out (its candidates keep 64-row programs;
#: rows in registers: 89-166 registers, no spill; in the ahead-of-time configurations (``python -m kernels.aot``),
#: unforced, fp32's 8-warp default stops at 128 on sm_90 and spills 8-16 bytes, capped at 168 it holds 130-133,
#: ``Tiles.general_tau_registers_maxnreg``; the 16-bit sm_80 4-warp candidate spills 8 bytes capped at 128, unforced
#: it holds 164). Its output kernel (three accumulators,
#: ``Tiles.general_block_mdv``) spilled 24-840 bytes at entmax-1.5's tiles; at its own (32 x 128, 16 x 256 above Dv =
#: 128; at most 32 rows: 64 x 64 spills 308 bytes on sm_80 in fp32, 780-824 in 16 bits) it holds 175-233 registers. Its
#: alternatives: 3 stages; at Dv <= 128 on sm_90, 64 rows with Dv chunks of 64 (at Dv = 128 K streamed as often as with
#: 32 rows, V half as often, QK^T twice; at Dv <= 64 fp32's K traffic of entmax-1.5; 16-bit: 255 registers on sm_80,
#: left out there); above Dv = 128, 32 rows with chunks of 128 (at Dv = 512 QK^T four times per score where 16 x 256
#: computes it twice; K streamed as often, V half as often). Those three-accumulator tiles and the `` general`` output
#: lists are for alpha's gradient (STORE_S); without it the output kernel holds two accumulators and takes entmax-1.5's
#: tiles and list at Dv <= 128 (fp32 at most 4,096 elements, ``Tiles.fixed_alpha_block_mdv``: 64 x 128 spills 20-32
#: bytes on sm_90; 64 x 64 holds 255 registers on sm_80, 220 on sm_90, no spill; 16-bit 64 x 128: 225-255) and above it
#: entmax-1.5's tiles (fp32 cut to 16 x 256: 16 x 512 spills 8 bytes on sm_80) on any alpha's wide list (entmax-1.5's
#: 64-row sm_90 alternatives spill 32-80 bytes; 16-bit 16 x 512: 225-243 registers).
_ALTERNATIVES = {
    ("tau registers", False): {"sm_80": [(4, 2, {"maxnreg": 128})], "sm_90": [(4, 2), (4, 2, {"BM": 64})]},
    ("tau registers", True): {"sm_80": [(4, 2)], "sm_90": [(4, 2, {"maxnreg": 128}), (8, 2, {"BM": 64})]},
    ("tau passes", False): {"sm_80": [(8, 2, {"maxnreg": 128}), (4, 2, {"BM": 64}), (4, 3, {"BM": 64}),
                                      (8, 3, {"BM": 64, "BN": 64})],
                            "sm_90": [(8, 2, {"maxnreg": 128}), (4, 2, {"BM": 64}), (4, 3, {"BM": 64, "maxnreg": 128}),
                                      (4, 3, {"BM": 64, "BN": 64, "maxnreg": 168}), (8, 3, {"BM": 64, "BN": 64})]},
    ("tau passes", True): {"sm_80": [(4, 2, {"BM": 64}), (8, 2, {"BM": 64})],
                           "sm_90": [(4, 2, {"BM": 64}), (8, 2, {"BM": 64}), (8, 3, {"BM": 64})]},
    ("fwd", False): {"sm_80": [(8, 3)], "sm_90": [(8, 3)]},
    ("fwd", True): {"sm_80": [(8, 3)], "sm_90": [(8, 3)]},
    ("fwd wide", False): {"sm_80": [(8, 3), (8, 2, {"BM": 32, "BDV": 256})],
                          "sm_90": [(8, 3), (8, 2, {"BM": 32, "BDV": 256}), (8, 2, {"BM": 64, "BDV": 256})]},
    ("fwd wide", True): {"sm_80": [(8, 3), (8, 2, {"BM": 32, "BDV": 256}), (8, 2, {"BM": 16, "BDV": 256})],
                         "sm_90": [(8, 3), (8, 2, {"BM": 32, "BDV": 256}), (8, 2, {"BM": 64, "BDV": 128})]},
    # any alpha (GENERAL)
    ("tau registers general", False): {"sm_80": [(4, 2)], "sm_90": [(4, 2, {"maxnreg": 128})]},
    ("tau registers general", True): {"sm_80": [(4, 2)], "sm_90": [(4, 2)]},
    ("tau passes general", False): {"sm_80": [(8, 3, {"BM": 64, "BN": 64})], "sm_90": [(8, 3, {"BM": 64, "BN": 64})]},
    ("tau passes general", True): {"sm_80": [], "sm_90": [(8, 2, {"BM": 64}), (8, 3, {"BM": 64})]},
    ("fwd general", False): {"sm_80": [(8, 3)], "sm_90": [(8, 3), (8, 2, {"BM": 64, "BDV": 64})]},
    ("fwd general", True): {"sm_80": [(8, 3)], "sm_90": [(8, 3), (8, 2, {"BM": 64, "BDV": 64})]},
    ("fwd wide general", False): {"sm_80": [(8, 3), (8, 2, {"BM": 32, "BDV": 128})],
                                  "sm_90": [(8, 3), (8, 2, {"BM": 32, "BDV": 128})]},
    ("fwd wide general", True): {"sm_80": [(8, 3), (8, 2, {"BM": 32, "BDV": 128})],
                                 "sm_90": [(8, 3), (8, 2, {"BM": 32, "BDV": 128})]},
    ("bwd", False): {"sm_80": [(4, 2)], "sm_90": [(4, 2, {"maxnreg": 255})]},
    ("bwd", True): {"sm_80": [(8, 3)], "sm_90": [(8, 3)]},
    ("bwd chunked", False): {"sm_80": [(8, 3)], "sm_90": [(8, 3)]},
    ("bwd chunked", True): {"sm_80": [(8, 3)], "sm_90": [(8, 3)]},
}


def _default_options(kernel: str, tiles: Tiles) -> tuple:
    """``(num_warps, num_stages)`` that ``kernel`` (a key of ``_ALTERNATIVES``) launches with untuned, and
    ``{"maxnreg": cap}`` third where the default caps its registers (rows in registers:
    ``Tiles.tau_registers_maxnreg``, any alpha's ``Tiles.general_tau_registers_maxnreg``)."""
    if kernel.startswith("tau passes") and tiles.tau_num_warps is not None:
        return tiles.tau_num_warps, tiles.num_stages
    cap = {"tau registers": tiles.tau_registers_maxnreg,
           "tau registers general": tiles.general_tau_registers_maxnreg}.get(kernel)
    if cap is not None:
        return tiles.num_warps, tiles.num_stages, {"maxnreg": cap}
    return tiles.num_warps, tiles.num_stages


def _candidates(kernel: str, dtype: torch.dtype, constexprs: dict, arch: str) -> List[triton.Config]:
    """Autotune candidates of ``kernel`` (a key of ``_ALTERNATIVES``) for inputs of ``dtype`` on ``arch``
    (``sm_80``, ``sm_90`` or ``fallback``), with the tile ``constexprs`` (the wide output kernel's alternatives
    replace BM and BDV, the chunk capped at the default's; the threshold passes' replace BN); the default
    (``Tiles``' launch options) first and alone on ``fallback`` and under ``_TILE_OVERRIDE``; no two alike."""
    tiles = _tiles(dtype)
    options = [_default_options(kernel, tiles)]
    if _TILE_OVERRIDE is None and arch in ARCHS:
        options += _ALTERNATIVES[(kernel, dtype == torch.float32)][arch]
    configs = []
    for warps, stages, *extra in options:
        extra = dict(extra[0]) if extra else {}
        maxnreg = extra.pop("maxnreg", None)
        tile = dict(constexprs, **extra)
        if "BDV" in extra:
            tile["BDV"] = min(tile["BDV"], constexprs["BDV"])
        config = triton.Config(tile, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
        if all(str(config) != str(other) for other in configs):
            configs.append(config)
    return configs


def _bucket(batch_heads: int, t: int) -> tuple:
    """The tuning key besides dtypes and tiles: T and B*H, each rounded up to a power of two."""
    return shape_bucket(t), shape_bucket(batch_heads)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


#: Runtime flags and sequence sizes are never specialized (no variant per value 1). D and Dv are: a multiple of 16
#: makes the feature masks constant over 16 elements, so tiles load as vectors and stream with async copies
#: (cp.async needs at least 4-byte vectors); D = 1 or Dv = 1 compiles a variant of its own. The support mask's
#: batch and row strides are sizes in disguise (its tiles per row), never specialized either.
_NOT_SPECIALIZED = ["H", "T", "TK", "causal"]
_SUPPORT_NOT_SPECIALIZED = _NOT_SPECIALIZED + ["stride_sb", "stride_sm"]


@triton.jit
def _row_dots(p_a, stride_at, stride_ak, p_b, stride_bt, stride_bk, o_m, o_n, n0, T, TB, K,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST_DOTS: tl.constexpr,
              B_TMA: tl.constexpr):
    """``a[o_m] . b[o_n]`` over K features in chunks of BK, in fp32, o_n the BN rows of b from n0; rows of a outside
    [0, T) and of b outside [0, TB) read as zeros. B_TMA: p_b is a TMA descriptor of b's (TB, K) rows
    (:func:`_row_tiles`)."""
    m_m = o_m < T
    m_n = o_n < TB
    o_m64 = o_m.to(tl.int64)
    o_n64 = o_n.to(tl.int64)
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(p_a + o_m64[:, None] * stride_at + o_k[None, :] * stride_ak,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if B_TMA:
            b_b = tl.trans(p_b.load([n0, i_k * BK]))  # [BK, BN]: a transposed view of the tile in shared memory
        else:
            b_b = tl.load(p_b + o_n64[None, :] * stride_bt + o_k[:, None] * stride_bk,
                          mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        # fp32 inputs: tf32x3 keeps ~fp32 accuracy on tensor cores (plain tf32 costs ~1e-3 relative, and "ieee"
        # compiles to huge FMA code); fp16/bf16 products are exact whatever the precision flag
        b_acc += dot_fp32acc(b_a, b_b, "tf32x3", UPCAST_DOTS)
    return b_acc


@triton.jit
def _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, n0, o_m, T, TK, D, half_scale, causal, b_start,
            b_end, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, UPCAST_DOTS: tl.constexpr,
            K_TMA: tl.constexpr):
    """Halved scores ``z = scale / 2 * q . k`` of query rows o_m (T rows) and the BN keys from n0 (TK keys),
    ``-inf`` outside each row's keys [b_start, b_end) and where the causal mask hides the key (``causal`` takes
    T = TK). p_k: pointer, or with K_TMA the descriptor of :func:`_row_tiles`."""
    o_n = n0 + tl.arange(0, BN)
    b_z = _row_dots(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, o_n, n0, T, TK, D, BM, BN, BD,
                    UPCAST_DOTS, K_TMA) * half_scale
    m_visible = (o_m[:, None] < T) & (o_n[None, :] >= b_start[:, None]) & (o_n[None, :] < b_end[:, None]) \
        & ((o_n[None, :] <= o_m[:, None]) | (causal == 0))
    return tl.where(m_visible, b_z, float("-inf"))  # [BM, BN]


@triton.jit
def _row_tiles(p, stride_t, rows, width, BR: tl.constexpr, BC: tl.constexpr, USE_TMA: tl.constexpr):
    """The (rows, width) matrix at p (row stride stride_t, unit feature stride) as a TMA descriptor of (BR, BC) tiles
    with USE_TMA (sm_90: rows past ``rows`` and features past ``width`` read as zeros, as the masked pointer loads do;
    p and stride_t 16-byte aligned, which the launchers check: ``tma_launch``), else p itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(p, shape=[rows, width], strides=[stride_t, 1], block_shape=[BR, BC])
    else:
        return p


@triton.jit
def _row_sequences(seq_start, seq_end, o_m, T):
    """Per query row (T rows), the keys [start, end) that it may see; empty past T."""
    m_m = o_m < T
    return tl.load(seq_start + o_m, mask=m_m, other=0), tl.load(seq_end + o_m, mask=m_m, other=0)


@triton.jit
def _visible_keys(i_m, o_m, b_start, b_end, T, TK, causal, BM: tl.constexpr, BN: tl.constexpr):
    """Keys [lo, hi) that query tile ``i_m`` (of T rows; TK keys) can see (lo a multiple of BN): key tiles outside are
    never visited."""
    lo = tl.min(tl.where(o_m < T, b_start, TK), 0) // BN * BN
    hi = tl.where(causal != 0, tl.minimum((i_m + 1) * BM, TK), tl.max(b_end, 0))
    return lo, hi


@triton.jit
def _probability_roots(b_z, b_max, b_tau):
    """``G = max((z - rowmax) - tau, 0)`` [BM, BN] (``p = G^2``), with tau relative to the row maximum so that scores
    of any magnitude keep their differences: ``z - rowmax`` is exact for scores within a factor 2 of the maximum."""
    b_w = (b_z - b_max[:, None]) - b_tau[:, None]
    return tl.where(b_w > 0, b_w, 0.0)


@triton.jit
def _accumulate_candidate_stats(b_zr, b_t, b_cnt, b_a1, b_a2, b_wmin, b_wout, NC: tl.constexpr):
    """Add one key tile's statistics of every candidate threshold: for candidate c of row i (``b_t[i, c]``) and
    ``w = zr - t`` over the tile's relative scores ``b_zr`` [BM, BN], the support ``w > 0``'s count, sum w, sum w^2
    and min w, and the largest w off the support. Accumulators are [BM, NC]."""
    o_c = tl.arange(0, NC)
    for i_c in range(NC):  # a loop, not unrolled: 16 copies of the statistics make huge, slow-to-compile code
        m_c = (o_c == i_c)[None, :]  # [1, NC]: column i_c
        b_tc = tl.sum(tl.where(m_c, b_t, 0.0), 1)  # [BM]
        b_w = b_zr - b_tc[:, None]  # [BM, BN]
        m_s = b_w > 0
        b_ws = tl.where(m_s, b_w, 0.0)
        b_cnt = tl.where(m_c, b_cnt + tl.sum(m_s.to(tl.float32), 1)[:, None], b_cnt)
        b_a1 = tl.where(m_c, b_a1 + tl.sum(b_ws, 1)[:, None], b_a1)
        b_a2 = tl.where(m_c, b_a2 + tl.sum(b_ws * b_ws, 1)[:, None], b_a2)
        b_wmin = tl.where(m_c, tl.minimum(b_wmin, tl.min(tl.where(m_s, b_w, float("inf")), 1)[:, None]), b_wmin)
        b_wout = tl.where(m_c, tl.maximum(b_wout, tl.max(tl.where(m_s, float("-inf"), b_w), 1)[:, None]), b_wout)
    return b_cnt, b_a1, b_a2, b_wmin, b_wout


@triton.jit
def _candidate_step(b_t, b_cnt, b_a1, b_a2, b_wmin, b_wout, b_lo, b_hi, b_tau, b_done):
    """One solver pass from the statistics of the candidates ``b_t`` [BM, NC] (see DESIGN.md section 3). A candidate
    t whose support S = {z > t} is the root's gives tau exactly: the smaller root of ``sum_S (z - x)^2 = 1`` lies
    above every score off S and below every score of S. Otherwise the candidates tighten the bracket [lo, hi] of the
    root: a Newton step from a candidate left of the root (f(t) >= 0) and the quadratic's root from one right of it
    are lower bounds (f is convex and decreasing); a candidate right of the root and the quadratic's root from one
    left of it are upper bounds. A bracket narrowed to one float is also a solution. Returns (tau, lo, hi, done)."""
    b_f = b_a2 - 1.0
    m_left = b_f >= 0
    b_disc = b_a1 * b_a1 - b_cnt * b_f
    b_a1 = tl.where(b_cnt > 0, b_a1, 1.0)  # an empty support (only in finished or padded rows): keep finite
    # smaller root of sum_S (w - delta)^2 = 1, rationalized so that it does not cancel as f -> 0
    b_delta = b_f / (b_a1 + tl.sqrt(tl.maximum(b_disc, 0.0)))
    b_root = b_t + b_delta
    m_exact = (b_disc >= 0) & (b_wmin >= b_delta) & (b_wout <= b_delta)
    b_lower = tl.where(m_left, b_t + b_f / (2.0 * b_a1), b_root)
    b_upper = tl.where(m_left, tl.where(b_disc >= 0, b_root, float("inf")), b_t)
    b_new_lo = tl.maximum(b_lo, tl.max(b_lower, 1))
    b_new_hi = tl.minimum(b_hi, tl.min(b_upper, 1))
    m_collapsed = b_new_hi <= b_new_lo
    m_solved = (tl.max(m_exact.to(tl.int32), 1) > 0) | m_collapsed
    b_solution = tl.where(m_collapsed, b_new_lo, tl.max(tl.where(m_exact, b_root, float("-inf")), 1))
    b_tau = tl.where(b_done, b_tau, tl.where(m_solved, b_solution, b_new_lo))
    b_lo = tl.where(b_done, b_lo, b_new_lo)
    b_hi = tl.where(b_done, b_hi, tl.maximum(b_new_hi, b_new_lo))
    return b_tau, b_lo, b_hi, b_done | m_solved


@triton.jit
def _row_alpha(alpha_rows, i_h, o_m, T, GENERAL: tl.constexpr):
    """alpha - 1 of each query row (``alpha_rows`` (H, T) fp32, any alpha) or 0.5 (entmax-1.5, nothing loaded)."""
    if GENERAL:
        return tl.load(alpha_rows + i_h.to(tl.int64) * T + o_m, mask=o_m < T, other=1.5) - 1.0
    else:
        return tl.full(o_m.shape, 0.5, dtype=tl.float32)


@triton.jit
def _powers(b_g, b_exponent):
    """``G^e`` [BM, BN] for G >= 0 and a per-row exponent e >= 0 [BM], 0 where G = 0 (also for e = 0)."""
    m_s = b_g > 0
    return tl.where(m_s, tl.exp2(tl.log2(tl.where(m_s, b_g, 1.0)) * b_exponent[:, None]), 0.0)


@triton.jit
def _accumulate_power_stats(b_zr, b_t, b_r, b_s1, b_s2, NC: tl.constexpr):
    """Any alpha: add one key tile's ``sum_j w^r`` and ``sum_j w^(r - 1)`` over the support ``w = zr - t > 0`` of
    every candidate t (``b_t`` [BM, NC]; r = 1 / (alpha - 1) per row): f(t) = s1 - 1 and f'(t) = -r s2. Sparsemax
    rows (r = 1) add ``sum_j zr`` over the support instead (s2 is its size): f(t) = s1 - s2 t - 1, and
    :func:`_power_candidate_step` gets its closed form from these sums, which hold the relative scores themselves."""
    o_c = tl.arange(0, NC)
    m_sparse = (b_r == 1.0)[:, None]  # [BM, 1]
    for i_c in range(NC):
        m_c = (o_c == i_c)[None, :]
        b_tc = tl.sum(tl.where(m_c, b_t, 0.0), 1)  # [BM]
        b_w = tl.maximum(b_zr - b_tc[:, None], 0.0)  # [BM, BN]
        b_pow = _powers(b_w, b_r - 1.0)  # w^(r - 1)
        b_term = tl.where(m_sparse & (b_w > 0), b_zr, b_pow * b_w)
        b_s1 = tl.where(m_c, b_s1 + tl.sum(b_term, 1)[:, None], b_s1)
        b_s2 = tl.where(m_c, b_s2 + tl.sum(b_pow, 1)[:, None], b_s2)
    return b_s1, b_s2


@triton.jit
def _power_candidate_step(b_t, b_s1, b_s2, b_r, b_lo, b_hi, b_tau, b_done):
    """Any alpha: one solver pass from ``f(t) = sum max(x - t, 0)^r - 1`` (convex and decreasing; r >= 1) at the
    candidates ``b_t`` [BM, NC] of the bracket [lo, hi] (sums of :func:`_accumulate_power_stats`). Lower bounds:
    candidates with f >= 0 and every Newton step (a tangent of a convex f crosses 0 left of the root); upper bounds:
    candidates with f < 0 and the secant between the two candidates around the root. The bracket shrinks
    quadratically; a row is solved when it is a few floats wide (relative 2^-21) or collapses.
    Sparsemax rows (r = 1) take the closed form (Martins and Astudillo, 2016): each candidate's support S gives
    ``c = (sum_S x - 1) / |S|`` (x relative to the row maximum, rounded once), a lower bound of the root that is the
    root when S is its support. The largest c is tau as soon as its own support is provably S (no score between
    the candidates around c). Returns (tau, lo, hi, done)."""
    m_sparse = b_r == 1.0  # [BM]
    b_f = tl.where(m_sparse[:, None], b_s1 - b_s2 * b_t, b_s1) - 1.0
    m_left = b_f >= 0
    m_support = b_s2 > 0
    b_newton = tl.where(m_support, b_t + b_f / (b_r[:, None] * tl.where(m_support, b_s2, 1.0)), float("-inf"))
    b_t_left = tl.max(tl.where(m_left, b_t, float("-inf")), 1)
    b_f_left = tl.min(tl.where(m_left, b_f, float("inf")), 1)
    b_t_right = tl.min(tl.where(m_left, float("inf"), b_t), 1)
    b_f_right = tl.max(tl.where(m_left, float("-inf"), b_f), 1)
    m_both = (b_t_left > float("-inf")) & (b_t_right < float("inf"))
    b_gap = tl.where(m_both, b_f_left - b_f_right, 1.0)  # > 0
    b_secant = tl.where(m_both, b_t_left + tl.where(m_both, b_f_left, 0.0)
                        * (tl.where(m_both, b_t_right, 0.0) - tl.where(m_both, b_t_left, 0.0)) / b_gap, float("inf"))
    # sparsemax: the size of c's support {x > c} is the size of the supports of the nearest candidates at or below c
    # and at or above it when those agree (supports shrink as t grows: the least size of one side, the largest of the
    # other); c is the root when that is the size of the support whose closed form c is (a fixed point)
    m_closed_form = m_sparse[:, None] & m_support
    b_closed_of = tl.where(m_closed_form, tl.math.div_rn(b_s1 - 1.0, tl.where(m_closed_form, b_s2, 1.0)),
                           float("-inf"))  # [BM, NC]
    b_closed = tl.max(b_closed_of, 1)  # [BM]
    b_size = tl.min(tl.where(b_t <= b_closed[:, None], b_s2, float("inf")), 1)
    m_fixed = (b_closed_of == b_closed[:, None]) & (b_s2 == b_size[:, None])
    m_closed = m_sparse & (b_size == tl.max(tl.where(b_t >= b_closed[:, None], b_s2, -1.0), 1)) \
        & (tl.max(m_fixed.to(tl.int32), 1) > 0)
    # sparsemax rows take the largest c as their lower bound in place of the Newton steps: each c is its candidate's
    # Newton step rounded once, where t + f / |S| may round above the root and leave no candidate at or below c next
    b_new_lo = tl.maximum(tl.maximum(b_lo, b_t_left), tl.where(m_sparse, b_closed, tl.max(b_newton, 1)))
    b_new_hi = tl.minimum(tl.minimum(b_hi, b_t_right), b_secant)
    m_solved = (b_new_hi - b_new_lo) <= 4.8e-7 * tl.abs(b_new_lo)  # also a collapsed bracket (hi <= lo)
    b_tau = tl.where(b_done, b_tau, tl.where(m_closed, b_closed, b_new_lo))
    b_lo = tl.where(b_done, b_lo, b_new_lo)
    b_hi = tl.where(b_done, b_hi, tl.maximum(b_new_hi, b_new_lo))
    return b_tau, b_lo, b_hi, b_done | m_solved | m_closed


@triton.jit(do_not_specialize=_SUPPORT_NOT_SPECIALIZED)
def _entmax_tau_kernel(q, k, seq_start, seq_end, rowmax, tau, support, alpha_rows,
                       stride_qb, stride_qh, stride_qt, stride_qd,
                       stride_kb, stride_kh, stride_kt, stride_kd,
                       stride_sb, stride_sm, stride_sn,
                       H, T, TK, D, half_scale, causal,
                       ROW_IN_REGISTERS: tl.constexpr, MAX_PASSES: tl.constexpr, NC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, MASK_BM: tl.constexpr,
                       MASK_BN: tl.constexpr, UPCAST_DOTS: tl.constexpr, USE_TMA: tl.constexpr,
                       GENERAL: tl.constexpr = False):
    """Row maximum rowmax (B*H, T) fp32 of ``z = scale / 2 * q k^T`` (T query rows, TK keys) and the threshold
    relative to it, tau (B*H, T) fp32: ``sum_j max(z_ij - rowmax_i - tau_i, 0)^2 = 1``. Rows with a NaN or +inf score
    (or visible keys but no finite score) get NaN tau and rowmax 0; rows that see no key get tau = +inf (no
    probability: zero output). Grid (cdiv(T, BM), B*H). ROW_IN_REGISTERS (scores computed once, kept on chip) needs
    TK <= BN. GENERAL (any alpha): ``z = (alpha_i - 1) * scale * q k^T`` (``half_scale`` holds scale, alpha_rows
    (H, T) fp32 each row's alpha) and ``sum_j max(z_ij - rowmax_i - tau_i, 0)^(1 / (alpha_i - 1)) = 1``, solved by
    :func:`_power_candidate_step` to fp32 rounding (no closed form).

    The first pass over K finds the row maximum; each further pass evaluates NC candidate thresholds spread over the
    row's bracket [max - 1, max - n^-1/2] (n visible keys), then over the bracket that they narrow, until every row
    of the tile is solved exactly (:func:`_candidate_step`). Each candidate pass also writes support
    (B*H, cdiv(T, MASK_BM), cdiv(TK, MASK_BN)) uint8 for the key tiles it visits: 1 if some row of the MASK_BM-row
    tile has a relative score above its bound (tau if solved, else its lower bracket), so the last pass's marks cover
    every p > 0 (docs/design.md section 2, tile classification); a program's BM rows (a multiple of MASK_BM) write
    one mark per MASK_BM-row tile, and a mask tile of MASK_BN keys (a multiple of BN) holds the OR of its BN-key
    tiles. With ROW_IN_REGISTERS the launcher fills the mask instead."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    o_m = i_m * BM + tl.arange(0, BM)
    b_start, b_end = _row_sequences(seq_start, seq_end, o_m, T)
    lo, hi = _visible_keys(i_m, o_m, b_start, b_end, T, TK, causal, BM, BN)
    b_am1 = _row_alpha(alpha_rows, i_h, o_m, T, GENERAL)  # alpha - 1 [BM]
    p_k = _row_tiles(p_k, stride_kt, TK, D, BN, BD, USE_TMA)

    if ROW_IN_REGISTERS:
        b_z = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, 0, o_m, T, TK, D,
                      half_scale, causal, b_start, b_end, BM, BN, BD, UPCAST_DOTS, USE_TMA)  # [BM, BN]
        if GENERAL:
            b_z = b_z * b_am1[:, None]
        m_bad = tl.max((b_z != b_z).to(tl.int32), 1) > 0
        b_max = tl.max(tl.where(b_z == b_z, b_z, float("-inf")), 1)
    else:
        m_bad = tl.zeros([BM], dtype=tl.int32) > 0
        b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
        for n0 in range(lo, hi, BN):
            b_zt = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, n0, o_m, T, TK,
                           D, half_scale, causal, b_start, b_end, BM, BN, BD, UPCAST_DOTS, USE_TMA)  # [BM, BN]
            if GENERAL:
                b_zt = b_zt * b_am1[:, None]
            m_bad = m_bad | (tl.max((b_zt != b_zt).to(tl.int32), 1) > 0)
            b_max = tl.maximum(b_max, tl.max(tl.where(b_zt == b_zt, b_zt, float("-inf")), 1))
    # a +inf score, or visible keys but none finite, leaves no finite probabilities: NaN row, as the reference; a row
    # that sees no key has no probability (tau = +inf: zero output)
    b_seen = tl.where(causal != 0, o_m + 1, b_end) - b_start
    m_blind = b_seen <= 0
    m_bad = m_bad | (b_max == float("inf")) | ((b_max == float("-inf")) & ~m_blind)
    m_rest = (o_m >= T) | m_bad | m_blind  # padded, NaN and blind rows: finished from the start, arithmetic finite
    b_max = tl.where(m_rest, 0.0, b_max)

    b_visible = tl.maximum(b_seen, 1).to(tl.float32)
    b_lo = tl.full([BM], -1.0, dtype=tl.float32)  # f(max - 1) >= 0 >= f(max - n^(1 - alpha))
    if GENERAL:
        b_hi = -tl.exp2(-b_am1 * tl.log2(b_visible))
    else:
        b_hi = -tl.rsqrt(b_visible)
    b_r = 1.0 / tl.where(m_rest, 0.5, b_am1)  # 1 / (alpha - 1)
    b_tau = b_lo
    b_done = m_rest
    o_c = tl.arange(0, NC).to(tl.float32) / (NC - 1)
    i_pass = 0
    while (i_pass < MAX_PASSES) & (tl.min(b_done.to(tl.int32), 0) == 0):
        b_t = b_lo[:, None] + (b_hi - b_lo)[:, None] * o_c[None, :]  # [BM, NC] candidates, relative to the max
        b_cnt = tl.zeros([BM, NC], dtype=tl.float32)
        b_a1 = tl.zeros([BM, NC], dtype=tl.float32)
        b_a2 = tl.zeros([BM, NC], dtype=tl.float32)
        b_wmin = tl.full([BM, NC], float("inf"), dtype=tl.float32)
        b_wout = tl.full([BM, NC], float("-inf"), dtype=tl.float32)
        if ROW_IN_REGISTERS:
            if GENERAL:
                b_cnt, b_a1 = _accumulate_power_stats(b_z - b_max[:, None], b_t, b_r, b_cnt, b_a1, NC)
            else:
                b_cnt, b_a1, b_a2, b_wmin, b_wout = _accumulate_candidate_stats(
                    b_z - b_max[:, None], b_t, b_cnt, b_a1, b_a2, b_wmin, b_wout, NC)
        else:
            # support bound of this pass: tau where solved, else the lower bracket lo <= tau; rows past T or NaN: none
            b_bound = tl.where(m_rest, float("inf"), tl.where(b_done, b_tau, b_lo))
            tl.static_assert(BM % MASK_BM == 0)
            o_mt = i_m * (BM // MASK_BM) + tl.arange(0, BM // MASK_BM)  # the program's mask tiles of MASK_BM rows
            p_sup = support + i_bh.to(tl.int64) * stride_sb + o_mt.to(tl.int64) * stride_sm
            for n0 in range(lo, hi, BN):
                b_zt = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, n0, o_m,
                               T, TK, D, half_scale, causal, b_start, b_end, BM, BN, BD, UPCAST_DOTS,
                               USE_TMA)  # [BM, BN]
                if GENERAL:
                    b_zt = b_zt * b_am1[:, None]
                b_zr = b_zt - b_max[:, None]
                if GENERAL:
                    b_cnt, b_a1 = _accumulate_power_stats(b_zr, b_t, b_r, b_cnt, b_a1, NC)
                else:
                    b_cnt, b_a1, b_a2, b_wmin, b_wout = _accumulate_candidate_stats(
                        b_zr, b_t, b_cnt, b_a1, b_a2, b_wmin, b_wout, NC)
                # p_ij > 0 needs zr_ij > tau_i >= bound_i: the last pass's record is the mask (one mark per
                # MASK_BM rows)
                m_row = (tl.max(b_zr, 1) > b_bound).to(tl.int32)  # [BM]
                m_hit = tl.max(tl.reshape(m_row, [BM // MASK_BM, MASK_BM]), 1)  # [BM // MASK_BM]
                # a mask tile's first visited key tile writes its mark, the others only add theirs (an OR)
                m_first = ((n0 == lo) | (n0 % MASK_BN == 0)).to(tl.int32)
                tl.store(p_sup + (n0 // MASK_BN) * stride_sn, m_hit.to(tl.uint8),
                         mask=(o_mt * MASK_BM < T) & (m_hit + m_first > 0))
        if GENERAL:
            b_tau, b_lo, b_hi, b_done = _power_candidate_step(b_t, b_cnt, b_a1, b_r, b_lo, b_hi, b_tau, b_done)
        else:
            b_tau, b_lo, b_hi, b_done = _candidate_step(b_t, b_cnt, b_a1, b_a2, b_wmin, b_wout, b_lo, b_hi, b_tau,
                                                        b_done)
        i_pass += 1

    o_row = i_bh.to(tl.int64) * T + o_m
    tl.store(rowmax + o_row, b_max, mask=o_m < T)
    tl.store(tau + o_row, tl.where(m_bad, float("nan"), tl.where(m_blind, float("inf"), b_tau)), mask=o_m < T)


@triton.jit(do_not_specialize=_SUPPORT_NOT_SPECIALIZED + ["store_w"])
def _entmax_fwd_kernel(q, k, v, seq_start, seq_end, rowmax, tau, support, o, w, alpha_rows, s, ent,
                       stride_qb, stride_qh, stride_qt, stride_qd,
                       stride_kb, stride_kh, stride_kt, stride_kd,
                       stride_vb, stride_vh, stride_vt, stride_vd,
                       stride_sb, stride_sm, stride_sn,
                       H, T, TK, D, Dv, half_scale, causal, store_w,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                       MASK_BM: tl.constexpr, UPCAST_DOTS: tl.constexpr, USE_TMA: tl.constexpr,
                       GENERAL: tl.constexpr = False, STORE_S: tl.constexpr = False):
    """o[:, :, :, chunk] (B, H, T, Dv) = p @ v (T query rows, TK keys) with ``p = max(z - tau, 0)^2``; if
    ``store_w``, also w (B, H, T, Dv) fp32 = ``(G @ v) / rowsum(G)``, ``G = max(z - tau, 0)``. Grid (cdiv(T, BM),
    cdiv(Dv, BDV), B*H).
    Key tiles whose ``support`` byte (the threshold kernel's mask, tiles MASK_BM x BN; BM divides MASK_BM: a query
    tile reads the entry of the mask tile that holds it) is 0 are skipped before QK^T.
    GENERAL (any alpha, :func:`_entmax_tau_kernel`): ``p = G^r / sum_j G^r`` and ``g = G^(r - 1)`` (= p^(2 - alpha))
    in place of ``G^2`` and G, r = 1 / (alpha - 1); with STORE_S (alpha's gradient: a constexpr, so that launches
    without it hold two [BM, BDV] accumulators as entmax-1.5 does, not three) also s (B, H, T, Dv) fp32
    = ``sum_j p_j log(p_j) v_j`` and ent (B, H, T) fp32 = ``sum_j p_j log(p_j)``."""
    tl.static_assert(MASK_BM % BM == 0)
    V_TMA: tl.constexpr = USE_TMA and BDV <= TMA_MAX_BOX  # V tiles through TMA too where a box holds them
    i_m, i_dv, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    o_dv = i_dv * BDV + tl.arange(0, BDV)
    m_dv = o_dv < Dv

    b_max = tl.load(rowmax + i_bh.to(tl.int64) * T + o_m, mask=m_m, other=0.0)  # [BM]
    b_tau = tl.load(tau + i_bh.to(tl.int64) * T + o_m, mask=m_m, other=float("inf"))  # [BM]
    b_o = tl.zeros([BM, BDV], dtype=tl.float32)
    b_u = tl.zeros([BM, BDV], dtype=tl.float32)
    b_gsum = tl.zeros([BM], dtype=tl.float32)
    b_am1 = _row_alpha(alpha_rows, i_bh % H, o_m, T, GENERAL)
    b_r = 1.0 / b_am1
    if GENERAL:
        b_psum = tl.zeros([BM], dtype=tl.float32)
    if STORE_S:
        b_s = tl.zeros([BM, BDV], dtype=tl.float32)
        b_ent = tl.zeros([BM], dtype=tl.float32)
    b_start, b_end = _row_sequences(seq_start, seq_end, o_m, T)
    lo, hi = _visible_keys(i_m, o_m, b_start, b_end, T, TK, causal, BM, BN)
    p_sup = support + i_bh.to(tl.int64) * stride_sb + ((i_m * BM) // MASK_BM).to(tl.int64) * stride_sm
    p_k = _row_tiles(p_k, stride_kt, TK, D, BN, BD, USE_TMA)
    p_v = _row_tiles(p_v, stride_vt, TK, Dv, BN, BDV, V_TMA)
    for n0 in range(lo, hi, BN):
        if tl.load(p_sup + (n0 // BN) * stride_sn) != 0:  # tiles of zero probabilities: no QK^T, no V
            o_n = n0 + tl.arange(0, BN)
            b_z = _scores(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, n0, o_m, T, TK, D,
                          half_scale, causal, b_start, b_end, BM, BN, BD, UPCAST_DOTS, USE_TMA)  # [BM, BN]
            if GENERAL:
                b_z = b_z * b_am1[:, None]
            b_g = _probability_roots(b_z, b_max, b_tau)  # [BM, BN]
            if tl.max(tl.max(b_g, 1), 0) > 0:  # the mask is conservative: the tile may still have none
                if V_TMA:
                    b_v = p_v.load([n0, i_dv * BDV])  # [BN, BDV]
                else:
                    b_v = tl.load(p_v + o_n.to(tl.int64)[:, None] * stride_vt + o_dv[None, :] * stride_vd,
                                  mask=(o_n[:, None] < TK) & m_dv[None, :], other=0.0)  # [BN, BDV]
                if GENERAL:
                    b_p = _powers(b_g, b_r)
                    b_o += dot_fp32acc(b_p.to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
                    b_psum += tl.sum(b_p, 1)
                    if store_w != 0:
                        b_gg = _powers(b_g, b_r - 1.0)
                        b_u += dot_fp32acc(b_gg.to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
                        b_gsum += tl.sum(b_gg, 1)
                    if STORE_S:  # p log p = p r ln G
                        b_plogp = b_p * (b_r * 0.6931471805599453)[:, None] * tl.log2(tl.where(b_g > 0, b_g, 1.0))
                        b_s += dot_fp32acc(b_plogp.to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
                        b_ent += tl.sum(b_plogp, 1)
                else:
                    b_o += dot_fp32acc((b_g * b_g).to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
                    if store_w != 0:
                        b_u += dot_fp32acc(b_g.to(b_v.dtype), b_v, "tf32x3", UPCAST_DOTS)
                        b_gsum += tl.sum(b_g, 1)

    if GENERAL:  # the threshold is exact to fp32 rounding only: normalise (rows without support keep 0)
        b_o = b_o / tl.where(b_psum > 0, b_psum, 1.0)[:, None]
    # a NaN row has NaN tau and no support: give it NaN, not zeros
    b_o = tl.where((b_tau == b_tau)[:, None], b_o, float("nan"))
    o_out = (i_bh.to(tl.int64) * T + o_m)[:, None] * Dv + o_dv[None, :]
    m_out = m_m[:, None] & m_dv[None, :]
    tl.store(o + o_out, b_o.to(o.dtype.element_ty), mask=m_out)
    if store_w != 0:
        b_w = b_u / tl.where(b_gsum > 0, b_gsum, 1.0)[:, None]  # rows past T have no support: no 0 / 0
        tl.store(w + o_out, tl.where((b_tau == b_tau)[:, None], b_w, float("nan")), mask=m_out)
    if STORE_S:
        tl.store(s + o_out, b_s, mask=m_out)
        if i_dv == 0:
            tl.store(ent + i_bh.to(tl.int64) * T + o_m, b_ent, mask=m_m)


@triton.jit
def _score_gradients(b_g, b_dp, b_c, dtype: tl.constexpr):
    """``dS = G (dP - c)`` [BM, BN] of one tile pair, zero off the support, in the dots' operand ``dtype``."""
    return tl.where(b_g > 0, b_g * (b_dp - b_c[:, None]), 0.0).to(dtype)


@triton.jit
def _add_dk_dq(b_g, b_dp, b_c, b_q, b_k, b_dk, dq, o_row, o_d, m_m, m_d, D, UPCAST_DOTS: tl.constexpr):
    """With ``dS = G (dP - c)`` of one tile pair: returns ``b_dk + dS^T @ q`` and adds ``dS @ k`` to the rows
    ``o_row`` of dq (fp32, row stride D) atomically."""
    b_ds = _score_gradients(b_g, b_dp, b_c, b_q.dtype)
    b_dk += dot_fp32acc(tl.trans(b_ds), b_q, "tf32x3", UPCAST_DOTS)
    tl.atomic_add(dq + o_row[:, None] * D + o_d[None, :], dot_fp32acc(b_ds, b_k, "tf32x3", UPCAST_DOTS),
                  mask=m_m[:, None] & m_d[None, :], sem="relaxed")
    return b_dk


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _entmax_bwd_kernel(q, k, v, do, seq_start, seq_end, rowmax, tau, c, tile_rows, tile_counts, dq, dk, dv, alpha_rows,
                       stride_qb, stride_qh, stride_qt, stride_qd,
                       stride_kb, stride_kh, stride_kt, stride_kd,
                       stride_vb, stride_vh, stride_vt, stride_vd,
                       stride_ob, stride_oh, stride_ot, stride_od,
                       H, T, TK, D, Dv, half_scale, scale, causal,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
                       WHOLE: tl.constexpr, UPCAST_DOTS: tl.constexpr, USE_TMA: tl.constexpr,
                       GENERAL: tl.constexpr = False):
    """The backward of one key tile (FA2's loop): over the query tiles that see it, ``z = q k^T``, ``G``,
    ``dP = dO v^T`` and ``dS = G (dP - c)``, then dv[:, :, tile] (B, H, TK, Dv) = p^T @ dO, dk[:, :, tile]
    (B, H, TK, D) = scale * dS^T @ q and, by atomic adds, dq (B*H, T, D) fp32 += dS @ k (unscaled; zero-filled by the
    caller); T query rows, TK keys. The query tiles visited are the first ``tile_counts[bh, i_n]`` entries of
    ``tile_rows[bh, i_n]`` (:func:`_query_tile_lists`: visible, with support, ascending); the others cost no dot and
    no load.

    WHOLE (BD >= D and BDV >= Dv): one program per key tile, k and v stay on chip, each product is one dot: five
    dots per tile pair, FA2's count. Otherwise program i_c of grid axis 1 owns feature chunk i_c of dk, dq (BD wide)
    and dv (BDV wide), and z and dP are reductions over D and Dv in BK-feature steps whose operands stream from
    memory (a whole-width operand of a BM x BN product would sit in every warp's registers): with BD >= D and
    BDV >= Dv still FA2's count, one program per key tile; wider heads take several programs, each recomputing z
    (and dP if it has a dk chunk). Grid (cdiv(TK, BN), 1 if WHOLE else max(cdiv(D, BD), cdiv(Dv, BDV)), B*H).
    GENERAL (any alpha): ``p = G^r`` and ``dS = g (dP - c)`` with ``g = G^(r - 1)`` (= p^(2 - alpha)), r = 1 /
    (alpha - 1) per row (``alpha_rows``). USE_TMA (WHOLE only): the Q and dO tiles stream through TMA descriptors
    (sm_90)."""
    tl.static_assert(WHOLE or not USE_TMA)
    i_n, i_bh = tl.program_id(0), tl.program_id(2)
    i_c = tl.program_id(1) * (1 - WHOLE)  # 0 (a constant) when WHOLE
    i_b, i_h = i_bh // H, i_bh % H
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh
    p_do = do + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < TK
    o_d = i_c * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_dv = i_c * BDV + tl.arange(0, BDV)
    m_dv = o_dv < Dv
    # chunked: when D != Dv, the programs past the narrower one skip its half
    has_dk = i_c * BD < D
    has_dv = i_c * BDV < Dv

    if WHOLE:
        b_k = tl.load(p_k + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :] * stride_kd,
                      mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        b_v = tl.load(p_v + o_n.to(tl.int64)[:, None] * stride_vt + o_dv[None, :] * stride_vd,
                      mask=m_n[:, None] & m_dv[None, :], other=0.0)  # [BN, BDV]
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BDV], dtype=tl.float32)
    q_tiles = _row_tiles(p_q, stride_qt, T, D, BM, BD, USE_TMA)
    do_tiles = _row_tiles(p_do, stride_ot, T, Dv, BM, BDV, USE_TMA)
    # the query tiles to visit, listed by the launcher: a loop without a branch, so that its loads stream with
    # async copies (Triton does not pipeline loads whose dots sit under an ``if``)
    o_list = i_bh.to(tl.int64) * tl.cdiv(TK, BN) + i_n
    p_rows = tile_rows + o_list * tl.cdiv(T, BM)
    for i_row in range(0, tl.load(tile_counts + o_list)):
        m0 = tl.load(p_rows + i_row) * BM
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < T
        o_row = i_bh.to(tl.int64) * T + o_m
        b_start, b_end = _row_sequences(seq_start, seq_end, o_m, T)
        b_max = tl.load(rowmax + o_row, mask=m_m, other=0.0)  # [BM]
        b_tau = tl.load(tau + o_row, mask=m_m, other=float("inf"))  # [BM]
        b_c = tl.load(c + o_row, mask=m_m, other=0.0)  # [BM]
        b_am1 = _row_alpha(alpha_rows, i_h, o_m, T, GENERAL)
        p_qm = p_q + o_m.to(tl.int64)[:, None] * stride_qt + o_d[None, :] * stride_qd
        p_dom = p_do + o_m.to(tl.int64)[:, None] * stride_ot + o_dv[None, :] * stride_od
        if USE_TMA:  # loaded ahead, streamed with async copies
            b_q = q_tiles.load([m0, 0])  # [BM, BD]
            b_do = do_tiles.load([m0, 0])  # [BM, BDV]
        elif WHOLE:
            b_q = tl.load(p_qm, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
            b_do = tl.load(p_dom, mask=m_m[:, None] & m_dv[None, :], other=0.0)  # [BM, BDV]
        m_visible = m_m[:, None] & (o_n[None, :] >= b_start[:, None]) & (o_n[None, :] < b_end[:, None]) \
            & ((o_n[None, :] <= o_m[:, None]) | (causal == 0))
        if WHOLE:
            b_z = dot_fp32acc(b_q, tl.trans(b_k), "tf32x3", UPCAST_DOTS) * half_scale
        else:
            b_z = _row_dots(p_q, stride_qt, stride_qd, p_k, stride_kt, stride_kd, o_m, o_n, n0, T, TK, D, BM, BN,
                            BK, UPCAST_DOTS, False) * half_scale
        if GENERAL:
            b_z = b_z * b_am1[:, None]
        b_g = _probability_roots(tl.where(m_visible, b_z, float("-inf")), b_max, b_tau)  # [BM, BN]
        if GENERAL:
            b_p = _powers(b_g, 1.0 / b_am1)
            b_g = _powers(b_g, 1.0 / b_am1 - 1.0)
        else:
            b_p = b_g * b_g
        if WHOLE:
            b_dv += dot_fp32acc(tl.trans(b_p.to(b_do.dtype)), b_do, "tf32x3", UPCAST_DOTS)
            b_dp = dot_fp32acc(b_do, tl.trans(b_v), "tf32x3", UPCAST_DOTS)  # [BM, BN]
            b_dk = _add_dk_dq(b_g, b_dp, b_c, b_q, b_k, b_dk, dq, o_row, o_d, m_m, m_d, D, UPCAST_DOTS)
        else:  # each operand loaded where it is used: only the dk and dv accumulators live across the loop
            if has_dv:
                b_do = tl.load(p_dom, mask=m_m[:, None] & m_dv[None, :], other=0.0)  # [BM, BDV]
                b_dv += dot_fp32acc(tl.trans(b_p.to(b_do.dtype)), b_do, "tf32x3", UPCAST_DOTS)
            if has_dk:
                b_dp = _row_dots(p_do, stride_ot, stride_od, p_v, stride_vt, stride_vd, o_m, o_n, n0, T, TK, Dv,
                                 BM, BN, BK, UPCAST_DOTS, False)  # [BM, BN]
                b_ds = _score_gradients(b_g, b_dp, b_c, q.dtype.element_ty)
                b_q = tl.load(p_qm, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
                b_dk += dot_fp32acc(tl.trans(b_ds), b_q, "tf32x3", UPCAST_DOTS)
                # dq += dS @ k over this program's features, BK at a time (k streamed, not held)
                for i_k in range(0, tl.cdiv(BD, BK)):
                    o_k = i_c * BD + i_k * BK + tl.arange(0, BK)
                    m_k = (o_k < D) & (o_k < (i_c + 1) * BD)
                    b_kc = tl.load(p_k + o_n.to(tl.int64)[:, None] * stride_kt + o_k[None, :] * stride_kd,
                                   mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
                    tl.atomic_add(dq + o_row[:, None] * D + o_k[None, :],
                                  dot_fp32acc(b_ds, b_kc, "tf32x3", UPCAST_DOTS), mask=m_m[:, None] & m_k[None, :],
                                  sem="relaxed")

    o_key = i_bh.to(tl.int64) * TK + o_n
    tl.store(dk + o_key[:, None] * D + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty),
             mask=m_n[:, None] & m_d[None, :])
    tl.store(dv + o_key[:, None] * Dv + o_dv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_n[:, None] & m_dv[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


class _Sequences(NamedTuple):
    """Per position t of the T (or packed) rows: its sequence's rows [start[t], end[t]), int32 (T,) each. A row sees
    only keys of its own sequence."""

    start: torch.Tensor
    end: torch.Tensor


#: the caches of every :func:`_shape_constant` function
_SHAPE_CONSTANT_CACHES: list = []


def clear_shape_constants() -> None:
    """Forget every shape-only tensor (:func:`_shape_constant`): the launch instruments (``kernels.tools``) run the
    ops with kernels that do not run, so what they build must neither stay nor hide a launch from them."""
    for cache in _SHAPE_CONSTANT_CACHES:
        cache.cache_clear()


def _shape_constant(build):
    """``build(*key, device)`` (device last) whose tensors depend on its hashable arguments only: built once per key
    (the last 64 keys) and shared afterwards, read-only (nothing writes them), so that a call at a shape seen before
    launches no device operation to rebuild them. Built afresh, uncached, while torch.compile traces or under a fake
    tensor mode (their tensors must not outlive the trace); built outside inference mode (autograd saves them)."""
    cached = functools.lru_cache(maxsize=64)(build)
    _SHAPE_CONSTANT_CACHES.append(cached)

    @functools.wraps(build)
    def get(*key):
        *key, device = key
        if torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None:
            return build(*key, torch.device(device))
        with torch.inference_mode(False):
            return cached(*key, torch.device(device))

    return get


@_shape_constant
def _whole_sequences(t: int, device) -> _Sequences:
    """One sequence of all t rows (the unpacked op); shared per (t, device) (:func:`_shape_constant`)."""
    return _Sequences(torch.zeros(t, dtype=torch.int32, device=device), torch.full((t,), t, dtype=torch.int32,
                                                                                   device=device))


def _is_same_tensor(a: Optional[Tensor], b: Tensor) -> bool:
    """Whether ``a`` holds ``b``'s elements: the same storage, offset, shape and strides (an autograd-saved output
    is another tensor object over the same memory)."""
    return (a is not None and a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


def _packed_sequences(cu_seqlens: torch.Tensor, total: int, device) -> _Sequences:
    """The sequences of packed rows from their offsets, on the device without a host sync."""
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return _Sequences(*(torch.repeat_interleave(bound, lengths, output_size=total).to(torch.int32)
                        for bound in (cu_seqlens[:-1], cu_seqlens[1:])))


def _support_shape(B: int, H: int, T: int, TK: int, tiles: Tiles):
    """Shape of the per-tile support mask of T query rows and TK keys: (B*H, query tiles, key tiles) of ``block_m`` x
    ``block_n``."""
    return B * H, triton.cdiv(T, tiles.block_m), triton.cdiv(TK, tiles.block_n)


@_shape_constant
def _reachable_tiles(shape: tuple, TK: int, causal: bool, tiles: Tiles, device) -> Tensor:
    """The support mask (:func:`_support_shape` ``shape``, uint8) of rows solved in registers: 1 at every tile that a
    causal (or any) query tile reaches among TK keys; shared per key (:func:`_shape_constant`), never written."""
    i_m = torch.arange(shape[1], device=device)[:, None]
    i_n = torch.arange(shape[2], device=device)[None, :]
    reachable = (i_n * tiles.block_n < torch.clamp((i_m + 1) * tiles.block_m, max=TK)) | (not causal)
    return reachable.to(torch.uint8).expand(shape).contiguous()


def _entmax_tau(q, k, causal: bool, scale: float, sequences: _Sequences, alpha_rows: Optional[Tensor] = None):
    """Launch the threshold kernel. Returns rowmax and tau relative to it, both (B, H, T) fp32, and the per-tile
    support mask (B*H, cdiv(T, block_m), cdiv(T, block_n)) uint8: 0 where every probability of the (query tile, key
    tile) pair is 0, 1 where some may not be (docs/design.md section 2). Rows solved in registers (T <= row_block_n)
    mark every tile that a causal (or any) query tile can reach. ``alpha_rows`` (H, T) fp32: each row's alpha (any
    alpha, the kernels' GENERAL mode; tau is then relative to the maximum of ``(alpha - 1) * scale * q k^T``); None:
    entmax-1.5."""
    B, H, T, D = q.shape
    TK = k.shape[2]
    tiles = _tiles(q.dtype)
    rowmax = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    tau = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    in_registers = TK <= tiles.row_block_n
    shape = _support_shape(B, H, T, TK, tiles)
    if in_registers:
        support = _reachable_tiles(shape, TK, causal, tiles, q.device)
        blocks = dict(BM=tiles.row_block_m, BN=tiles.row_block_n, BD=tiles.block_d)
    else:  # the kernel writes every tile that a query tile visits; the others stay 0
        support = torch.zeros(shape, dtype=torch.uint8, device=q.device)
        blocks = _tau_pass_tiles(tiles)
    # timing launches restore the mask: the kernel writes only the tiles it visits (the launcher's in registers)
    general = alpha_rows is not None
    arch = launch_arch(q.device)
    use_tma = tma_launch(arch, k)  # K tiles through TMA descriptors on sm_90
    with tma_scratch(use_tma):
        launch(_entmax_tau_kernel, lambda meta: (triton.cdiv(T, meta["BM"]), B * H),
               (q, k, *sequences, rowmax, tau, support, alpha_rows if general else tau, *q.stride(), *k.stride(),
                *support.stride(), H, T, TK, D, scale if general else 0.5 * scale, int(causal)),
               dict(ROW_IN_REGISTERS=in_registers, MAX_PASSES=_MAX_PASSES, NC=tiles.candidates,
                    MASK_BM=tiles.block_m, MASK_BN=tiles.block_n, UPCAST_DOTS=upcast_dots_for(q.dtype),
                    USE_TMA=use_tma, **_general(general)),
               _candidates(("tau registers" if in_registers else "tau passes") + (" general" if general else ""),
                           q.dtype, blocks, arch),
               device=q.device, bucket=(*_bucket(B * H, T), use_tma), restore_value=("support",))
    return rowmax, tau, support


def _forward_tiles(tiles: Tiles, dv: int, general: bool = False, store_s: bool = False):
    """(candidate list, query rows BM, Dv chunk BDV) of the output kernel (``Tiles``): ``block_m`` rows and one
    chunk of ``block_dv`` or Dv's next power of two for Dv up to ``wide_block_dv``, else ``wide_dv_block_m`` rows
    and chunks of Dv's next power of two up to ``wide_dv_block_dv``. ``general`` (any alpha): above
    ``wide_block_dv`` the list ``"fwd wide general"``; with ``store_s`` (alpha's gradient: three accumulators) also
    ``"fwd general"`` below, and BM (one chunk; at most ``general_block_m``) or else BDV cut so that BM x BDV is at
    most ``general_block_mdv``; without it (two accumulators, as entmax-1.5) cut to ``fixed_alpha_block_mdv``."""
    budget = tiles.general_block_mdv if store_s else tiles.fixed_alpha_block_mdv if general else None
    if dv <= tiles.wide_block_dv:
        block_dv = max(tiles.block_dv, triton.next_power_of_2(dv))
        block_m = tiles.block_m
        if store_s:
            block_m = min(tiles.general_block_m or block_m, block_m)
        if budget is not None:
            block_m = min(block_m, max(1, budget // block_dv))
        if tiles.block_m % block_m:
            raise ValueError(f"output kernel tile {block_m} must divide the support mask's {tiles.block_m}")
        return ("fwd general" if store_s else "fwd"), block_m, block_dv
    block_m = tiles.wide_dv_block_m or tiles.block_m
    if tiles.block_m % block_m:
        raise ValueError(f"output kernel tile {block_m} must divide the support mask's {tiles.block_m}")
    block_dv = min(tiles.wide_dv_block_dv or tiles.wide_block_dv, triton.next_power_of_2(dv))
    if budget is not None:
        block_dv = min(block_dv, max(1, budget // block_m))
    return ("fwd wide general" if general else "fwd wide"), block_m, block_dv


def _general(general: bool, **flags: bool) -> dict:
    """The GENERAL constexpr of a launch and the any-alpha ``flags`` (the output kernel's STORE_S): passed only for
    any alpha, so entmax-1.5 launches keep their signature."""
    return dict(GENERAL=True, **flags) if general else {}


def _entmax_attention_fwd(q, k, v, causal: bool, scale: float, store_w: bool, sequences: _Sequences,
                          alpha_rows: Optional[Tensor] = None, store_s: bool = False):
    """Launch the tau and forward kernels. Returns o (B, H, T, Dv) in v's dtype, rowmax and tau (B, H, T) fp32, the
    support mask (:func:`_entmax_tau`), with ``store_w`` w (B, H, T, Dv) fp32 for the backward (else None) and, any
    alpha (``alpha_rows``, :func:`_entmax_tau`) with ``store_s``, s (B, H, T, Dv) and ent (B, H, T) fp32 for alpha's
    gradient (else None, None)."""
    B, H, T, D = q.shape
    TK, Dv = k.shape[2], v.shape[-1]
    tiles = _tiles(q.dtype)
    general = alpha_rows is not None
    rowmax, tau, support = _entmax_tau(q, k, causal, scale, sequences, alpha_rows)
    o = torch.empty((B, H, T, Dv), dtype=v.dtype, device=v.device)
    w = torch.empty((B, H, T, Dv), dtype=torch.float32, device=v.device) if store_w else None
    store_s = store_s and general
    s = torch.empty((B, H, T, Dv), dtype=torch.float32, device=v.device) if store_s else None
    ent = torch.empty((B, H, T), dtype=torch.float32, device=v.device) if store_s else None
    name, block_m, block_dv = _forward_tiles(tiles, Dv, general, store_s)
    arch = launch_arch(q.device)
    use_tma = tma_launch(arch, k, v)  # K and V tiles (V chunks up to TMA_MAX_BOX) through TMA descriptors on sm_90
    with tma_scratch(use_tma):
        launch(_entmax_fwd_kernel, lambda meta: (triton.cdiv(T, meta["BM"]), triton.cdiv(Dv, meta["BDV"]), B * H),
               (q, k, v, *sequences, rowmax, tau, support, o, tau if w is None else w,  # no store_w: w is any fp32
                alpha_rows if general else tau, tau if s is None else s, tau if ent is None else ent,
                *q.stride(), *k.stride(), *v.stride(), *support.stride(), H, T, TK, D, Dv,
                scale if general else 0.5 * scale, int(causal), int(store_w)),
               dict(MASK_BM=tiles.block_m, UPCAST_DOTS=upcast_dots_for(q.dtype), USE_TMA=use_tma,
                    **_general(general, STORE_S=store_s)),
               _candidates(name, q.dtype, dict(BM=block_m, BN=tiles.block_n, BD=tiles.block_d, BDV=block_dv), arch),
               device=q.device, bucket=(*_bucket(B * H, T), use_tma))
    return o, rowmax, tau, support, w, s, ent


#: Feature chunk and step cap of the chunked backward when D or Dv is not a multiple of 16: without vector loads, dk
#: and dv held whole at D = 250 / Dv = 500 spill (fp32 16-108 bytes, bf16 572-668), 64-feature chunks do not (211-236
#: registers; 16-bit 128-feature chunks spill 44-148 bytes).
_UNALIGNED_BWD_BLOCK_D = 64


#: Backward key tiles on sm_90 where they differ from ``Tiles.bwd_block_n``, per dtype: (widest D and Dv, key tile).
#: fp32 at D, Dv <= 64 in 16 x 64 tiles issues warpgroup MMA (HGMMA) in dk's and dv's products, which 16-key tiles
#: cannot (report, D = 64: 214-217 registers, no spills, 8 resident warps per SM as the 16 x 16 tiles' 166); at
#: D = 128 and in the chunked backward 64 keys' dk and dv do not fit in registers, and 16-bit 32 x 64 tiles would
#: halve the resident warps (152 registers against 126: 8 per SM, not 16).
_SM90_BWD_BLOCK_N = {torch.float32: (64, 64)}


def _backward_tile_set(dtype: torch.dtype, D: int, Dv: int, arch: str) -> Tiles:
    """``_tiles(dtype)`` with the backward's key tile of ``arch`` (``_SM90_BWD_BLOCK_N``; not under
    ``_TILE_OVERRIDE``)."""
    tiles = _tiles(dtype)
    widest, block_n = _SM90_BWD_BLOCK_N.get(dtype, (0, None))
    if arch == "sm_90" and _TILE_OVERRIDE is None and max(D, Dv) <= widest:
        tiles = tiles._replace(bwd_block_n=block_n)
    return tiles


def _backward_tiles(tiles: Tiles, D: int, Dv: int) -> dict:
    """Tile constexprs (BM, BN, BD, BDV, BK, WHOLE) of the backward kernel: D and Dv whole (their next powers of
    two, at least 16 for the tensor cores; BK = BD, unused) when both fit ``bwd_whole_d``; else dk and dv in chunks of
    D's and Dv's next powers of two up to ``bwd_wide_d`` / ``bwd_wide_dv`` and QK^T and dP reduced in steps of
    ``bwd_block_d`` features (all three at most ``_UNALIGNED_BWD_BLOCK_D`` when D or Dv is not a multiple of 16)."""
    tile = dict(BM=tiles.bwd_block_m or tiles.block_m, BN=tiles.bwd_block_n or tiles.block_n)
    block_d, block_dv = (max(triton.next_power_of_2(n), 16) for n in (D, Dv))
    if max(block_d, block_dv) <= tiles.bwd_whole_d:
        return dict(tile, BD=block_d, BDV=block_dv, BK=block_d, WHOLE=True)
    step, wide_d, wide_dv = tiles.bwd_block_d or tiles.block_d, tiles.bwd_wide_d, tiles.bwd_wide_dv
    if D % 16 or Dv % 16:
        step, wide_d, wide_dv = (min(n, _UNALIGNED_BWD_BLOCK_D) for n in (step, wide_d, wide_dv))
    return dict(tile, BD=min(block_d, wide_d), BDV=min(block_dv, wide_dv), BK=step, WHOLE=False)


#: sizes and strides that vary per call: one compiled list kernel per tile configuration
_TILE_LISTS_NOT_SPECIALIZED = ["stride_sb", "stride_sm", "stride_sn", "T", "TK", "TILES_M", "TILES_N", "MASK_TILES_M",
                               "MASK_TILES_N", "causal"]


@triton.jit(do_not_specialize=_TILE_LISTS_NOT_SPECIALIZED)
def _tile_lists_kernel(support, seq_start, seq_end, tile_rows, tile_counts, stride_sb, stride_sm, stride_sn,
                       T, TK, TILES_M, TILES_N, MASK_TILES_M, MASK_TILES_N, causal,
                       BM: tl.constexpr, BN: tl.constexpr, MASK_BM: tl.constexpr, MASK_BN: tl.constexpr,
                       SPAN_M: tl.constexpr, SPAN_N: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr,
                       HAS_SUPPORT: tl.constexpr):
    """The backward's query-tile lists of ``CHUNK_N`` key tiles of one batch-head (:func:`_query_tile_lists`): over
    its ``TILES_M`` query tiles of ``BM`` rows in chunks of ``CHUNK_M``, query tile m is listed for key tile n (of
    ``BN`` keys) when n's keys meet m's rows' visible keys ``[min start, max end)`` (causal: ``[min start,
    min((m + 1) BM, TK))``, as the forward's ``_visible_keys``) and, with ``HAS_SUPPORT``, the support mask (tiles of
    ``MASK_BM`` x ``MASK_BN``) has a 1 in a mask tile that the pair covers (``SPAN_M`` x ``SPAN_N`` of them where the
    backward's tiles are multiples of the mask's, else the one holding it). Each listed query tile goes to its rank
    among the listed ones (an exclusive prefix sum carried over the chunks): ``tile_rows[bh, n, :count]`` ascending;
    ``tile_counts[bh, n] = count``; entries past the count are not written. Grid (cdiv(TILES_N, CHUNK_N), B*H)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    o_n = i_n * CHUNK_N + tl.arange(0, CHUNK_N)  # key tiles
    m_n = o_n < TILES_N
    n0 = o_n * BN  # their first keys
    o_list = i_bh.to(tl.int64) * TILES_N + o_n
    p_rows = tile_rows + o_list * TILES_M
    p_support = support + i_bh.to(tl.int64) * stride_sb
    o_r = tl.arange(0, BM)
    b_count = tl.zeros([CHUNK_N], dtype=tl.int32)
    for m_start in range(0, TILES_M, CHUNK_M):
        o_m = m_start + tl.arange(0, CHUNK_M)  # query tiles
        m_m = o_m < TILES_M
        o_row = o_m[:, None] * BM + o_r[None, :]  # [CHUNK_M, BM]
        m_row = o_row < T
        b_lo = tl.min(tl.load(seq_start + o_row, mask=m_row, other=TK), axis=1)
        if causal:
            b_hi = tl.minimum((o_m + 1) * BM, TK)
        else:
            b_hi = tl.max(tl.load(seq_end + o_row, mask=m_row, other=0), axis=1)
        b_visit = (n0[None, :] < b_hi[:, None]) & (n0[None, :] + BN > b_lo[:, None]) & m_m[:, None] & m_n[None, :]
        if HAS_SUPPORT:
            b_covered = tl.zeros([CHUNK_M, CHUNK_N], dtype=tl.int32)
            for a in tl.static_range(SPAN_M):
                j_m = o_m * BM // MASK_BM + a
                for b in tl.static_range(SPAN_N):
                    j_n = o_n * BN // MASK_BN + b
                    m_mask = b_visit & (j_m < MASK_TILES_M)[:, None] & (j_n < MASK_TILES_N)[None, :]
                    b_covered |= tl.load(p_support + j_m[:, None] * stride_sm + j_n[None, :] * stride_sn,
                                         mask=m_mask, other=0).to(tl.int32)
            b_visit = b_visit & (b_covered != 0)
        b_one = b_visit.to(tl.int32)
        b_rank = b_count[None, :] + tl.cumsum(b_one, axis=0) - b_one  # [CHUNK_M, CHUNK_N]
        tl.store(p_rows[None, :] + b_rank, o_m[:, None] + tl.zeros_like(b_rank), mask=b_visit)
        b_count += tl.sum(b_one, axis=0)
    tl.store(tile_counts + o_list, b_count, mask=m_n)


#: Query tiles x key tiles that one program of :func:`_tile_lists_kernel` lists per step (its query tiles' rows are
#: read once per step for all its key tiles), and its launch options: at the default tiles 55-128 registers on sm_80,
#: 56-96 on sm_90, no spills (ptxas -v of the AOT configurations; 64 x 16 chunks spill 4 bytes on sm_80 at 32 x 32
#: tiles)
_TILE_LISTS_CHUNKS = dict(CHUNK_M=32, CHUNK_N=32)
_TILE_LISTS_OPTIONS = dict(num_warps=4, num_stages=1)


def _tile_list_constexprs(block_m: int, block_n: int, mask_m: int, mask_n: int, has_support: bool) -> dict:
    """The constexprs of :func:`_tile_lists_kernel` for backward tiles of ``block_m`` x ``block_n`` and mask tiles of
    ``mask_m`` x ``mask_n``."""
    return dict(BM=block_m, BN=block_n, MASK_BM=mask_m, MASK_BN=mask_n, SPAN_M=max(block_m // mask_m, 1),
                SPAN_N=max(block_n // mask_n, 1), HAS_SUPPORT=has_support, **_TILE_LISTS_CHUNKS)


def _query_tile_lists(support, sequences: _Sequences, causal: bool, T: int, TK: int, block_m: int, block_n: int,
                      mask_m: int, mask_n: int, batch_heads: int):
    """Per batch-head and key tile, the query tiles the backward visits: visible and with support (T query rows, TK
    keys; ``support`` None: every visible one). Returns (rows (B*H, cdiv(TK, block_n), cdiv(T, block_m)) int32, their
    first ``counts`` entries ascending, the rest unwritten; counts (B*H, cdiv(TK, block_n)) int32): one launch of
    :func:`_tile_lists_kernel`, 4 bytes per (query tile, key tile) pair, no host sync."""
    tiles_m, tiles_n = triton.cdiv(T, block_m), triton.cdiv(TK, block_n)
    device = sequences.start.device
    rows = torch.empty((batch_heads, tiles_n, tiles_m), dtype=torch.int32, device=device)
    counts = torch.empty((batch_heads, tiles_n), dtype=torch.int32, device=device)
    mask = rows.view(torch.uint8) if support is None else support  # no support: any uint8 pointer, never read
    mask_tiles = (1, 1) if support is None else support.shape[1:]
    strides = (0, 0, 0) if support is None else support.stride()
    constexprs = _tile_list_constexprs(block_m, block_n, mask_m, mask_n, support is not None)
    launch(_tile_lists_kernel, lambda meta: (triton.cdiv(tiles_n, meta["CHUNK_N"]), batch_heads),
           (mask, *sequences, rows, counts, *strides, T, TK, tiles_m, tiles_n, *mask_tiles, int(causal)), {},
           [triton.Config(constexprs, **_TILE_LISTS_OPTIONS)], device=device)
    return rows, counts


@_shape_constant
def _shape_tile_lists(reachable: bool, causal: bool, T: int, block_m: int, block_n: int, tiles: Tiles,
                      batch_heads: int, device) -> tuple:
    """:func:`_query_tile_lists` of one whole sequence of T rows with the support mask of rows solved in registers
    (``reachable``) or none: they depend on shapes only, shared per key (:func:`_shape_constant`)."""
    support = _reachable_tiles((batch_heads, *_support_shape(1, 1, T, T, tiles)[1:]), T, causal, tiles, device)
    return _query_tile_lists(support if reachable else None, _whole_sequences(T, device), causal, T, T, block_m,
                             block_n, tiles.block_m, tiles.block_n, batch_heads)


#: The backward's row sums: rows per program, Dv chunk and launch options (one configuration, no autotuning)
_ROW_SUMS_TILES = dict(BM=32, BDV=64)
_ROW_SUMS_OPTIONS = dict(num_warps=4, num_stages=1)


@triton.jit(do_not_specialize=["H", "T"])
def _entmax_bwd_row_sums_kernel(do, w, c, stride_ob, stride_oh, stride_ot, stride_od,
                                stride_wb, stride_wh, stride_wt, stride_wd, H, T, Dv,
                                BM: tl.constexpr, BDV: tl.constexpr):
    """c (B*H, T) fp32 = ``sum_d do[..., d] * w[..., d]`` of do (B, H, T, Dv) and w (B, H, T, Dv) fp32: the
    backward's ``c_i = dO_i . w_i`` (flash-attention's rowsum(dO * O)), in fp32 whatever do's dtype. Grid
    (cdiv(T, BM), B*H)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < T
    p_do = do + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + o_m.to(tl.int64)[:, None] * stride_ot
    p_w = w + i_b.to(tl.int64) * stride_wb + i_h.to(tl.int64) * stride_wh + o_m.to(tl.int64)[:, None] * stride_wt
    b_c = tl.zeros([BM], dtype=tl.float32)
    for d0 in range(0, Dv, BDV):
        o_d = d0 + tl.arange(0, BDV)
        m_md = m_m[:, None] & (o_d[None, :] < Dv)
        b_do = tl.load(p_do + o_d[None, :] * stride_od, mask=m_md, other=0.0).to(tl.float32)  # [BM, BDV]
        b_w = tl.load(p_w + o_d[None, :] * stride_wd, mask=m_md, other=0.0)
        b_c += tl.sum(b_do * b_w, 1)
    tl.store(c + i_bh.to(tl.int64) * T + o_m, b_c, mask=m_m)


def _backward_row_sums(do: Tensor, w: Tensor) -> Tensor:
    """``c`` (B, H, T) fp32 = rowsum(do * w) (:func:`_entmax_bwd_row_sums_kernel`): one launch."""
    B, H, T, Dv = do.shape
    c = torch.empty((B, H, T), dtype=torch.float32, device=do.device)
    launch(_entmax_bwd_row_sums_kernel, lambda meta: (triton.cdiv(T, meta["BM"]), B * H),
           (do, w, c, *do.stride(), *w.stride(), H, T, Dv), {},
           [triton.Config(_ROW_SUMS_TILES, **_ROW_SUMS_OPTIONS)], device=do.device)
    return c


def _backward_tile_lists(support, sequences: _Sequences, causal: bool, T: int, TK: int, block_m: int, block_n: int,
                         tiles: Tiles, batch_heads: int, device) -> tuple:
    """:func:`_query_tile_lists` with the mask's tiles of ``tiles``; shared ones (:func:`_shape_tile_lists`) when
    ``support`` and ``sequences`` are the shared shape-only ones (:func:`_reachable_tiles`, :func:`_whole_sequences`),
    as at every call of the unpacked op whose rows are solved in registers."""
    if T == TK and (support is None or TK <= tiles.row_block_n):
        shape = (batch_heads, *_support_shape(1, 1, T, TK, tiles)[1:])
        reachable = support is not None
        whole = _whole_sequences(T, device)
        if ((not reachable or _is_same_tensor(support, _reachable_tiles(shape, TK, causal, tiles, device)))
                and _is_same_tensor(sequences.start, whole.start) and _is_same_tensor(sequences.end, whole.end)):
            return _shape_tile_lists(reachable, causal, T, block_m, block_n, tiles, batch_heads, device)
    return _query_tile_lists(support, sequences, causal, T, TK, block_m, block_n, tiles.block_m, tiles.block_n,
                             batch_heads)


def _entmax_attention_bwd(do, q, k, v, rowmax, tau, w, causal: bool, scale: float, sequences: _Sequences,
                          support: Optional[torch.Tensor] = None, alpha_rows: Optional[Tensor] = None):
    """Launch the backward kernel. Returns dq (B, H, T, D), dk (B, H, TK, D) and dv (B, H, TK, Dv) in the inputs'
    dtype.

    ``support`` (B*H, cdiv(T, block_m), cdiv(TK, block_n)) uint8, the threshold pass's per-tile mask (0: every
    probability of that tile pair is 0); None means every visible tile may have support. The backward tiles must
    divide the mask's or be multiples of them (:func:`_query_tile_lists`). ``alpha_rows``: as :func:`_entmax_tau`."""
    B, H, T, D = q.shape
    TK, Dv = k.shape[2], v.shape[-1]
    arch = launch_arch(q.device)
    tiles = _backward_tile_set(q.dtype, D, Dv, arch)
    blocks = _backward_tiles(tiles, D, Dv)
    block_m, block_n, block_d, block_dv, whole = (blocks[name] for name in ("BM", "BN", "BD", "BDV", "WHOLE"))
    for size, mask_size in ((block_m, tiles.block_m), (block_n, tiles.block_n)):
        if size % mask_size and mask_size % size:
            raise ValueError(f"backward tile {size} must divide or be a multiple of the support mask's {mask_size}")
    shape = _support_shape(B, H, T, TK, tiles)
    if support is not None and tuple(support.shape) != shape:
        raise ValueError(f"support must have shape (B*H, query tiles, key tiles) = {shape}, got "
                         f"{tuple(support.shape)}")
    # the support mask's tiles: ``tiles`` with the backward's key tile of ``arch`` may be another cache key
    rows, counts = _backward_tile_lists(support, sequences, causal, T, TK, block_m, block_n, _tiles(q.dtype), B * H,
                                        q.device)
    # c_i = sum_j G_ij dP_ij / sum_j G_ij = dO_i . w_i: flash-attention's rowsum(dO * O) for entmax
    c = _backward_row_sums(do, w)
    dq = torch.zeros((B, H, T, D), dtype=torch.float32, device=q.device)  # atomic adds of dS @ k
    dk = torch.empty((B, H, TK, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, TK, Dv), dtype=v.dtype, device=v.device)
    chunks = 1 if whole else max(triton.cdiv(D, block_d), triton.cdiv(Dv, block_dv))
    general = alpha_rows is not None
    use_tma = whole and tma_launch(arch, q, do)  # whole heads: Q and dO tiles through TMA descriptors on sm_90
    with tma_scratch(use_tma):
        launch(_entmax_bwd_kernel, lambda meta: (triton.cdiv(TK, block_n), chunks, B * H),
               (q, k, v, do, *sequences, rowmax, tau, c, rows, counts, dq, dk, dv, alpha_rows if general else tau,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), H, T, TK, D, Dv,
                scale if general else 0.5 * scale, scale, int(causal)),
               dict(UPCAST_DOTS=upcast_dots_for(q.dtype), USE_TMA=use_tma, **_general(general)),
               _candidates("bwd" if whole else "bwd chunked", q.dtype, blocks, arch),
               device=q.device, bucket=(*_bucket(B * H, T), use_tma), reset_to_zero=("dq",))  # dq: atomic adds
    if q.dtype == torch.float32:
        return dq.mul_(scale), dk, dv
    return torch.mul(dq, scale, out=torch.empty_like(dq, dtype=q.dtype)), dk, dv  # scale and cast in one operation


# torch.library ops (docs/design.md section 5): opaque to torch.compile, with fake (meta) implementations and the
# fused backward registered as their autograd formula. The rows' sequences travel as their (T,) int32 start and end
# (``_Sequences``). Saved per call: q, k, v, rowmax and tau (B, H, T), w (B, H, T, Dv), the sequences and the
# per-tile support mask (B*H, cdiv(T, block_m), cdiv(T, block_n)) uint8 (T^2 / 1,024 bytes per head at 64 x 16).


@torch.library.custom_op("kernels::entmax15_attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor seq_start, Tensor seq_end, bool causal, "
                                "float scale, bool store_w) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _entmax15_attention_fwd_op(q, k, v, seq_start, seq_end, causal, scale, store_w):
    """Triton forward: (o, rowmax, tau, w, support); w is empty (0,) without ``store_w``."""
    with launch_device_of(q):
        o, rowmax, tau, support, w, _, _ = _entmax_attention_fwd(q, k, v, causal, scale, store_w,
                                                                 _Sequences(seq_start, seq_end))
    return o, rowmax, tau, w if w is not None else tau.new_zeros(0), support


@_entmax15_attention_fwd_op.register_fake
def _(q, k, v, seq_start, seq_end, causal, scale, store_w):
    B, H, T, _ = q.shape
    shape_w = (B, H, T, v.shape[-1]) if store_w else (0,)
    return (v.new_empty((B, H, T, v.shape[-1])), q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty((B, H, T), dtype=torch.float32), q.new_empty(shape_w, dtype=torch.float32),
            q.new_empty(_support_shape(B, H, T, k.shape[2], _tiles(q.dtype)), dtype=torch.uint8))


@torch.library.custom_op("kernels::entmax15_attention_bwd", mutates_args=(),
                         schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor rowmax, Tensor tau, Tensor w, "
                                "Tensor seq_start, Tensor seq_end, bool causal, float scale, Tensor? support=None) "
                                "-> (Tensor, Tensor, Tensor)")
def _entmax15_attention_bwd_op(do, q, k, v, rowmax, tau, w, seq_start, seq_end, causal, scale, support=None):
    """Triton backward: (dq, dk, dv); ``support``: the per-tile mask of :func:`_entmax_attention_bwd`."""
    with launch_device_of(q):
        return _entmax_attention_bwd(do, q, k, v, rowmax, tau, w, causal, scale, _Sequences(seq_start, seq_end),
                                     support)


@_entmax15_attention_bwd_op.register_fake
def _(do, q, k, v, rowmax, tau, w, seq_start, seq_end, causal, scale, support=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _entmax15_attention_setup_context(ctx, inputs, output):
    q, k, v, seq_start, seq_end, causal, scale, _ = inputs
    _, rowmax, tau, w, support = output
    ctx.save_for_backward(q, k, v, rowmax, tau, w, seq_start, seq_end, support)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(rowmax, tau, w, support)
    ctx.set_materialize_grads(False)  # no zero cotangents for the non-differentiable outputs


def _entmax15_attention_backward(ctx, do, _d_rowmax, _d_tau, _d_w, _d_support):
    q, k, v, rowmax, tau, w, seq_start, seq_end, support = ctx.saved_tensors
    if do is None:  # o took no part in the loss
        return None, None, None, None, None, None, None, None
    dq, dk, dv = _entmax15_attention_bwd_op(do, q, k, v, rowmax, tau, w, seq_start, seq_end, ctx.causal, ctx.scale,
                                            support=support)
    return dq, dk, dv, None, None, None, None, None


_entmax15_attention_fwd_op.register_autograd(_entmax15_attention_backward,
                                             setup_context=_entmax15_attention_setup_context)


@torch.library.custom_op("kernels::entmax_attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor alpha_rows, Tensor seq_start, Tensor seq_end, "
                                "bool causal, float scale, bool store_w, bool store_s) "
                                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _entmax_attention_fwd_op(q, k, v, alpha_rows, seq_start, seq_end, causal, scale, store_w, store_s):
    """Triton forward of any alpha (``alpha_rows`` (H, T) fp32, one alpha per query row): (o, rowmax, tau, w,
    support, s, ent); w is empty (0,) without ``store_w``, s and ent without ``store_s``."""
    with launch_device_of(q):
        o, rowmax, tau, support, w, s, ent = _entmax_attention_fwd(q, k, v, causal, scale, store_w,
                                                                   _Sequences(seq_start, seq_end), alpha_rows,
                                                                   store_s)
    return (o, rowmax, tau, w if w is not None else tau.new_zeros(0), support,
            s if s is not None else tau.new_zeros(0), ent if ent is not None else tau.new_zeros(0))


@_entmax_attention_fwd_op.register_fake
def _(q, k, v, alpha_rows, seq_start, seq_end, causal, scale, store_w, store_s):
    B, H, T, _ = q.shape
    Dv = v.shape[-1]
    return (v.new_empty((B, H, T, Dv)), q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty((B, H, T, Dv) if store_w else (0,), dtype=torch.float32),
            q.new_empty(_support_shape(B, H, T, k.shape[2], _tiles(q.dtype)), dtype=torch.uint8),
            q.new_empty((B, H, T, Dv) if store_s else (0,), dtype=torch.float32),
            q.new_empty((B, H, T) if store_s else (0,), dtype=torch.float32))


@torch.library.custom_op("kernels::entmax_attention_bwd", mutates_args=(),
                         schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor alpha_rows, Tensor rowmax, "
                                "Tensor tau, Tensor w, Tensor seq_start, Tensor seq_end, bool causal, float scale, "
                                "Tensor support) -> (Tensor, Tensor, Tensor)")
def _entmax_attention_bwd_op(do, q, k, v, alpha_rows, rowmax, tau, w, seq_start, seq_end, causal, scale, support):
    """Triton backward of any alpha: (dq, dk, dv)."""
    with launch_device_of(q):
        return _entmax_attention_bwd(do, q, k, v, rowmax, tau, w, causal, scale, _Sequences(seq_start, seq_end),
                                     support, alpha_rows)


@_entmax_attention_bwd_op.register_fake
def _(do, q, k, v, alpha_rows, rowmax, tau, w, seq_start, seq_end, causal, scale, support):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _entmax_attention_setup_context(ctx, inputs, output):
    q, k, v, alpha_rows, seq_start, seq_end, causal, scale, _, store_s = inputs
    o, rowmax, tau, w, support, s, ent = output
    ctx.save_for_backward(q, k, v, alpha_rows, rowmax, tau, w, seq_start, seq_end, support, o, s, ent)
    ctx.causal, ctx.scale, ctx.store_s = causal, scale, store_s
    ctx.mark_non_differentiable(rowmax, tau, w, support, s, ent)
    ctx.set_materialize_grads(False)  # no zero cotangents for the non-differentiable outputs


def _entmax_attention_backward(ctx, do, _d_rowmax, _d_tau, _d_w, _d_support, _d_s, _d_ent):
    """(dq, dk, dv) from the backward kernel; alpha's gradient per row from the forward's per-row sums:
    ``(dO.o - c) / (alpha - 1)^2 - (dO.s - c ent) / (alpha - 1)`` with ``c = dO.w`` (``_AlphaEntmaxFunction``'s
    formula summed over the keys), summed over the batch."""
    q, k, v, alpha_rows, rowmax, tau, w, seq_start, seq_end, support, o, s, ent = ctx.saved_tensors
    if do is None:  # o took no part in the loss
        return None, None, None, None, None, None, None, None, None, None
    dq, dk, dv = _entmax_attention_bwd_op(do, q, k, v, alpha_rows, rowmax, tau, w, seq_start, seq_end, ctx.causal,
                                          ctx.scale, support)
    d_alpha = None
    if ctx.store_s:
        do = do.float()
        c = (do * w).sum(-1)
        am1 = alpha_rows - 1
        rows = ((do * o.float()).sum(-1) - c) / (am1 * am1) - ((do * s).sum(-1) - c * ent) / am1  # (B, H, T)
        d_alpha = rows.sum(0)
    return dq, dk, dv, d_alpha, None, None, None, None, None, None


_entmax_attention_fwd_op.register_autograd(_entmax_attention_backward, setup_context=_entmax_attention_setup_context)


def tau_solver_passes(q, k, *, causal=True, scale=None, block_m=64, block_n=64) -> torch.Tensor:
    """Passes over the visible keys of each query-tile program that ``_entmax_tau_kernel`` makes (the row-maximum
    pass included), (B, H, cdiv(T, block_m)) int64: a PyTorch mirror of the solver with the current
    ``Tiles.candidates``, for lengths where the interpreter is too slow to count (``kernels.tools.counts``;
    ``tests/test_counts.py`` and ``tests/test_entmax.py`` prove it equal to the kernel's own count on small shapes).

    ``block_m`` x ``block_n`` are the call's tiles: the launcher's ``(row_block_m, row_block_n)`` when
    ``T <= row_block_n`` (then K is read once, whatever the solver does: 1 pass), else the passes' query rows
    (``Tiles.tau_block_m``) and ``block_n``; a program passes over K until its last row is solved. K traffic of the
    forward in single flash passes is the programs' mean weighted by their visible keys and divided by
    ``block_m / 64``, plus the output kernel's share of visited tiles (:func:`tau_support_tiles`).
    Rows go a chunk at a time (about 64 MB of scores per chunk), so T = 16k fits in memory.
    """
    return _solver_mirror(q, k, causal, scale, block_m, block_n, block_m, with_support=False)


def tau_support_tiles(q, k, *, causal=True, scale=None, block_m=64, block_n=64, pass_block_m=None,
                      exact=False) -> torch.Tensor:
    """The per-tile support mask that ``_entmax_tau_kernel`` writes with ``block_m`` x ``block_n`` tiles (T >
    ``row_block_n``) from programs of ``pass_block_m`` query rows (a multiple of ``block_m``; None: ``block_m``),
    (B, H, cdiv(T, block_m), cdiv(T, block_n)) bool: a PyTorch mirror like :func:`tau_solver_passes`
    (``tests/test_entmax.py`` proves it equal to the kernel's mask on small shapes). A tile pair is marked when, in
    its program's last pass, some row's score exceeds that row's bound (tau if the row was solved before, else its
    lower bracket); ``kernels.tools.counts`` reports the share of key tiles the output kernel visits from it at
    lengths the interpreter cannot run. ``exact=True`` gives the tightest sound mask instead: the tile pairs with
    some p > 0 (every row bounded by its tau)."""
    pass_block_m = block_m if pass_block_m is None else pass_block_m
    return _solver_mirror(q, k, causal, scale, block_m, block_n, pass_block_m, with_support=True, exact=exact)


def _solver_mirror(q, k, causal, scale, block_m, block_n, pass_block_m, with_support: bool,
                   exact: bool = False) -> torch.Tensor:
    """Per program of ``pass_block_m`` rows, its passes (B, H, programs); or the support mask of ``block_m`` x
    ``block_n`` tiles those programs write (:func:`tau_support_tiles`)."""
    _check_entmax_inputs(q, k, k, 1.5, causal, scale)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, H, T, D) = {tuple(q.shape)}, got {tuple(k.shape)}")
    for name, value in (("block_m", block_m), ("block_n", block_n), ("pass_block_m", pass_block_m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if pass_block_m % block_m:
        raise ValueError(f"pass_block_m must be a multiple of block_m = {block_m}, got {pass_block_m}")
    B, H, T, _ = q.shape
    programs, tiles, key_tiles = triton.cdiv(T, pass_block_m), triton.cdiv(T, block_m), triton.cdiv(T, block_n)
    if T <= block_n and not with_support:
        return torch.ones((B, H, programs), dtype=torch.int64, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    candidates = _tiles(q.dtype).candidates
    programs_per_chunk = max(1, (1 << 24) // (T * candidates * pass_block_m))  # whole programs per chunk
    out = torch.zeros((B, H, tiles, key_tiles) if with_support else (B, H, programs), dtype=torch.int64,
                      device=q.device)
    for b in range(B):
        for h in range(H):
            for first in range(0, programs, programs_per_chunk):
                start, stop = first * pass_block_m, min((first + programs_per_chunk) * pass_block_m, T)
                z = (q[b, h, start:stop].float() @ k[b, h].float().T) * (0.5 * scale)  # [rows, T]
                rows = torch.arange(start, stop, device=z.device)
                if causal:
                    z = z.masked_fill(torch.arange(T, device=z.device)[None, :] > rows[:, None], float("-inf"))
                visible = rows + 1 if causal else torch.full_like(rows, T)
                passes, zr, bound_last = _solver_passes_of_rows(z, visible, candidates)
                program_passes = torch.nn.functional.pad(passes, (0, -(stop - start) % pass_block_m))
                program_passes = program_passes.view(-1, pass_block_m).amax(-1)  # [programs in chunk]
                if not with_support:
                    out[b, h, first:first + program_passes.numel()] = program_passes
                    continue
                # rows solved before their program's last pass bound the support by tau (-sqrt(max p)), the others
                # by their lower bracket at the start of that pass; rows of one pass (NaN rows) never mark a tile
                row_program_passes = program_passes.repeat_interleave(pass_block_m)[:stop - start]
                tau = -_entmax15_rows(2 * zr).amax(-1).sqrt()
                bound = torch.where((passes == row_program_passes) & (not exact), bound_last, tau)
                hit = (zr > bound[:, None]) & (row_program_passes > 1)[:, None]  # [rows, T]
                hit = torch.nn.functional.pad(hit, (0, -T % block_n, 0, -(stop - start) % block_m))
                hit = hit.view(-1, block_m, key_tiles, block_n).any(-1).any(1)
                first_tile = first * (pass_block_m // block_m)
                out[b, h, first_tile:first_tile + hit.shape[0]] = hit.long()
    return out.bool() if with_support else out


def _solver_passes_of_rows(z: torch.Tensor, visible: torch.Tensor, candidates: int):
    """Per row of halved scores z (rows, T) fp32 with ``visible`` keys each: the passes of the multi-pass solver
    (the row-maximum pass, then one per candidate pass until the row is solved or its bracket closes), the scores
    relative to the row maximum and each row's lower bracket at the start of its last pass (+inf for NaN rows)."""
    finite = ~z.isnan().any(-1)
    rowmax = torch.where(z.isnan(), float("-inf"), z).amax(-1)
    done = ~finite | rowmax.isinf()
    zr = z - torch.where(done, 0.0, rowmax)[:, None]
    lo = torch.full_like(rowmax, -1.0)
    hi = visible.float().rsqrt().neg()
    bound_last = torch.where(done, float("inf"), lo)
    passes = torch.ones_like(rowmax, dtype=torch.int64)
    spread = torch.arange(candidates, device=z.device).float() / (candidates - 1)
    for _ in range(_MAX_PASSES):
        if done.all():
            break
        passes += (~done).long()
        rows = (~done).nonzero()[:, 0]
        bound_last[rows] = lo[rows]
        t = lo[rows, None] + (hi - lo)[rows, None] * spread  # (rows, NC)
        w = zr[rows, None, :] - t[:, :, None]  # (rows, NC, T)
        support = w > 0
        ws = torch.where(support, w, 0.0)
        cnt, a1, a2 = support.float().sum(-1), ws.sum(-1), (ws * ws).sum(-1)
        wmin = torch.where(support, w, float("inf")).amin(-1)
        wout = torch.where(support, float("-inf"), w).amax(-1)
        f = a2 - 1.0
        left = f >= 0
        disc = a1 * a1 - cnt * f
        a1 = torch.where(cnt > 0, a1, 1.0)
        delta = f / (a1 + disc.clamp(min=0).sqrt())
        root = t + delta
        exact = (disc >= 0) & (wmin >= delta) & (wout <= delta)
        lower = torch.where(left, t + f / (2.0 * a1), root)
        upper = torch.where(left, torch.where(disc >= 0, root, float("inf")), t)
        new_lo = torch.maximum(lo[rows], lower.amax(-1))
        new_hi = torch.minimum(hi[rows], upper.amin(-1))
        lo[rows], hi[rows] = new_lo, torch.maximum(new_hi, new_lo)
        done[rows] = exact.any(-1) | (new_hi <= new_lo)
    return passes, zr, bound_last


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _entmax15_rows(scores: torch.Tensor) -> torch.Tensor:
    """Forward of :func:`entmax15` along the last dimension, in the dtype of ``scores``.

    With ``z = scores / 2`` shifted by its row maximum (``z_max = 0``), the threshold satisfies
    ``max z - 1 <= tau <= max z``, so scores at or below ``max z - 1`` are never in the support and are clamped to it:
    every number below lies in [-1, 0] whatever the magnitude of the scores (1e30 is as exact as 1). On the sorted
    row ``z_(1) >= z_(2) >= ...``, the candidate for support size k is the smaller root of
    ``sum_{i <= k} (z_(i) - tau)^2 = 1``::

        tau_k = mean_k - sqrt((1 - k * var_k) / k),    mean_k, var_k: mean and variance of z_(1..k)

    and the support size is ``k* = max {k : tau_k <= z_(k)}`` (Peters et al., 2019, Algorithm 2). tau is then
    recomputed from the k* support values with a two-pass (centred) variance, which does not cancel.
    """
    finite = torch.isfinite(scores)
    # NaN or +inf anywhere, or no finite score at all: the row is undefined
    undefined = (scores.isnan() | (scores == float("inf"))).any(-1, keepdim=True) | ~finite.any(-1, keepdim=True)
    z = torch.where(finite, scores, float("-inf")) / 2
    z_max = torch.where(undefined, 0.0, z.amax(-1, keepdim=True))
    w = (z - z_max).clamp(min=-1.0)  # [-1, 0] on defined rows; -inf (hidden) becomes -1, never in the support
    w_sorted = w.sort(dim=-1, descending=True).values
    k = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    mean = w_sorted.cumsum(-1) / k
    k_var = (w_sorted * w_sorted).cumsum(-1) - mean * mean * k  # k * var_k
    tau_k = mean - ((1 - k_var) / k).clamp(min=0).sqrt()
    support_size = (tau_k <= w_sorted).sum(-1, keepdim=True).to(w.dtype)  # >= 1: tau_1 = z_(1) - 1
    in_support = k <= support_size
    mean = torch.where(in_support, w_sorted, 0.0).sum(-1, keepdim=True) / support_size
    k_var = torch.where(in_support, (w_sorted - mean) ** 2, 0.0).sum(-1, keepdim=True)
    tau = mean - ((1 - k_var) / support_size).clamp(min=0).sqrt()
    return torch.where(undefined, float("nan"), (w - tau).clamp(min=0) ** 2)


class _Entmax15Function(torch.autograd.Function):
    """entmax-1.5 along the last dimension; the backward of ``entmax.entmax15``:
    ``d scores = g * (dp - sum(g dp) / sum(g))`` with ``g = sqrt(p)``."""

    @staticmethod
    def forward(ctx, scores):
        p = _entmax15_rows(scores)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp):
        (p,) = ctx.saved_tensors
        g = p.sqrt()
        g_dp = g * dp
        return g_dp - g * (g_dp.sum(-1, keepdim=True) / g.sum(-1, keepdim=True))


def entmax15(scores: torch.Tensor) -> torch.Tensor:
    """entmax-1.5 along the last dimension, in PyTorch: ``p = max(scores / 2 - tau, 0)^2`` with tau such that each
    row sums to 1 (sort-based exact threshold, see ``_entmax15_rows``); differentiable.

    ``-inf`` scores (hidden keys) get probability 0. A row with a NaN or ``+inf`` score, or with no finite score,
    is NaN (its gradient too). Huge finite scores are exact: the threshold is solved relative to the row maximum.
    Equals ``entmax.entmax15(scores, dim=-1)`` up to rounding on the rows that package handles.
    """
    return _Entmax15Function.apply(scores)


def _sparsemax_rows(x: torch.Tensor) -> torch.Tensor:
    """``max(x - tau, 0)`` with ``sum = 1`` along the last dimension (sparsemax; ``x`` finite, any value at or below
    ``max x - 1`` is never in the support): sort-based exact threshold ``tau = (sum_{i <= k*} x_(i) - 1) / k*``,
    ``k* = max {k : 1 + k x_(k) > sum_{i <= k} x_(i)}`` (Martins and Astudillo, 2016)."""
    x_sorted = x.sort(dim=-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    support_size = (1 + k * x_sorted > x_sorted.cumsum(-1)).sum(-1, keepdim=True)  # >= 1
    tau = (x_sorted.cumsum(-1).gather(-1, support_size - 1) - 1) / support_size.to(x.dtype)
    return (x - tau).clamp(min=0)


#: Bisection steps of the reference threshold per dtype: past the mantissa (53, 24 bits), steps that go on shrinking
#: the bracket where tau lies near 0 (it lies in [-1, -n^(1 - alpha)]); then the midpoint is one of the ends.
_BISECTION_STEPS = {torch.float64: 53 + 64, torch.float32: 24 + 40, torch.float16: 11 + 20, torch.bfloat16: 8 + 20}


def _alpha_entmax_rows(scores: torch.Tensor, alpha: torch.Tensor, fixed_alpha: Optional[float]) -> torch.Tensor:
    """Forward of :func:`alpha_entmax` along the last dimension; ``alpha`` broadcasts to ``scores[..., :1]``
    (``fixed_alpha``: its one value when known on the host, else None).

    With ``x = (alpha - 1) * scores`` shifted by its row maximum, the threshold lies in ``[-1, -n^(1 - alpha)]``
    (n finite scores), so values at or below -1 are clamped to it (never in the support; any magnitude is exact).
    alpha = 1.5 takes the closed form of :func:`entmax15`, alpha = 2 sparsemax's; other alpha bisect
    ``f(tau) = sum_j max(x_j - tau, 0)^(1 / (alpha - 1)) - 1`` (decreasing) down to adjacent floats of the row's dtype,
    and the probabilities are normalised to sum to 1 (as ``entmax.entmax_bisect``). A tensor of several alpha takes
    each row's closed form where its alpha is 1.5 or 2 (computing all three; no host read, so it compiles)."""
    if fixed_alpha == 1.5:
        return _entmax15_rows(scores)
    finite = torch.isfinite(scores)
    undefined = (scores.isnan() | (scores == float("inf"))).any(-1, keepdim=True) | ~finite.any(-1, keepdim=True)
    alpha = alpha.to(scores.dtype).expand_as(scores[..., :1])
    x = torch.where(finite, scores, float("-inf")) * (alpha - 1)
    x_max = torch.where(undefined, 0.0, x.amax(-1, keepdim=True))
    w = (x - x_max).clamp(min=-1.0)
    if fixed_alpha == 2.0:
        return torch.where(undefined, float("nan"), _sparsemax_rows(w))
    inverse = 1 / (alpha - 1)
    n = finite.sum(-1, keepdim=True).clamp(min=1).to(scores.dtype)
    lo, hi = torch.full_like(alpha, -1.0), -(n ** -(alpha - 1))
    for _ in range(_BISECTION_STEPS[scores.dtype]):  # tau near 0 has finer floats than the bracket's ends
        mid = (lo + hi) / 2
        above = (w - mid).clamp(min=0).pow(inverse).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    p = (w - lo).clamp(min=0).pow(inverse)
    p = p / p.sum(-1, keepdim=True)
    if fixed_alpha is None:
        p = torch.where(alpha == 1.5, _entmax15_rows(scores), torch.where(alpha == 2.0, _sparsemax_rows(w), p))
    return torch.where(undefined, float("nan"), p)


def check_alpha(alpha, heads: Optional[int] = None, validate: Optional[bool] = None):
    """``alpha`` as the ops take it: a float in (1, 2] (returned as a float), or a floating-point tensor of shape
    ``(heads,)`` (one alpha per query head; any shape when ``heads`` is None) whose values are in (1, 2] (read on the
    host when ``validate``; None: when the tensor is on the CPU and torch.compile is not tracing)."""
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a float or a floating-point tensor, got dtype {alpha.dtype}")
        if heads is not None and tuple(alpha.shape) != (heads,):
            raise ValueError(f"alpha must be a float or a tensor of shape (H,) = ({heads},) (one per query head), "
                             f"got shape {tuple(alpha.shape)}")
        if torch.compiler.is_compiling() or not (alpha.device.type == "cpu" if validate is None else validate):
            return alpha
        values = alpha.detach()
        if not bool(((values > 1) & (values <= 2)).all()):  # NaN fails too
            raise ValueError(f"alpha must lie in (1, 2] and be finite, got {values.cpu().tolist()}")
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float in (1, 2] or a tensor, got {type(alpha).__name__}")
    if not 1 < alpha <= 2:  # NaN fails too
        raise ValueError(f"alpha must lie in (1, 2] and be finite, got {alpha}")
    return float(alpha)


class _AlphaEntmaxFunction(torch.autograd.Function):
    """alpha-entmax along the last dimension with gradients to the scores and to alpha (``entmax.entmax_bisect``'s
    backward). On the support, ``g = p^(2 - alpha)``, ``g_hat = g / sum g``, ``S = p log p``, ``H = sum S``:
    ``d scores = g * (dp - sum(g dp) / sum g)``,
    ``d alpha = sum_j dp_j [(p_j - g_hat_j) / (alpha - 1)^2 - (S_j - g_hat_j H) / (alpha - 1)]`` per row (summed
    over the rows that share an alpha)."""

    @staticmethod
    def forward(ctx, scores, alpha, fixed_alpha):
        p = _alpha_entmax_rows(scores, alpha, fixed_alpha)
        ctx.save_for_backward(p, alpha)
        return p

    @staticmethod
    def backward(ctx, dp):
        p, alpha = ctx.saved_tensors
        row_alpha = alpha.to(p.dtype).expand_as(p[..., :1])
        g = torch.where(p > 0, p.clamp(min=torch.finfo(p.dtype).tiny) ** (2 - row_alpha), 0.0)
        g_hat = g / g.sum(-1, keepdim=True)
        d_scores = g * dp - g * (g * dp).sum(-1, keepdim=True) / g.sum(-1, keepdim=True)
        d_alpha = None
        if ctx.needs_input_grad[1]:
            shannon = torch.where(p > 0, p * p.clamp(min=torch.finfo(p.dtype).tiny).log(), 0.0)
            entropy = shannon.sum(-1, keepdim=True)
            row_grad = (dp * ((p - g_hat) / (row_alpha - 1) ** 2 - (shannon - g_hat * entropy) / (row_alpha - 1))
                        ).sum(-1, keepdim=True)
            d_alpha = row_grad.sum_to_size(alpha.shape).to(alpha.dtype)
        return d_scores, d_alpha, None


def alpha_entmax(scores: torch.Tensor, alpha=1.5) -> torch.Tensor:
    """alpha-entmax along the last dimension, in PyTorch: ``p = max((alpha - 1) * scores - tau, 0)^(1 / (alpha - 1))``
    with tau such that each row sums to 1; differentiable in ``scores`` and in ``alpha``.

    ``alpha``: a float in (1, 2] or a tensor that broadcasts to ``scores[..., :1]`` (one alpha per row or group of
    rows). alpha = 1.5 is :func:`entmax15` and alpha = 2 sparsemax, both with a closed-form threshold; other alpha
    bisect it to the rounding of the scores' dtype. ``-inf`` scores get probability 0; a row with a NaN or ``+inf``
    score, or no finite score, is NaN. Equals ``entmax.entmax_bisect(scores, alpha, dim=-1)`` up to rounding.
    """
    alpha = check_alpha(alpha)
    if isinstance(alpha, torch.Tensor):
        return _AlphaEntmaxFunction.apply(scores, alpha, None)
    if alpha == 1.5:
        return _Entmax15Function.apply(scores)
    return _AlphaEntmaxFunction.apply(scores, torch.tensor(alpha, dtype=scores.dtype, device=scores.device), alpha)


def entmax15_attention_weights(q: Tensor, k: Tensor, *, causal: bool = True,
                               scale: Optional[float] = None) -> Tensor:
    """:func:`entmax_attention_weights` with alpha = 1.5."""
    return entmax_attention_weights(q, k, alpha=1.5, causal=causal, scale=scale)


def entmax15_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                                 scale: Optional[float] = None) -> Tensor:
    """:func:`entmax_attention_reference` with alpha = 1.5. NaN rows as in :func:`entmax15`."""
    return entmax_attention_reference(q, k, v, alpha=1.5, causal=causal, scale=scale)


def entmax15_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                       scale: Optional[float] = None) -> Tensor:
    """Entmax-1.5 attention: :func:`entmax_attention` with alpha = 1.5."""
    return entmax_attention(q, k, v, alpha=1.5, causal=causal, scale=scale)


def _entmax15_attention_triton(q, k, v, causal: bool, scale: float, sequences: _Sequences):
    store_w = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # the backward needs w
    return _entmax15_attention_fwd_op(q, k, v, *sequences, causal, scale, store_w)[0]


def entmax15_attention_varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = True,
                                        scale: Optional[float] = None) -> Tensor:
    """:func:`entmax_attention_varlen_reference` with alpha = 1.5 and the query offsets for the keys."""
    return entmax_attention_varlen_reference(q, k, v, cu_seqlens, alpha=1.5, causal=causal, scale=scale)


def entmax15_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *,
                              max_seqlen: Optional[int] = None, causal: bool = True, scale: Optional[float] = None,
                              validate: Optional[bool] = None) -> Tensor:
    """Entmax-1.5 attention on packed sequences: :func:`entmax_attention_varlen` with alpha = 1.5 and one offsets
    tensor ``cu_seqlens`` for queries and keys. The kernels tile the packed rows and never visit key tiles outside a
    query tile's sequences, so padding costs nothing."""
    check_tensor("q", q, ndim=3)
    cu_seqlens = checked_cu_seqlens(cu_seqlens, q.shape[0], validate, max_seqlen)  # errors name these arguments
    return entmax_attention_varlen(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, causal=causal, scale=scale,
                                   validate=validate)


# ----------------------------------------------------------------------------------------------------------------
# alpha-entmax attention: any alpha, grouped-query heads, queries and keys of different lengths
# ----------------------------------------------------------------------------------------------------------------


def _causal_hidden(t_q: int, t_k: int, device) -> Tensor:
    """(Tq, Tk) bool, True where query i may not see key j: ``j > i + Tk - Tq`` (aligned bottom-right, as
    FlashAttention >= 2.1: the last query sees every key; with Tq > Tk the first ``Tq - Tk`` queries see none)."""
    rows = torch.arange(t_q, device=device)[:, None]
    cols = torch.arange(t_k, device=device)[None, :]
    return cols > rows + (t_k - t_q)


def _masked_entmax_weights(q: Tensor, k: Tensor, hidden: Optional[Tensor], scale: Optional[float], alpha) -> Tensor:
    """``alpha_entmax(q k^T * scale)`` (..., H, Tq, Tk) for q (..., H, Tq, D) and k (..., Hkv, Tk, D) (query head h
    reads key head ``h // (H / Hkv)``), with ``-inf`` where ``hidden`` (Tq, Tk) (None: nothing hidden); a query row
    that sees no key is zeros (zero gradient). alpha: a float or a (H,) tensor. In float32 or the inputs' dtype if
    wider."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * scale
    blind = None
    if hidden is not None:
        blind = hidden.all(-1, keepdim=True)  # (Tq, 1): rows that see no key
        scores = scores.masked_fill(hidden, float("-inf")).masked_fill(blind, 0.0)
    if isinstance(alpha, Tensor):
        alpha = alpha.view(-1, 1, 1)  # one per query head
    weights = alpha_entmax(scores, alpha)
    return weights if blind is None else weights.masked_fill(blind, 0.0)


@autocast_op(keep=("alpha",))
def entmax_attention_weights(q: Tensor, k: Tensor, *, alpha=1.5, causal: bool = True,
                             scale: Optional[float] = None) -> Tensor:
    """The attention matrix ``alpha_entmax(mask(q k^T * scale))`` (B, H, Tq, Tk) of :func:`entmax_attention`, in
    float32 or the inputs' dtype if wider (float64 for tests). For references and drawing only: O(Tq Tk) memory."""
    hidden = _causal_hidden(q.shape[-2], k.shape[-2], q.device) if causal else None
    return _masked_entmax_weights(q, k, hidden, scale, alpha)


@autocast_op(keep=("alpha",))
def entmax_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, alpha=1.5, causal: bool = True,
                               scale: Optional[float] = None) -> Tensor:
    """:func:`entmax_attention` in plain PyTorch: ``alpha_entmax(mask(q k^T * scale)) @ v`` (B, H, Tq, Dv), computed
    in float32 (float64 for float64 inputs) and returned in v's dtype; differentiable in q, k, v and a tensor alpha."""
    weights = entmax_attention_weights(q, k, alpha=alpha, causal=causal, scale=scale)
    v = v.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    return (weights @ v.to(weights.dtype)).to(v.dtype)


def _check_entmax_inputs(q, k, v, alpha, causal, scale, *, packed: bool = False):
    """Checks of :func:`entmax_attention` (``packed``: of the varlen form, on its (1, H, total, D) views); returns
    alpha as :func:`check_alpha` does."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor, ndim=4)
    check_same_dtype_and_device(q=q, k=k, v=v)
    shape = "(total, Hkv, D)" if packed else "(B, Hkv, Tk, D)"
    if k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must match q in batch and D: q {tuple(q.shape)}, k {tuple(k.shape)} (k: {shape})")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k's heads Hkv = {k.shape[1]} must divide q's heads H = {q.shape[1]} (grouped-query "
                         f"attention: query head h reads key head h // (H / Hkv))")
    if v.shape[:3] != k.shape[:3]:
        packed_k, packed_v = (tuple(x.shape[2:0:-1]) if packed else tuple(x.shape[:3]) for x in (k, v))
        raise ValueError(f"v must match k in {'(total, Hkv)' if packed else '(B, Hkv, Tk)'} = {packed_k}, got "
                         f"{packed_v}")
    check_nonempty(q=q, k=k, v=v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_scale(scale)
    alpha = check_alpha(alpha, heads=q.shape[1])
    if isinstance(alpha, Tensor) and alpha.device != q.device:
        raise ValueError(f"alpha is on {alpha.device} but q is on {q.device}; they must match")
    return alpha


def _triton_attention(q, k, v, causal: bool, scale: float, sequences: _Sequences, alpha, groups: int = 1):
    """The Triton op on q (B, Hq, T, D) whose rows hold ``groups`` query heads (row ``t * G + g`` of head h: query
    head ``h * G + g``, :func:`_pack_query_heads`) and ``sequences`` per row: the entmax-1.5 op for alpha = 1.5, else
    the op of any alpha with one alpha per row, from alpha (a float or a (Hq * G,) tensor)."""
    if isinstance(alpha, float) and alpha == 1.5:
        return _entmax15_attention_triton(q, k, v, causal, scale, sequences)
    heads, rows = q.shape[1], q.shape[2]
    if isinstance(alpha, float):
        alpha = torch.full((heads * groups,), alpha, dtype=torch.float32, device=q.device)
    alpha_rows = alpha.float().view(heads, 1, groups).expand(heads, rows // groups, groups).reshape(heads, rows)
    grad = torch.is_grad_enabled()
    store_s = grad and alpha.requires_grad
    store_w = store_s or (grad and any(t.requires_grad for t in (q, k, v)))
    return _entmax_attention_fwd_op(q, k, v, alpha_rows.contiguous(), *sequences, causal, scale, store_w,
                                    store_s)[0]


def _pack_query_heads(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv * G, T, n) -> (B, Hkv, T * G, n): the G query heads that read one key head become rows of one head,
    row ``t * G + g`` holding head ``h * G + g``'s row t, so that every key tile the kernels load serves the G heads
    of the query rows of a tile (grouped-query attention). A view when G = 1."""
    B, H, T, n = x.shape
    return x.reshape(B, H // groups, groups, T, n).transpose(2, 3).reshape(B, H // groups, T * groups, n)


def _unpack_query_heads(x: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`_pack_query_heads`: (B, Hkv, T * G, n) -> (B, Hkv * G, T, n)."""
    B, Hkv, TG, n = x.shape
    return x.reshape(B, Hkv, TG // groups, groups, n).transpose(2, 3).reshape(B, Hkv * groups, TG // groups, n)


def _attention_over_key_ranges(q, k, v, scale: float, key_ranges: _Sequences, alpha=1.5):
    """The Triton op where query row t (of q's Tq rows, any head) sees keys ``[start[t], end[t])`` of k's Tk rows
    (``key_ranges``; a causal mask is folded into them, an empty range gives a zero row): q (B, H, Tq, D), k
    (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) -> (B, H, Tq, Dv), the query heads of each key head packed as its rows;
    alpha a float or a (H,) tensor."""
    groups = q.shape[1] // k.shape[1]
    rows = _Sequences(*(bound.repeat_interleave(groups) for bound in key_ranges))
    out = _triton_attention(_pack_query_heads(q, groups), k, v, False, scale, rows, alpha, groups)
    return _unpack_query_heads(out, groups)


def _whole_key_ranges(t_q: int, t_k: int, causal: bool, device) -> _Sequences:
    """Per query row of :func:`entmax_attention`, the keys it sees: all, or when causal ``[0, i + 1 + Tk - Tq)``
    (empty for the first ``Tq - Tk`` rows)."""
    start = torch.zeros(t_q, dtype=torch.int32, device=device)
    if not causal:
        return _Sequences(start, torch.full((t_q,), t_k, dtype=torch.int32, device=device))
    rows = torch.arange(t_q, dtype=torch.int32, device=device)
    return _Sequences(start, (rows + (1 + t_k - t_q)).clamp(min=0, max=t_k))


def _packed_key_ranges(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, causal: bool) -> _Sequences:
    """Per packed query row of :func:`entmax_attention_varlen`, the packed keys it sees: its sequence's, up to
    ``c - end_k <= r - end_q`` when causal (bottom-right per sequence); on the device without a host sync."""
    sequence = sequence_ids(cu_seqlens_q, total_q)
    start, end = cu_seqlens_k.long()[sequence], cu_seqlens_k.long()[sequence + 1]
    if causal:
        rows = torch.arange(total_q, device=sequence.device)
        end = torch.maximum(end - cu_seqlens_q.long()[sequence + 1] + 1 + rows, start)
    return _Sequences(start.to(torch.int32), end.to(torch.int32))


@autocast_op(keep=("alpha",))
def entmax_attention(q: Tensor, k: Tensor, v: Tensor, *, alpha=1.5, causal: bool = True,
                     scale: Optional[float] = None) -> Tensor:
    """alpha-entmax attention: ``alpha_entmax(mask(q k^T * scale)) @ v``.

    q: (B, H, Tq, D); k: (B, Hkv, Tk, D); v: (B, Hkv, Tk, Dv), Hkv dividing H: query head h reads key head
    ``h // (H / Hkv)`` (grouped-query attention). fp32, fp16 or bf16 (any strides). Returns (B, H, Tq, Dv) in the
    inputs' dtype. ``causal`` lets query i see key j iff ``j <= i + Tk - Tq`` (bottom-right, as FlashAttention >=
    2.1); a query row that sees no key (Tq > Tk) returns zeros. ``scale`` defaults to ``D ** -0.5``.
    ``alpha``: a float in (1, 2] or a (H,) tensor (one per query head; its values are checked when it is on the CPU),
    differentiable: 1.5 is entmax-1.5, 2 sparsemax, and alpha -> 1 tends to softmax. Differentiable in q, k, v and a
    tensor alpha. Under ``torch.autocast`` q, k, v run in the autocast dtype, alpha keeps its own.
    Runs the Triton kernels or the reference as ``kernels.backend.use_triton`` decides.
    """
    alpha = _check_entmax_inputs(q, k, v, alpha, causal, scale)
    if not use_triton(q, k, v):
        return entmax_attention_reference(q, k, v, alpha=alpha, causal=causal, scale=scale)
    check_batch_heads(q.shape[0] * q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if k.shape[1:3] == q.shape[1:3]:
        return _triton_attention(q, k, v, causal, scale, _whole_sequences(q.shape[2], q.device), alpha)
    key_ranges = _whole_key_ranges(q.shape[2], k.shape[2], causal, q.device)
    return _attention_over_key_ranges(q, k, v, scale, key_ranges, alpha)


def _packed_hidden(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, total_k: int, causal: bool) -> Tensor:
    """(total_q, total_k) bool, True where packed query row r may not see packed key row c: other sequences, and,
    when causal, ``c - end_k > r - end_q`` (each sequence aligned bottom-right; ``end_*``: its last offsets)."""
    seq_q = sequence_ids(cu_seqlens_q, total_q)
    seq_k = sequence_ids(cu_seqlens_k, total_k)
    hidden = seq_q[:, None] != seq_k[None, :]
    if causal:
        from_end_q = torch.arange(total_q, device=seq_q.device) - cu_seqlens_q.long()[seq_q + 1]
        from_end_k = torch.arange(total_k, device=seq_k.device) - cu_seqlens_k.long()[seq_k + 1]
        hidden |= from_end_k[None, :] > from_end_q[:, None]
    return hidden


@autocast_op(keep=("alpha",))
def entmax_attention_varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                                      cu_seqlens_k: Optional[Tensor] = None, *, alpha=1.5, causal: bool = True,
                                      scale: Optional[float] = None) -> Tensor:
    """:func:`entmax_attention_varlen` in plain PyTorch, as one dense masked attention over all packed rows
    (O(total_q total_k) memory; no host read of the offsets, so it compiles)."""
    cu_seqlens_q = cu_seqlens_q.to(q.device)
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k.to(q.device)
    hidden = _packed_hidden(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], causal)
    q_h, k_h, v_h = (x.transpose(0, 1) for x in (q, k, v))  # (heads, total, D)
    weights = _masked_entmax_weights(q_h, k_h, hidden, scale, alpha)
    v_h = v_h.repeat_interleave(q.shape[1] // k.shape[1], dim=0)
    return (weights @ v_h.to(weights.dtype)).transpose(0, 1).to(v.dtype)


def _checked_offsets(name: str, cu_seqlens, total: int, validate, max_name: str, max_seqlen) -> Tensor:
    """``checked_cu_seqlens`` with errors that name the arguments ``name`` (cu_seqlens_q or cu_seqlens_k) and
    ``max_name`` (max_seqlen_q or max_seqlen_k)."""
    try:
        return checked_cu_seqlens(cu_seqlens, total, validate, max_seqlen)
    except (TypeError, ValueError) as error:
        message = str(error)
        if message.startswith("max_seqlen"):
            raise type(error)(max_name + message.removeprefix("max_seqlen")) from None
        raise type(error)(message.replace("cu_seqlens", name, 1)) from None


@autocast_op(keep=("alpha",))
def entmax_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                            cu_seqlens_k: Optional[Tensor] = None, *, max_seqlen_q: Optional[int] = None,
                            max_seqlen_k: Optional[int] = None, alpha=1.5, causal: bool = True,
                            scale: Optional[float] = None, validate: Optional[bool] = None) -> Tensor:
    """:func:`entmax_attention` on packed sequences: q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv)
    -> (total_q, H, Dv).

    Query sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of q and attends only to key rows
    ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` (both (num_seqs + 1,) int32; ``cu_seqlens_k`` None: the query
    offsets, self-attention), causally when ``causal``, aligned bottom-right per sequence (a query row that sees no
    key returns zeros). ``max_seqlen_q``/``max_seqlen_k`` follow the varlen convention and are checked, not needed.
    ``validate`` checks the offsets (start at 0, strictly increasing, end at total_q / total_k) and that
    ``max_seqlen_q``/``max_seqlen_k``, when given, are at least the longest query / key sequence; None means "when
    they are on the CPU". alpha, scale and the backends as in :func:`entmax_attention`.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor, ndim=3)
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, heads, total, D) views
    alpha = _check_entmax_inputs(q4, k4, v4, alpha, causal, scale, packed=True)
    keys_share_offsets = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
    cu_seqlens_q = _checked_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], validate, "max_seqlen_q", max_seqlen_q)
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"cu_seqlens_k is needed when k's rows ({k.shape[0]}) differ from q's ({q.shape[0]})")
        if max_seqlen_k is not None:  # the keys' sequences are the queries'
            _checked_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], validate, "max_seqlen_k", max_seqlen_k)
    else:
        cu_seqlens_k = _checked_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], validate, "max_seqlen_k",
                                        max_seqlen_k)
        if cu_seqlens_k.shape != cu_seqlens_q.shape:
            raise ValueError(f"cu_seqlens_k must hold as many offsets as cu_seqlens_q ({cu_seqlens_q.numel()}), got "
                             f"{cu_seqlens_k.numel()}")
    if not use_triton(q, k, v):
        return entmax_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, alpha=alpha, causal=causal,
                                                 scale=scale)
    check_batch_heads(q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if keys_share_offsets and k.shape[1] == q.shape[1]:
        out = _triton_attention(q4, k4, v4, causal, scale, _packed_sequences(cu_seqlens_q, q.shape[0], q.device),
                                alpha)
    else:
        cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k.to(q.device, non_blocking=True)
        key_ranges = _packed_key_ranges(cu_seqlens_q.to(q.device, non_blocking=True), cu_seqlens_k, q.shape[0],
                                        causal)
        out = _attention_over_key_ranges(q4, k4, v4, scale, key_ranges, alpha)
    return out[0].transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: pointer arguments that hold fp32 whatever the input dtype
_FP32_POINTERS = ("rowmax", "tau", "w", "c", "dq", "alpha_rows", "s", "ent")
_UINT8_POINTERS = ("support",)
_INT32_POINTERS = ("seq_start", "seq_end", "tile_rows", "tile_counts")
#: (D, Dv) of the backward's AOT variants (its BD and BDV follow the head sizes): the benchmarks' and CARN's
_AOT_BWD_HEAD_DIMS = ((64, 64), (128, 128), (256, 512))
_FLOAT_SCALARS = ("half_scale", "scale")
#: arguments that a launch on aligned tensors with D, Dv multiples of 16 specializes as multiples of 16 (besides the
#: q/k/v/do batch, head and row strides): every pointer and the head sizes
_ALIGNED_ARGS = {"q", "k", "v", "do", "o", "w", "dq", "dk", "dv", "seq_start", "seq_end", "rowmax", "tau",
                 "support", "c", "tile_rows", "tile_counts", "D", "Dv", "alpha_rows", "s", "ent"}
#: the feature strides of q, k, v, do (o) and the support mask's column stride: 1 on the dense tensors the ops launch
#: on (the last dim of a (B, T, H, D) projection viewed as (B, H, T, D) too), so every configuration compiles them as
#: the constexpr 1, as Triton's launcher does
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_sn")


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    pointers = {"q", "k", "v", "do", "o", "dq", "dk", "dv"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _INT32_POINTERS:
            signature[name] = "*i32"
        elif name in _UINT8_POINTERS:
            signature[name] = "*u8"
        elif name in pointers:
            signature[name] = f"*{dtype}"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def aot_configurations() -> List[AotConfig]:
    """Every (kernel, dtype, tiles, candidate) the launchers can launch on a GPU, each for the architectures whose
    candidate list holds it (``_candidates``; causal and store_w are runtime flags, UPCAST_DOTS is set only under
    the interpreter), with the unit feature strides (``_UNIT_STRIDES``) and the 16-divisibility of pointers, D, Dv and
    the q/k/v/do batch, head and row strides that a launch on aligned tensors with D, Dv multiples of 16 gets; the
    default candidates also without it (odd head sizes). ``default`` marks the aligned default candidates (the tests'
    quick subset). Each is listed again with GENERAL=True (any alpha, label suffix "any-alpha", its own candidate
    lists), the output kernel twice: STORE_S=False at entmax-1.5's tiles (``Tiles.fixed_alpha_block_mdv``) and Dv <=
    ``wide_block_dv`` list, STORE_S=True (alpha's gradient, "alpha-grad") at its own output tiles and lists
    (:func:`_forward_tiles`); compiled by the full list (``pytest -m full_aot``); of those, the quick subset holds the
    output kernel's defaults at Dv = 64 without alpha's gradient and, with it, those whose tiles are its own at some Dv
    (fewer rows or narrower Dv chunks than entmax-1.5's there), in fp32 and bf16 (fp16 compiles bf16's code)."""
    configs, listed = [], {}
    for torch_dtype, dtype in _TRITON_DTYPES.items():
        t = _DEFAULT_TILES[torch_dtype]
        blocks = dict(BM=t.block_m, BN=t.block_n, BD=t.block_d, BDV=t.block_dv)
        solver = dict(MAX_PASSES=_MAX_PASSES, NC=t.candidates, MASK_BM=t.block_m, MASK_BN=t.block_n,
                      UPCAST_DOTS=False)
        # (label, kernel, candidate list, tile constexprs, other constexprs, alignments compiled: "aligned" for
        # every candidate, "unaligned" for the default, quick: the default in the quick subset)
        both = ("aligned", "unaligned")
        variants = []
        # every (list, BM, BDV) of _forward_tiles (its chunks stop growing at the widest); labels name each
        # candidate's own tiles
        widest = max(t.wide_block_dv, t.wide_dv_block_dv or 0)
        widths = [1 << i for i in range(widest.bit_length() + 1)]
        for general, suffix in ((False, ""), (True, " any-alpha")):
            lists = " general" if general else ""
            fixed = dict(GENERAL=general)
            variants += [
                ("tau registers BM={BM}" + suffix, _entmax_tau_kernel, "tau registers" + lists,
                 dict(BM=t.row_block_m, BN=t.row_block_n, BD=t.block_d), dict(ROW_IN_REGISTERS=True, **solver, **fixed),
                 both, not general),
                ("tau passes BM={BM} BN={BN}" + suffix, _entmax_tau_kernel, "tau passes" + lists, _tau_pass_tiles(t),
                 dict(ROW_IN_REGISTERS=False, **solver, **fixed), both, not general),
            ]
            for store_s in (False, True) if general else (False,):
                forward_tiles = {}
                for dv in widths:
                    tiles = _forward_tiles(t, dv, general, store_s)
                    forward_tiles[tiles] = forward_tiles.get(tiles, False) or tiles[1:] != _forward_tiles(t, dv)[1:]
                for (name, block_m, block_dv), own in forward_tiles.items():
                    # any alpha in the quick subset: its own tiles (alpha's gradient), else its Dv = 64 tiles
                    quick = not general or torch_dtype != torch.float16 and (
                        own if store_s else (name, block_m, block_dv) == _forward_tiles(t, 64, general))
                    variants.append((name.replace(" general", "") + " BM={BM} BDV={BDV}" + suffix
                                     + (" alpha-grad" if store_s else ""), _entmax_fwd_kernel, name,
                                     dict(blocks, BM=block_m, BDV=block_dv),
                                     dict(MASK_BM=t.block_m, UPCAST_DOTS=False, STORE_S=store_s, **fixed), both,
                                     quick))
            for d, dv in _AOT_BWD_HEAD_DIMS:
                # odd head sizes of this width (d - 1: the same powers of two) may take narrower chunks; tiles per
                # architecture ({arch: constexprs}: _backward_tile_set)
                aligned_tiles, odd_tiles = ({arch: _backward_tiles(_backward_tile_set(torch_dtype, n, nv, arch), n, nv)
                                             for arch in ARCHS} for n, nv in ((d, dv), (d - 1, dv - 1)))
                name = "bwd" if aligned_tiles["sm_80"]["WHOLE"] else "bwd chunked"
                per_alignment = ([(aligned_tiles, both)] if odd_tiles == aligned_tiles else
                                 [(aligned_tiles, ("aligned",)), (odd_tiles, ("unaligned",))])
                for tiles, alignments in per_alignment:
                    variants.append((f"{name} D{d} Dv{dv} BN={{BN}}{suffix}", _entmax_bwd_kernel, name, tiles,
                                     dict(UPCAST_DOTS=False, **fixed), alignments, not general))
        for label, kernel, name, tiles, fixed, alignments, quick in variants:
            aligned = tuple(arg for arg in kernel.arg_names if arg in _ALIGNED_ARGS
                            or (arg.startswith("stride_") and arg[-2] in "qkvo" and arg[-1] in "bht"))
            units = {arg: 1 for arg in _UNIT_STRIDES if arg in kernel.arg_names}
            if "USE_TMA" in kernel.arg_names:
                units["USE_TMA"] = False
            for config, capabilities, default in aot_candidates(
                    lambda arch: _candidates(name, torch_dtype, tiles.get(arch, tiles), arch)):
                constexprs = {**fixed, **config.kwargs, **units}
                # a wide output kernel's alternative may be another list's candidate too: compile it once
                identity = (kernel, dtype, tuple(sorted(constexprs.items())), config.num_warps, config.num_stages,
                            config.maxnreg)
                if set(capabilities) <= listed.get(identity, set()):
                    continue
                listed.setdefault(identity, set()).update(capabilities)
                signature = _signature(kernel, dtype, constexprs)
                full = f"{label.format(**config.kwargs)} {dtype} w{config.num_warps}s{config.num_stages}" + (
                    f"r{config.maxnreg}" if config.maxnreg else "")
                options = dict(num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg)
                if "aligned" in alignments:
                    # aligned tiles stream through TMA on sm_90 (``tma_launch``; the backward with whole heads
                    # only), through pointer loads elsewhere
                    streams = "USE_TMA" in constexprs and constexprs.get("WHOLE", True)
                    for use_tma in (False, True) if streams else (False,):
                        on = tuple(c for c in capabilities if (c == ARCH_CAPABILITY["sm_90"]) == use_tma
                                   or not streams)
                        if on:
                            tma = {"USE_TMA": True} if use_tma else {}
                            configs.append(AotConfig(full + (" tma" if use_tma else "") + " aligned", kernel,
                                                     signature, {**constexprs, **tma}, divisible=aligned,
                                                     default=default and quick, capabilities=on, **options))
                if default and "unaligned" in alignments:
                    configs.append(AotConfig(full, kernel, signature, constexprs, default=False,
                                             capabilities=capabilities, **options))
    return configs + _tile_lists_aot_configurations() + _row_sums_aot_configurations()


def _tile_list_candidates(dtype: torch.dtype, arch: str, has_support: bool) -> List[triton.Config]:
    """The configurations of :func:`_tile_lists_kernel` that backwards of ``dtype`` launch on ``arch`` at the head
    sizes compiled ahead of time (``_AOT_BWD_HEAD_DIMS``; its tiles are the backward's: :func:`_backward_tile_set`),
    one per distinct tiles."""
    tiles, configs = _DEFAULT_TILES[dtype], {}
    for d, dv in _AOT_BWD_HEAD_DIMS:
        backward = _backward_tiles(_backward_tile_set(dtype, d, dv, arch), d, dv)
        constexprs = _tile_list_constexprs(backward["BM"], backward["BN"], tiles.block_m, tiles.block_n, has_support)
        configs.setdefault(tuple(constexprs.items()), triton.Config(constexprs, **_TILE_LISTS_OPTIONS))
    return list(configs.values())


def _tile_lists_aot_configurations() -> List[AotConfig]:
    """The backward's list kernel (:func:`_tile_lists_kernel`) at the backward's tiles of each dtype, architecture and
    compiled head size (it reads no input of that dtype: one configuration per distinct tiles), with the support mask
    (the op's launches: aligned pointers are the default) and without (None given to the backward)."""
    configs, listed = [], set()
    pointers = ("support", "seq_start", "seq_end", "tile_rows", "tile_counts")
    for torch_dtype in _TRITON_DTYPES:
        for has_support in (True, False):
            for config, capabilities, _ in aot_candidates(
                    lambda arch: _tile_list_candidates(torch_dtype, arch, has_support)):
                constexprs = config.kwargs
                identity = (tuple(constexprs.items()), capabilities)
                if identity in listed:
                    continue
                listed.add(identity)
                label = (f"tile lists BM={constexprs['BM']} BN={constexprs['BN']} mask "
                         f"{constexprs['MASK_BM']}x{constexprs['MASK_BN']}" + ("" if has_support else " no support"))
                signature = _signature(_tile_lists_kernel, "i32", constexprs)
                configs.append(AotConfig(label + " aligned", _tile_lists_kernel, signature, constexprs,
                                         divisible=pointers, default=has_support, capabilities=capabilities,
                                         **_TILE_LISTS_OPTIONS))
                configs.append(AotConfig(label, _tile_lists_kernel, signature, constexprs, default=False,
                                         capabilities=capabilities, **_TILE_LISTS_OPTIONS))
    return configs


def _row_sums_aot_configurations() -> List[AotConfig]:
    """The backward's row sums (:func:`_entmax_bwd_row_sums_kernel`) per dtype of do, aligned (the op's launches:
    the default) and not."""
    configs = []
    aligned = ("do", "w", "c", "stride_ob", "stride_oh", "stride_ot", "stride_wb", "stride_wh", "stride_wt", "Dv")
    capabilities = tuple(ARCH_CAPABILITY[arch] for arch in ARCHS)
    for dtype in _TRITON_DTYPES.values():
        constexprs = dict(_ROW_SUMS_TILES, stride_od=1, stride_wd=1)
        signature = _signature(_entmax_bwd_row_sums_kernel, dtype, constexprs)
        label = f"row sums BM={_ROW_SUMS_TILES['BM']} BDV={_ROW_SUMS_TILES['BDV']} {dtype}"
        configs.append(AotConfig(label + " aligned", _entmax_bwd_row_sums_kernel, signature, constexprs,
                                 divisible=aligned, default=True, capabilities=capabilities, **_ROW_SUMS_OPTIONS))
        configs.append(AotConfig(label, _entmax_bwd_row_sums_kernel, signature, constexprs, default=False,
                                 capabilities=capabilities, **_ROW_SUMS_OPTIONS))
    return configs


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


#: The smallest alpha a module learns: alpha -> 1 is softmax, which entmax's threshold (exponent 1 / (alpha - 1))
#: reaches only in the limit.
_LEARNED_ALPHA_MIN = 1.01


class EntmaxAttentionOutput(NamedTuple):
    """``output`` (B, T, E); ``context`` = A @ x averaged over heads (B, T, E) or None; ``weights`` A (B, H, T, T)
    or None."""

    output: torch.Tensor
    context: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]


class EntmaxCausalAttention(torch.nn.Module):
    """Multi-head alpha-entmax self-attention on the reference op; ``FusedEntmaxCausalAttention`` is its Triton twin
    with the same arguments and ``state_dict`` keys.

    Constructor: ``(embed_dim, num_heads=1, dropout=0.0, bias=True, *, out_proj=True, causal=True,
    batch_first=True, alpha=1.5, learn_alpha=False, num_kv_heads=None)``; ``dropout`` is ``nn.MultiheadAttention``'s
    positional argument and must be 0 (entmax weights are not dropped); ``batch_first=False`` takes (T, B, E).
    ``alpha`` in (1, 2] is entmax's alpha (1.5: entmax-1.5, 2: sparsemax); with ``learn_alpha`` the module learns one
    alpha per head, ``alpha = 1.01 + 0.99 sigmoid(alpha_logit)`` (kept inside [1.01, 2] in any float precision, as
    the ``entmax`` package's learned alpha; initialised at ``alpha``, which must then lie in (1.01, 2)), a parameter
    in the ``state_dict`` (a checkpoint without it loads, keeping the initial alpha).
    ``num_kv_heads`` (None: ``num_heads``) key and value heads, dividing ``num_heads``: grouped-query attention,
    keys and values have ``num_kv_heads * embed_dim / num_heads`` features each.
    One projection ``qkv_proj`` (a Linear, E -> E + 2 kv features, q's rows first, then k's, then v's: one GEMM per
    call and two in the backward) makes queries, keys and values; a ``state_dict`` of the separate ``q_proj``,
    ``k_proj`` and ``v_proj`` of earlier versions loads, concatenated.

    ``forward(query, key=None, value=None, *, key_padding_mask=None, need_weights=False, average_attn_weights=True)``
    returns ``(output, weights or None)`` like ``nn.MultiheadAttention``: self-attention only (key and value None or
    query itself); output (B, T, E); weights (B, T, T) averaged over heads or (B, H, T, T), recomputed by the
    reference formula. ``key_padding_mask`` (B, T) bool, True at padding (``nn.MultiheadAttention``'s convention):
    the unpadded positions of each row form one sequence, run packed (varlen), and padded positions output exactly 0
    (no ``out_proj`` bias; zero context) and pass no gradient; it does not combine with ``need_weights``.
    ``attn_mask`` and ``is_causal`` are refused.

    ``forward_with_context(x, *, need_weights=False, key_padding_mask=None)`` returns
    ``EntmaxAttentionOutput(output, context, weights)`` (three fields, so it cannot be unpacked as the pair above):
    ``context = A @ x`` averaged over heads (CARN's causal parents) comes from the same attention call, with x
    appended to every head's values; weights (B, H, T, T).
    """

    _attention = staticmethod(entmax_attention_reference)
    _attention_varlen = staticmethod(entmax_attention_varlen_reference)

    def __init__(self, embed_dim: int, num_heads: int = 1, dropout: float = 0.0, bias: bool = True, *,
                 out_proj: bool = True, causal: bool = True, batch_first: bool = True, alpha: float = 1.5,
                 learn_alpha: bool = False, num_kv_heads: Optional[int] = None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if dropout != 0.0:
            raise ValueError(f"dropout must be 0.0: entmax attention weights are not dropped, got {dropout}")
        for name, flag in (("causal", causal), ("batch_first", batch_first)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if not isinstance(learn_alpha, bool):
            raise TypeError(f"learn_alpha must be a bool, got {type(learn_alpha).__name__}")
        alpha = check_alpha(alpha)
        if isinstance(alpha, Tensor):
            raise TypeError("alpha must be a float: the module learns one alpha per head with learn_alpha=True")
        if learn_alpha and not _LEARNED_ALPHA_MIN < alpha < 2:
            raise ValueError(f"alpha must lie in ({_LEARNED_ALPHA_MIN}, 2) with learn_alpha=True (alpha = "
                             f"{_LEARNED_ALPHA_MIN} + {2 - _LEARNED_ALPHA_MIN:g} sigmoid(alpha_logit)), got {alpha}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads!r}) must be a positive int dividing num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.causal, self.batch_first = embed_dim, num_heads, causal, batch_first
        self.num_kv_heads, self.learn_alpha, self._initial_alpha = num_kv_heads, learn_alpha, alpha
        self.kv_dim = kv_dim = num_kv_heads * (embed_dim // num_heads)
        # [W_q; W_k; W_v], drawn as the three Linear layers of earlier versions (the same random stream: a seeded
        # model starts from the same weights)
        parts = [torch.nn.Linear(embed_dim, size, bias=bias) for size in (embed_dim, kv_dim, kv_dim)]
        self.qkv_proj = torch.nn.utils.skip_init(torch.nn.Linear, embed_dim, embed_dim + 2 * kv_dim, bias=bias)
        with torch.no_grad():
            self.qkv_proj.weight.copy_(torch.cat([part.weight for part in parts]))
            if bias:
                self.qkv_proj.bias.copy_(torch.cat([part.bias for part in parts]))
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias) if out_proj else None
        share = (alpha - _LEARNED_ALPHA_MIN) / (2 - _LEARNED_ALPHA_MIN)
        logit = torch.full((num_heads,), math.log(share / (1 - share))) if learn_alpha else None
        self.alpha_logit = None if logit is None else torch.nn.Parameter(logit)

    @property
    def alpha(self):
        """The float alpha, or with ``learn_alpha`` the (H,) fp32 tensor ``1.01 + 0.99 sigmoid(alpha_logit)``."""
        if self.alpha_logit is None:
            return self._initial_alpha
        return _LEARNED_ALPHA_MIN + (2 - _LEARNED_ALPHA_MIN) * torch.sigmoid(self.alpha_logit.float())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint saved without learned alpha keeps this module's initial alpha_logit
        if self.alpha_logit is not None and prefix + "alpha_logit" not in state_dict:
            state_dict[prefix + "alpha_logit"] = self.alpha_logit.detach().clone()
        # a checkpoint of separate q_proj, k_proj, v_proj (earlier versions): their rows concatenated, in that order
        for name in ("weight", "bias"):
            separate = [f"{prefix}{proj}.{name}" for proj in ("q_proj", "k_proj", "v_proj")]
            if f"{prefix}qkv_proj.{name}" not in state_dict and all(key in state_dict for key in separate):
                state_dict[f"{prefix}qkv_proj.{name}"] = torch.cat([state_dict.pop(key) for key in separate])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        alpha = "learned per head" if self.learn_alpha else self.alpha
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"alpha={alpha}, causal={self.causal}, out_proj={self.out_proj is not None}, "
                f"batch_first={self.batch_first}")

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                *, key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        check_mha_unsupported(attn_mask=attn_mask, is_causal=is_causal)
        for name, other in (("key", key), ("value", value)):
            if other is not None and other is not query:
                raise ValueError(f"{name} must be None or query itself: {type(self).__name__} is self-attention")
        result = self._attend(query, return_context=False, need_weights=need_weights,
                              key_padding_mask=key_padding_mask)
        weights = result.weights
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return result.output, weights

    def forward_with_context(self, x: torch.Tensor, *, need_weights: bool = False,
                             key_padding_mask: Optional[torch.Tensor] = None) -> EntmaxAttentionOutput:
        return self._attend(x, return_context=True, need_weights=need_weights, key_padding_mask=key_padding_mask)

    def _attend(self, x: torch.Tensor, *, return_context: bool, need_weights: bool,
                key_padding_mask: Optional[torch.Tensor]) -> EntmaxAttentionOutput:
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have embed_dim = {self.embed_dim} features, got shape {tuple(x.shape)}")
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            x = x.transpose(0, 1)
        b, t, e = x.shape
        h, h_kv, dh = self.num_heads, self.num_kv_heads, e // self.num_heads
        if key_padding_mask is not None:
            check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,))
            if key_padding_mask.shape != (b, t):
                raise ValueError(f"key_padding_mask must have shape (B, T) = {(b, t)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            if need_weights:
                raise ValueError("need_weights is not supported with key_padding_mask")
            attended = self._packed_attention(x, ~key_padding_mask.to(x.device), return_context)
        else:
            q, k, v = self._project(x, return_context)
            q, k, v = (y.view(b, t, -1, y.shape[-1] // n).transpose(1, 2) for y, n in zip((q, k, v), (h, h_kv, h_kv)))
            attended = self._attention(q, k, v, alpha=self.alpha, causal=self.causal)  # (B, H, T, dh [+ E])
        # output and context are views of the one attention output: its backward assembles one gradient (one op)
        output, context = attended.split([dh, e], dim=-1) if return_context else (attended, None)
        output = output.transpose(1, 2).reshape(b, t, e)
        if self.out_proj is not None:
            output = self.out_proj(output)
        if key_padding_mask is not None:  # padded positions output exactly 0 (no out_proj bias), as in every module
            output = output.masked_fill(key_padding_mask.to(x.device)[..., None], 0)
        if context is not None:  # the mean over heads; of one head: that head (a view, no op)
            context = context.squeeze(1) if h == 1 else context.mean(dim=1)
        weights = (entmax_attention_weights(q, k, alpha=self.alpha, causal=self.causal).to(output.dtype)
                   if need_weights else None)
        if not self.batch_first:
            output, context = output.transpose(0, 1), None if context is None else context.transpose(0, 1)
        return EntmaxAttentionOutput(output, context, weights)

    def _project(self, x: torch.Tensor, return_context: bool) -> tuple:
        """q (..., E), k and v (..., kv features) of x (..., E), views of one ``qkv_proj`` GEMM; with
        ``return_context`` x is appended to every key head's values (each head's dh features, then x's E): A @ x comes
        from the same attention call."""
        q, k, v = self.qkv_proj(x).split([self.embed_dim, *[self.kv_dim] * 2], dim=-1)
        if return_context:  # v is bf16 under autocast
            heads, dh = self.num_kv_heads, self.embed_dim // self.num_heads
            v = torch.cat([v.unflatten(-1, (heads, dh)), x.to(v.dtype).unsqueeze(-2).expand(*x.shape[:-1], heads, -1)],
                          dim=-1).flatten(-2)
        return q, k, v

    def _packed_attention(self, x, keep, return_context: bool):
        """Attention over the kept positions ``keep`` (B, T) of each row, packed (``kernels._packing``; no host
        read of the lengths, so it compiles): (B, H, T, dh [+ E]), zeros at the other positions."""
        h, h_kv = self.num_heads, self.num_kv_heads
        packing = pack_padding(keep, singleton_padding=True)  # padding: O(padding) work, not O(padding^2)
        rows = packing.pack(x)  # (B * T, E): each batch row's kept positions, in order, then its padding rows
        q, k, v = self._project(rows, return_context)
        q, k, v = (y.view(-1, n, y.shape[-1] // n) for y, n in zip((q, k, v), (h, h_kv, h_kv)))
        out = self._attention_varlen(q, k, v, packing.cu_seqlens, alpha=self.alpha, causal=self.causal)
        return packing.unpack(out.to(x.dtype)).transpose(1, 2)


class FusedEntmaxCausalAttention(EntmaxCausalAttention):
    """``EntmaxCausalAttention`` on the fused op (Triton kernels where ``kernels.backend`` selects them)."""

    _attention = staticmethod(entmax_attention)
    # the packing of a padded batch holds empty sequences, which the kernels take and the offset check refuses
    _attention_varlen = staticmethod(functools.partial(entmax_attention_varlen, validate=False))
