"""Predictions of a trained CARN or CaM-HG on a user's own conversations: the input format, the output rows, the
``predict`` command line both models share (``python -m carn.predict`` / ``python -m camhg.predict``).

    python -m camhg.predict RUN_DIR talk.npz other.npz --out predictions.csv
    python -m camhg.predict RUN_DIR GCNET_DATASET_FOLDER --format json --out predictions.json
    feature-extractor | python -m camhg.predict RUN_DIR --stream

Input, one conversation per ``.npz`` file (read with ``allow_pickle=False``), L utterances:

- ``audio``, ``text``, ``video``: float arrays (L, d_m) at the feature sizes the run was trained on; a modality
  left out is missing for the whole conversation;
- ``present`` (optional): (L, 3) bool, modality m (order audio, text, video) missing at utterance t where False;
  every utterance needs one modality present; a modality left out must be False throughout;
- ``speakers`` (optional, default 0): (L,) integer speaker ids in {0, 1};
- ``labels`` (optional): (L,) class ids, or sentiment scores, shown as ``true_label`` next to the predictions.

A folder in the GCNet layout (:mod:`mer.published`: a label file and ``features/``) predicts every conversation in it
(all splits), with the dataset's labels as ``true_label``. The conversation id is the file's stem, or the dataset's
dialogue id.

Output, one row per utterance (CSV columns / JSON fields): ``conversation``, ``utterance`` (index from 0), ``label``
(the predicted label's name), ``probabilities`` (label name -> probability; a JSON object in the CSV cell) or,
for a sentiment-score model, ``score`` (its label is ``positive`` when the score is > 0, else ``negative``),
``present`` (the letters of the modalities seen: ``a``, ``t``, ``v``), and ``true_label`` when the input has labels.
The file is written to a temporary file beside ``--out`` and renamed at the end: an error or Ctrl-C leaves no
partial file. Without ``--out`` the rows go to standard output.

``--stream``: one utterance per line of standard input as JSON, ``{"conversation": ..., "audio": [...], "text":
[...], "video": [...], "speaker": 0, "label": ...}`` (modalities, speaker and label optional); each line is
answered at once by one JSON line with the fields above (``utterance`` counts the conversation's lines), flushed,
so the command can sit in a pipe behind a feature extractor. A malformed line gets ``{"error": ...}`` and the
stream goes on. Conversations may interleave; each keeps its own state (:mod:`mer.streaming`).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TextIO

import numpy as np
import torch

from mer.cli import UserError, checkpoint_of, device_name, new_parser
from mer.dialogues import MODALITIES
from mer.training import CheckpointError, load_checkpoint

MODALITY_NAMES = {"a": "audio", "t": "text", "v": "video"}  # the input arrays' names
NUM_SPEAKERS = 2
FORMATS = ("csv", "json")
NPZ_ARRAYS = (*MODALITY_NAMES.values(), "present", "speakers", "labels")


@dataclass
class Conversation:
    """One conversation to predict: L utterances.

    features: modality -> (L, d_m) float32, zero where absent; present: (L, 3) bool; speakers: (L,) int64;
    labels: (L,) class ids or scores, or None; label_names: the names of class ids in ``labels`` (None: the run's).
    """

    name: str
    features: dict[str, np.ndarray]
    present: np.ndarray
    speakers: np.ndarray
    labels: Optional[np.ndarray] = None
    label_names: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.present)


@dataclass
class RunModel:
    """A trained model as the prediction commands use it.

    outputs(features {m: (B, L, d_m)}, present (B, L, 3), speakers (B, L), valid (B, L)) -> (B, L, C) logits, or
    (B, L) scores when ``predicts_score``; ``class_names`` name the C outputs; ``stream(batch_size)`` a streaming
    state (:class:`mer.streaming.ModelStream`).
    """

    name: str
    model: torch.nn.Module
    dims: dict[str, int]
    task: str  # "classification" or "regression" (sentiment), the training data's
    class_names: list[str]
    predicts_score: bool
    outputs: Callable[..., torch.Tensor]
    device: torch.device

    def __post_init__(self):
        self.device = torch.device(self.device)

    def stream(self, batch_size: int = 1):
        return self.model.stream(batch_size)


def load_trained(path, device, build: Callable, trainer: str):
    """``(state, build(state, device))`` for the checkpoint of run folder or file ``path`` (:func:`mer.cli.checkpoint_of`),
    loaded without running code; a file that does not load, or loads but builds no model of ``trainer`` (the
    command that writes such checkpoints, e.g. ``carn.train``), is a :class:`mer.cli.UserError` naming it."""
    path = checkpoint_of(Path(path))
    try:
        state = load_checkpoint(path)
        return state, build(state, torch.device(device))
    except CheckpointError as error:
        raise UserError(str(error)) from None
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # it loads, but builds no such model
        raise UserError(f"{path} is not a usable {trainer} checkpoint: {error}") from None


def output_names(task: str, num_outputs: int, dataset: str) -> list[str]:
    """Names of the outputs of a model trained on ``dataset`` (a name of ``mer.data.DATASET_NAMES``): its classes,
    ``negative``/``positive`` for the sentiment sign classifier, ``score`` for the sentiment regressor."""
    from mer.embedded import _EMOTIONS_4, _EMOTIONS_6
    from mer.published import _DATASETS

    if task == "regression":
        return ["negative", "positive"] if num_outputs == 2 else ["score"]
    if dataset in _DATASETS:
        return list(_DATASETS[dataset][2])
    return [emotion[0] for emotion in (_EMOTIONS_6 if dataset == "embedded6" else _EMOTIONS_4)]


# ----------------------------------------------------------------------------------------------------- reading
def _finite(name: str, array: np.ndarray, where: str, kind: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        utterance = int(np.argwhere(bad)[0][0])
        raise UserError(f"{where}: {kind} {name!r} holds NaN or inf values (utterance {utterance})")


def conversation_from_arrays(arrays: dict, dims: dict[str, int], name: str, where: str,
                             kind: str = "array") -> Conversation:
    """A :class:`Conversation` from named arrays (the .npz layout above); ``where`` names the source and ``kind``
    what holds the arrays (``array``, ``field``) in the errors (UserError naming the array)."""
    unknown = sorted(set(arrays) - set(NPZ_ARRAYS))
    if unknown:
        raise UserError(f"{where}: unknown {kind} {unknown[0]!r} (expected some of {', '.join(NPZ_ARRAYS)})")
    given = [m for m in MODALITIES if MODALITY_NAMES[m] in arrays]
    if not given:
        raise UserError(f"{where}: no modality array (expected at least one of audio, text, video)")
    lengths = {}
    features = {}
    for m in given:
        key = MODALITY_NAMES[m]
        x = np.asarray(arrays[key])
        if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise UserError(f"{where}: {kind} {key!r} has shape {x.shape} ({x.dtype}); expected numbers of shape "
                            f"(L, {dims[m]})")
        if x.shape[1] != dims[m]:
            raise UserError(f"{where}: {kind} {key!r} has {x.shape[1]} features per utterance; the run was trained "
                            f"on {dims[m]} (shape (L, {dims[m]}))")
        _finite(key, x, where, kind)
        lengths[key] = x.shape[0]
        features[m] = x.astype(np.float32)
    if len(set(lengths.values())) != 1:
        raise UserError(f"{where}: the modality arrays have different numbers of utterances {lengths}")
    length = next(iter(lengths.values()))
    if length == 0:
        raise UserError(f"{where}: {kind} {MODALITY_NAMES[given[0]]!r} is an empty conversation (0 utterances)")
    observed = np.array([m in features for m in MODALITIES])
    if "present" in arrays:
        present = np.asarray(arrays["present"])
        if present.dtype != np.bool_ or present.shape != (length, len(MODALITIES)):
            raise UserError(f"{where}: {kind} 'present' has shape {present.shape} ({present.dtype}); expected bool "
                            f"of shape ({length}, 3)")
        if (present & ~observed).any():
            m = MODALITIES[int(np.argwhere((present & ~observed).any(axis=0))[0][0])]
            raise UserError(f"{where}: {kind} 'present' marks {MODALITY_NAMES[m]} present, but there is no "
                            f"{MODALITY_NAMES[m]!r} array")
    else:
        present = np.broadcast_to(observed, (length, len(MODALITIES))).copy()
    if not present.any(axis=1).all():
        utterance = int(np.argwhere(~present.any(axis=1))[0][0])
        raise UserError(f"{where}: {kind} 'present' leaves utterance {utterance} with no modality (one is needed)")
    for index, m in enumerate(MODALITIES):
        x = features.get(m, np.zeros((length, dims[m]), np.float32))
        features[m] = np.where(present[:, index, None], x, np.float32(0.0))
    speakers = np.zeros(length, np.int64)
    if "speakers" in arrays:
        speakers = np.asarray(arrays["speakers"])
        if speakers.shape != (length,) or not np.issubdtype(speakers.dtype, np.integer) \
                or speakers.min() < 0 or speakers.max() >= NUM_SPEAKERS:
            raise UserError(f"{where}: {kind} 'speakers' must hold {length} speaker ids in {{0, 1}}, got shape "
                            f"{speakers.shape} ({speakers.dtype})")
        speakers = speakers.astype(np.int64)
    labels = None
    if "labels" in arrays:
        labels = np.asarray(arrays["labels"])
        if labels.shape != (length,) or not (np.issubdtype(labels.dtype, np.integer)
                                             or np.issubdtype(labels.dtype, np.floating)):
            raise UserError(f"{where}: {kind} 'labels' must hold {length} class ids or scores, got shape "
                            f"{labels.shape} ({labels.dtype})")
        _finite("labels", labels[:, None], where, kind)
    return Conversation(name, features, present, speakers, labels)


def read_npz(path: Path, dims: dict[str, int]) -> Conversation:
    """The conversation in the .npz file ``path`` (layout in the module docstring), loaded without pickle."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:  # not a zip, truncated, or an object array (pickle refused)
        raise UserError(f"{path}: not a readable .npz of numeric arrays ({error})") from None
    return conversation_from_arrays(arrays, dims, path.stem, str(path))


def read_dataset_folder(folder: Path, dims: dict[str, int], task: str, num_classes: int) -> list[Conversation]:
    """Every conversation of the GCNet-layout dataset in ``folder`` (all splits), with its labels.

    The dataset is the one whose label file the folder holds; a folder with several label files takes one of the
    run's ``task`` (and, for classification, with ``num_classes`` classes)."""
    from mer.published import _DATASETS, _find_root, load_published

    found = []
    for name in _DATASETS:
        try:
            _find_root(name, folder)
        except FileNotFoundError:
            continue
        found.append(name)
    if not found:
        files = ", ".join(entry[0] for entry in _DATASETS.values())
        raise UserError(f"{folder}: no label file of the GCNet layout ({files}) in it or in its dataset folders")
    fitting = [name for name in found if (len(_DATASETS[name][2]) == num_classes if _DATASETS[name][2]
                                          else task == "regression")]
    name = (fitting or found)[0]
    options = {"valid_fraction": 0.0} if name.startswith("iemocap") else {}
    try:
        splits = load_published(name, folder, **options)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"{folder}: {error}") from None
    for m in MODALITIES:
        if splits.info.dims[m] != dims[m]:
            raise UserError(f"{folder}: {MODALITY_NAMES[m]} features of {name} have {splits.info.dims[m]} values per "
                            f"utterance; the run was trained on {dims[m]}")
    datasets = [splits.train] + ([splits.valid] if splits.valid is not None else []) + [splits.test]
    dialogues = sorted((d for dataset in datasets for d in dataset), key=lambda d: d.vid)
    label_names = splits.info.class_names if splits.info.task == "classification" else None
    return [Conversation(d.vid, dict(d.features), np.ones((len(d), len(MODALITIES)), bool), d.speakers, d.labels,
                         label_names) for d in dialogues]


