"""torch.compile and torch.library: every op passes ``torch.library.opcheck``; every op, module and both models
trace with ``fullgraph=True`` (no graph break) and equal eager, forward and gradients, on the reference path and on
the Triton path (through the interpreter here: the Triton ops are opaque custom ops, so only their real
implementation runs the interpreter). Backend ``aot_eager``: it traces forward and backward like inductor without
generating code, which keeps these tests fast on a CPU.
"""
from __future__ import annotations

import pytest
import torch

from kernels import (BlockCausalMultiheadAttention, BlockCausalTransformerLayer, FusedEntmaxCausalAttention, Top2MoE,
                     block_causal_attention, entmax15_attention, entmax_attention, entmax_attention_varlen, moe_top2,
                     reference, use_backend)
from kernels.block_causal import block_causal_attention_varlen
from kernels.entmax import entmax15_attention_varlen

BACKENDS = ["reference", "triton"]


def _tensors(*shapes, requires_grad=True):
    return [torch.randn(*shape, requires_grad=requires_grad) for shape in shapes]


# ------------------------------------------------------------------------------------------------------- opcheck
def _moe_args(n):
    e, d, h, d_out = 3, 8, 6, 5
    return _tensors((n, d), (e, d), (e, d, h), (e, h), (e, h, d_out), (e, d_out))


