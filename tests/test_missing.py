"""Missing-modality masks: GCNet's random_mask protocol, fixed conditions, CaM-HG's training masks."""
import numpy as np
import pytest
import torch

from mer.data import Dialogue, collate_dialogues
from mer.missing import CONDITIONS, batch_missing_mask, camhg_training_mask, condition_mask, random_missing_mask

ETAS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def _batch(lengths, seed=0):
    rng = np.random.default_rng(seed)
    dialogues = [
        Dialogue(
            f"d{i}",
            {m: rng.standard_normal((n, 4)).astype(np.float32) for m in "atv"},
            rng.integers(0, 2, n),
            rng.integers(0, 4, n),
        )
        for i, n in enumerate(lengths)
    ]
    return collate_dialogues(dialogues)


@pytest.mark.parametrize("eta", [pytest.param(e, id=f"eta{e}") for e in ETAS])
@pytest.mark.parametrize("num", [pytest.param(n, id=f"N{n}") for n in (7, 500)])
def test_random_mask_follows_protocol(eta, num):
    mask = random_missing_mask(num, eta, np.random.default_rng(1))
    assert mask.shape == (num, 3) and mask.dtype == bool
    kept_per_utterance = mask.sum(1)
    assert kept_per_utterance.min() >= 1
    if eta == 0.0:
        assert mask.all()
    elif 1 - eta <= 1 / 3 + 1e-9:
        assert (kept_per_utterance == 1).all()
    else:
        # the closest achievable fraction: within 1 / (6 N), which is within 0.005 for N >= 34
        assert abs(mask.mean() - (1 - eta)) <= max(0.005, 1 / (6 * num)) + 1e-12


def test_random_mask_modalities_are_uniform():
    mask = random_missing_mask(30000, 0.5, 3)
    np.testing.assert_allclose(mask.mean(0), 0.5, atol=0.02)
    one = random_missing_mask(30000, 0.8, 3)
    np.testing.assert_allclose(one.mean(0), 1 / 3, atol=0.02)


def test_random_mask_is_seeded():
    assert np.array_equal(random_missing_mask(200, 0.4, 5), random_missing_mask(200, 0.4, 5))
    assert not np.array_equal(random_missing_mask(200, 0.4, 5), random_missing_mask(200, 0.4, 6))


@pytest.mark.parametrize(
    "eta, error, match",
    [
        pytest.param(1.0, ValueError, "eta", id="eta-one"),
        pytest.param(-0.1, ValueError, "eta", id="eta-negative"),
        pytest.param("0.5", TypeError, "eta", id="eta-string"),
    ],
)
def test_random_mask_rejects_bad_eta(eta, error, match):
    with pytest.raises(error, match=match):
        random_missing_mask(10, eta, 0)


def test_batch_mask_covers_valid_only():
    batch = _batch([5, 40, 17])
    mask = batch_missing_mask(batch, 0.3, 0)
    assert mask.shape == (3, 40, 3)
    assert not mask[~batch.valid].any()
    assert (mask[batch.valid].sum(-1) >= 1).all()
    assert abs(mask[batch.valid].float().mean().item() - 0.7) <= 1 / (6 * 62) + 1e-6


@pytest.mark.parametrize("condition", [pytest.param(c, id=c) for c in CONDITIONS])
def test_condition_mask(condition):
    batch = _batch([3, 6])
    mask = condition_mask(batch, condition)
    expected = torch.tensor([m in condition for m in "atv"])
    assert torch.equal(mask[batch.valid], expected.expand(9, 3))
    assert not mask[~batch.valid].any()
    applied = batch.with_present(mask)
    for i, m in enumerate("atv"):
        assert torch.equal(applied.features[m][~mask[..., i]], torch.zeros_like(applied.features[m][~mask[..., i]]))
        assert torch.equal(applied.features[m][mask[..., i]], batch.features[m][mask[..., i]])


def test_condition_mask_rejects_unknown():
    with pytest.raises(ValueError, match="condition"):
        condition_mask(_batch([3]), "ta")


def test_camhg_training_mask_statistics():
    batch = _batch([110] * 40)
    generator = torch.Generator().manual_seed(0)
    etas, text_gaps = [], []
    for _ in range(60):
        mask, eta = camhg_training_mask(batch, generator)
        valid = mask[batch.valid]
        assert (valid.sum(-1) >= 1).all() and not mask[~batch.valid].any()
        # text kept: not dropped (0.75) and (Bernoulli kept, or restored as 1 of 3 when all three failed)
        expected_text = 0.75 * ((1 - eta) + eta**3 / 3)
        text_gaps.append(valid[:, 1].float().mean().item() - expected_text)
        etas.append(eta)
    assert max(abs(g) for g in text_gaps) < 0.03
    assert 0.3 < np.mean(etas) < 0.7 and min(etas) < 0.2 and max(etas) > 0.8  # eta ~ U(0, 1) per batch
    # at eta -> 0 text is absent in ~25% of the utterances: the drop is independent of eta
    generator = torch.Generator().manual_seed(1)
    text_absent_at_low_eta = []
    for _ in range(200):
        mask, eta = camhg_training_mask(batch, generator)
        if eta < 0.05:
            text_absent_at_low_eta.append(1 - mask[batch.valid][:, 1].float().mean().item())
    assert text_absent_at_low_eta and all(abs(x - 0.25) < 0.05 for x in text_absent_at_low_eta)


def test_camhg_training_mask_is_seeded():
    batch = _batch([9, 4])
    first = camhg_training_mask(batch, torch.Generator().manual_seed(3))
    second = camhg_training_mask(batch, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    with pytest.raises(TypeError, match="generator"):
        camhg_training_mask(batch, 3)
