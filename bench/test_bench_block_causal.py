"""Block-causal attention: ours vs the dense reference, SDPA with an explicit boolean mask, FlexAttention with the
same mask (compiled), and SDPA flash ``is_causal`` (the speed ceiling, group-1 semantics), forward and
forward+backward.

Run with ``pytest bench/test_bench_block_causal.py --benchmark-only``. GPU cases run in fp16:

- the model's shapes: 32 dialogues of L = 8..110 utterances (mean ~50, fixed seed), 3L nodes each, 8 heads of
  64, right-padded (B = 32, T = 3 max L) and packed (cu_seqlens, no padding);
- long shapes: T = 1k, 4k, 16k with 16k tokens per batch, head dim 64 and 128.

FlexAttention's block-mask creation is timed as its own case (``flex_block_mask``), since dialogue batches change
every step. On CPU only a tiny reference-vs-SDPA case runs. The budgeted run (``BENCH_QUICK=1``, bench/gpu.sh) times
the dialogues and ``QUICK_LONG_SHAPES``, with FlexAttention (a compile per shape and mode) at T = 4k only.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_call, requires_cuda, skip_in_quick_run
from kernels import block_causal_attention
from kernels.block_causal import (
    block_causal_attention_reference,
    block_causal_attention_varlen,
    block_causal_mask,
)

GROUP = 3
HEADS = 8
MODES = ["fwd", "fwd+bwd"]
CANDIDATES = ["ours", "reference", "sdpa_mask", "flex", "flex_block_mask", "sdpa_flash_causal"]
LONG_SHAPES = [  # id, batch, T, head dim: 16k tokens per batch
    pytest.param(16, 1024, 64, id="B16-T1k-D64"),
    pytest.param(16, 1024, 128, id="B16-T1k-D128"),
    pytest.param(4, 4096, 64, id="B4-T4k-D64"),
    pytest.param(4, 4096, 128, id="B4-T4k-D128"),
    pytest.param(1, 16384, 64, id="B1-T16k-D64"),
    pytest.param(1, 16384, 128, id="B1-T16k-D128"),
]
QUICK_LONG_SHAPES = [(4, 4096, 64), (1, 16384, 128)]
QUICK_FLEX_MAX_T = 4096


def dialogue_lengths(num_dialogues=32, seed=0):
    """Utterances per dialogue, drawn like IEMOCAP's (8..110, mean ~50), fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(num_dialogues, generator=generator) * 25 + 50).round().clamp(8, 110).long()
    return lengths.tolist()


