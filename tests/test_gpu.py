"""Every op and module against its reference ON THE CUDA DEVICE: forward outputs and every gradient, at the models'
shapes (CARN's entmax attention with context, CaM-HG's block-causal Transformer layers and top-2 MoE) and at long
sequences, in fp32, fp16 and bf16.

- Our side runs with ``torch.cuda.set_sync_debug_mode("error")``, so an op that synchronizes the host with the
  device fails. Each case runs once before that (compilation or autotuning may sync once); references run outside.
- Each result is compared with the float64 reference on the same (already rounded) inputs and weights. The largest
  error may not exceed ``tol x max |fp64|`` (``TOLERANCE``: the op's own rounding) plus twice the largest error of
  the reference run in the same dtype (the rounding that both sides share, e.g. bf16 linears around the op).
- The MoE must be bit-identical run to run; its inputs are drawn so that no row is near a routing tie.

Skipped without CUDA. ``bash bench/gpu.sh`` runs them first; by hand:
``TRITON_INTERPRET=0 KERNELS_BACKEND=auto PYTHONPATH=$PWD python -m pytest tests/test_gpu.py -m gpu``.
With ``KERNELS_GPU_TESTS_ON_CPU=1`` (``bench/gpu_run.py --dry-run``) the same bodies run on the CPU at tiny shapes,
our side on the reference backend too: that checks the test code (and, through the reference's own error, each
float64 truth), not the kernels; ``KERNELS_GPU_TESTS_ON_CPU=full`` does the same at the GPU's shapes (minutes), and
``KERNELS_GPU_TESTS_ON_CPU=interpreter`` runs our side on the kernels through Triton's interpreter at tiny shapes.
"""
import contextlib
import copy
import os

import pytest
import torch

from kernels import (
    BlockCausalMultiheadAttention,
    BlockCausalTransformerLayer,
    FusedEntmaxCausalAttention,
    Top2MoE,
    block_causal_attention,
    entmax15_attention,
    moe_top2,
    reference,
    use_backend,
)
from kernels._autotune import recording_choices
from kernels.backend import triton_interpreter_enabled
from kernels.block_causal import block_causal_attention_varlen

#: On the CPU, our side on the reference backend: "1" at tiny shapes (seconds), "full" at the GPU's shapes (minutes);
#: "interpreter": our side on the Triton kernels through the interpreter (TRITON_INTERPRET=1) at tiny shapes.
_ON_CPU_MODE = os.environ.get("KERNELS_GPU_TESTS_ON_CPU", "")
ON_CPU = _ON_CPU_MODE in ("1", "full", "interpreter")
TINY = _ON_CPU_MODE in ("1", "interpreter")
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
OURS = "triton" if _ON_CPU_MODE == "interpreter" or not ON_CPU else "reference"


def _skip_reason() -> str:
    if ON_CPU:
        return ""
    if not torch.cuda.is_available():
        return ("needs a CUDA GPU: `bash bench/gpu.sh` runs these tests on one "
                "(KERNELS_GPU_TESTS_ON_CPU=1 checks the test code on a CPU)")
    if triton_interpreter_enabled():
        return ("TRITON_INTERPRET=1 would run the kernels in Triton's CPU interpreter: set TRITON_INTERPRET=0 "
                "(bench/gpu.sh does)")
    return ""


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON or "not skipped")]

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16")]

#: max |ours - fp64| / max |fp64| for outputs from the op's own rounding; gradients get twice this.
#: fp16 and bf16: 8 unit roundoffs (u = 2^-11 and 2^-8), since the kernels round P (or the hidden layer) and the
#: result to the dtype. fp32: entmax (tf32x3 dots) and the MoE with exact products (``KERNELS_FP32_PRECISION=ieee``)
#: are about as exact as fp32 (errors near 1e-6, a 100x margin); block-causal attention and the MoE by default run
#: TF32 tensor cores on fp32 inputs (10-bit mantissas, u = 2^-11, rounding both factors of every product): 20 unit
#: roundoffs, tests/test_block_causal.py's 1e-2 (the MoE's expected error is ~1.6e-3 of the output's maximum).
TOLERANCE = {
    "entmax": {FP32: 1e-4, FP16: 4e-3, BF16: 3e-2},
    "block_causal": {FP32: 1e-2, FP16: 4e-3, BF16: 3e-2},
    "moe": {FP32: 1e-4, FP16: 4e-3, BF16: 3e-2},
    "moe_tf32": {FP32: 1e-2},
}


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(DEVICE)


def randn(generator: torch.Generator, *shape, dtype, scale: float = 1.0) -> torch.Tensor:
    """N(0, scale^2) drawn on the CPU (the same values on every machine), rounded to dtype, moved to the device."""
    return on_device((torch.randn(*shape, generator=generator) * scale).to(dtype))


