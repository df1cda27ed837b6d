"""Top-2 MoE dispatch: the Triton kernels (interpreted on CPU) against the per-expert loop reference."""
import pytest
import torch

from kernels import Top2MoE, moe, moe_top2, reference
from kernels.moe import MoETiles, moe_top2_reference

# Relative tolerance per dtype, on errors measured against the largest magnitude of the expected tensor.
# fp32 runs against a float64 reference; fp16/bf16 round the hidden layer and the outputs to their precision.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TINY_TILES = MoETiles(block_m=16, block_n=16, block_k=16, block_rows=4, num_warps=1, num_stages=1)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """16-wide tiles, so small problems still span several tiles with partial ones at the edges."""
    monkeypatch.setattr(moe, "TILES", {key: (TINY_TILES,) for key in moe.TILES})


def make_inputs(n, num_experts, d, h, d_out, dtype=torch.float32, seed=0, gate_bias=None):
    """x, gate_weight, w1, b1, w2, b2 with unit-scale activations. gate_bias (E,) steers rows to some experts."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    x = randn(n, d)
    gate_weight = randn(num_experts, d)
    if gate_bias is not None:
        # a constant feature in x turns gate_bias into a per-expert offset on the logits
        x[:, 0] = 1.0
        gate_weight[:, 0] = gate_bias
    tensors = (x, gate_weight, randn(num_experts, d, h) / d**0.5, randn(num_experts, h) / 2,
               randn(num_experts, h, d_out) / h**0.5, randn(num_experts, d_out) / 2)
    return [t.to(dtype) for t in tensors]


def forward_backward(op, inputs, seed=1, keep=None):
    """Outputs, routing and the gradients of every input under a loss that uses y, the weights and aux_loss.
    keep: the (N,) row mask of a padded batch; the valid rows then get the upstream gradients that the
    unpadded batch gets, the padded rows random ones."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y, routing = op(*leaves, return_routing=True)
    generator = torch.Generator().manual_seed(seed)
    rows = y.shape[0] if keep is None else int(keep.sum())
    dy = torch.randn(rows, *y.shape[1:], generator=generator).to(y.dtype)
    d_weights = torch.randn(rows, *routing.weights.shape[1:], generator=generator)
    if keep is not None:
        dy, d_weights = (torch.randn(full.shape, generator=generator).to(t.dtype).index_put((keep,), t)
                         for t, full in ((dy, y), (d_weights, routing.weights)))
    loss = (y.float() * dy.float()).sum() + (routing.weights.float() * d_weights).sum() + 0.5 * routing.aux_loss
    grads = torch.autograd.grad(loss, leaves)
    return y, routing, grads


def assert_close(name, actual, expected, dtype):
    error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert error <= TOLERANCE[dtype] * scale, f"{name}: max error {error:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


def check_against_reference(inputs, dtype):
    y, routing, grads = forward_backward(moe_top2, inputs)
    # float64 reference for fp32; fp16/bf16 inputs are exact in float64 too
    y_ref, routing_ref, grads_ref = forward_backward(moe_top2_reference, [t.double() for t in inputs])
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert torch.equal(routing.experts, routing_ref.experts), "different experts chosen"
    assert_close("y", y, y_ref, dtype)
    assert_close("weights", routing.weights, routing_ref.weights, torch.float32)
    assert_close("aux_loss", routing.aux_loss, routing_ref.aux_loss, torch.float32)
    for name, grad, grad_ref in zip(("x", "gate_weight", "w1", "b1", "w2", "b2"), grads, grads_ref):
        assert grad.dtype == dtype and grad.shape == grad_ref.shape, name
        assert_close(f"d{name}", grad, grad_ref, dtype)


