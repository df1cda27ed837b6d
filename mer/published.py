"""Readers of the published utterance features that GCNet, MoMKE, SDR-GNN and FedDISC use.

Layout under ``data_root``, or under one of its GCNet folders: ``IEMOCAP`` (GCNet's ``dataset/IEMOCAP/`` holds both
IEMOCAP label files), ``IEMOCAPFour``, ``IEMOCAPSix``, ``CMUMOSI``, ``CMUMOSEI``; so ``data_root`` may be GCNet's
``dataset/`` folder itself:

- label file, a pickle written by Python 2 (read with ``encoding="latin1"``) through a restricted unpickler that
  builds only what such a file holds (builtin containers and scalars, numpy arrays, scalars and dtypes, as numpy
  1.x and 2.x name them) and refuses any other type, naming it, so that a crafted file cannot run code:
  ``IEMOCAP_features_raw_{4,6}way.pkl``: ``[videoIDs, videoLabels, videoSpeakers, videoSentences, trainVid,
  testVid]``; ``CMUMOSI_features_raw_2way.pkl`` / ``CMUMOSEI_features_raw_2way.pkl``: ``[videoIDs, videoLabels,
  videoSpeakers, videoSentences, trainVids, valVids, testVids]``. Dicts keyed by dialogue id; ``videoIDs[vid]``
  lists the utterance ids in order; labels are class ids (IEMOCAP-6: hap 0, sad 1, neu 2, ang 3, exc 4, fru 5;
  IEMOCAP-4: happy 0, sad 1, neutral 2, angry 3, where GCNet's 4-way file has merged excited into happy and left out
  frustrated and the other classes) or float sentiment in [-3, 3]; speakers 'F'/'M' (IEMOCAP) or '' (MOSI/MOSEI);
  splits are Python sets.
- features: ``features/<name>/<utt_id>.npy`` per utterance, shape [D], [1, D] or [T, D] (averaged over T), cast to
  float32. IEMOCAP video may instead be a folder ``features/<name>/<utt_id>/`` holding ``compress_F.npy`` and
  ``compress_M.npy`` (the two actors' faces); the utterance's speaker's one is used. Default names
  :data:`DEFAULT_FEATURES`, overridable per modality.

Splits. IEMOCAP: by default Session 5 is the test set (the label file's ``testVid``); ``fold=k`` (1-5) gives the
leave-one-session-out protocol instead (session = 5th character of the dialogue id, session k held out as test).
Either way the valid split is a seeded ``valid_fraction`` of the *training* dialogues (default 0.1; 0 gives no
valid split, ``None`` in :class:`~mer.data.DatasetSplits`), never the test session. MOSI/MOSEI: the file's
train / val / test.

Every feature file is read and checked before anything is returned: a missing or malformed file raises
``FileNotFoundError`` / ``ValueError`` naming the utterance id and the path.
"""
from __future__ import annotations

import builtins
import codecs
import pickle
from pathlib import Path

import numpy as np

from mer.dialogues import MODALITIES, DatasetInfo, DatasetSplits, Dialogue, DialogueDataset

DEFAULT_FEATURES = {"a": "wav2vec-large-c-UTT", "t": "deberta-large-4-UTT", "v": "manet_UTT"}

_IEMOCAP_LAYOUT = "[videoIDs, videoLabels, videoSpeakers, videoSentences, trainVid, testVid]"
_CMU_LAYOUT = "[videoIDs, videoLabels, videoSpeakers, videoSentences, trainVids, valVids, testVids]"

