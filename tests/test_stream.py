"""Streaming both models one utterance at a time (``model.stream()``, mer.streaming): the streamed prediction at
utterance t equals the offline forward's at t for every causal configuration, with missing modalities, two speakers
and ragged batches of live conversations; CARN's non-causal default equals the forward over the utterances <= t."""
from __future__ import annotations

import pytest
import torch

from camhg.config import CaMHGConfig
from camhg.model import CaMHG
from carn.config import ModelConfig
from carn.model import CARN
from kernels import use_backend

DIMS = {"a": 5, "t": 7, "v": 6}
CAMHG_ABLATIONS = ("full", "no_hypergraph", "no_gating", "no_moe", "no_causal_factor", "no_imputation")


def dialogues(batch: int, lengths: list[int], seed: int = 0):
    """Right-padded random dialogues: features {m: (B, L, d_m)}, present (B, L, 3) with about a third of the
    modalities missing (at least one per utterance, none at padding), speakers (B, L) in {0, 1}, valid (B, L)."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    valid = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    features = {m: torch.randn(batch, length, d, generator=g) * valid[..., None] for m, d in DIMS.items()}
    present = torch.rand(batch, length, 3, generator=g) > 0.35
    present[..., 1] |= ~present.any(-1)
    present &= valid[..., None]
    speakers = torch.randint(0, 2, (batch, length), generator=g) * valid
    return features, present, speakers, valid


def streamed(model, features, present, speakers, valid) -> torch.Tensor:
    """(B, L, C) raw outputs (logits or scores) of a batch stream fed the dialogues utterance by utterance, each row
    active while its dialogue lasts (ragged lengths)."""
    stream = model.stream(valid.shape[0])
    outputs = [stream.push(audio=features["a"][:, t], text=features["t"][:, t], video=features["v"][:, t],
                           speaker=speakers[:, t], present=present[:, t], active=valid[:, t], probabilities=False)
               for t in range(valid.shape[1])]
    return torch.stack(outputs, dim=1)


def camhg_model(ablation: str, phase: int = 3, num_classes: int = 4, layers: int = 2) -> CaMHG:
    torch.manual_seed(0)
    config = CaMHGConfig(hidden=8, heads=2, ablation=ablation, num_experts=3, extractor_layers=layers,
                         hypergraph_layers=layers)
    model = CaMHG(config, DIMS, num_classes)
    model.set_phase(phase)
    return model.eval()


def carn_model(**options) -> CARN:
    torch.manual_seed(0)
    options.setdefault("num_classes", 4)
    return CARN(ModelConfig(dims=DIMS, hidden=8, num_heads=2, css_dim=4, **options)).eval()


@pytest.mark.parametrize("ablation", CAMHG_ABLATIONS)
def test_camhg_stream_equals_offline(reference_backend, ablation):
    model = camhg_model(ablation)
    features, present, speakers, valid = dialogues(3, [9, 4, 7], seed=1)
    offline = model(features, present, speakers, valid=valid).logits
    torch.testing.assert_close(streamed(model, features, present, speakers, valid)[valid], offline[valid],
                               atol=1e-5, rtol=1e-5)


def test_camhg_stream_phase_one_and_score(reference_backend):
    """A phase-1 model (no imputation yet) and a sentiment-score model (B,) stream their offline outputs too."""
    for model in (camhg_model("full", phase=1), camhg_model("full", num_classes=1)):
        features, present, speakers, valid = dialogues(2, [6, 3], seed=2)
        offline = model(features, present, speakers, valid=valid).logits
        offline = offline[..., 0] if model.num_classes == 1 else offline
        torch.testing.assert_close(streamed(model, features, present, speakers, valid)[valid], offline[valid],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(encoder_mask="causal"), dict(encoder_mask="causal", use_cce=False),
                                     dict(encoder_mask="causal", css_context="strict", css="mse"),
                                     dict(encoder_mask="causal", task="regression", num_classes=1)],
                         ids=["causal", "causal-no-cce", "causal-strict", "causal-score"])
def test_carn_causal_stream_equals_offline(reference_backend, options):
    model = carn_model(**options)
    features, present, _, valid = dialogues(3, [8, 5, 2], seed=3)
    offline = model(features, present, valid).logits
    assert model.stream(3).causal
    out = streamed(model, features, present, torch.zeros_like(valid, dtype=torch.long), valid)
    torch.testing.assert_close(out[valid], offline[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(), dict(attention="vanilla", encoder_mask="causal")],
                         ids=["default", "vanilla"])
def test_carn_noncausal_stream_is_the_prefix_prediction(reference_backend, options):
    """Non-causal encoders: the stream re-encodes the history; its output at t is the forward over utterances <= t,
    which the forward over the whole dialogue revises."""
    model = carn_model(**options)
    assert not model.stream().causal
    features, present, _, valid = dialogues(2, [6, 4], seed=4)
    out = streamed(model, features, present, torch.zeros_like(valid, dtype=torch.long), valid)
    for b, length in enumerate(valid.sum(1).tolist()):
        for t in range(length):
            prefix = model({m: x[b:b + 1, :t + 1] for m, x in features.items()}, present[b:b + 1, :t + 1],
                           valid[b:b + 1, :t + 1]).logits[0, t]
            torch.testing.assert_close(out[b, t], prefix, atol=1e-5, rtol=1e-5)
    offline = model(features, present, valid).logits
    assert not torch.allclose(out[valid], offline[valid], atol=1e-3)


@pytest.mark.parametrize("which", ["camhg", "carn"])
def test_triton_backend_streams_the_offline_prediction(triton_backend, which, monkeypatch):
    """The same equality with the Triton kernels (interpreter) in the offline forward and in the stream's KV-cache
    attention (its references are refused), at tiny sizes. The MoE, whose interpreter run is slow, is left out (a
    CPU stream runs the chosen experts in PyTorch; a GPU stream calls the op)."""
    import kernels.kvcache

    def refused(*args, **kwargs):
        raise AssertionError("the KV-cache reference ran on the triton backend")

    for name in ("entmax_attention_with_kvcache_reference", "block_causal_attention_with_kvcache_reference"):
        monkeypatch.setattr(kernels.kvcache, name, refused)
    features, present, speakers, valid = dialogues(2, [3, 2], seed=5)
    if which == "camhg":
        model = camhg_model("no_moe", layers=1)
        offline = model(features, present, speakers, valid=valid).logits
    else:
        model = carn_model(encoder_mask="causal")
        offline = model(features, present, valid).logits
    torch.testing.assert_close(streamed(model, features, present, speakers, valid)[valid], offline[valid],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["camhg", "carn"])
def test_ragged_streams_advance_together(reference_backend, which):
    """Four slots of a batch stream serve conversations that start at different times (reset), pause (inactive
    rows) and end: each slot's outputs equal its conversation's own offline forward."""
    model = camhg_model("full") if which == "camhg" else carn_model(encoder_mask="causal")
    conversations = [dialogues(1, [n], seed=10 + n) for n in (5, 3, 6, 4)]
    # (slot, conversation) schedule: slot 0 runs conversation 0 then 1; slots 1-2 run 2 and 3 with pauses
    plan = {0: [0, 1], 1: [2], 2: [3]}
    stream = model.stream(3)
    position = {slot: 0 for slot in plan}
    queue = {slot: list(convs) for slot, convs in plan.items()}
    got = {c: [] for c in range(4)}
    step = 0
    while any(queue.values()):
        active = torch.tensor([bool(queue[s]) and (s != 1 or step % 2 == 0) for s in range(3)])
        rows = {m: torch.zeros(3, d) for m, d in DIMS.items()}
        present, speakers = torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, dtype=torch.long)
        for s in range(3):
            if active[s]:
                features, p, spk, _ = conversations[queue[s][0]]
                t = position[s]
                for m in DIMS:
                    rows[m][s] = features[m][0, t]
                present[s], speakers[s] = p[0, t], spk[0, t]
        out = stream.push(audio=rows["a"], text=rows["t"], video=rows["v"], speaker=speakers, present=present,
                          active=active, probabilities=False)
        for s in range(3):
            if active[s]:
                conversation = queue[s][0]
                got[conversation].append(out[s])
                position[s] += 1
                if position[s] == conversations[conversation][3].shape[1]:  # finished: the slot takes the next one
                    queue[s].pop(0)
                    position[s] = 0
                    stream.reset(torch.tensor([s]))
        step += 1
    for c, (features, present, speakers, valid) in enumerate(conversations):
        if which == "camhg":
            offline = model(features, present, speakers, valid=valid).logits[0]
        else:
            offline = model(features, present, valid).logits[0]
        torch.testing.assert_close(torch.stack(got[c]), offline, atol=1e-5, rtol=1e-5)


def test_single_stream_takes_vectors_and_returns_probabilities(reference_backend):
    model = camhg_model("full")
    features, present, speakers, valid = dialogues(1, [3], seed=6)
    stream = model.stream()
    probabilities = [stream.push(audio=features["a"][0, t], text=features["t"][0, t], video=None,
                                 speaker=int(speakers[0, t])) for t in range(3)]
    present = present.clone()
    present[..., 0], present[..., 1], present[..., 2] = True, True, False
    offline = model({**features, "v": torch.zeros_like(features["v"])}, present, speakers).logits[0].softmax(-1)
    torch.testing.assert_close(torch.stack(probabilities), offline, atol=1e-5, rtol=1e-5)
    assert probabilities[0].shape == (4,)


def test_stream_input_errors(reference_backend):
    model = camhg_model("full")
    stream = model.stream()
    with pytest.raises(ValueError, match="audio must have shape"):
        stream.push(audio=torch.zeros(4))
    with pytest.raises(ValueError, match="text holds NaN or inf values at row 0"):
        stream.push(text=torch.full((7,), float("nan")))
    with pytest.raises(ValueError, match="no modality present"):
        stream.push()
    with pytest.raises(ValueError, match="speaker must be 0 or 1"):
        stream.push(text=torch.zeros(7), speaker=2)
    with pytest.raises(ValueError, match="present marks a modality"):
        stream.push(text=torch.zeros(7), present=torch.tensor([True, True, False]))
    assert int(stream.lengths[0]) == 0  # nothing was pushed
    with pytest.raises(ValueError, match="call model.eval"):
        camhg_model("full").train().stream()
    with pytest.raises(ValueError, match="phase 2"):
        camhg_model("full", phase=2).stream()
    with pytest.raises(ValueError, match="batch_size 2"):
        model.stream(2).push(text=torch.zeros(7))


def test_stream_caches_grow(reference_backend):
    """Past the first cache capacity (16 utterances) the stream still equals the offline forward."""
    model = camhg_model("no_gating", layers=1)
    features, present, speakers, valid = dialogues(1, [37], seed=7)
    offline = model(features, present, speakers, valid=valid).logits
    torch.testing.assert_close(streamed(model, features, present, speakers, valid), offline, atol=1e-5, rtol=1e-5)


def test_carn_wider_than_one_decoding_tile_streams_on_the_kernels(triton_backend, monkeypatch):
    """CARN's one-head causal-cue attention is ``hidden`` wide: past the decoding kernels' head tile (8 features
    here) it streams on them in feature chunks, equal to the offline forward."""
    from kernels import kvcache

    tiles = kvcache.DecodeTiles(block_n=16, block_t=64, num_warps=4, threshold_num_warps=4, whole_d=8, block_d=8)
    monkeypatch.setattr(kvcache, "_TILE_OVERRIDE", tiles)
    torch.manual_seed(0)
    model = CARN(ModelConfig(dims=DIMS, num_classes=3, hidden=12, num_heads=4, css_dim=4,
                             encoder_mask="causal", use_cce=True)).eval()
    features, present, speakers, valid = dialogues(1, [2], seed=9)
    with use_backend("reference"):
        offline = model(features, present, valid).logits
    torch.testing.assert_close(streamed(model, features, present, speakers, valid), offline, atol=1e-4, rtol=1e-4)

@pytest.mark.parametrize("rows, out_features, in_features, layout", [
    pytest.param(1, 24, 8, "transposed", id="1-row-wide"), pytest.param(1, 8, 24, "plain", id="1-row-deep"),
    pytest.param(3, 24, 8, "packed", id="3-rows")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_stream_linear_equals_linear_in_each_weight_layout(rows, out_features, in_features, layout, bias):
    """A stream's linear map gives ``F.linear``'s result on fresh inputs, whichever layout it multiplies by (packed
    for oneDNN at several rows, transposed at one row of a wide map, the weight itself at one row of a deep one),
    with leading axes kept, and does not hold the layer's parameters for autograd."""
    from mer.streaming import StreamLinear, _onednn_linear

    if layout == "packed" and not _onednn_linear():
        pytest.skip("this PyTorch build has no oneDNN linear")
    g = torch.Generator().manual_seed(rows * 100 + out_features)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    linear = StreamLinear(layer.weight, layer.bias, rows)
    assert (linear.packed is not None, linear.transposed is not None) == (layout == "packed", layout == "transposed")
    x = torch.randn(2, rows, in_features, generator=g)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    got = linear(x)
    assert got.shape == expected.shape and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