@contextlib.contextmanager
def host_syncs_forbidden():
    """Any synchronizing CUDA call inside raises (``torch.cuda.set_sync_debug_mode("error")``); a no-op on the CPU."""
    if DEVICE.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def forward_and_gradients(forward, leaves: dict, cotangents: dict) -> dict:
    """forward() -> {name: output}. Returns the outputs and ``grad <leaf>``, the gradient of
    ``sum_name <output, cotangent>`` with respect to every leaf (the cotangents are cast to each output's dtype)."""
    outputs = forward()
    names = list(cotangents)
    grads = torch.autograd.grad([outputs[n] for n in names], list(leaves.values()),
                                [cotangents[n].to(outputs[n].dtype) for n in names])
    results = {name: output.detach() for name, output in outputs.items()}
    results.update({f"grad {name}": grad for name, grad in zip(leaves, grads)})
    return results


def run_ours(case):
    """``case()`` on our backend twice: once to compile, then with host syncs forbidden. Returns both results."""
    with use_backend(OURS):
        first = case()
        with host_syncs_forbidden():
            second = case()
    return first, second


def assert_matches(ours: dict, same_dtype: dict, truth: dict, tol: float) -> None:
    """Every floating result of ours within ``tol x max |truth|`` (x2 for gradients) + 2 x the same-dtype reference's
    error, all measured against ``truth`` (float64), and that reference within 4 x the budget (which checks the
    float64 truth itself); all mismatches are listed in one failure.

    A gradient that is zero in exact arithmetic (float64 gives ~1e-17: the key bias of an attention, since a shift of
    all of a row's scores changes nothing) is rounding noise in any other dtype, as large as the summands that
    cancel: it is measured against the largest gradient of the case instead."""
    gradient_scale = max((truth[name].abs().max().item() for name in truth
                          if name.startswith("grad ") and truth[name].numel()), default=0.0)
    failures = []
    for name, value in ours.items():
        expected = truth[name]
        if not expected.is_floating_point():
            continue
        assert value.shape == expected.shape, f"{name}: shape {tuple(value.shape)} != {tuple(expected.shape)}"
        assert value.dtype == same_dtype[name].dtype, f"{name}: dtype {value.dtype} != {same_dtype[name].dtype}"
        expected = expected.double()
        scale = expected.abs().max().item()
        is_gradient = name.startswith("grad ")
        if is_gradient and scale <= 1e-9 * gradient_scale:
            scale = gradient_scale
        error = (value.double() - expected).abs().max().item()
        reference_error = (same_dtype[name].double() - expected).abs().max().item()
        budget = (2 * tol if is_gradient else tol) * scale
        bound = budget + 2 * reference_error
        if not reference_error <= 4 * budget:  # a wrong float64 truth would otherwise widen the bound
            failures.append(f"{name}: the reference in {value.dtype} is {reference_error:.3g} off float64, more than "
                            f"4 x the budget {budget:.3g}: the float64 truth of this test is wrong")
        if not error <= bound:  # also catches NaN
            failures.append(f"{name}: max |ours - fp64| = {error:.3g} > {bound:.3g} (= {budget:.3g} own budget + 2 x "
                            f"{reference_error:.3g}, the reference's error in {value.dtype}; max |fp64| = {scale:.3g})")
    assert not failures, "\n".join(failures)


def op_case(op, tensors: dict, cotangents: dict, dtype, **kwargs):
    """A closure computing ``op(*tensors, **kwargs)`` as ``out`` and the gradients of every tensor, in dtype."""
    leaves = {name: tensor.detach().to(dtype).requires_grad_() for name, tensor in tensors.items()}
    return lambda: forward_and_gradients(lambda: {"out": op(*leaves.values(), **kwargs)}, leaves, cotangents)


def module_case(module, forward, inputs: dict, cotangents: dict, backend=None):
    """A closure computing ``forward(module, **inputs)`` (a dict of outputs) and the gradients of the inputs and of
    every parameter; inputs are cast to the module's dtype. The closure runs on ``backend`` when given, else on
    whichever backend is active where it is called (``run_ours`` sets ours)."""
    dtype = next(module.parameters()).dtype
    leaves = {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}
    parameters = dict(module.named_parameters())

    def case():
        with use_backend(backend) if backend else contextlib.nullcontext():
            return forward_and_gradients(lambda: forward(module, **leaves), {**leaves, **parameters}, cotangents)

    return case


def reference_twins(ours, twin=None):
    """(same-dtype twin, float64 twin) holding ours' (already rounded) weights: ``twin`` (a reference module, moved
    to ours' device and dtype) loaded with ours' state, or a copy of ours itself when None (run it on the reference
    backend)."""
    if twin is None:
        same = copy.deepcopy(ours)
    else:
        same = twin.to(DEVICE, next(ours.parameters()).dtype)
        same.load_state_dict(ours.state_dict())
    return same, copy.deepcopy(same).double()