# name -> (label file, the folders under data_root it may be in, class names or None for sentiment);
# IEMOCAP-4's "happy" includes excited (merged in GCNet's 4-way label file)
_DATASETS = {
    "iemocap4": ("IEMOCAP_features_raw_4way.pkl", ("IEMOCAP", "IEMOCAPFour"), ["happy", "sad", "neutral", "angry"]),
    "iemocap6": ("IEMOCAP_features_raw_6way.pkl", ("IEMOCAP", "IEMOCAPSix"),
                 ["hap", "sad", "neu", "ang", "exc", "fru"]),
    "mosi": ("CMUMOSI_features_raw_2way.pkl", ("CMUMOSI",), None),
    "mosei": ("CMUMOSEI_features_raw_2way.pkl", ("CMUMOSEI",), None),
}
_SPEAKER_IDS = {"F": 0, "M": 1}


def _find_root(name: str, data_root: Path) -> Path:
    label_file, folders, _ = _DATASETS[name]
    roots = [data_root] + [data_root / folder for folder in folders]
    for root in roots:
        if (root / label_file).is_file():
            return root
    raise FileNotFoundError(
        f"no {label_file} for dataset {name!r} in {', '.join(map(str, roots))}; expected the label file in one of "
        f"them and the features under features/<name>/ beside it"
    )


def _read_label_file(path: Path, iemocap: bool):
    """The label pickle's parts, checked against the layout."""
    layout = _IEMOCAP_LAYOUT if iemocap else _CMU_LAYOUT
    try:
        with open(path, "rb") as handle:
            content = _LabelFileUnpickler(handle, encoding="latin1").load()
    except Exception as error:  # any unpickling failure means the same thing to the user
        raise ValueError(f"{path} is not a readable label pickle ({error}); expected a list {layout}") from error
    expected_parts = 6 if iemocap else 7
    if not isinstance(content, (list, tuple)) or len(content) != expected_parts:
        found = f"a {type(content).__name__}" + (f" of {len(content)} items" if hasattr(content, "__len__") else "")
        raise ValueError(f"{path} holds {found}; expected a list {layout}")
    dicts, splits = content[:4], content[4:]
    sets_ok = all(isinstance(s, (set, frozenset, list)) for s in splits)
    if not all(isinstance(part, dict) for part in dicts) or not sets_ok:
        raise ValueError(f"{path}: expected four dicts keyed by dialogue id, then split sets: {layout}")
    return dicts, [set(s) for s in splits]


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, for latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}: only latin-1 builds bytes")
    return codecs.encode(text, "latin-1")


def _label_file_globals() -> dict:
    """(module, name) -> object: every global a GCNet label file may name, under Python 2 and 3, numpy 1.x and 2.x."""
    try:  # numpy 2 (numpy 1.26 has the aliases too)
        from numpy._core import multiarray, numeric
    except ImportError:  # older numpy
        from numpy.core import multiarray, numeric
    names = ("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str", "bytes",
             "bytearray")
    allowed = {(module, name): getattr(builtins, name) for module in ("builtins", "__builtin__") for name in names}
    allowed.update({("__builtin__", "long"): int, ("__builtin__", "unicode"): str, ("_codecs", "encode"): _latin1_encode,
                    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype})
    for prefix in ("numpy.core", "numpy._core"):  # numpy 1.x writes numpy.core, numpy 2.x numpy._core
        allowed.update({(f"{prefix}.multiarray", "_reconstruct"): multiarray._reconstruct,
                        (f"{prefix}.multiarray", "scalar"): multiarray.scalar,
                        (f"{prefix}.numeric", "_frombuffer"): numeric._frombuffer})
    return allowed


class _LabelFileUnpickler(pickle.Unpickler):
    """Builds only the globals of ``_label_file_globals()``; any other raises ``UnpicklingError`` naming it."""

    allowed = _label_file_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which a GCNet label file never holds: refused, since building it "
                f"could run code"
            ) from None


