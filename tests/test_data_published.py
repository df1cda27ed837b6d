"""Readers of the published features, on tiny files written in exactly the published layout."""
import pickle
import struct

import numpy as np
import pytest

from mer.data import load_dataset
from mer.published import DEFAULT_FEATURES

DIMS = {"a": 5, "t": 7, "v": 3}


def _write_features(root, utterances, rng, face_folders=False, speakers=None):
    """One .npy per utterance: [D] for audio, [1, D] for text, [T, D] (or a face folder) for video."""
    arrays = {}
    for m, name in DEFAULT_FEATURES.items():
        directory = root / "features" / name
        directory.mkdir(parents=True, exist_ok=True)
        for u in utterances:
            if m == "a":
                value = rng.standard_normal(DIMS[m])
            elif m == "t":
                value = rng.standard_normal((1, DIMS[m]))
            elif face_folders:
                (directory / u).mkdir()
                faces = {s: rng.standard_normal((4, DIMS[m])) for s in "FM"}
                for s, face in faces.items():
                    np.save(directory / u / f"compress_{s}.npy", face)
                arrays[(m, u)] = faces[speakers[u]].mean(0)
                continue
            else:
                value = rng.standard_normal((3, DIMS[m]))
            np.save(directory / f"{u}.npy", value.astype(np.float64))
            arrays[(m, u)] = value.reshape(-1, DIMS[m]).mean(0)
    return arrays


def _write_iemocap(root, ways=4):
    rng = np.random.default_rng(0)
    vids = {f"Ses0{s}{g}_impro0{k}": None for s in (1, 2, 3, 4, 5) for g in "FM" for k in (1, 2)}
    video_ids, labels, speakers = {}, {}, {}
    for i, vid in enumerate(vids):
        n = 3 + i % 4
        video_ids[vid] = [f"{vid}_{'FM'[j % 2]}{j:03d}" for j in range(n)]
        labels[vid] = [int(x) for x in rng.integers(0, ways, n)]
        speakers[vid] = ["FM"[(j + i) % 2] for j in range(n)]
    sentences = {vid: ["hello"] * len(u) for vid, u in video_ids.items()}
    train = {v for v in vids if v[4] != "5"}
    test = {v for v in vids if v[4] == "5"}
    with open(root / f"IEMOCAP_features_raw_{ways}way.pkl", "wb") as handle:
        pickle.dump([video_ids, labels, speakers, sentences, train, test], handle, protocol=2)
    speaker_of = {u: s for vid in vids for u, s in zip(video_ids[vid], speakers[vid])}
    arrays = _write_features(root, list(speaker_of), rng, face_folders=True, speakers=speaker_of)
    return video_ids, labels, speakers, arrays


def _write_mosi(root, name="CMUMOSI"):
    rng = np.random.default_rng(1)
    video_ids = {f"vid{i}": [f"vid{i}_{j}" for j in range(2 + i)] for i in range(6)}
    labels = {vid: [float(x) for x in np.round(rng.uniform(-3, 3, len(u)), 1)] for vid, u in video_ids.items()}
    labels["vid0"][0] = 0.0  # a zero sentiment label
    speakers = {vid: [""] * len(u) for vid, u in video_ids.items()}
    sentences = {vid: ["x"] * len(u) for vid, u in video_ids.items()}
    splits = [{"vid0", "vid1", "vid2"}, {"vid3"}, {"vid4", "vid5"}]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}_features_raw_2way.pkl", "wb") as handle:
        pickle.dump([video_ids, labels, speakers, sentences, *splits], handle, protocol=2)
    arrays = _write_features(root, [u for us in video_ids.values() for u in us], rng)
    return video_ids, labels, arrays


def test_iemocap_session5_split_and_faces(tmp_path):
    video_ids, labels, speakers, arrays = _write_iemocap(tmp_path)
    splits = load_dataset("iemocap4", tmp_path, valid_fraction=0.0)
    assert splits.valid is None
    assert {d.vid[4] for d in splits.test} == {"5"} and "5" not in {d.vid[4] for d in splits.train}
    assert splits.info.task == "classification" and splits.info.num_classes == 4 and splits.info.dims == DIMS
    dialogue = splits.test[0]
    assert dialogue.labels.tolist() == labels[dialogue.vid] and dialogue.labels.dtype == np.int64
    assert dialogue.speakers.tolist() == [{"F": 0, "M": 1}[s] for s in speakers[dialogue.vid]]
    for j, u in enumerate(video_ids[dialogue.vid]):
        for m in "atv":
            assert dialogue.features[m].dtype == np.float32
            np.testing.assert_allclose(dialogue.features[m][j], arrays[(m, u)], rtol=1e-6)


@pytest.mark.parametrize("fold", [pytest.param(k, id=f"fold{k}") for k in (1, 3)])
def test_iemocap_leave_one_session_out(tmp_path, fold):
    _write_iemocap(tmp_path, ways=6)
    splits = load_dataset("iemocap6", tmp_path, fold=fold, valid_fraction=0.25, seed=2)
    assert {d.vid[4] for d in splits.test} == {str(fold)}
    train_sessions = {d.vid[4] for d in splits.train} | {d.vid[4] for d in splits.valid}
    assert str(fold) not in train_sessions and len(train_sessions) == 4
    assert len(splits.valid) == 4 and len(splits.train) == 12  # 25% of the 16 training dialogues
    assert splits.info.class_names == ["hap", "sad", "neu", "ang", "exc", "fru"]