SHAPES = [  # n, num_experts, d, h, d_out
    pytest.param(1, 4, 5, 7, 3, id="N1-E4"),
    pytest.param(3, 8, 6, 9, 5, id="N3-fewer-rows-than-experts-E8"),
    pytest.param(37, 5, 19, 23, 21, id="N37-E5-odd-dims"),
    pytest.param(20, 2, 17, 33, 18, id="N20-E2"),
    pytest.param(24, 64, 4, 5, 3, id="N24-E64-tiny-dims"),
]


@pytest.mark.parametrize("n, num_experts, d, h, d_out", SHAPES)
def test_fp32_forward_and_all_gradients_match_reference(triton_backend, tiny_tiles, n, num_experts, d, h, d_out):
    check_against_reference(make_inputs(n, num_experts, d, h, d_out, seed=n), torch.float32)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_half_precision_matches_reference(triton_backend, tiny_tiles, dtype):
    check_against_reference(make_inputs(29, 4, 18, 35, 17, dtype=dtype, seed=3), dtype)


def test_uneven_loads_and_experts_without_rows(triton_backend, tiny_tiles):
    # experts 1 and 4 take almost every row, experts 0, 2, 3 and 5 none
    gate_bias = torch.tensor([-30.0, 30.0, -30.0, -30.0, 25.0, -30.0])
    inputs = make_inputs(45, 6, 9, 20, 11, gate_bias=gate_bias, seed=4)
    counts = torch.bincount(moe_top2_reference(*inputs, return_routing=True)[1].experts.flatten(), minlength=6)
    assert counts[[0, 2, 3, 5]].sum() == 0 and counts[1] == 45 and counts[4] == 45, counts
    check_against_reference(inputs, torch.float32)


def test_thousands_of_rows(triton_backend, monkeypatch):
    # the interpreter is slow: tiny features, 64-row tiles (still about a hundred pair tiles)
    monkeypatch.setattr(moe, "TILES", {key: (MoETiles(64, 16, 16, 64, 1, 1),) for key in moe.TILES})
    check_against_reference(make_inputs(3001, 4, 3, 5, 2, seed=5), torch.float32)


def test_strided_inputs(triton_backend, tiny_tiles):
    x, gate_weight, w1, b1, w2, b2 = make_inputs(23, 3, 10, 12, 9, seed=6)
    # transposed storage everywhere: the kernels read through strides, no copies
    strided = [x.t().contiguous().t(), gate_weight.t().contiguous().t(), w1.transpose(1, 2).contiguous().transpose(1, 2),
               b1, w2.transpose(1, 2).contiguous().transpose(1, 2), b2]
    assert not strided[0].is_contiguous() and not strided[2].is_contiguous()
    check_against_reference(strided, torch.float32)


def test_empty_input_gives_empty_output_and_zero_gradients(triton_backend, tiny_tiles):
    inputs = make_inputs(0, 4, 6, 8, 5)
    y, routing, grads = forward_backward(moe_top2, inputs)
    assert y.shape == (0, 5) and routing.experts.shape == (0, 2) and routing.weights.shape == (0, 2)
    assert routing.aux_loss.item() == 0.0
    for grad, tensor in zip(grads, inputs):
        assert grad.shape == tensor.shape and torch.count_nonzero(grad) == 0


def test_two_runs_are_bit_identical(triton_backend, tiny_tiles):
    inputs = make_inputs(70, 4, 13, 19, 15, seed=7)
    first_y, first_routing, first_grads = forward_backward(moe_top2, inputs)
    second_y, second_routing, second_grads = forward_backward(moe_top2, inputs)
    assert torch.equal(first_y, second_y) and torch.equal(first_routing.aux_loss, second_routing.aux_loss)
    for first, second in zip(first_grads, second_grads):
        assert torch.equal(first, second)


