"""``python -m carn.predict`` / ``camhg.predict`` as a user meets them: .npz conversations and GCNet folders in, CSV
and JSON out, one-line errors that write nothing, Ctrl-C leaves no partial file, and the JSON-lines stream in a
pipe (a subprocess answering each line before the next is sent)."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import camhg.predict
import camhg.train
import carn.predict
import carn.train
from mer.embedded import SMALL_DIMS
from mer.predict import MODALITY_NAMES, stream_json_lines

REPO = Path(__file__).resolve().parents[1]
PREDICT = {"carn": carn.predict, "camhg": camhg.predict}
TINY = {
    "carn": (carn.train, ["--dims", "small", "--num-dialogues", "3", "1", "1", "--hidden", "8", "--batch-size", "2",
                          "--epochs", "1", "1", "--encoder-mask", "causal", "--no-progress", "--no-plots"]),
    "camhg": (camhg.train, ["--dims", "small", "--num-dialogues", "3", "1", "1", "--hidden", "8", "--batch-size", "2",
                            "--epochs", "1", "0", "1", "--no-progress", "--no-plots"]),
}
CLASSES = ["happy", "sad", "neutral", "angry"]  # the embedded dataset's


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained run folder of each model (embedded data, small feature sizes)."""
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    with torch.random.fork_rng():
        from kernels import use_backend

        with use_backend("reference"):
            for model, (train, arguments) in TINY.items():
                assert train.cli([*arguments, "--runs-dir", str(root), "--run-name", "tiny"]) == 0
                folders[model] = root / model / "embedded" / "tiny"
    return folders


def conversation(length: int, seed: int = 0, **drop) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {MODALITY_NAMES[m]: rng.standard_normal((length, d)).astype(np.float32) for m, d in SMALL_DIMS.items()}
    arrays["speakers"] = rng.integers(0, 2, length)
    for key in drop:
        arrays.pop(key)
    return arrays


def predict(model: str, *arguments, capsys) -> tuple[int, str, str]:
    code = PREDICT[model].cli([str(a) for a in arguments])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("model", ["carn", "camhg"])
def test_npz_files_to_csv_and_json(reference_backend, runs, model, tmp_path, capsys):
    """Every input form (all modalities; one left out; a present mask; labels) in, CSV and JSON out, the same rows;
    each row's probabilities are the offline forward's."""
    full = conversation(5, seed=1)
    np.savez(tmp_path / "full.npz", **full)
    no_video = conversation(4, seed=2, video=True)
    np.savez(tmp_path / "no_video.npz", **no_video, labels=np.array([0, 3, 1, 2]))
    masked = conversation(3, seed=3)
    present = np.array([[True, False, True], [False, True, False], [True, True, True]])
    np.savez(tmp_path / "masked.npz", **masked, present=present)
    inputs = [tmp_path / name for name in ("full.npz", "no_video.npz", "masked.npz")]

    assert predict(model, runs[model], *inputs, "--out", tmp_path / "p.json", capsys=capsys)[0] == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [(r["conversation"], r["utterance"]) for r in rows] == (
        [("full", t) for t in range(5)] + [("no_video", t) for t in range(4)] + [("masked", t) for t in range(3)])
    for row in rows:
        assert set(row["probabilities"]) == set(CLASSES) and row["label"] in CLASSES
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    assert [r["present"] for r in rows] == ["atv"] * 5 + ["at"] * 4 + ["av", "t", "atv"]
    assert [r.get("true_label") for r in rows[5:9]] == ["happy", "angry", "sad", "neutral"]
    assert "true_label" not in rows[0]

    code, out, _ = predict(model, runs[model], *inputs, capsys=capsys)  # CSV on standard output
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and list(table[0]) == ["conversation", "utterance", "label", "probabilities", "present",
                                            "true_label"]
    assert [json.loads(r["probabilities"]) for r in table] == [r["probabilities"] for r in rows]
    assert predict(model, runs[model], *inputs, "--out", tmp_path / "p.txt", "--format", "json",
                   capsys=capsys)[0] == 0
    assert json.loads((tmp_path / "p.txt").read_text()) == rows

    run = PREDICT[model].load_run(runs[model])
    features = {m: torch.from_numpy(masked[MODALITY_NAMES[m]])[None] * torch.from_numpy(present[:, i])[None, :, None]
                for i, m in enumerate(SMALL_DIMS)}
    with torch.no_grad():
        logits = run.outputs(features, torch.from_numpy(present)[None], torch.from_numpy(masked["speakers"])[None],
                             torch.ones(1, 3, dtype=torch.bool))[0]
    expected = logits.softmax(-1)
    got = torch.tensor([[r["probabilities"][c] for c in CLASSES] for r in rows[9:]])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