def test_mosi_splits_and_zero_label(tmp_path):
    video_ids, labels, arrays = _write_mosi(tmp_path / "CMUMOSI")  # the GCNet folder under data_root
    splits = load_dataset("mosi", tmp_path)
    assert [d.vid for d in splits.train] == ["vid0", "vid1", "vid2"]
    assert [d.vid for d in splits.valid] == ["vid3"] and [d.vid for d in splits.test] == ["vid4", "vid5"]
    assert splits.info.task == "regression" and splits.info.num_classes == 1
    first = splits.train[0]
    assert first.labels.dtype == np.float32 and first.labels[0] == 0.0
    np.testing.assert_allclose(first.labels, labels["vid0"], rtol=1e-6)
    assert first.speakers.tolist() == [0, 0]
    np.testing.assert_allclose(first.features["v"][1], arrays[("v", "vid0_1")], rtol=1e-6)


def test_feature_names_are_overridable(tmp_path):
    _write_mosi(tmp_path, name="CMUMOSEI")
    (tmp_path / "features" / DEFAULT_FEATURES["t"]).rename(tmp_path / "features" / "my-text")
    splits = load_dataset("mosei", tmp_path, features={"t": "my-text"})
    assert splits.info.dims["t"] == DIMS["t"]


def test_missing_feature_names_utterance_and_path(tmp_path):
    _write_mosi(tmp_path)
    path = tmp_path / "features" / DEFAULT_FEATURES["a"] / "vid3_1.npy"
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"vid3_1.*vid3_1\.npy"):
        load_dataset("mosi", tmp_path)


def test_malformed_feature_names_utterance_and_path(tmp_path):
    _write_mosi(tmp_path)
    path = tmp_path / "features" / DEFAULT_FEATURES["v"] / "vid2_0.npy"
    np.save(path, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"vid2_0.*vid2_0\.npy.*\[T, D\]"):
        load_dataset("mosi", tmp_path)
    path.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match=r"vid2_0.*cannot read"):
        load_dataset("mosi", tmp_path)


def test_missing_face_of_speaker(tmp_path):
    video_ids, _, speakers, _ = _write_iemocap(tmp_path)
    u, s = video_ids["Ses02F_impro01"][0], speakers["Ses02F_impro01"][0]
    (tmp_path / "features" / DEFAULT_FEATURES["v"] / u / f"compress_{s}.npy").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{u}.*compress_{s}\.npy"):
        load_dataset("iemocap4", tmp_path)


def test_wrong_label_file_layout(tmp_path):
    with open(tmp_path / "CMUMOSI_features_raw_2way.pkl", "wb") as handle:
        pickle.dump({"videoIDs": {}}, handle)
    with pytest.raises(ValueError, match=r"expected a list \[videoIDs, .*valVids"):
        load_dataset("mosi", tmp_path)


def test_bad_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="IEMOCAP_features_raw_4way.pkl"):
        load_dataset("iemocap4", tmp_path)
    with pytest.raises(ValueError, match="fold"):
        load_dataset("mosi", tmp_path, fold=1)
    with pytest.raises(ValueError, match="data_root"):
        load_dataset("mosi")
    with pytest.raises(ValueError, match="name"):
        load_dataset("meld", tmp_path)


# ------------------------------------------------------------------------------------- label pickles run no code
class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2 with numpy 1.x wrote: 8-bit strings (BINSTRING) for str and bytes, ``__builtin__``
    (protocol 2's import mapping) and ``numpy.core`` (rewritten after pickling by ``_python2_pickle``)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_8bit_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = _save_8bit_string


def _python2_pickle(content, path):
    with open(path, "wb") as handle:
        _Python2Pickler(handle, protocol=2).dump(content)
    data = path.read_bytes()
    assert b"numpy._core." in data  # the numpy 2 names that numpy 1.x wrote as numpy.core
    path.write_bytes(data.replace(b"cnumpy._core.", b"cnumpy.core."))


@pytest.mark.parametrize("style", ["protocol2", "protocol4", "protocol5", "python2-numpy1"])
def test_label_file_with_numpy_values_loads(tmp_path, style):
    video_ids, labels, speakers, _ = _write_iemocap(tmp_path)
    vids = sorted(video_ids)
    numpy_labels = {vid: np.asarray(labels[vid], dtype=np.int64) if i % 2 else [np.int64(x) for x in labels[vid]]
                    for i, vid in enumerate(vids)}  # arrays and numpy scalars
    numpy_speakers = {vid: np.asarray(speakers[vid]) for vid in vids}
    sentences = {vid: np.asarray(["hello"] * len(video_ids[vid]), dtype=object) for vid in vids}
    content = [video_ids, numpy_labels, numpy_speakers, sentences, {v for v in vids if v[4] != "5"},
               frozenset(v for v in vids if v[4] == "5")]
    path = tmp_path / "IEMOCAP_features_raw_4way.pkl"
    if style == "python2-numpy1":
        _python2_pickle(content, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(content, handle, protocol=int(style[-1]))
    splits = load_dataset("iemocap4", tmp_path, valid_fraction=0.0)
    for dialogue in [*splits.train, *splits.test]:
        assert dialogue.labels.tolist() == labels[dialogue.vid]
        assert dialogue.speakers.tolist() == [{"F": 0, "M": 1}[s] for s in speakers[dialogue.vid]]