def _timed_call(mode, forward, inputs):
    """fwd: forward(*inputs); fwd+bwd: forward then the gradients of every input."""
    if mode == "fwd":
        return lambda: forward(*inputs)

    def forward_backward():
        out = forward(*inputs)
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    return forward_backward


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(seq_len, device, document=None):
    """FlexAttention's block mask for block-causal attention, per packed document when ``document`` is given."""
    from torch.nn.attention.flex_attention import create_block_mask

    if document is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx // GROUP <= q_idx // GROUP
    else:
        starts = torch.zeros_like(document)
        starts[1:] = torch.where(document[1:] != document[:-1], torch.arange(1, seq_len, device=device), 0)
        starts = starts.cummax(0).values

        def mask_mod(b, h, q_idx, kv_idx):
            same = document[q_idx] == document[kv_idx]
            return same & ((kv_idx - starts[kv_idx]) // GROUP <= (q_idx - starts[q_idx]) // GROUP)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def _padded_candidate(name, t, device):
    """The callable f(q, k, v) of a candidate on (B, H, T, D) inputs, or a skip reason."""
    if name == "ours":
        return functools.partial(block_causal_attention, group_size=GROUP)
    if name == "reference":
        if t > 4096:
            pytest.skip("the reference materializes B x H x T x T fp32 scores: tens of GiB at T = 16k")
        return functools.partial(block_causal_attention_reference, group_size=GROUP)
    if name == "sdpa_mask":
        mask = block_causal_mask(t, GROUP, device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name == "flex":
        block_mask = _flex_block_mask(t, device)
        return lambda q, k, v: _compiled_flex()(q, k, v, block_mask=block_mask)
    if name == "sdpa_flash_causal":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return flash
    raise ValueError(name)


def _bench_padded(benchmark, group, name, mode, b, t, d, device):
    benchmark.group = group
    if name == "flex_block_mask":
        if mode != "fwd":
            pytest.skip("block-mask creation has no backward; timed once, in the fwd group")
        bench_call(benchmark, lambda: _flex_block_mask(t, device))
        return
    inputs = [torch.randn(b, HEADS, t, d, device=device, dtype=torch.float16, requires_grad=mode != "fwd")
              for _ in range(3)]
    bench_call(benchmark, _timed_call(mode, _padded_candidate(name, t, device), inputs))


@requires_cuda
@pytest.mark.parametrize("name", CANDIDATES)
@pytest.mark.parametrize("mode", MODES)
def test_dialogues_padded(benchmark, device, name, mode):
    """32 right-padded dialogues of 3L nodes (T = 3 max L); the lengths are multiples of 3, so no padding mask."""
    lengths = dialogue_lengths()
    t = 3 * max(lengths)
    _bench_padded(benchmark, f"block_causal {mode} dialogues-B32-T{t}-H8-D64 padded", name, mode, len(lengths), t,
                  64, device)


@requires_cuda
@pytest.mark.parametrize("name", ["ours_varlen", "ours_padded", "flex_varlen", "flex_block_mask"])
@pytest.mark.parametrize("mode", MODES)
def test_dialogues_packed(benchmark, device, name, mode):
    """The same 32 dialogues packed (cu_seqlens) vs padded: what padding costs."""
    lengths = [3 * length for length in dialogue_lengths()]
    total, t = sum(lengths), max(lengths)
    benchmark.group = f"block_causal {mode} dialogues-total{total}-H8-D64 packed"
    make = lambda *shape: torch.randn(*shape, device=device, dtype=torch.float16, requires_grad=mode != "fwd")
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device))
    if name == "flex_block_mask":
        if mode != "fwd":
            pytest.skip("block-mask creation has no backward; timed once, in the fwd group")
        bench_call(benchmark, lambda: _flex_block_mask(total, device, document))
        return
    if name == "ours_varlen":
        inputs = [make(total, HEADS, 64) for _ in range(3)]
        forward = functools.partial(block_causal_attention_varlen, cu_seqlens=cu_seqlens, max_seqlen=t,
                                    group_size=GROUP)
    elif name == "ours_padded":
        inputs = [make(len(lengths), HEADS, t, 64) for _ in range(3)]
        forward = functools.partial(block_causal_attention, group_size=GROUP)
    else:  # flex_varlen: one (1, H, total, D) sequence with a per-document block-causal mask
        inputs = [make(1, HEADS, total, 64) for _ in range(3)]
        block_mask = _flex_block_mask(total, device, document)
        forward = lambda q, k, v: _compiled_flex()(q, k, v, block_mask=block_mask)  # noqa: E731
    bench_call(benchmark, _timed_call(mode, forward, inputs))


@requires_cuda
@pytest.mark.parametrize("name", CANDIDATES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b, t, d", LONG_SHAPES)
def test_long(benchmark, device, name, mode, b, t, d):
    benchmark.group = f"block_causal {mode} B{b}-T{t}-H8-D{d}"
    skip_in_quick_run((b, t, d) in QUICK_LONG_SHAPES, f"long shapes other than {QUICK_LONG_SHAPES}")
    skip_in_quick_run(not name.startswith("flex") or t <= QUICK_FLEX_MAX_T,
                      f"FlexAttention beyond T = {QUICK_FLEX_MAX_T}")
    _bench_padded(benchmark, benchmark.group, name, mode, b, t, d, device)


@pytest.mark.parametrize("name", ["reference", "sdpa_mask"])
def test_tiny_cpu_reference_vs_sdpa(benchmark, name):
    """A tiny CPU case, so that the bench runs (and is checked) without a GPU."""
    benchmark.group = "block_causal fwd B2-T64-H2-D32 cpu"
    q, k, v = (torch.randn(2, 2, 64, 32) for _ in range(3))
    if name == "reference":
        forward = functools.partial(block_causal_attention_reference, group_size=GROUP)
    else:
        mask = block_causal_mask(64, GROUP)
        forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    bench_call(benchmark, lambda: forward(q, k, v))
