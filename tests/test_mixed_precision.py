"""Mixed precision: every op, module and both models forward and backward under ``torch.autocast`` (CPU bf16).

The ops run in the autocast dtype (their outputs are bf16) and must equal the same op called on bf16-cast inputs
outside autocast; gradients reach the fp32 parameters. Both backends: the references and the Triton interpreter.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import (BlockCausalMultiheadAttention, BlockCausalTransformerLayer, FusedEntmaxCausalAttention, Top2MoE,
                     block_causal_attention, entmax15_attention, moe_top2, reference, use_backend)
from kernels.block_causal import block_causal_attention_varlen
from kernels.entmax import entmax15_attention_varlen

BACKENDS = ["reference", "triton"]


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _check_op(op, inputs, **kwargs):
    """op under autocast on fp32 leaves == op on bf16 copies outside autocast; fp32 gradients of the leaves."""
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    with _autocast():
        out = op(*leaves, **kwargs)
    assert out.dtype == torch.bfloat16
    grad = torch.randn_like(out, dtype=torch.float32).to(torch.bfloat16)
    out.backward(grad)
    cast = [x.detach().to(torch.bfloat16).requires_grad_() if x.is_floating_point() else x for x in inputs]
    expected = op(*cast, **kwargs)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for leaf, twin in zip(leaves, cast):
        if leaf.is_floating_point():
            assert leaf.grad.dtype == torch.float32
            torch.testing.assert_close(leaf.grad, twin.grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_run_in_the_autocast_dtype(backend):
    torch.manual_seed(0)
    b, h, t, d = 2, 2, 5, 8
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    with use_backend(backend):
        _check_op(entmax15_attention, (q, k, v))
        _check_op(block_causal_attention, (q, k, v), group_size=2)
        packed = [x[0].transpose(0, 1).contiguous() for x in (q, k, v)]  # (T, H, D)
        _check_op(block_causal_attention_varlen, (*packed, torch.tensor([0, 2, 5], dtype=torch.int32)))
        _check_op(entmax15_attention_varlen, (*packed, torch.tensor([0, 2, 5], dtype=torch.int32)))
        n, dm, e, hid = 6, 8, 4, 12
        moe_inputs = (torch.randn(n, dm), torch.randn(e, dm), torch.randn(e, dm, hid) / 3, torch.randn(e, hid),
                      torch.randn(e, hid, dm) / 3, torch.randn(e, dm))
        _check_op(moe_top2, moe_inputs)
        _check_op(moe_top2, moe_inputs, row_mask=torch.tensor([True, False, True, True, False, True]))


def test_references_run_in_the_autocast_dtype():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    _check_op(reference.entmax15_attention_reference, (q, k, v))
    _check_op(reference.block_causal_attention_reference, (q, k, v), group_size=2)
    packed = [x[0].transpose(0, 1).contiguous() for x in (q, k, v)]
    _check_op(reference.block_causal_attention_varlen_reference,
              (*packed, torch.tensor([0, 2, 5], dtype=torch.int32)))
    _check_op(reference.moe_top2_reference, (torch.randn(6, 8), torch.randn(4, 8), torch.randn(4, 8, 12) / 3,
                                             torch.randn(4, 12), torch.randn(4, 12, 8) / 3, torch.randn(4, 8)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [
    lambda: FusedEntmaxCausalAttention(8, 2),
    lambda: reference.EntmaxCausalAttention(8, 2),
    lambda: BlockCausalMultiheadAttention(8, 2),
    lambda: BlockCausalTransformerLayer(8, 2, dropout=0.0),
    lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), Top2MoE(8)),
    lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), reference.Top2MoE(8)),
], ids=["fused_entmax", "reference_entmax", "block_causal_mha", "block_causal_layer", "linear_moe",
        "linear_reference_moe"])
def test_modules_forward_and_backward_under_autocast(backend, make):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 6, 8)
    with use_backend(backend), _autocast():
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        # autocast runs LayerNorm (the layer's last step) in fp32; everything else stays in bf16
        assert out.dtype == (torch.float32 if isinstance(module, BlockCausalTransformerLayer) else torch.bfloat16)
        out.float().square().mean().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_entmax_context_under_autocast(backend):
    """CARN's path: x (fp32) appended to bf16 values inside the module."""
    torch.manual_seed(0)
    module = FusedEntmaxCausalAttention(8, 1, out_proj=False)
    x = torch.randn(2, 5, 8, requires_grad=True)
    with use_backend(backend), _autocast():
        res = module.forward_with_context(x, need_weights=True)
        (res.output.float().sum() + res.context.float().sum()).backward()
    assert res.context.dtype == torch.bfloat16 and res.context.shape == x.shape
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _carn_loss(out):
    from mer.data import MODALITIES

    return (out.logits.float().square().mean()
            + sum(out.css_prediction[m].float().square().mean() for m in MODALITIES)
            + sum(out.reconstruction[m].float().square().mean() for m in MODALITIES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_carn_under_autocast(backend):
    from tests.test_carn import random_inputs, tiny_config
    from carn.model import CARN

    torch.manual_seed(0)
    model = CARN(tiny_config())
    features, present, valid, _ = random_inputs(lengths=(5, 3))
    with use_backend(backend), _autocast():
        out = model(features, present, valid, need_weights=True)
        loss = _carn_loss(out)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_camhg_under_autocast(backend):
    from tests.test_camhg import DIMS, random_inputs, tiny_config
    from camhg import CaMHG

    torch.manual_seed(0)
    model = CaMHG(tiny_config(), DIMS, num_classes=4)
    model.set_phase(3)
    features, present, speakers = random_inputs()
    with use_backend(backend), _autocast():
        out = model(features, present, speakers)
        loss = out.logits.float().square().mean() + out.aux_loss.float()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------ --precision in the CLIs
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_carn_training_precision_recorded_in_checkpoints(reference_backend, tmp_path, precision):
    from carn.config import TrainConfig
    from carn.train import DataSpec, build_parser, run_training
    from mer.data import load_dataset
    from mer.training import CheckpointManager

    assert build_parser().parse_args(["--precision", precision]).precision == precision
    splits = load_dataset("embedded", dims="small", num_dialogues=(4, 1, 2), seed=0)
    splits = dataclasses.replace(splits, valid=None)
    config = TrainConfig(epochs_stage1=1, epochs_stage2=1, batch_size=2, lr=1e-3, precision=precision)
    run_training(DataSpec("embedded", dataset_options={"dims": "small"}), train_config=config, run_dir=tmp_path,
                 splits=splits, model_overrides={"hidden": 8, "num_heads": 2, "css_dim": 4}, show_progress=False,
                 make_plots=False, verbose=False, stop_after_epoch=2)
    state = CheckpointManager(tmp_path / "checkpoints").latest()
    assert state["train_config"]["precision"] == precision
    assert bool(state["grad_scaler"]) == (precision == "fp16")  # the scale of an fp16 run is saved for resume
    assert all(torch.isfinite(p).all() for p in state["model"].values())


def test_camhg_training_precision_recorded_in_checkpoints(reference_backend, tmp_path):
    import json

    import camhg.train as camhg_train
    from mer.training import CheckpointManager
    from tests.test_camhg import tiny_config

    args = camhg_train.parse_args(["--precision", "fp16"])
    assert camhg_train.config_from_args(args).precision == "fp16"
    config = tiny_config(epochs=(1, 0, 1), precision="fp16",
                         dataset_options={"dims": "small", "num_dialogues": (4, 1, 2)})
    camhg_train.train(config, run_dir=tmp_path, evaluate=False, show_progress=False)
    state = CheckpointManager(tmp_path / "checkpoints").latest()
    assert state["config"]["precision"] == "fp16" and state["grad_scaler"]["scale"] > 0
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "fp16"
    assert all(torch.isfinite(p).all() for p in state["model"].values())