def test_routing_and_aux_loss_follow_their_definition(triton_backend, tiny_tiles):
    x, gate_weight, *weights = make_inputs(40, 5, 8, 6, 4, seed=8)
    _, routing = moe_top2(x, gate_weight, *weights, return_routing=True)
    logits = x.double() @ gate_weight.double().t()
    top, experts = logits.topk(2, dim=-1)
    assert torch.equal(routing.experts, experts)
    torch.testing.assert_close(routing.weights.double(), top.softmax(-1), rtol=1e-6, atol=1e-6)
    fraction = torch.stack([(experts == e).sum() for e in range(5)]).double() / (2 * 40)
    mean_probability = logits.softmax(-1).mean(0)
    torch.testing.assert_close(routing.aux_loss.double(), 5 * (fraction * mean_probability).sum(), rtol=1e-6, atol=1e-6)


def _rule_experts(logits):
    """The documented tie rule in plain Python: the two largest logits, equal ones by lower index first."""
    return [sorted(range(len(row)), key=lambda e: (-row[e], e))[:2] for row in logits.tolist()]


@pytest.mark.parametrize("ties", ["all-equal", "three-equal-rows"])
def test_ties_pick_the_lower_expert_index_first_on_both_backends(triton_backend, tiny_tiles, ties):
    x, gate_weight, *weights = make_inputs(21, 5, 8, 6, 4, seed=9)
    if ties == "all-equal":  # every logit 0: a five-way tie in every row
        gate_weight = torch.zeros_like(gate_weight)
    else:  # experts 1, 3 and 4 have the same gate row: their logits are bitwise equal, above or below 0 and 2
        gate_weight[3] = gate_weight[4] = gate_weight[1]
    logits = x.double() @ gate_weight.double().t()
    for op in (moe_top2, moe_top2_reference):
        y, routing = op(x, gate_weight, *weights, return_routing=True)
        assert routing.experts.tolist() == _rule_experts(logits), op.__name__
    y_ref, routing_ref = moe_top2_reference(x, gate_weight, *weights, return_routing=True)
    torch.testing.assert_close(routing.weights, routing_ref.weights)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    if ties == "all-equal":
        assert torch.all(routing.weights == 0.5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("where", ["nan-gate-weight", "inf-gate-weight", "nan-in-x-row", "inf-in-x-row"])
def test_non_finite_logits_give_nan_rows_on_both_backends(triton_backend, tiny_tiles, where):
    inputs = make_inputs(19, 4, 7, 6, 5, seed=12)
    x, gate_weight = inputs[0].clone(), inputs[1].clone()
    if where.endswith("gate-weight"):
        gate_weight[2, 3] = float("nan") if where.startswith("nan") else float("inf")
        bad_rows = torch.ones(19, dtype=torch.bool)  # every row has a non-finite logit
    else:
        x[6, 2] = float("nan") if where.startswith("nan") else float("-inf")
        bad_rows = torch.arange(19) == 6
    inputs[:2] = x, gate_weight
    y, routing, grads = forward_backward(moe_top2, inputs)
    y_ref, routing_ref, grads_ref = forward_backward(moe_top2_reference, inputs)
    for result in ((y, routing), (y_ref, routing_ref)):
        out, chosen = result
        assert out[bad_rows].isnan().all() and chosen.weights[bad_rows].isnan().all()
        assert chosen.experts[bad_rows].tolist() == [[0, 1]] * int(bad_rows.sum())
        assert torch.isfinite(out[~bad_rows]).all()
    assert torch.equal(routing.experts, routing_ref.experts)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5, equal_nan=True)
    torch.testing.assert_close(routing.weights, routing_ref.weights, atol=1e-6, rtol=1e-6, equal_nan=True)
    for name, grad, grad_ref in zip(("x", "gate_weight", "w1", "b1", "w2", "b2"), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-4, rtol=1e-4, equal_nan=True, msg=lambda m: f"d{name}: {m}")


def _with(index, value):
    inputs = make_inputs(6, 4, 5, 7, 3)
    inputs[index] = value(inputs[index]) if callable(value) else value
    return inputs