def read_inputs(paths: Sequence[Path], dims: dict[str, int], task: str, num_classes: int) -> list[Conversation]:
    """The conversations of ``paths`` (.npz files and GCNet-layout folders), every file checked before any
    prediction."""
    conversations = []
    for path in map(Path, paths):
        if path.is_dir():
            conversations += read_dataset_folder(path, dims, task, num_classes)
        elif path.is_file():
            conversations.append(read_npz(path, dims))
        else:
            raise UserError(f"{path} does not exist: give .npz conversation files or a GCNet-layout dataset folder")
    return conversations


# ------------------------------------------------------------------------------------------------------- rows
def present_letters(present: Sequence[bool]) -> str:
    """(3,) flags -> the letters of the modalities seen, e.g. ``"at"``."""
    return "".join(m for m, seen in zip(MODALITIES, present) if seen)


def utterance_row(run: RunModel, conversation: str, utterance: int, output: torch.Tensor, present,
                  true_label=None, label_names: Optional[Sequence[str]] = None) -> dict:
    """One output row from the model's output at one utterance: (C,) logits or a () score."""
    row = {"conversation": conversation, "utterance": int(utterance)}
    if run.predicts_score:
        score = float(output)
        row["label"] = "positive" if score > 0 else "negative"
        row["score"] = round(score, 6)
    else:
        probabilities = output.float().softmax(dim=-1).tolist()
        row["label"] = run.class_names[int(np.argmax(probabilities))]
        row["probabilities"] = {name: round(p, 6) for name, p in zip(run.class_names, probabilities)}
    row["present"] = present_letters(present)
    if true_label is not None:
        row["true_label"] = true_label_name(true_label, label_names or run.class_names, run.predicts_score)
    return row


