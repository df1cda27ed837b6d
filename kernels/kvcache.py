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
inputs' dtype: autocast does not cast their inputs, since the caches are written in place.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._checks import FLOAT_DTYPES, check_nonempty, check_same_dtype_and_device, check_scale, check_tensor
from .entmax import entmax15

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
        appended = tq if k is not None else 0
        lengths = cache_seqlens.to(torch.int64)
        if bool((lengths < 0).any()):
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens.tolist()}")
        if bool((lengths + appended > t_max).any()):
            raise ValueError(f"cache_seqlens + {appended} new keys must fit the cache (Tmax = {t_max}), got "
                             f"cache_seqlens = {cache_seqlens.tolist()}")


def _checked_alpha(alpha: Alpha, heads: int, device: torch.device) -> Tensor:
    """``alpha`` as a float32 (H,) tensor on ``device``; a float must lie in (1, 2], so must a tensor's values when
    it is on the CPU (on the GPU they are not read on the host)."""
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a float or a floating-point tensor, got dtype {alpha.dtype}")
        if alpha.shape != (heads,):
            raise ValueError(f"an alpha tensor must have shape (H,) = ({heads},), got {tuple(alpha.shape)}")
        if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(((alpha > 1) & (alpha <= 2)).all()):
                raise ValueError(f"alpha must lie in (1, 2], got {alpha.tolist()}")
        return alpha.to(device=device, dtype=torch.float32)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float in (1, 2] or an (H,) tensor, got {type(alpha).__name__}")
    if not 1 < alpha <= 2:
        raise ValueError(f"alpha must lie in (1, 2] (1.5: entmax-1.5, 2: sparsemax), got {alpha}")
    return torch.full((heads,), float(alpha), device=device, dtype=torch.float32)


def _append_to_cache(k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k: Optional[Tensor],
                     v: Optional[Tensor]) -> Tensor:
    """Write ``k``, ``v`` (B, Hkv, Tq, .) into the caches at ``cache_seqlens[b] + (0 .. Tq - 1)`` (in place, on the
    caches' device, no host read) and return the attended lengths (B,) int32: ``cache_seqlens`` plus Tq appended."""
    lengths = cache_seqlens.to(device=k_cache.device)
    if k is None:
        return lengths
    tq = k.shape[2]
    positions = lengths.to(torch.int64)[:, None] + torch.arange(tq, device=k_cache.device)  # (B, Tq)
    index = positions[:, None, :, None]
    k_cache.scatter_(2, index.expand(k.shape), k)
    v_cache.scatter_(2, index.expand(v.shape), v)
    return lengths + tq


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def _visible_keys(lengths: Tensor, tq: int, t_max: int, causal: bool) -> Tensor:
    """(B, 1, Tq, Tmax) bool: key j is attended by new query i of batch row b: ``j < lengths[b]`` and, when causal
    (bottom-right aligned), ``j <= lengths[b] - Tq + i``."""
    j = torch.arange(t_max, device=lengths.device)
    length = lengths.to(torch.int64)[:, None, None]
    visible = (j < length).expand(-1, tq, -1)
    if causal:
        i = torch.arange(tq, device=lengths.device)[:, None]
        visible = visible & (j <= length - tq + i)
    return visible[:, None]


def _masked_scores(q: Tensor, k_cache: Tensor, visible: Tensor, scale: Optional[float], compute: torch.dtype):
    """(B, H, Tq, Tmax) scores ``q k^T * scale`` of each query head against its key head, ``-inf`` where hidden."""
    groups = q.shape[1] // k_cache.shape[1]
    keys = k_cache.to(compute).repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute) @ keys.transpose(-1, -2)) * scale
    return scores.masked_fill(~visible, float("-inf"))


def _weighted_values(weights: Tensor, v_cache: Tensor, lengths: Tensor) -> Tensor:
    """``weights @ v`` per key head group, with cache rows beyond ``lengths`` (never written, maybe NaN) as zeros."""
    groups = weights.shape[1] // v_cache.shape[1]
    written = (torch.arange(v_cache.shape[2], device=v_cache.device) < lengths.to(torch.int64)[:, None])
    values = torch.where(written[:, None, :, None], v_cache.to(weights.dtype), 0.0)
    return weights @ values.repeat_interleave(groups, dim=1)


def _entmax_bisect_rows(scores: Tensor, alpha: Tensor, iterations: int = 64) -> Tensor:
    """alpha-entmax along the last dimension by bisection on the threshold: ``p = [(alpha - 1) s - tau]_+^(1 /
    (alpha - 1))`` normalized to sum 1, as ``entmax.entmax_bisect`` (``alpha`` broadcasts against the rows, e.g.
    (H, 1, 1)). In the dtype of ``scores`` (64 halvings reach float64's rounding). Rows without a finite score are
    zeros."""
    alpha = alpha.to(scores.dtype)
    finite = torch.isfinite(scores)
    has_key = finite.any(-1, keepdim=True)
    x = torch.where(finite, scores, float("-inf")) * (alpha - 1)
    x = x - torch.where(has_key, x.amax(-1, keepdim=True), 0.0)  # row maximum 0: tau lies in [-1, 0]
    exponent = 1 / (alpha - 1)
    lo = torch.full_like(x[..., :1], -1.0)
    hi = torch.zeros_like(lo)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = ((x - mid).clamp(min=0) ** exponent).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    p = (x - lo).clamp(min=0) ** exponent
    return torch.where(has_key, p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny), 0.0)