BAD_INPUTS = [
    pytest.param(_with(0, lambda x: x[None]), ValueError, "x must have 2 dimensions", id="x-rank"),
    pytest.param(_with(2, lambda w: w[0]), ValueError, "w1 must have 3 dimensions", id="w1-rank"),
    pytest.param(_with(0, lambda x: x[:, :4]), ValueError, "x has 4 features", id="x-vs-gate"),
    pytest.param(_with(1, torch.randn(1, 5)), ValueError, "gate_weight must have 2 to 64 experts", id="one-expert"),
    pytest.param(_with(1, torch.randn(65, 5)), ValueError, "gate_weight must have 2 to 64 experts", id="65-experts"),
    pytest.param(_with(2, torch.randn(4, 6, 7)), ValueError, r"w1 must have shape \(4, 5, 7\)", id="w1-vs-d"),
    pytest.param(_with(3, torch.randn(4, 8)), ValueError, r"b1 must have shape \(4, 7\)", id="b1-vs-h"),
    pytest.param(_with(4, torch.randn(4, 8, 3)), ValueError, r"w2 must have shape \(4, 7, 3\)", id="w2-vs-h"),
    pytest.param(_with(5, torch.randn(3, 3)), ValueError, r"b2 must have shape \(4, 3\)", id="b2-vs-experts"),
    pytest.param(_with(3, lambda b: b.half()), TypeError, "b1 has dtype torch.float16", id="mixed-dtypes"),
    pytest.param(_with(0, lambda x: x.double()), TypeError, "x must have dtype in", id="float64"),
    pytest.param(_with(0, lambda x: x.long()), TypeError, "x must have dtype in", id="integer"),
    pytest.param(_with(4, lambda w: w.to("meta")), ValueError, "w2 is on meta", id="devices"),
    pytest.param(_with(5, [1.0, 2.0]), TypeError, "b2 must be a torch.Tensor", id="not-a-tensor"),
]


@pytest.mark.parametrize("inputs, error, message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(triton_backend, inputs, error, message):
    with pytest.raises(error, match=message):
        moe_top2(*inputs)


def test_module_and_reference_twin_share_state_and_outputs(triton_backend, tiny_tiles):
    torch.manual_seed(10)
    fused = Top2MoE(12, num_experts=3, hidden=20, d_out=7)
    twin = reference.Top2MoE(12, num_experts=3, hidden=20, d_out=7)
    assert list(fused.state_dict()) == list(twin.state_dict()) == ["gate_weight", "w1", "b1", "w2", "b2"]
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 12)
    y, routing = fused(x, return_routing=True)
    y_ref, routing_ref = twin(x, return_routing=True)
    assert y.shape == (2, 9, 7) and routing.experts.shape == (2, 9, 2) and routing.weights.shape == (2, 9, 2)
    assert torch.equal(routing.experts, routing_ref.experts)
    assert_close("module y", y, y_ref, torch.float32)
    assert Top2MoE(8).w1.shape == (4, 8, 16), "hidden defaults to 2 * d_model, d_out to d_model"
    with pytest.raises(ValueError, match="num_experts must be in 2..64"):
        Top2MoE(8, num_experts=1)


