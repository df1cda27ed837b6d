"""The embedded dataset: deterministic, shaped like IEMOCAP/MOSI, and carrying its planted causal structure."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mer.data import DATASET_NAMES, Dialogue, collate_dialogues, load_dataset
from mer.embedded import RULES, generate_embedded

SMALL = dict(dims="small", num_dialogues=(12, 4, 5))


def _flat(dataset, modalities="atv"):
    features = np.concatenate([np.concatenate([d.features[m] for m in modalities], 1) for d in dataset])
    return features, np.concatenate([d.labels for d in dataset])


def test_identical_for_a_seed_different_across_seeds():
    first, second = load_dataset("embedded", seed=3, **SMALL), load_dataset("embedded", seed=3, **SMALL)
    other = load_dataset("embedded", seed=4, **SMALL)
    for split in ("train", "valid", "test"):
        a, b = getattr(first, split), getattr(second, split)
        assert [d.vid for d in a] == [d.vid for d in b]
        for x, y in zip(a, b):
            assert np.array_equal(x.labels, y.labels) and np.array_equal(x.speakers, y.speakers)
            assert all(np.array_equal(x.features[m], y.features[m]) for m in "atv")
    assert not np.array_equal(_flat(first.train)[0][:50], _flat(other.train)[0][:50])


def test_shapes_and_defaults():
    splits = load_dataset("embedded", seed=0, num_dialogues=(40, 2, 2))
    assert splits.info.dims == {"a": 512, "t": 1024, "v": 1024}
    assert splits.info.num_classes == 4 and splits.info.task == "classification"
    lengths = np.array([len(d) for d in splits.train])
    assert lengths.min() >= 8 and lengths.max() <= 110 and 35 <= lengths.mean() <= 65
    dialogue = splits.train[0]
    assert set(dialogue.speakers.tolist()) <= {0, 1} and dialogue.speakers.dtype == np.int64
    assert np.mean(dialogue.speakers[1:] != dialogue.speakers[:-1]) > 0.6  # alternating-ish
    assert all(dialogue.features[m].shape == (len(dialogue), splits.info.dims[m]) for m in "atv")
    assert all(dialogue.features[m].dtype == np.float32 for m in "atv")
    default = load_dataset("embedded", dims="small")
    assert (len(default.train), len(default.valid), len(default.test)) == (120, 30, 40)


def test_six_classes_and_sentiment():
    six = load_dataset("embedded6", **SMALL)
    assert six.info.class_names == ["hap", "sad", "neu", "ang", "exc", "fru"]
    assert set(_flat(six.train)[1]) == set(range(6))
    sentiment = load_dataset("embedded-sentiment", **SMALL)
    labels = _flat(sentiment.train)[1]
    assert sentiment.info.task == "regression" and labels.dtype == np.float32
    assert labels.min() >= -3 and labels.max() <= 3
    assert (labels == 0).any() and (labels > 0).any() and (labels < 0).any()


def test_planted_structure_oracle_beats_context_free():
    """A context-free logistic regression on one utterance's features scores measurably below one that also
    sees the latent cause emotion (the earlier turns' effect), and the text channel is the strongest."""
    splits, traces = generate_embedded("embedded", seed=0, dims="small", num_dialogues=(50, 20, 1))
    x_train, y_train = _flat(splits.train)
    x_valid, y_valid = _flat(splits.valid)

    def cause(split):
        return np.eye(4)[np.concatenate([t.cause for t in traces[split]])]

    context_free = LogisticRegression(max_iter=300).fit(x_train, y_train).score(x_valid, y_valid)
    oracle = (
        LogisticRegression(max_iter=300)
        .fit(np.hstack([x_train, 3 * cause("train")]), y_train)
        .score(np.hstack([x_valid, 3 * cause("valid")]), y_valid)
    )
    assert 0.45 < context_free < oracle - 0.15, (context_free, oracle)
    single = {
        m: LogisticRegression(max_iter=300).fit(*_flat(splits.train, m)).score(*_flat(splits.valid, m))
        for m in "atv"
    }
    assert single["t"] > max(single["a"], single["v"]), single


def test_causes_come_from_earlier_turns():
    _, traces = generate_embedded("embedded", seed=1, **SMALL)
    rules = np.concatenate([t.rule for t in traces["train"]])
    assert set(rules.tolist()) == set(range(len(RULES)))
    assert np.mean(rules == RULES.index("drift")) < 0.3  # most causes are predictable from context
    triggers = np.concatenate([t.trigger for t in traces["train"]])
    assert 0.05 < np.mean(triggers >= 0) < 0.25


def test_spurious_feature_reverses_under_shift():
    splits, traces = generate_embedded("embedded", seed=2, **SMALL)
    for split, shifted in (("train", False), ("valid", False), ("test", True)):
        labels = _flat(getattr(splits, split))[1]
        spurious = np.concatenate([t.spurious for t in traces[split]])
        target = (labels + 1) % 4 if shifted else labels
        assert np.mean(spurious == target) > 0.6, split
    iid, _ = generate_embedded("embedded", seed=2, shift=False, **SMALL)
    assert np.array_equal(_flat(iid.train)[0], _flat(splits.train)[0])  # shift changes only the test split


def test_collate_and_with_present():
    dialogues = list(load_dataset("embedded", **SMALL).train)[:3]
    batch = collate_dialogues(dialogues)
    lengths = [len(d) for d in dialogues]
    assert batch.lengths.tolist() == lengths and batch.max_len == max(lengths) and batch.batch_size == 3
    assert torch.equal(batch.present, batch.valid[..., None].expand(-1, -1, 3))
    for b, d in enumerate(dialogues):
        assert torch.equal(batch.features["t"][b, : len(d)], torch.from_numpy(d.features["t"]))
        assert (batch.features["t"][b, len(d):] == 0).all() and (batch.labels[b, len(d):] == -1).all()
    present = torch.ones(3, batch.max_len, 3, dtype=torch.bool)
    present[..., 0] = False
    hidden = batch.with_present(present)
    assert (hidden.features["a"] == 0).all() and torch.equal(hidden.present, present & batch.valid[..., None])
    assert torch.equal(hidden.features["v"], batch.features["v"]) and (batch.features["a"] != 0).any()
    with pytest.raises(ValueError, match="present"):
        batch.with_present(present[:, :-1])
    assert batch.to("cpu").vids == batch.vids


def test_collate_regression_pads_with_zero():
    dialogues = [Dialogue(f"d{n}", {m: np.ones((n, 2), np.float32) for m in "atv"}, np.zeros(n, np.int64),
                          np.full(n, -1.5, np.float32)) for n in (2, 4)]
    batch = collate_dialogues(dialogues)
    assert batch.labels.dtype == torch.float32 and batch.labels[0].tolist() == [-1.5, -1.5, 0.0, 0.0]


@pytest.mark.parametrize(
    "options, error, match",
    [
        pytest.param(dict(dims="tiny"), ValueError, "dims", id="dims"),
        pytest.param(dict(num_dialogues=(1, 2)), ValueError, "num_dialogues", id="num-dialogues"),
        pytest.param(dict(trigger_ratee=0.1), TypeError, "trigger_ratee", id="unknown-option"),
        pytest.param(dict(data_root="/tmp"), ValueError, "data_root", id="data-root"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        load_dataset("embedded", **options)


def test_dataset_names():
    embedded = {"embedded", "embedded6", "embedded-sentiment"}
    assert set(DATASET_NAMES) == embedded | {"iemocap4", "iemocap6", "mosi", "mosei"}
