"""The input checks both models share (``mer.inputs``): the same clear errors from CARN and CaM-HG, naming the
modality, dialogue and utterance; float64 features cast; one host sync for all value checks."""
from __future__ import annotations

import pytest
import torch

from camhg import CaMHG, preset
from carn.config import ModelConfig
from carn.model import CARN
from mer.data import MODALITIES
from mer.inputs import check_dialogue_inputs

DIMS = {"a": 6, "t": 8, "v": 5}


def _model(kind):
    torch.manual_seed(0)
    if kind == "carn":
        return CARN(ModelConfig(dims=DIMS, num_classes=4, hidden=8, num_heads=2, css_dim=4, dropout=0.0)).eval()
    return CaMHG(preset("embedded", hidden=8, heads=2, dropout=0.0), DIMS, num_classes=4).eval()


def _inputs(lengths=(5, 3)):
    """Right-padded random features (zero at padding), every modality present at valid utterances."""
    generator = torch.Generator().manual_seed(1)
    b, l = len(lengths), max(lengths)
    valid = torch.arange(l)[None, :] < torch.tensor(lengths)[:, None]
    features = {m: torch.randn(b, l, d, generator=generator) * valid[..., None] for m, d in DIMS.items()}
    present = valid[..., None].expand(b, l, 3).clone()
    speakers = torch.randint(0, 2, (b, l), generator=generator)
    return features, present, valid, speakers


def _call(model, features, present, valid, speakers):
    if isinstance(model, CARN):
        return model(features, present, valid).logits
    return model(features, present, speakers, valid=valid).logits


MODELS = ["carn", "camhg"]


def _poison(value):
    def change(features, present, valid, speakers):
        features = dict(features, t=features["t"].clone())
        features["t"][1, 2, 4] = value
        return features, present, valid, speakers

    return change


def _no_modality(features, present, valid, speakers):
    present = present.clone()
    present[1, 1] = False
    return features, present, valid, speakers


def _empty_dialogue(features, present, valid, speakers):
    valid, present = valid.clone(), present.clone()
    valid[1], present[1] = False, False
    return features, present, valid, speakers


def _lone_empty_dialogue(features, present, valid, speakers):
    return ({m: x[:1, :0] for m, x in features.items()}, present[:1, :0], valid[:1, :0], speakers[:1, :0])


def _wrong_size(features, present, valid, speakers):
    return dict(features, v=features["v"][..., :4]), present, valid, speakers


def _integer_features(features, present, valid, speakers):
    return dict(features, a=features["a"].long()), present, valid, speakers


def _padding_first(features, present, valid, speakers):
    valid = valid.clone()
    valid[0, 1] = False
    return features, present, valid, speakers


BAD = [
    pytest.param(_poison(float("nan")), ValueError,
                 r"features\['t'\] contains NaN or infinite values at dialogue 1, utterance 2", id="nan"),
    pytest.param(_poison(float("-inf")), ValueError,
                 r"features\['t'\] contains NaN or infinite values at dialogue 1, utterance 2", id="inf"),
    pytest.param(_no_modality, ValueError, r"no modality present .* at dialogue 1, utterance 1", id="no-modality"),
    pytest.param(_empty_dialogue, ValueError, r"a dialogue is empty .* dialogue 1", id="empty-dialogue"),
    pytest.param(_lone_empty_dialogue, ValueError, r"every dialogue of the batch is empty \(L = 0",
                 id="lone-empty-dialogue"),
    pytest.param(_wrong_size, ValueError, r"features\['v'\] has shape \(2, 5, 4\), expected .* dims\['v'\] = 5",
                 id="feature-size"),
    pytest.param(_integer_features, TypeError, r"features\['a'\] must be a floating-point tensor, got int64",
                 id="integer-features"),
    pytest.param(_padding_first, ValueError, r"valid must mark a non-empty prefix .* dialogue 0, utterance 1",
                 id="valid-not-a-prefix"),
]


@pytest.mark.parametrize("change, error, match", BAD)
@pytest.mark.parametrize("kind", MODELS)
def test_bad_inputs_get_the_same_clear_error_from_both_models(reference_backend, kind, change, error, match):
    with pytest.raises(error, match=match):
        _call(_model(kind), *change(*_inputs()))


@pytest.mark.parametrize("kind", MODELS)
def test_without_valid_trailing_utterances_without_modality_are_padding(reference_backend, kind):
    model = _model(kind)
    features, present, valid, speakers = _inputs()
    torch.testing.assert_close(_call(model, features, present, None, speakers),
                               _call(model, features, present, valid, speakers))
    with pytest.raises(ValueError, match=r"no modality present .* at dialogue 1, utterance 1"):
        _call(model, *_no_modality(features, present, None, speakers))
    present = present.clone()
    present[1] = False  # no utterance with a modality: an empty dialogue
    with pytest.raises(ValueError, match=r"a dialogue is empty .* dialogue 1"):
        _call(model, features, present, None, speakers)


@pytest.mark.parametrize("kind", MODELS)
def test_float64_features_are_cast_to_the_model_dtype(reference_backend, kind):
    model = _model(kind)
    features, present, valid, speakers = _inputs()
    as_float32 = _call(model, features, present, valid, speakers)
    as_float64 = _call(model, {m: x.double() for m, x in features.items()}, present, valid, speakers)
    assert as_float64.dtype == torch.float32
    torch.testing.assert_close(as_float64, as_float32)


def test_value_checks_sync_with_the_host_once(monkeypatch):
    features, present, valid, speakers = _inputs()
    syncs = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            syncs.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    check_dialogue_inputs(features, present, valid=valid, speakers=speakers, dims=DIMS, dtype=torch.float32)
    assert syncs == ["__bool__"]


def test_value_checks_are_skipped_while_compiling(monkeypatch):
    features, present, valid, _ = _poison(float("nan"))(*_inputs())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    checked, _ = check_dialogue_inputs(features, present, valid=valid, dims=DIMS, dtype=torch.float32)
    assert set(checked) == set(MODALITIES)