def _opcheck_cases():
    torch.manual_seed(0)
    ops = torch.ops.kernels
    q, k, v = _tensors((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 4))
    packed = _tensors((5, 2, 8), (5, 2, 8), (5, 2, 4))
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)
    pad = torch.zeros(1, dtype=torch.int32)
    whole = (torch.zeros(5, dtype=torch.int32), torch.full((5,), 5, dtype=torch.int32))  # one sequence of 5 rows
    in_packed = (torch.tensor([0, 0, 2, 2, 2], dtype=torch.int32), torch.tensor([2, 2, 5, 5, 5], dtype=torch.int32))
    row_mask = torch.tensor([True, False, True, True, False, True, True])
    with torch.no_grad():
        o, rowmax, tau, w, _ = ops.entmax15_attention_fwd(q, k, v, *whole, True, 0.3, True)
        alpha_rows = torch.tensor([[1.25] * 5, [2.0] * 5], requires_grad=True)  # (H, T): one alpha per row
        general = ops.entmax_attention_fwd(q, k, v, alpha_rows, *whole, True, 0.3, True, True)
        o_bc, lse = ops.block_causal_attention_fwd(q, k, v, pad, 1, 5, False, 2, 0.3)
        moe_outputs = ops.moe_top2_fwd(*_moe_args(7), None)
    x, gate_weight, w1, _, w2, _ = _moe_args(7)
    do = torch.randn_like(o)
    d = lambda *tensors: tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in tensors)
    packed4 = [t.transpose(0, 1)[None] for t in packed]  # (1, H, total, D): how entmax15_attention_varlen calls it
    # the backward ops are not differentiable themselves (no double backward): detached inputs
    return {
        "entmax15_attention_fwd": (ops.entmax15_attention_fwd, (q, k, v, *whole, True, 0.3, True)),
        # without w (inference: the public op asks for it whenever a gradient is needed)
        "entmax15_attention_fwd no w": (ops.entmax15_attention_fwd,
                                         (q.detach(), k.detach(), v.detach(), *whole, False, 0.3, False)),
        "entmax15_attention_fwd varlen": (ops.entmax15_attention_fwd, (*packed4, *in_packed, True, 0.3, True)),
        "entmax15_attention_bwd": (ops.entmax15_attention_bwd, d(do, q, k, v, rowmax, tau, w, *whole, True, 0.3)),
        "entmax_attention_fwd any alpha": (ops.entmax_attention_fwd,
                                           (q, k, v, alpha_rows, *whole, True, 0.3, True, True)),
        "entmax_attention_fwd any alpha inference": (ops.entmax_attention_fwd,
                                                     d(q, k, v, alpha_rows, *whole, False, 0.3, False, False)),
        "entmax_attention_bwd any alpha": (ops.entmax_attention_bwd,
                                           d(do, q, k, v, alpha_rows, *general[1:4], *whole, True, 0.3,
                                             general[4])),
        "block_causal_attention_fwd": (ops.block_causal_attention_fwd, (q, k, v, pad, 1, 5, False, 2, 0.3)),
        "block_causal_attention_fwd varlen": (ops.block_causal_attention_fwd,
                                              (*packed, cu_seqlens, 2, 3, True, 3, 0.3)),
        "block_causal_attention_bwd": (ops.block_causal_attention_bwd,
                                       d(q, k, v, lse, torch.randn_like(o_bc), pad, 1, 5, False, 2, 0.3, True, True)),
        "block_causal_attention_bwd dkdv only": (ops.block_causal_attention_bwd,
                                                 d(q, k, v, lse, torch.randn_like(o_bc), pad, 1, 5, False, 2, 0.3,
                                                   False, True)),
        "moe_top2_fwd": (ops.moe_top2_fwd, (*_moe_args(7), None)),
        "moe_top2_fwd row_mask": (ops.moe_top2_fwd, (*_moe_args(7), row_mask)),
        "moe_top2_fwd empty": (ops.moe_top2_fwd, (*_moe_args(0), None)),
        "moe_top2_bwd": (ops.moe_top2_bwd, d(torch.randn(7, 5), torch.randn(7, 2), torch.randn(()), x, gate_weight,
                                             w1, w2, *moe_outputs[3:5], moe_outputs[1], *moe_outputs[5:],
                                             [True, True, True, False, True, True])),
        "moe_top2_bwd y only": (ops.moe_top2_bwd, d(torch.randn(7, 5), None, None, x, gate_weight, w1, w2,
                                                   *moe_outputs[3:5], moe_outputs[1], *moe_outputs[5:],
                                                   [True, True, False, False, False, False])),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases().keys()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------- compiled equals eager
def _compare(fn, inputs, *, atol=1e-5):
    """fn compiled (fullgraph, aot_eager) == fn eager: outputs and the gradients of every float input."""
    def run(f):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = f(*leaves)
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
        sum(t.float().sin().sum() for t in outs if t.is_floating_point()).backward()
        return outs, [x.grad for x in leaves if x.is_floating_point()]

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (eager_out, eager_grads), (compiled_out, compiled_grads) = run(fn), run(compiled)
    for a, b in zip(eager_out + eager_grads, compiled_out + compiled_grads, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_compile_fullgraph(backend):
    torch.manual_seed(0)
    q, k, v = _tensors((2, 2, 5, 8), (2, 2, 5, 8), (2, 2, 5, 4))
    packed = _tensors((5, 2, 8), (5, 2, 8), (5, 2, 4))
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)
    with use_backend(backend):
        _compare(entmax15_attention, (q, k, v))
        _compare(lambda *t: block_causal_attention(*t, group_size=2), (q, k, v))
        _compare(lambda *t: block_causal_attention_varlen(*t, cu_seqlens, group_size=2), packed)
        _compare(lambda *t: moe_top2(*t, return_routing=True), _moe_args(7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_ops_compile_fullgraph(backend):
    """Offsets as a graph input (read on the device only) and a row mask: sequences of different lengths."""
    torch.manual_seed(0)
    packed = _tensors((9, 2, 8), (9, 2, 8), (9, 2, 4))
    cu_seqlens = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    row_mask = torch.tensor([True, False, True, True, False, True, True])
    with use_backend(backend):
        _compare(lambda q, k, v, cu: entmax15_attention_varlen(q, k, v, cu), (*packed, cu_seqlens))
        _compare(lambda q, k, v, cu: entmax15_attention_varlen(q, k, v, cu, causal=False), (*packed, cu_seqlens))
        _compare(lambda q, k, v, cu: block_causal_attention_varlen(q, k, v, cu, group_size=3), (*packed, cu_seqlens))
        _compare(lambda *t: moe_top2(*t[:-1], row_mask=t[-1], return_routing=True), (*_moe_args(7), row_mask))
        moe = Top2MoE(8)
        _compare(lambda x, m: moe(x, row_mask=m), (torch.randn(2, 5, 8), row_mask[:5].expand(2, 5)))


# a padded batch of different lengths: right and left padding, an unpadded row and an all-padding row
_PADDING = torch.tensor([[False] * 4 + [True] * 3, [True] * 2 + [False] * 5, [False] * 7, [True] * 7])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [
    lambda: FusedEntmaxCausalAttention(8, 2),
    lambda: reference.EntmaxCausalAttention(8, 2),
    lambda: BlockCausalMultiheadAttention(8, 2, group_size=3),
    lambda: BlockCausalTransformerLayer(8, 2, dropout=0.0, group_size=3),
], ids=["fused_entmax", "reference_entmax", "block_causal_mha", "block_causal_layer"])
def test_key_padding_mask_compiles_fullgraph(backend, make):
    """The padded path packs on the device (kernels._packing): no host read of the lengths, no graph break."""
    torch.manual_seed(0)
    module = make()
    call = lambda x, mask: module(x, key_padding_mask=mask)  # noqa: E731
    with use_backend(backend):
        _compare(call, (torch.randn(4, 7, 8), _PADDING))


@pytest.mark.parametrize("backend", BACKENDS)
def test_entmax_context_with_padding_compiles_fullgraph(backend):
    torch.manual_seed(0)
    module = FusedEntmaxCausalAttention(8, 1, out_proj=False)
    with use_backend(backend):
        _compare(lambda x, mask: tuple(module.forward_with_context(x, key_padding_mask=mask)),
                 (torch.randn(4, 7, 8), _PADDING))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [
    lambda: FusedEntmaxCausalAttention(8, 2),
    lambda: reference.EntmaxCausalAttention(8, 2),
    lambda: BlockCausalMultiheadAttention(8, 2),
    lambda: BlockCausalTransformerLayer(8, 2, dropout=0.0),
    lambda: Top2MoE(8),
], ids=["fused_entmax", "reference_entmax", "block_causal_mha", "block_causal_layer", "moe"])
def test_modules_compile_fullgraph(backend, make):
    torch.manual_seed(0)
    module = make()
    with use_backend(backend):
        _compare(module, (torch.randn(2, 6, 8),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_entmax_context_compiles_fullgraph(backend):
    torch.manual_seed(0)
    module = FusedEntmaxCausalAttention(8, 1, out_proj=False)
    with use_backend(backend):
        _compare(lambda x: tuple(module.forward_with_context(x, need_weights=True)), (torch.randn(2, 5, 8),))


def _compare_model(model, call):
    """model compiled (fullgraph, aot_eager) == eager: outputs and every parameter's gradient."""
    def run(m):
        model.zero_grad()
        outs = call(m)
        sum(t.float().square().mean() for t in outs).backward()
        # a parameter the loss does not reach has no gradient in eager and a zero one in compiled code
        return outs, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                      for n, p in model.named_parameters() if p.requires_grad}

    torch._dynamo.reset()
    eager_out, eager_grads = run(model)
    compiled_out, compiled_grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager_out, compiled_out, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and any(g.any() for g in eager_grads.values())
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_carn_compiles_fullgraph(backend):
    from carn.model import CARN
    from mer.data import MODALITIES
    from tests.test_carn import random_inputs, tiny_config

    torch.manual_seed(0)
    model = CARN(tiny_config())
    features, present, valid, _ = random_inputs(lengths=(5, 3))
    present[0, 1, 0] = False
    with use_backend(backend):
        _compare_model(model, lambda m: (
            (out := m(features, present, valid)).logits,
            *(out.css_prediction[x] for x in MODALITIES), *(out.reconstruction[x] for x in MODALITIES)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_camhg_compiles_fullgraph(backend):
    from camhg import CaMHG
    from tests.test_camhg import DIMS, random_inputs, tiny_config

    torch.manual_seed(0)
    model = CaMHG(tiny_config(), DIMS, num_classes=4).eval()  # eval: no dropout, so both runs draw alike
    model.set_phase(3)
    features, present, speakers = random_inputs()
    with use_backend(backend):
        _compare_model(model, lambda m: ((out := m(features, present, speakers)).logits, out.restored,
                                         out.aux_loss))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_under_autocast(backend):
    """The ops' autocast casting (kernels._amp) traces too: compiled == eager in bf16."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(FusedEntmaxCausalAttention(8, 2), _First(), Top2MoE(8))
    with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        _compare(module, (torch.randn(2, 6, 8),), atol=1e-2)


class _First(torch.nn.Module):
    """(output, weights) -> output, to chain an attention module in nn.Sequential."""

    def forward(self, pair):
        return pair[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entmax_attention_grouped_heads_and_other_lengths_compile_fullgraph(backend):
    """Grouped-query heads with Tq != Tk (bottom-right causal, rows that see no key), and packed sequences with
    separate key offsets, and a learned alpha per head (a graph input with its gradient): compiled equals eager,
    gradients included."""
    torch.manual_seed(0)
    q, k, v = _tensors((1, 4, 7, 8), (1, 2, 5, 8), (1, 2, 5, 4))
    packed = _tensors((7, 4, 8), (9, 2, 8), (9, 2, 4))
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5, 9], dtype=torch.int32)
    with use_backend(backend):
        _compare(entmax_attention, (q, k, v))
        _compare(lambda q, k, v, a, b: entmax_attention_varlen(q, k, v, a, b), (*packed, cu_q, cu_k))
        alpha = torch.tensor([1.2, 1.5, 1.8, 2.0])
        _compare(lambda q, k, v, a: entmax_attention(q, k, v, alpha=a), (q, k, v, alpha))