def test_sync_debug_mode_catches_a_host_sync():
    """The trap the other tests rely on: a synchronizing call inside ``host_syncs_forbidden`` raises."""
    if DEVICE.type != "cuda":
        pytest.skip("the sync trap needs CUDA")
    x = torch.ones(4, device=DEVICE)
    with host_syncs_forbidden(), pytest.raises(RuntimeError, match="synchroniz"):
        x.sum().item()


# ----------------------------------------------------------------------------------------------------------------
# The ops at long sequences
# ----------------------------------------------------------------------------------------------------------------

#: (B, H, T, D, Dv) on the GPU, its tiny CPU stand-in, and the op's option (entmax: causal; block-causal: group)
ENTMAX_SHAPES = [
    pytest.param((1, 4, 4096, 64, 64), (1, 2, 37, 16, 16), True, id="B1-H4-T4096-D64"),
    pytest.param((1, 2, 4096, 128, 128), (1, 2, 40, 32, 32), True, id="B1-H2-T4096-D128"),
    pytest.param((2, 3, 3001, 80, 48), (2, 2, 29, 24, 20), False, id="B2-H3-T3001-D80-Dv48-noncausal"),
]
BLOCK_CAUSAL_SHAPES = [
    pytest.param((1, 4, 4096, 64, 64), (1, 2, 37, 16, 16), 3, id="B1-H4-T4096-D64-G3"),
    pytest.param((1, 2, 4096, 128, 128), (1, 2, 40, 32, 32), 3, id="B1-H2-T4096-D128-G3"),
    pytest.param((2, 3, 3001, 80, 48), (2, 2, 29, 24, 20), 1, id="B2-H3-T3001-D80-Dv48-G1"),
]


def random_attention_inputs(shape, dtype, seed=0):
    """q, k (B, H, T, D), v and the output's cotangent (B, H, T, Dv), N(0, 1) in dtype."""
    b, h, t, d, dv = shape
    generator = torch.Generator().manual_seed(seed)
    q, k = (randn(generator, b, h, t, d, dtype=dtype) for _ in range(2))
    v, do = (randn(generator, b, h, t, dv, dtype=dtype) for _ in range(2))
    return {"q": q, "k": k, "v": v}, {"out": do}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gpu_shape, cpu_shape, causal", ENTMAX_SHAPES)