def _entmax_weights(scores: Tensor, alpha: Alpha) -> Tensor:
    """alpha-entmax of the masked scores along the last dimension; rows that see no key are zeros."""
    if isinstance(alpha, Tensor):
        return _entmax_bisect_rows(scores, alpha[:, None, None])
    if alpha == 1.5:
        has_key = torch.isfinite(scores).any(-1, keepdim=True)
        return torch.where(has_key, entmax15(scores), 0.0)  # the exact sort-based threshold
    return _entmax_bisect_rows(scores, torch.tensor(float(alpha), device=scores.device))


@torch.no_grad()
def entmax_attention_with_kvcache_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                                            k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                            alpha: Alpha = 1.5, causal: bool = True,
                                            scale: Optional[float] = None) -> Tensor:
    """:func:`entmax_attention_with_kvcache` in plain PyTorch: the cache append, then dense masked scores over the
    whole cache, computed in float32 (float64 for float64 inputs) and returned in v_cache's dtype."""
    _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, _REFERENCE_DTYPES)
    _check_causal(causal)
    _checked_alpha(alpha, q.shape[1], q.device)
    lengths = _append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    compute = torch.promote_types(q.dtype, torch.float32)
    visible = _visible_keys(lengths, q.shape[2], k_cache.shape[2], causal)
    scores = _masked_scores(q, k_cache, visible, scale, compute)
    weights = _entmax_weights(scores, alpha.to(q.device) if isinstance(alpha, Tensor) else alpha)
    return _weighted_values(weights, v_cache, lengths).to(v_cache.dtype)


@torch.no_grad()
def block_causal_attention_with_kvcache_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                                                  *, k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                                  scale: Optional[float] = None) -> Tensor:
    """:func:`block_causal_attention_with_kvcache` in plain PyTorch: the cache append, then a softmax over every
    attended key, computed in float32 (float64 for float64 inputs) and returned in v_cache's dtype."""
    _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, _REFERENCE_DTYPES)
    lengths = _append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    compute = torch.promote_types(q.dtype, torch.float32)
    visible = _visible_keys(lengths, q.shape[2], k_cache.shape[2], causal=False)
    scores = _masked_scores(q, k_cache, visible, scale, compute)
    weights = torch.where(visible, scores.softmax(dim=-1), 0.0)  # rows that see no key: zeros, not NaN
    return _weighted_values(weights, v_cache, lengths).to(v_cache.dtype)


def _check_causal(causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def entmax_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                                  k: Optional[Tensor] = None, v: Optional[Tensor] = None, alpha: Alpha = 1.5,
                                  causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """alpha-entmax attention of the new queries ``q`` (B, H, Tq, D) over a KV cache (see the module docstring for
    the layout, the in-place append of ``k``/``v`` and ``cache_seqlens``). Returns (B, H, Tq, Dv) in the inputs'
    dtype.

    With L_b attended keys in batch row b, new query i sees key j iff ``j < L_b`` and, when ``causal``
    (bottom-right aligned, as when the Tq queries are the last Tq positions), ``j <= L_b - Tq + i``; a query that
    sees no key returns zeros. ``alpha``: a float in (1, 2] (1.5: entmax-1.5, 2: sparsemax) or an (H,) tensor of
    per-head values; ``scale`` defaults to ``D ** -0.5``. Forward only (no autograd), no host synchronization.
    """
    _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, FLOAT_DTYPES)
    _check_causal(causal)
    _checked_alpha(alpha, q.shape[1], q.device)
    # Until the decoding kernels land, the Triton backend runs the reference too.
    return entmax_attention_with_kvcache_reference(q, k_cache, v_cache, cache_seqlens, k=k, v=v, alpha=alpha,
                                                   causal=causal, scale=scale)


@torch.no_grad()
def block_causal_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                                        k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                                        scale: Optional[float] = None) -> Tensor:
    """Block-causal (softmax) attention of one new group of Tq queries ``q`` (B, H, Tq, D) over a KV cache (see the
    module docstring for the layout, the in-place append of ``k``/``v`` and ``cache_seqlens``): every new query
    sees every attended key, i.e. all cached keys and the group's own Tq keys, as the last group of
    :func:`kernels.block_causal_attention` with ``group_size = Tq`` does. Returns (B, H, Tq, Dv) in the inputs'
    dtype; a query that sees no key returns zeros. Forward only (no autograd), no host synchronization.
    """
    _check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, k, v, scale, FLOAT_DTYPES)
    # Until the decoding kernels land, the Triton backend runs the reference too.
    return block_causal_attention_with_kvcache_reference(q, k_cache, v_cache, cache_seqlens, k=k, v=v, scale=scale)