def true_label_name(label, names: Sequence[str], predicts_score: bool):
    """A label as shown: a class id by its name, a score as a number."""
    value = label.item() if hasattr(label, "item") else label
    if isinstance(value, (int, np.integer)) and not predicts_score and 0 <= value < len(names):
        return names[int(value)]
    return round(float(value), 6) if isinstance(value, float) else value


@torch.no_grad()
def predict_conversation(run: RunModel, conversation: Conversation) -> list[dict]:
    """The rows of one conversation from one offline forward pass."""
    device = run.device
    features = {m: torch.from_numpy(conversation.features[m])[None].to(device) for m in MODALITIES}
    present = torch.from_numpy(conversation.present)[None].to(device)
    speakers = torch.from_numpy(conversation.speakers)[None].to(device)
    valid = torch.ones(1, len(conversation), dtype=torch.bool, device=device)
    outputs = run.outputs(features, present, speakers, valid)[0].cpu()
    labels = conversation.labels
    return [utterance_row(run, conversation.name, t, outputs[t], conversation.present[t],
                          None if labels is None else labels[t], conversation.label_names)
            for t in range(len(conversation))]


def format_rows(rows: list[dict], fmt: str) -> str:
    """The rows as CSV (``probabilities`` a JSON object per cell) or as a JSON list."""
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    columns = ["conversation", "utterance", "label", "score" if rows and "score" in rows[0] else "probabilities",
               "present"] + (["true_label"] if any("true_label" in row for row in rows) else [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: json.dumps(value) if isinstance(value, dict) else value for key, value in row.items()})
    return buffer.getvalue()


