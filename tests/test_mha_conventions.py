"""nn.MultiheadAttention's call conventions on the attention modules: ``out, weights = attn(q, k, v)``,
batch_first either way, the positional dropout, weights on request, a padded batch with ``key_padding_mask`` equal
to its sequences run one by one, and clear errors for what the modules do not implement."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels import (BlockCausalMultiheadAttention, BlockCausalTransformerLayer, FusedEntmaxCausalAttention, reference,
                     use_backend)
from kernels.block_causal import block_causal_mask
from kernels.entmax import EntmaxAttentionOutput

BACKENDS = ["reference", "triton"]
ENTMAX_MODULES = [FusedEntmaxCausalAttention, reference.EntmaxCausalAttention]


@pytest.mark.parametrize("make", [lambda: BlockCausalMultiheadAttention(8, 2), *(lambda c=c: c(8, 2) for c in
                                                                                ENTMAX_MODULES)],
                         ids=["block_causal", "fused_entmax", "reference_entmax"])
def test_returns_the_output_weights_pair(make):
    module = make()
    x = torch.randn(2, 6, 8)  # B = 2: a bare tensor would unpack into its two batch rows
    out, weights = module(x, x, x)
    assert out.shape == x.shape and weights is None
    out_again, averaged = module(x, need_weights=True)
    torch.testing.assert_close(out_again, out, rtol=0, atol=0)
    _, per_head = module(x, need_weights=True, average_attn_weights=False)
    assert per_head.shape == (2, 2, 6, 6) and averaged.shape == (2, 6, 6)
    torch.testing.assert_close(averaged, per_head.mean(1))
    torch.testing.assert_close(per_head.sum(-1), torch.ones(2, 2, 6))


@pytest.mark.parametrize("make", [lambda **kw: BlockCausalMultiheadAttention(8, 2, **kw),
                                  lambda **kw: FusedEntmaxCausalAttention(8, 2, **kw)], ids=["block_causal", "entmax"])
def test_batch_first_false_takes_time_major_inputs(make):
    torch.manual_seed(0)
    batch_major, time_major = make(batch_first=True), make(batch_first=False)
    time_major.load_state_dict(batch_major.state_dict())
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(time_major(x.transpose(0, 1))[0], batch_major(x)[0].transpose(0, 1))


def test_block_causal_weights_equal_nn_multihead_attention():
    torch.manual_seed(0)
    ours, torch_mha = BlockCausalMultiheadAttention(8, 2, 0.0), nn.MultiheadAttention(8, 2, 0.0, batch_first=True)
    torch_mha.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 8)
    for average in (True, False):
        _, ours_weights = ours(x, need_weights=True, average_attn_weights=average)
        _, expected = torch_mha(x, x, x, attn_mask=~block_causal_mask(7, 3), average_attn_weights=average)
        torch.testing.assert_close(ours_weights, expected)


def test_positional_dropout_like_nn_multihead_attention():
    assert BlockCausalMultiheadAttention(8, 2, 0.25).dropout == 0.25
    assert FusedEntmaxCausalAttention(8, 2, 0.0).num_heads == 2
    with pytest.raises(ValueError, match="dropout must be 0.0"):
        FusedEntmaxCausalAttention(8, 2, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [1, 3])
def test_padded_batch_equals_its_unpadded_sequences(backend, group_size):
    """Lengths that are not multiples of the group: each row's valid prefix runs as its own sequence."""
    torch.manual_seed(0)
    lengths, e = [7, 4, 1, 5], 8
    module = BlockCausalMultiheadAttention(e, 2, group_size=group_size)
    x = torch.randn(len(lengths), max(lengths), e, requires_grad=True)
    padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    with use_backend(backend):
        out, weights = module(x, key_padding_mask=padding, need_weights=True)
        out.sin().sum().backward()
        for i, length in enumerate(lengths):
            alone = x[i:i + 1, :length].detach().requires_grad_()
            expected, expected_weights = module(alone, need_weights=True)
            expected.sin().sum().backward()
            torch.testing.assert_close(out[i, :length], expected[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.grad[i, :length], alone.grad[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(weights[i, :length, :length], expected_weights[0], atol=1e-5, rtol=1e-5)
    assert (out[padding] == 0).all() and (x.grad[padding] == 0).all() and (weights[padding] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_layer_passes_the_padding_mask(backend):
    torch.manual_seed(0)
    layer = BlockCausalTransformerLayer(8, 2, dropout=0.0, group_size=3)
    x = torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 5, [False, False, True, True, True]])
    with use_backend(backend):
        out = layer(x, key_padding_mask=padding)
        torch.testing.assert_close(out[1, :2], layer(x[1:, :2])[0], atol=1e-5, rtol=1e-5)


def test_entmax_context_is_a_triple_that_cannot_pass_for_the_pair():
    module = FusedEntmaxCausalAttention(8, 1, out_proj=False)
    result = module.forward_with_context(torch.randn(2, 5, 8))
    assert isinstance(result, EntmaxAttentionOutput) and result.weights is None and result.context.shape == (2, 5, 8)
    with pytest.raises(ValueError, match="too many values to unpack"):
        out, weights = result


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x: m(x, attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "attn_mask=a tensor is not"),
    (lambda m, x: m(x, is_causal=True), ValueError, "is_causal=True is not supported"),
    (lambda m, x: m(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must"),
    (lambda m, x: m(x, key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must have dtype"),
    (lambda m, x: m(x, x[:, :3]), ValueError, "key and value must have query's"),
    (lambda m, x: m(x[0], cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                    key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "not both"),
])
def test_block_causal_unsupported_arguments_raise(call, error, match):
    with pytest.raises(error, match=match):
        call(BlockCausalMultiheadAttention(8, 2), torch.randn(2, 5, 8))


@pytest.mark.parametrize("arguments, match", [
    (dict(add_bias_kv=True), "add_bias_kv=True is not supported"),
    (dict(add_zero_attn=True), "add_zero_attn=True is not supported"),
    (dict(kdim=4), "kdim must be None or embed_dim"),
    (dict(batch_first=1), "batch_first must be a bool"),
])
def test_block_causal_unsupported_constructor_arguments_raise(arguments, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BlockCausalMultiheadAttention(8, 2, **arguments)


@pytest.mark.parametrize("module_class", ENTMAX_MODULES)
def test_entmax_unsupported_arguments_raise(module_class):
    module, x = module_class(8, 2), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="key must be None or query itself"):
        module(x, torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="need_weights is not supported with key_padding_mask"):
        module(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool), need_weights=True)
    with pytest.raises(ValueError, match="attn_mask"):
        module(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- repr and version
@pytest.mark.parametrize("module, expected", [
    (BlockCausalMultiheadAttention(8, 2, group_size=1), "embed_dim=8, num_heads=2, group_size=1"),
    (BlockCausalTransformerLayer(8, 2, norm_first=True), "norm_first=True"),
    (FusedEntmaxCausalAttention(8, 2, out_proj=False), "embed_dim=8, num_heads=2, num_kv_heads=2, alpha=1.5, causal=True, out_proj=False"),
    (reference.EntmaxCausalAttention(8, 1), "embed_dim=8, num_heads=1"),
    (reference.Top2MoE(8, num_experts=3), "d_model=8, num_experts=3"),
], ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else "")
def test_every_module_says_its_configuration(module, expected):
    assert expected in module.extra_repr() and expected in repr(module)


def test_version_is_the_one_setup_py_installs():
    import re
    import subprocess
    import sys
    from pathlib import Path

    import kernels

    assert re.fullmatch(r"\d+\.\d+\.\d+", kernels.__version__)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip().splitlines()[-1] == kernels.__version__, result.stderr