def _read_feature(path: Path, utterance: str, speaker: str) -> np.ndarray:
    """One utterance's feature vector [D] from a .npy file or an IEMOCAP face folder."""
    folder = path.with_suffix("")
    if not path.is_file() and folder.is_dir():
        if speaker not in _SPEAKER_IDS:
            raise ValueError(f"utterance {utterance}: face folder {folder} needs speaker 'F' or 'M', got {speaker!r}")
        path = folder / f"compress_{speaker}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"utterance {utterance}: feature file {path} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ValueError(f"utterance {utterance}: cannot read {path} as .npy ({error})") from error
    if array.ndim == 2:
        if array.shape[0] == 0:
            raise ValueError(f"utterance {utterance}: {path} has no frames (shape {array.shape})")
        array = array.mean(axis=0)
    if array.ndim != 1 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"utterance {utterance}: {path} has shape {array.shape} ({array.dtype}); expected [D], [1, D] or [T, D]"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"utterance {utterance}: {path} holds non-finite values")
    return array.astype(np.float32)


def _speaker_ids(vid: str, speakers) -> np.ndarray:
    """'F'/'M' -> 0/1 (IEMOCAP); otherwise ids in order of first appearance ('' for MOSI/MOSEI -> 0)."""
    speakers = list(speakers)
    if all(s in _SPEAKER_IDS for s in speakers):
        return np.array([_SPEAKER_IDS[s] for s in speakers], dtype=np.int64)
    order = list(dict.fromkeys(speakers))
    if len(order) > 2:
        raise ValueError(f"dialogue {vid}: expected at most two speakers, got {order}")
    return np.array([order.index(s) for s in speakers], dtype=np.int64)