def gcnet_folder(root: Path, dialogues: int = 2, length: int = 3) -> list[str]:
    """An IEMOCAP-4 dataset in GCNet's layout with the small feature sizes; returns the dialogue ids."""
    vids = [f"Ses0{k + 1}F_impro0{k}" for k in range(dialogues)]
    ids = {vid: [f"{vid}_F00{u}" for u in range(length)] for vid in vids}
    labels = {vid: [u % 4 for u in range(length)] for vid in vids}
    speakers = {vid: ["F", "M", "F"][:length] for vid in vids}
    with open(root / "IEMOCAP_features_raw_4way.pkl", "wb") as handle:
        pickle.dump([ids, labels, speakers, {}, set(vids[:-1]), {vids[-1]}], handle, protocol=2)
    from mer.published import DEFAULT_FEATURES

    rng = np.random.default_rng(0)
    for m, name in DEFAULT_FEATURES.items():
        (root / "features" / name).mkdir(parents=True)
        for vid in vids:
            for u in ids[vid]:
                np.save(root / "features" / name / f"{u}.npy", rng.standard_normal(SMALL_DIMS[m]).astype(np.float32))
    return vids


def test_gcnet_folder_predicts_every_conversation_with_its_labels(reference_backend, runs, tmp_path, capsys):
    vids = gcnet_folder(tmp_path)
    assert predict("camhg", runs["camhg"], tmp_path, "--out", tmp_path / "p.json", capsys=capsys)[0] == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [(r["conversation"], r["utterance"]) for r in rows] == [(vid, u) for vid in vids for u in range(3)]
    assert [r["true_label"] for r in rows] == ["happy", "sad", "neutral"] * 2


BAD_INPUTS = {  # name -> (arrays, what the error line says)
    "wrong_size": (dict(conversation(3), text=np.zeros((3, 47), np.float32)), "array 'text' has 47 features"),
    "nan": (dict(conversation(3), audio=np.full((3, 32), np.nan, np.float32)), "array 'audio' holds NaN or inf"),
    "inf": (dict(conversation(3), video=np.full((3, 40), np.inf, np.float32)), "array 'video' holds NaN or inf"),
    "empty": ({"text": np.zeros((0, 48), np.float32)}, "array 'text' is an empty conversation"),
    "no_modality": ({"speakers": np.zeros(3, np.int64)}, "no modality array"),
    "bad_present": (dict(conversation(2), present=np.zeros((2, 3), bool)), "array 'present' leaves utterance 0"),
    "bad_speakers": (dict(conversation(2), speakers=np.array([0, 5])), "array 'speakers' must hold"),
    "typo": (dict(conversation(2), txt=np.zeros((2, 48))), "unknown array 'txt'"),
}