def padded(inputs, rows, seed=11):
    """x with finite garbage rows inserted at ``rows`` of the padded batch, and the (N_padded,) bool row mask."""
    x, *weights = inputs
    n_padded = x.shape[0] + len(rows)
    keep = torch.ones(n_padded, dtype=torch.bool)
    keep[rows] = False
    x_padded = torch.randn(n_padded, x.shape[1], generator=torch.Generator().manual_seed(seed)).to(x.dtype) * 3
    x_padded[keep] = x
    return [x_padded, *weights], keep


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_row_mask_padding_changes_nothing(triton_backend, tiny_tiles, dtype):
    """Padded rows (anywhere in the batch) take no part: the valid rows' output, the routing, the aux loss and
    every gradient equal the unpadded call's; padded rows output 0, expert -1, weight 0, zero gradient."""
    inputs = make_inputs(21, 4, 9, 11, 7, dtype=dtype, seed=12)
    inputs_padded, keep = padded(inputs, rows=[0, 5, 6, 22, 23, 24])
    y, routing, grads = forward_backward(moe_top2, inputs)
    op = lambda *args, **kwargs: moe_top2(*args, row_mask=keep, **kwargs)  # noqa: E731
    y_pad, routing_pad, grads_pad = forward_backward(op, inputs_padded, keep=keep)
    assert torch.equal(routing_pad.experts[keep], routing.experts)
    assert torch.all(routing_pad.experts[~keep] == -1) and torch.all(routing_pad.weights[~keep] == 0)
    assert torch.all(y_pad[~keep] == 0) and torch.all(grads_pad[0][~keep] == 0)
    assert_close("valid y", y_pad[keep], y, dtype)
    assert_close("weights", routing_pad.weights[keep], routing.weights, torch.float32)
    assert_close("aux_loss", routing_pad.aux_loss, routing.aux_loss, torch.float32)
    assert_close("dx of valid rows", grads_pad[0][keep], grads[0], dtype)
    for name, grad_pad, grad in zip(("gate_weight", "w1", "b1", "w2", "b2"), grads_pad[1:], grads[1:]):
        assert_close(f"d{name}", grad_pad, grad, dtype)
    # and the Triton path equals the reference with the same mask
    reference_op = lambda *args, **kwargs: moe_top2_reference(*args, row_mask=keep, **kwargs)  # noqa: E731
    y_ref, routing_ref, grads_ref = forward_backward(reference_op, [t.double() for t in inputs_padded], keep=keep)
    assert torch.equal(routing_pad.experts, routing_ref.experts)
    assert_close("y vs reference", y_pad, y_ref, dtype)
    assert_close("aux_loss vs reference", routing_pad.aux_loss, routing_ref.aux_loss, torch.float32)
    for name, grad_pad, grad_ref in zip(("x", "gate_weight", "w1", "b1", "w2", "b2"), grads_pad, grads_ref):
        assert_close(f"d{name} vs reference", grad_pad, grad_ref, dtype)


def test_row_mask_keeping_no_row_gives_zeros(triton_backend, tiny_tiles):
    inputs = make_inputs(9, 3, 5, 6, 4, seed=13)
    keep = torch.zeros(9, dtype=torch.bool)
    y, routing, grads = forward_backward(lambda *a, **k: moe_top2(*a, row_mask=keep, **k), inputs)
    assert torch.all(y == 0) and routing.aux_loss.item() == 0.0 and torch.all(routing.experts == -1)
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


def test_module_row_mask_and_bad_masks(triton_backend, tiny_tiles):
    torch.manual_seed(14)
    module = Top2MoE(6, num_experts=3, hidden=8)
    x = torch.randn(2, 5, 6)
    keep = torch.tensor([[True] * 5, [True, True, False, False, False]])
    y, routing = module(x, row_mask=keep, return_routing=True)
    y_first, _ = module(x[1, :2], return_routing=True)
    assert torch.all(y[~keep] == 0) and torch.all(routing.experts[~keep] == -1)
    assert_close("module valid rows", y[1, :2], y_first, torch.float32)
    with pytest.raises(ValueError, match="row_mask must have x's leading shape"):
        module(x, row_mask=keep[0])
    with pytest.raises(TypeError, match="row_mask must have dtype"):
        moe_top2(x[0], module.gate_weight, module.w1, module.b1, module.w2, module.b2, row_mask=keep[0].float())
    with pytest.raises(ValueError, match=r"row_mask must have shape \(5,\)"):
        moe_top2(x[0], module.gate_weight, module.w1, module.b1, module.w2, module.b2, row_mask=keep.flatten())