def load_published(
    name: str,
    data_root,
    *,
    seed: int = 0,
    features: dict[str, str] | None = None,
    fold: int | None = None,
    valid_fraction: float | None = None,
) -> DatasetSplits:
    """The splits of published dataset ``name`` ("iemocap4", "iemocap6", "mosi", "mosei") under ``data_root``.

    IEMOCAP-4 has the classes happy (with excited merged into it), sad, neutral and angry; IEMOCAP-6 keeps hap, sad,
    neu, ang, exc, fru apart. ``data_root`` holds the label file, or a GCNet folder does (``IEMOCAP/`` for both
    IEMOCAP variants, ``IEMOCAPFour/``, ``IEMOCAPSix/``, ``CMUMOSI/``, ``CMUMOSEI/``).

    features: modality -> feature folder name, overriding :data:`DEFAULT_FEATURES` per modality;
    fold: 1-5 for IEMOCAP leave-one-session-out (session ``fold`` is the test set), None for the Session-5 split;
    valid_fraction: IEMOCAP only, the share of training dialogues drawn (with ``seed``) as valid (default 0.1).
    """
    if name not in _DATASETS:
        raise ValueError(f"name must be one of {list(_DATASETS)}, got {name!r}")
    if data_root is None:
        raise ValueError(f"data_root is required for the published dataset {name!r}")
    iemocap = name.startswith("iemocap")
    if not iemocap and (fold is not None or valid_fraction is not None):
        raise ValueError(f"fold and valid_fraction apply to IEMOCAP only; {name} has fixed train/val/test sets")
    if fold is not None and fold not in (1, 2, 3, 4, 5):
        raise ValueError(f"fold must be 1-5 (the held-out IEMOCAP session) or None, got {fold!r}")
    valid_fraction = 0.1 if valid_fraction is None else float(valid_fraction)
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    unknown = set(features or {}) - set(MODALITIES)
    if unknown:
        raise ValueError(f"features keys must be modalities {MODALITIES}, got {sorted(unknown)}")
    feature_names = {**DEFAULT_FEATURES, **(features or {})}

    root = _find_root(name, Path(data_root))
    label_file, _, class_names = _DATASETS[name]
    (video_ids, video_labels, video_speakers, _), split_sets = _read_label_file(root / label_file, iemocap)

    dialogues = {}
    for vid in sorted(video_ids):
        utterances = list(video_ids[vid])
        raw_speakers = list(video_speakers[vid])
        labels = np.asarray(video_labels[vid], dtype=np.int64 if iemocap else np.float32)
        if not (len(utterances) == len(raw_speakers) == len(labels)) or not utterances:
            raise ValueError(
                f"dialogue {vid}: {len(utterances)} utterance ids, {len(labels)} labels and {len(raw_speakers)} "
                f"speakers in {root / label_file}; they must be equal and non-zero"
            )
        dialogue_features = {}
        for m in MODALITIES:
            directory = root / "features" / feature_names[m]
            vectors = [_read_feature(directory / f"{u}.npy", u, s) for u, s in zip(utterances, raw_speakers)]
            sizes = {v.shape[0] for v in vectors}
            if len(sizes) != 1:
                raise ValueError(f"dialogue {vid}: features in {directory} have different sizes {sorted(sizes)}")
            dialogue_features[m] = np.stack(vectors)
        dialogues[vid] = Dialogue(vid, dialogue_features, _speaker_ids(vid, raw_speakers), labels)

    dims = {m: next(iter(dialogues.values())).features[m].shape[1] for m in MODALITIES}
    for vid, dialogue in dialogues.items():
        for m in MODALITIES:
            if dialogue.features[m].shape[1] != dims[m]:
                size = dialogue.features[m].shape[1]
                raise ValueError(f"dialogue {vid}: modality {m} has size {size}, other dialogues {dims[m]}")
    if class_names is None:
        info = DatasetInfo(name, "regression", 1, ["sentiment"], dims)
    else:
        info = DatasetInfo(name, "classification", len(class_names), class_names, dims)
        for vid, dialogue in dialogues.items():
            if dialogue.labels.min() < 0 or dialogue.labels.max() >= len(class_names):
                raise ValueError(
                    f"dialogue {vid}: labels must be class ids in [0, {len(class_names)}), got {dialogue.labels}"
                )

    if iemocap:
        train_ids, valid_ids, test_ids = _iemocap_split(sorted(dialogues), split_sets, fold, valid_fraction, seed)
    else:
        train_ids, valid_ids, test_ids = (sorted(s) for s in split_sets)
    named = {"train": set(train_ids), "valid": set(valid_ids), "test": set(test_ids)}
    for first, second in (("train", "valid"), ("train", "test"), ("valid", "test")):
        shared = sorted(named[first] & named[second])
        if shared:
            raise ValueError(f"the {first} and {second} splits of {root / label_file} share dialogues: {shared[:5]}")
    for split, ids in (("train", train_ids), ("valid", valid_ids), ("test", test_ids)):
        missing = [vid for vid in ids if vid not in dialogues]
        if missing:
            raise ValueError(f"{split} split lists dialogues absent from videoIDs: {missing[:5]}")
        if not ids and split != "valid":
            raise ValueError(f"the {split} split of {root / label_file} is empty")

    def dataset(ids):
        return DialogueDataset([dialogues[vid] for vid in ids], info)

    valid = dataset(valid_ids) if valid_ids else None
    return DatasetSplits(dataset(train_ids), valid, dataset(test_ids), info)


def _iemocap_split(vids: list[str], split_sets, fold, valid_fraction: float, seed: int):
    """(train, valid, test) dialogue ids: Session 5 from the file, or session ``fold`` held out."""
    if fold is None:
        train_set, test_set = split_sets
        train, test = sorted(train_set), sorted(test_set)
    else:
        test = [vid for vid in vids if vid[4:5] == str(fold)]
        train = [vid for vid in vids if vid[4:5] != str(fold)]
        if not test:
            raise ValueError(f"fold {fold}: no dialogue id has session {fold} as its 5th character")
    num_valid = int(round(valid_fraction * len(train)))
    chosen = set(np.random.default_rng(seed).choice(len(train), size=num_valid, replace=False).tolist())
    valid = [vid for i, vid in enumerate(train) if i in chosen]
    train = [vid for i, vid in enumerate(train) if i not in chosen]
    return train, valid, test