@pytest.mark.parametrize("model", ["carn", "camhg"])
def test_bad_inputs_get_one_line_exit_2_and_write_nothing(reference_backend, runs, model, tmp_path, capsys):
    good = tmp_path / "good.npz"
    np.savez(good, **conversation(3))
    out = tmp_path / "p.csv"
    for name, (arrays, message) in BAD_INPUTS.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        code, _, err = predict(model, runs[model], good, path, "--out", out, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and str(path) in err and message in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    objects = tmp_path / "objects.npz"  # an object array needs pickle, which is refused
    np.savez(objects, text=np.array([{"x": 1}], dtype=object))
    code, _, err = predict(model, runs[model], objects, "--out", out, capsys=capsys)
    assert code == 2 and str(objects) in err and "not a readable .npz" in err and not out.exists()
    other = runs["camhg" if model == "carn" else "carn"]
    code, _, err = predict(model, other, good, "--out", out, capsys=capsys)
    assert code == 2 and "checkpoint" in err and err.count("\n") == 1 and not out.exists()
    code, _, err = predict(model, runs[model], tmp_path / "missing.npz", capsys=capsys)
    assert code == 2 and "does not exist" in err


def run_module(module: str, *arguments) -> subprocess.Popen:
    env = {**os.environ, "KERNELS_BACKEND": "reference", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *map(str, arguments)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow  # a Python start and a long prediction
def test_ctrl_c_leaves_no_partial_output(runs, tmp_path):
    path = tmp_path / "long.npz"
    np.savez(path, **conversation(100))
    out = tmp_path / "p.csv"
    process = run_module("camhg.predict", runs["camhg"], *[path] * 500, "--out", out)
    assert "predicting 500 conversation(s)" in process.stderr.readline()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [path]


def json_lines(arrays: dict) -> list[str]:
    """The conversation's utterances as --stream input lines, with a wrong-size line and a non-JSON line inserted
    as the 3rd and 4th."""
    lines = [json.dumps({"conversation": "c", **{key: arrays[key][t].tolist() for key in ("audio", "text", "video")},
                         "speaker": int(arrays["speakers"][t])}) for t in range(len(arrays["speakers"]))]
    lines.insert(2, '{"conversation": "c", "text": [1, 2]}')
    lines.insert(3, "not json")
    return lines


def check_streamed_answers(answers: list[dict], expected: list[dict], bad_line: int) -> None:
    """The answers to :func:`json_lines`: errors for the two bad lines (the first is input line ``bad_line``), the
    file predictions for the others."""
    assert "error" in answers[2] and f"line {bad_line}:" in answers[2]["error"]
    assert "field 'text' has 2 features" in answers[2]["error"]
    assert "error" in answers[3] and "not JSON" in answers[3]["error"]
    streamed = answers[:2] + answers[4:]
    assert [a["utterance"] for a in streamed] == list(range(len(expected)))
    for got, want in zip(streamed, expected):
        assert got["label"] == want["label"] and got["present"] == want["present"] == "atv"
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


def file_predictions(model: str, run_dir: Path, arrays: dict, tmp_path: Path, capsys) -> list[dict]:
    np.savez(tmp_path / "c.npz", **arrays)
    assert predict(model, run_dir, tmp_path / "c.npz", "--format", "json", "--out", tmp_path / "c.json",
                   capsys=capsys)[0] == 0
    return json.loads((tmp_path / "c.json").read_text())


@pytest.mark.slow  # a Python start
def test_json_lines_stream_in_a_pipe(reference_backend, runs, tmp_path, capsys):
    """A subprocess answers each line before the next is sent; the answers are the file predictions of the same
    conversation; a malformed line gets an error line and the stream goes on."""
    arrays = conversation(4, seed=7)
    expected = file_predictions("camhg", runs["camhg"], arrays, tmp_path, capsys)
    process = run_module("camhg.predict", runs["camhg"], "--stream")
    answers = []
    for line in json_lines(arrays):
        process.stdin.write(line + "\n")
        process.stdin.flush()
        answers.append(json.loads(process.stdout.readline()))
    process.stdin.close()
    assert process.wait(timeout=60) == 0, process.stderr.read()
    check_streamed_answers(answers, expected, 3)


def test_json_lines_stream_of_carn(reference_backend, runs, tmp_path, capsys):
    """The same exchange in process (the loop is shared; the subprocess test runs CaM-HG): two interleaved
    conversations keep their own states."""
    arrays = conversation(4, seed=8)
    expected = file_predictions("carn", runs["carn"], arrays, tmp_path, capsys)
    run = carn.predict.load_run(runs["carn"])
    lines = json_lines(arrays)
    other = [line.replace('"conversation": "c"', '"conversation": "d"') for line in lines]
    out = io.StringIO()
    stream_json_lines(run, [line for pair in zip(lines, other) for line in pair], out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    check_streamed_answers(answers[0::2], expected, 5)
    check_streamed_answers(answers[1::2], [{**row, "conversation": "d"} for row in expected], 6)