def test_entmax15_attention_long(dtype, gpu_shape, cpu_shape, causal):
    tensors, cotangents = random_attention_inputs(cpu_shape if TINY else gpu_shape, dtype)
    _, ours = run_ours(op_case(entmax15_attention, tensors, cotangents, dtype, causal=causal))
    same = op_case(reference.entmax15_attention_reference, tensors, cotangents, dtype, causal=causal)()
    truth = op_case(reference.entmax15_attention_reference, tensors, cotangents, torch.float64, causal=causal)()
    assert_matches(ours, same, truth, TOLERANCE["entmax"][dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gpu_shape, cpu_shape, group_size", BLOCK_CAUSAL_SHAPES)
def test_block_causal_attention_long(dtype, gpu_shape, cpu_shape, group_size):
    tensors, cotangents = random_attention_inputs(cpu_shape if TINY else gpu_shape, dtype)
    _, ours = run_ours(op_case(block_causal_attention, tensors, cotangents, dtype, group_size=group_size))
    reference_op = reference.block_causal_attention_reference
    same = op_case(reference_op, tensors, cotangents, dtype, group_size=group_size)()
    truth = op_case(reference_op, tensors, cotangents, torch.float64, group_size=group_size)()
    assert_matches(ours, same, truth, TOLERANCE["block_causal"][dtype])


@pytest.mark.skipif(ON_CPU, reason="autotuning happens on GPUs only")
def test_autotune_picks_listed_candidates_and_kernels_autotune_0_pins_the_default(monkeypatch):
    """Block-causal bf16 at T 2048: the first call times the device's candidates (kernels._autotune), the second
    reuses the choice without a host sync; KERNELS_AUTOTUNE=0 launches the defaults untimed. Both are accurate."""
    tensors, cotangents = random_attention_inputs((1, 4, 2048, 64, 64), BF16)
    case = op_case(block_causal_attention, tensors, cotangents, BF16, group_size=3)
    with recording_choices() as picks:
        _, tuned = run_ours(case)
    assert {pick["kernel"] for pick in picks} == {"block_causal_attn_fwd_kernel", "block_causal_attn_bwd_dq_kernel",
                                                  "block_causal_attn_bwd_dkdv_kernel"}, picks
    assert all(1 <= pick["rank"] <= pick["candidates"] and pick["candidates"] > 1 for pick in picks), picks
    monkeypatch.setenv("KERNELS_AUTOTUNE", "0")
    with recording_choices() as pinned, use_backend(OURS):
        default = case()
    assert pinned == []
    reference_op = reference.block_causal_attention_reference
    same = op_case(reference_op, tensors, cotangents, BF16, group_size=3)()
    truth = op_case(reference_op, tensors, cotangents, torch.float64, group_size=3)()
    for ours in (tuned, default):
        assert_matches(ours, same, truth, TOLERANCE["block_causal"][BF16])


def dialogue_node_counts(num_dialogues: int, seed: int = 0) -> list:
    """3 nodes per utterance of dialogues of 8..110 utterances (IEMOCAP-like, mean ~50), fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    utterances = (torch.randn(num_dialogues, generator=generator) * 25 + 50).round().clamp(8, 110).long()
    return (3 * utterances).tolist()


def packed_block_causal_reference(q, k, v, lengths, group_size):
    """The reference on each packed sequence (total, H, D) separately; lengths is a Python list (no device read)."""
    outputs, start = [], 0
    for length in lengths:
        per_sequence = [x[start:start + length].transpose(0, 1)[None] for x in (q, k, v)]  # (1, H, L, D)
        out = reference.block_causal_attention_reference(*per_sequence, group_size=group_size)
        outputs.append(out[0].transpose(0, 1))
        start += length
    return torch.cat(outputs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_causal_attention_varlen_dialogues(dtype):
    """CaM-HG's batch packed: 32 dialogues of 3L nodes, 8 heads of 64, offsets on the device."""
    lengths = [6, 15, 9] if TINY else dialogue_node_counts(32)
    heads, d = (2, 16) if TINY else (8, 64)
    total = sum(lengths)
    generator = torch.Generator().manual_seed(1)
    tensors = {name: randn(generator, total, heads, d, dtype=dtype) for name in "qkv"}
    cotangents = {"out": randn(generator, total, heads, d, dtype=dtype)}
    cu_seqlens = on_device(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32))
    ours_op = lambda q, k, v: block_causal_attention_varlen(  # noqa: E731
        q, k, v, cu_seqlens, max_seqlen=max(lengths), group_size=3)
    reference_op = lambda q, k, v: packed_block_causal_reference(q, k, v, lengths, 3)  # noqa: E731
    _, ours = run_ours(op_case(ours_op, tensors, cotangents, dtype))
    same = op_case(reference_op, tensors, cotangents, dtype)()
    truth = op_case(reference_op, tensors, cotangents, torch.float64)()
    assert_matches(ours, same, truth, TOLERANCE["block_causal"][dtype])


def _two_bytes_off(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` at an address one element past a 16-byte boundary: no TMA descriptor can address it."""
    buffer = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
    return buffer[1:].view(tensor.shape).copy_(tensor)


def _recording_tma_choices(module, monkeypatch) -> list:
    """Launches of ``module``'s kernels choose as on sm_90 (skipped on other GPUs, and on a CPU unless the kernels run
    in the interpreter); returns the list of (kernel name, USE_TMA) that launches with the flag append to."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] != 9:
        pytest.skip("the TMA variants launch on sm_90 only")
    if DEVICE.type != "cuda":
        if OURS != "triton":
            pytest.skip("needs the kernels: a Hopper GPU or KERNELS_GPU_TESTS_ON_CPU=interpreter")
        monkeypatch.setattr(module, "launch_arch", lambda device: "sm_90")
    chosen, launch = [], module.launch

    def recording(kernel, grid, args, kwargs, *rest, **options):
        if "USE_TMA" in kwargs:
            chosen.append((kernel.fn.__name__, kwargs["USE_TMA"]))
        launch(kernel, grid, args, kwargs, *rest, **options)

    monkeypatch.setattr(module, "launch", recording)
    return chosen


@pytest.mark.parametrize("dtype", [pytest.param(FP32, id="fp32"), pytest.param(BF16, id="bf16")])
def test_block_causal_tma_and_pointer_variants_match(dtype, monkeypatch):
    """On sm_90 the block-causal kernels stream aligned tiles through TMA tensor descriptors (``USE_TMA``; forward
    and dQ: K, V; dK/dV: Q, dO): that variant, the pointer-load variant (``_uses_tma`` forced off) and unaligned
    inputs (which fall back to pointer loads by themselves) all match float64, each launch taking the variant
    expected. On the CPU (``KERNELS_GPU_TESTS_ON_CPU=interpreter``) launches choose as on sm_90."""
    import kernels.block_causal as module

    chosen = _recording_tma_choices(module, monkeypatch)
    tensors, cotangents = random_attention_inputs((1, 2, 37, 16, 16) if TINY else (1, 4, 4096, 64, 64), dtype)
    reference_op = reference.block_causal_attention_reference
    same = op_case(reference_op, tensors, cotangents, dtype, group_size=3)()
    truth = op_case(reference_op, tensors, cotangents, torch.float64, group_size=3)()
    unaligned = {name: _two_bytes_off(tensor) for name, tensor in tensors.items()}
    for variant, inputs, expected in (("TMA", tensors, True), ("pointer loads", tensors, False),
                                      ("unaligned", unaligned, False)):
        chosen.clear()
        with monkeypatch.context() as forced, use_backend(OURS):
            if variant == "pointer loads":
                forced.setattr(module, "_uses_tma", lambda device, *streamed: False)
            ours = op_case(block_causal_attention, inputs, cotangents, dtype, group_size=3)()
        assert [tma for _, tma in chosen] == [expected] * 3, (variant, chosen)
        assert_matches(ours, same, truth, TOLERANCE["block_causal"][dtype])


@pytest.mark.parametrize("dtype", [pytest.param(FP32, id="fp32"), pytest.param(BF16, id="bf16")])
def test_entmax_tma_and_pointer_variants_match(dtype, monkeypatch):
    """On sm_90 the entmax threshold and output kernels stream K and V, the backward (whole heads) Q and dO, through
    TMA descriptors (``USE_TMA``): that variant, the pointer-load variant (``tma_launch`` forced off) and unaligned
    inputs (the threshold and output kernels fall back by themselves) all match float64, each launch taking the
    variant expected. On the CPU (``KERNELS_GPU_TESTS_ON_CPU=interpreter``) launches choose as on sm_90."""
    import kernels.entmax as module

    chosen = _recording_tma_choices(module, monkeypatch)
    tensors, cotangents = random_attention_inputs((1, 2, 37, 16, 16) if TINY else (1, 4, 4096, 64, 64), dtype)
    same = op_case(reference.entmax15_attention_reference, tensors, cotangents, dtype)()
    truth = op_case(reference.entmax15_attention_reference, tensors, cotangents, torch.float64)()
    unaligned = {name: _two_bytes_off(tensor) if name in "kv" else tensor for name, tensor in tensors.items()}
    kernels = ("_entmax_tau_kernel", "_entmax_fwd_kernel", "_entmax_bwd_kernel")
    for variant, inputs, expected in (("TMA", tensors, (True, True, True)),
                                      ("pointer loads", tensors, (False, False, False)),
                                      ("unaligned K and V", unaligned, (False, False, True))):
        chosen.clear()
        with monkeypatch.context() as forced, use_backend(OURS):
            if variant == "pointer loads":
                forced.setattr(module, "tma_launch", lambda arch, *streamed: False)
            ours = op_case(entmax15_attention, inputs, cotangents, dtype)()
        assert dict(chosen) == dict(zip(kernels, expected)), (variant, chosen)
        assert_matches(ours, same, truth, TOLERANCE["entmax"][dtype])


# ----------------------------------------------------------------------------------------------------------------
# The modules at the models' shapes
# ----------------------------------------------------------------------------------------------------------------


def _attention_with_context(module, x):
    result = module.forward_with_context(x)
    return {"output": result.output, "context": result.context}


def _attention_with_context_formula(module, x):
    """What ``EntmaxCausalAttention(E, 1, out_proj=False).forward_with_context(x)`` computes, written out, for float64
    (which the modules refuse): z = A (x W_v^T + b_v), context = A x, A = entmax15(causal(q k^T / sqrt(E)))."""
    q, k, v = (y[:, None] for y in module.qkv_proj(x).chunk(3, dim=-1))  # one head: E features each
    attended = reference.entmax15_attention_reference(q, k, torch.cat([v, x[:, None]], dim=-1))[:, 0]
    return {"output": attended[..., :x.shape[-1]], "context": attended[..., x.shape[-1]:]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_carn_entmax_attention_with_context(dtype):
    """CARN's causal-cue attention as carn/model.py runs it: one head over the 256-wide hidden state, no output
    projection, the causal context A @ x from the same call; B = 32 dialogues of 110 utterances."""
    b, t, e = (2, 12, 16) if TINY else (32, 110, 256)
    torch.manual_seed(0)
    ours = FusedEntmaxCausalAttention(e, 1, out_proj=False).to(DEVICE, dtype)
    same, truth = reference_twins(ours, reference.EntmaxCausalAttention(e, 1, out_proj=False))
    generator = torch.Generator().manual_seed(2)
    inputs = {"x": randn(generator, b, t, e, dtype=dtype)}
    cotangents = {name: randn(generator, b, t, e, dtype=dtype) for name in ("output", "context")}
    _, ours_results = run_ours(module_case(ours, _attention_with_context, inputs, cotangents))
    same_results = module_case(same, _attention_with_context, inputs, cotangents, backend="reference")()
    truth_results = module_case(truth, _attention_with_context_formula, inputs, cotangents, backend="reference")()
    assert_matches(ours_results, same_results, truth_results, TOLERANCE["entmax"][dtype])


def _layer(module, x, context=None):
    return {"out": module(x, context)}


class MaskedMultiheadAttention(torch.nn.MultiheadAttention):
    """torch's own multi-head attention under the equivalent boolean mask, holding a ``BlockCausalMultiheadAttention``'s
    weights (their state dicts load both ways, same parameter names) in float64, which the fused module refuses:
    the float64 truth of that module, packed sequences one by one."""

    def __init__(self, ours):
        super().__init__(ours.embed_dim, ours.num_heads, bias=ours.in_proj_bias is not None, batch_first=True,
                         device=ours.in_proj_weight.device, dtype=torch.float64)
        self.group_size = ours.group_size
        self.load_state_dict(ours.state_dict())

    def forward(self, query, key=None, value=None, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        """(output, None), the fused module's convention; key_padding_mask (always None) and max_seqlen (a grid
        size) are unused here."""
        key = query if key is None else key
        value = key if value is None else value
        if cu_seqlens is not None:
            offsets = cu_seqlens.tolist()
            return torch.cat([self(query[None, start:end], key[None, start:end], value[None, start:end])[0][0]
                              for start, end in zip(offsets[:-1], offsets[1:])]), None
        hidden = ~reference.block_causal_mask(query.shape[-2], self.group_size, query.device)
        return super().forward(query, key, value, attn_mask=hidden, need_weights=False)[0], None


CAMHG_LAYERS = [  # group size, T on the GPU, cross-attention
    pytest.param(3, 330, False, id="hypergraph-G3-T330"),
    pytest.param(3, 330, True, id="hypergraph-cross-G3-T330"),
    pytest.param(1, 110, False, id="extractor-G1-T110"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size, t, cross", CAMHG_LAYERS)
def test_camhg_block_causal_transformer_layer(dtype, group_size, t, cross):
    """CaM-HG's ``BlockCausalTransformerLayer(512, 8)``: the hypergraph's layers on 3L = 330 nodes (self-attention
    and hyperedges attending nodes) and the causal factor extractor's on L = 110 utterances; B = 32, dropout off so
    that both backends compute the same function."""
    b, e, heads = (2, 32, 4) if TINY else (32, 512, 8)
    t = 12 if TINY else t
    torch.manual_seed(0)
    ours = BlockCausalTransformerLayer(e, heads, dropout=0.0, group_size=group_size).to(DEVICE, dtype)
    same, truth = reference_twins(ours)
    truth.attn = MaskedMultiheadAttention(truth.attn)
    generator = torch.Generator().manual_seed(3)
    inputs = {"x": randn(generator, b, t, e, dtype=dtype)}
    if cross:
        inputs["context"] = randn(generator, b, t, e, dtype=dtype)
    cotangents = {"out": randn(generator, b, t, e, dtype=dtype)}
    _, ours_results = run_ours(module_case(ours, _layer, inputs, cotangents))
    same_results = module_case(same, _layer, inputs, cotangents, backend="reference")()
    truth_results = module_case(truth, _layer, inputs, cotangents, backend="reference")()
    assert_matches(ours_results, same_results, truth_results, TOLERANCE["block_causal"][dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_camhg_block_causal_multihead_attention_packed(dtype):
    """``BlockCausalMultiheadAttention(512, 8)`` on CaM-HG's 32 dialogues packed with ``cu_seqlens`` on the device."""
    lengths = [6, 15, 9] if TINY else dialogue_node_counts(32)
    e, heads = (32, 4) if TINY else (512, 8)
    torch.manual_seed(0)
    ours = BlockCausalMultiheadAttention(e, heads, group_size=3).to(DEVICE, dtype)
    same, truth = reference_twins(ours)
    truth = MaskedMultiheadAttention(truth)
    cu_seqlens = on_device(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32))
    generator = torch.Generator().manual_seed(4)
    inputs = {"x": randn(generator, sum(lengths), e, dtype=dtype)}
    cotangents = {"out": randn(generator, sum(lengths), e, dtype=dtype)}
    forward = lambda module, x: {"out": module(x, cu_seqlens=cu_seqlens)[0]}  # noqa: E731
    _, ours_results = run_ours(module_case(ours, forward, inputs, cotangents))
    same_results = module_case(same, forward, inputs, cotangents, backend="reference")()
    truth_results = module_case(truth, forward, inputs, cotangents, backend="reference")()
    assert_matches(ours_results, same_results, truth_results, TOLERANCE["block_causal"][dtype])


# ----------------------------------------------------------------------------------------------------------------
# Top-2 MoE
# ----------------------------------------------------------------------------------------------------------------


#: the MoE's dtypes and float32 dot precisions (``KERNELS_FP32_PRECISION``): float32 both with exact products
#: (``fp32-ieee``, the accuracy mode, against exact float32's budget) and with the default TF32 tensor cores
#: (``fp32-tf32``, against TF32's budget ``TOLERANCE["moe_tf32"]``)
MOE_DTYPES = [pytest.param(FP32, "ieee", id="fp32-ieee"), pytest.param(FP32, "tf32", id="fp32-tf32"),
              pytest.param(FP16, "ieee", id="fp16"), pytest.param(BF16, "ieee", id="bf16")]


def routing_gap(dtype, precision: str) -> float:
    """The smallest gap, in logit standard deviations, between a row's three best logits that rounding cannot close:
    1e-3 where the gate's logits are float32-exact products (errors near 1e-6 of the deviation); 2e-2 with TF32
    products (d = 512: errors up to ~3e-3 of it)."""
    return 2e-2 if dtype == FP32 and precision == "tf32" else 1e-3


def moe_tolerance(dtype, precision: str) -> float:
    return TOLERANCE["moe_tf32" if dtype == FP32 and precision == "tf32" else "moe"][dtype]


def separate_routing(x: torch.Tensor, gate_weight: torch.Tensor, generator: torch.Generator,
                     gap: float = 1e-3) -> torch.Tensor:
    """Redraw (in place, on the CPU) the rows of x (N, d) whose three best logits (float64) lie within ``gap`` logit
    standard deviations of each other, so that rounding cannot change which two experts a row takes nor their order
    (``routing_gap``): the routings of ours and of the references can then be compared exactly. About one row in a
    thousand is redrawn at 1e-3."""
    for _ in range(100):
        logits = x.double() @ gate_weight.double().t()
        top = logits.topk(min(3, logits.shape[1]), dim=-1).values
        gaps = (top[:, :-1] - top[:, 1:]).min(dim=-1).values
        near_tie = gaps < gap * logits.std()
        if not near_tie.any():
            return x
        x[near_tie] = torch.randn(int(near_tie.sum()), x.shape[1], generator=generator).to(x.dtype)
    raise AssertionError("could not draw inputs without near-tied routing logits")


def _moe(module, x):
    y, routing = module(x, return_routing=True)
    return {"y": y, "weights": routing.weights, "aux_loss": routing.aux_loss, "experts": routing.experts}


def moe_cotangents(generator, lead_shape, d_out, dtype):
    """Cotangents of y, the routing weights and the load-balancing loss (0.5), so that every gradient path runs."""
    return {"y": randn(generator, *lead_shape, d_out, dtype=dtype),
            "weights": randn(generator, *lead_shape, 2, dtype=torch.float32),
            "aux_loss": on_device(torch.tensor(0.5))}


def assert_moe_matches(first, ours, same, truth, tol):
    for name in ours:
        assert torch.equal(first[name], ours[name]), f"{name} differs between two runs on the same inputs"
    assert torch.equal(ours["experts"], truth["experts"]), "ours routed some row to other experts than the reference"
    assert_matches(ours, same, truth, tol)


@pytest.mark.parametrize("dtype, precision", MOE_DTYPES)
def test_camhg_top2_moe(dtype, precision, monkeypatch):
    """CaM-HG's imputation MoE: ``Top2MoE(512, 4 experts, hidden 512)`` on 32 x 110 = 3,520 utterances; every
    gradient (input, gate, experts' weights and biases, through y, the routing weights and the aux loss); two runs
    bit-identical."""
    b, t, d, hidden, experts = (2, 16, 32, 48, 4) if TINY else (32, 110, 512, 512, 4)
    torch.manual_seed(0)
    ours = Top2MoE(d, num_experts=experts, hidden=hidden).to(dtype)
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(b * t, d, generator=generator)).to(dtype)
    x = separate_routing(x, ours.gate_weight.detach(), generator, routing_gap(dtype, precision)).reshape(b, t, d)
    ours = ours.to(DEVICE)
    same, truth = reference_twins(ours, reference.Top2MoE(d, num_experts=experts, hidden=hidden))
    inputs = {"x": on_device(x)}
    cotangents = moe_cotangents(generator, (b, t), d, dtype)
    monkeypatch.setenv("KERNELS_FP32_PRECISION", precision)
    first, ours_results = run_ours(module_case(ours, _moe, inputs, cotangents))
    same_results = module_case(same, _moe, inputs, cotangents, backend="reference")()
    truth_results = module_case(truth, _moe, inputs, cotangents, backend="reference")()
    assert_moe_matches(first, ours_results, same_results, truth_results, moe_tolerance(dtype, precision))


@pytest.mark.parametrize("dtype, precision", MOE_DTYPES)
def test_moe_top2_odd_sizes(dtype, precision, monkeypatch):
    """``moe_top2`` itself at sizes that fill no tile exactly (N = 1001, d = 100, h = 200, d_out = 72, E = 5)."""
    n, d, hidden, d_out, experts = (13, 10, 12, 7, 5) if TINY else (1001, 100, 200, 72, 5)
    generator = torch.Generator().manual_seed(6)
    weights = {"gate_weight": torch.randn(experts, d, generator=generator) / d ** 0.5,
               "w1": torch.randn(experts, d, hidden, generator=generator) / d ** 0.5,
               "b1": torch.randn(experts, hidden, generator=generator) / 2,
               "w2": torch.randn(experts, hidden, d_out, generator=generator) / hidden ** 0.5,
               "b2": torch.randn(experts, d_out, generator=generator) / 2}
    weights = {name: w.to(dtype) for name, w in weights.items()}
    x = separate_routing(torch.randn(n, d, generator=generator).to(dtype), weights["gate_weight"], generator,
                         routing_gap(dtype, precision))
    tensors = {"x": on_device(x), **{name: on_device(w) for name, w in weights.items()}}
    cotangents = moe_cotangents(generator, (n,), d_out, dtype)

    def case(op, cast):
        leaves = {name: tensor.detach().to(cast).requires_grad_() for name, tensor in tensors.items()}

        def forward():
            y, routing = op(*leaves.values(), return_routing=True)
            return {"y": y, "weights": routing.weights, "aux_loss": routing.aux_loss, "experts": routing.experts}

        return lambda: forward_and_gradients(forward, leaves, cotangents)

    monkeypatch.setenv("KERNELS_FP32_PRECISION", precision)
    first, ours = run_ours(case(moe_top2, dtype))
    same = case(reference.moe_top2_reference, dtype)()
    truth = case(reference.moe_top2_reference, torch.float64)()
    assert_moe_matches(first, ours, same, truth, moe_tolerance(dtype, precision))


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs: both models' training step and inference captured and replayed
# ----------------------------------------------------------------------------------------------------------------


def _flat_tensors(inputs) -> list:
    return [t for value in inputs for t in (value.values() if isinstance(value, dict) else [value])]


def assert_graph_replays_match_eager(model, loss_of, inputs, fresh_inputs):
    """``loss_of(model, *inputs)`` (a scalar) as one training step (forward + backward into ``.grad``) and as
    inference (no grad), each captured in a CUDA graph (``torch.cuda.graph``: any host sync or allocation outside
    the graph's pool fails the capture), then replayed on ``fresh_inputs`` copied into the captured inputs: the loss,
    every parameter's gradient and the inference loss equal eager's on the same inputs."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires: compile, autotune, allocate
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss_of(model, *inputs).backward()
            with torch.no_grad():
                loss_of(model, *inputs)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    train_step, inference = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(train_step):
        static_loss = loss_of(model, *inputs)
        static_loss.backward()
    with torch.no_grad(), torch.cuda.graph(inference):
        static_inference = loss_of(model, *inputs)
    for static, fresh in zip(_flat_tensors(inputs), _flat_tensors(fresh_inputs)):
        static.copy_(fresh)
    train_step.replay()
    inference.replay()
    torch.cuda.synchronize()
    replayed = [static_loss.clone(), static_inference.clone(), *[p.grad.clone() for p in parameters]]

    model.zero_grad(set_to_none=True)
    eager_loss = loss_of(model, *fresh_inputs)
    eager_loss.backward()
    with torch.no_grad():
        eager_inference = loss_of(model, *fresh_inputs)
    eager = [eager_loss.detach(), eager_inference, *[p.grad for p in parameters]]
    names = ["loss", "inference loss", *[f"grad {name}" for name, p in model.named_parameters() if p.requires_grad]]
    for name, graph_value, eager_value in zip(names, replayed, eager):
        torch.testing.assert_close(graph_value, eager_value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _carn_inputs(seed: int):
    from tests.test_carn import random_inputs

    features, present, valid, _ = random_inputs(lengths=(110, 97, 60, 33), seed=seed)
    return [{m: on_device(x) for m, x in features.items()}, on_device(present), on_device(valid)]


def test_carn_training_step_and_inference_replay_as_cuda_graphs():
    """CARN (fused entmax attention in every modality's causal-cue encoder) at 4 dialogues of up to 110
    utterances: captured without a host sync, replayed equal to eager."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    from carn.model import CARN
    from tests.test_carn import tiny_config

    torch.manual_seed(0)
    model = CARN(tiny_config(hidden=64, num_heads=1)).to(DEVICE).eval()  # eval: no dropout, so both runs draw alike

    def loss_of(model, features, present, valid):
        out = model(features, present, valid)
        reconstruction = sum(out.reconstruction[m].float().square().mean() for m in out.reconstruction)
        return (out.logits.float().square() * valid[..., None]).mean() + reconstruction

    with use_backend(OURS):
        assert_graph_replays_match_eager(model, loss_of, _carn_inputs(0), _carn_inputs(1))


def test_camhg_training_step_and_inference_replay_as_cuda_graphs():
    """CaM-HG in its last phase (block-causal hypergraph layers and the top-2 MoE generator with its row mask and
    load-balancing loss) at 4 dialogues of 110 utterances: captured without a host sync, replayed equal to eager."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    from camhg import CaMHG
    from tests.test_camhg import DIMS, random_inputs, tiny_config

    torch.manual_seed(0)
    model = CaMHG(tiny_config(hidden=64), DIMS, num_classes=4).to(DEVICE).eval()
    model.set_phase(3)

    def inputs(seed):
        features, present, speakers = random_inputs(batch=4, length=110, generator=torch.Generator().manual_seed(seed))
        return [{m: on_device(x) for m, x in features.items()}, on_device(present), on_device(speakers)]

    def loss_of(model, features, present, speakers):
        out = model(features, present, speakers)
        return out.logits.float().square().mean() + out.restored.float().square().mean() + out.aux_loss

    with use_backend(OURS):
        assert_graph_replays_match_eager(model, loss_of, inputs(0), inputs(1))