def write_atomically(text: str, path: Path) -> None:
    """``text`` to a temporary file beside ``path``, then renamed to it: never a partial ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ JSON lines
def stream_json_lines(run: RunModel, lines: Iterable[str], out: TextIO) -> None:
    """Answer each JSON line of ``lines`` (one utterance, module docstring) with one JSON line on ``out``, flushed."""
    streams, counts = {}, {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            answer = _answer_line(run, line, number, streams, counts)
        except UserError as error:
            answer = {"error": str(error)}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def _answer_line(run: RunModel, line: str, number: int, streams: dict, counts: dict) -> dict:
    where = f"line {number}"
    try:
        message = json.loads(line, parse_constant=lambda name: float("nan"))
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not JSON ({error})") from None
    if not isinstance(message, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(message).__name__}")
    unknown = sorted(set(message) - {"conversation", "speaker", "label", *MODALITY_NAMES.values()})
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (expected conversation, audio, text, video, speaker, "
                        f"label)")
    conversation = str(message.get("conversation", ""))
    arrays = {}
    for key in MODALITY_NAMES.values():
        if message.get(key) is not None:
            try:
                arrays[key] = np.asarray([message[key]], dtype=np.float32)
            except (TypeError, ValueError):
                raise UserError(f"{where}: field {key!r} must be a list of numbers") from None
    speaker = message.get("speaker", 0)
    if isinstance(speaker, bool) or not isinstance(speaker, int):
        raise UserError(f"{where}: field 'speaker' must be 0 or 1, got {speaker!r}")
    arrays["speakers"] = np.asarray([speaker])
    parsed = conversation_from_arrays(arrays, run.dims, conversation, where, kind="field")
    label = message.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float))):
        raise UserError(f"{where}: field 'label' must be a class id or a score, got {label!r}")
    if conversation not in streams:
        streams[conversation], counts[conversation] = run.stream(1), 0
    stream = streams[conversation]
    with torch.no_grad():
        output = stream.push(**{MODALITY_NAMES[m]: torch.from_numpy(parsed.features[m][0]) if parsed.present[0, i]
                                else None for i, m in enumerate(MODALITIES)},
                             speaker=int(parsed.speakers[0]), probabilities=False)
    utterance = counts[conversation]
    counts[conversation] += 1
    return utterance_row(run, conversation, utterance, output.cpu(), parsed.present[0], label)


# ----------------------------------------------------------------------------------------------- command line
def build_parser(module: str, model: str, doc: Optional[str]) -> argparse.ArgumentParser:
    # the command's docstring, then the formats (this module's docstring from "Input")
    parser = new_parser(module, (doc or "") + "\n" + __doc__[__doc__.index("Input, one conversation"):])
    parser.add_argument("checkpoint", type=Path, metavar="RUN_DIR",
                        help=f"a run folder of {model}.train (its checkpoints/last.pt is used) or a .pt file in it")
    parser.add_argument("inputs", type=Path, nargs="*", metavar="INPUT",
                        help="conversation .npz files or GCNet-layout dataset folders (see the format above)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: standard output)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: from --out's suffix, .json -> json, else csv)")
    parser.add_argument("--stream", action="store_true",
                        help="read one utterance per line of standard input as JSON and answer each at once "
                             "(default: off)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    return parser


def run_predict(argv, *, module: str, model: str, doc: Optional[str],
                load: Callable[[Path, torch.device], RunModel]) -> int:
    """The ``predict`` command of a model: ``load(run folder or checkpoint, device)`` builds its :class:`RunModel`."""
    from mer.training import select_device

    args = build_parser(module, model, doc).parse_args(argv)
    if args.stream and (args.inputs or args.out is not None):
        raise UserError("--stream reads standard input and writes standard output: give no INPUT and no --out")
    if not args.stream and not args.inputs:
        raise UserError("give INPUT files or folders to predict, or --stream to read utterances from standard input")
    if args.out is not None and not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist")
    run = load(args.checkpoint, select_device(args.device))
    if args.stream:
        stream_json_lines(run, sys.stdin, sys.stdout)
        return 0
    conversations = read_inputs(args.inputs, run.dims, run.task, len(run.class_names))
    print(f"predicting {len(conversations)} conversation(s) with {run.name} on {run.device}", file=sys.stderr,
          flush=True)
    rows = [row for conversation in conversations for row in predict_conversation(run, conversation)]
    fmt = args.format or ("json" if args.out is not None and args.out.suffix.lower() == ".json" else "csv")
    text = format_rows(rows, fmt)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomically(text, args.out)
        print(f"{len(rows)} predictions of {len(conversations)} conversation(s) written to {args.out}",
              file=sys.stderr)
    return 0
