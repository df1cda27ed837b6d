"""The command lines of both models as a user meets them: one set of flags, help on each, values checked by
argparse, one-line errors that leave nothing behind, Ctrl-C, resume, evaluate on a run folder."""
from __future__ import annotations

import argparse
import csv
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import camhg.ablations
import camhg.evaluate
import camhg.train
import carn.ablations
import carn.evaluate
import carn.train
import mer.combine
import mer.learning_curves
from mer.cli import HelpFormatter
from mer.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
TOOLS = {"mer.combine": mer.combine, "mer.learning_curves": mer.learning_curves}  # no --threads: nothing to compute
ENTRY_POINTS = {
    "carn.train": carn.train, "carn.evaluate": carn.evaluate, "carn.ablations": carn.ablations,
    "camhg.train": camhg.train, "camhg.evaluate": camhg.evaluate, "camhg.ablations": camhg.ablations,
}
MODEL_ONLY = {"carn": {"--missing-rate", "--stage2", "--css-context", "--encoder-mask"},  # flags that only one
              "camhg": {"--p3-lr"}}  # model has (README says which)
TINY_CARN = ["--dims", "small", "--num-dialogues", "4", "1", "2", "--hidden", "8", "--batch-size", "2",
             "--no-progress", "--no-plots"]
TINY_CAMHG = ["--dims", "small", "--num-dialogues", "3", "1", "2", "--hidden", "8", "--batch-size", "2",
              "--epochs", "1", "0", "1", "--no-progress", "--no-plots"]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}


@pytest.mark.parametrize("name", [*ENTRY_POINTS, *TOOLS])
def test_every_flag_has_help_and_its_default(name):
    parser = {**ENTRY_POINTS, **TOOLS}[name].build_parser()
    assert parser.prog == f"python -m {name}"
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        # value options and --x/--no-x switches say their default; plain switches are off unless given
        if action.option_strings and (action.nargs != 0 or isinstance(action, argparse.BooleanOptionalAction)):
            assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings}"


@pytest.mark.parametrize("command", ["train", "evaluate", "ablations"])
def test_both_models_have_the_same_flags(command):
    carn_flags = options(ENTRY_POINTS[f"carn.{command}"].build_parser()) - MODEL_ONLY["carn"]
    camhg_flags = options(ENTRY_POINTS[f"camhg.{command}"].build_parser()) - MODEL_ONLY["camhg"]
    assert carn_flags == camhg_flags, carn_flags ^ camhg_flags


@pytest.mark.parametrize("arguments, flag", [
    pytest.param(["--lr", "-1"], "--lr", id="negative-lr"),
    pytest.param(["--lr", "nan"], "--lr", id="nan-lr"),
    pytest.param(["--lr", "inf"], "--lr", id="inf-lr"),
    pytest.param(["--lr", "fast"], "--lr", id="text-lr"),
    pytest.param(["--batch-size", "0"], "--batch-size", id="zero-batch"),
    pytest.param(["--hidden", "-8"], "--hidden", id="negative-hidden"),
    pytest.param(["--dropout", "1"], "--dropout", id="dropout-1"),
    pytest.param(["--seed", "-1"], "--seed", id="negative-seed"),
    pytest.param(["--keep-checkpoints", "-2"], "--keep-checkpoints", id="negative-keep"),
    pytest.param(["--num-dialogues", "0", "1", "1"], "--num-dialogues", id="zero-dialogues"),
    pytest.param(["--ablation", "no_such_thing"], "--ablation", id="unknown-ablation"),
    pytest.param(["--dataset", "imdb"], "--dataset", id="unknown-dataset"),
    pytest.param(["--device", "tpu"], "--device", id="unknown-device"),
])
@pytest.mark.parametrize("model", ["carn", "camhg"])
def test_bad_values_are_argparse_errors_naming_the_flag(model, arguments, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[f"{model}.train"].build_parser().parse_args(arguments)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    pytest.param(["--dataset", "foo"], "argument --dataset: invalid choice: 'foo'", id="unknown-dataset"),
    pytest.param(["--device", "cuda:99"], "argument --device:", id="missing-gpu"),
    pytest.param(["--resume", "X", "--epochs", "5", "5", "5", "5"], "argument --epochs: takes", id="epochs-count"),
    pytest.param(["--threads", "0"], "argument --threads: must be a positive integer", id="zero-threads"),
])
@pytest.mark.parametrize("model", ["carn", "camhg"])
def test_argparse_errors_are_one_line_without_the_usage_block(model, arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[f"{model}.train"].cli(arguments)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"python -m {model}.train: error: {message}"), err


@pytest.mark.parametrize("name", [*ENTRY_POINTS, *TOOLS])
def test_help_is_plain_text(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        {**ENTRY_POINTS, **TOOLS}[name].build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "``" not in shown and ":func:" not in shown and ":class:" not in shown, shown
    assert name in TOOLS or "--threads" in shown


def test_threads_default_flag_and_environment(monkeypatch):
    """Every entry point runs on ``--threads`` CPU threads, by default $OMP_NUM_THREADS or 1, and gives the previous
    count back when it returns (so a test calling it leaves the process as it was)."""
    import torch

    from mer.cli import run_command

    seen = []
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for argv in ([], ["--threads", "3"], ["--threads=2"], ["--threads", "x"]):
        run_command(lambda args: seen.append(torch.get_num_threads()) or 0, argv)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    run_command(lambda args: seen.append(torch.get_num_threads()) or 0, [])
    assert seen == [1, 3, 2, 1, 2] and torch.get_num_threads() == before
    for name, module in ENTRY_POINTS.items():
        assert module.build_parser().parse_args(
            ["RUN"] * name.endswith("evaluate") + ["--threads", "4"]).threads == 4, name


def test_epochs_per_model(capsys):
    assert carn.train.build_parser().parse_args(["--epochs", "2", "3"]).epochs == [2, 3]
    assert camhg.train.build_parser().parse_args(["--epochs", "2", "0", "3"]).epochs == [2, 0, 3]
    with pytest.raises(SystemExit):
        carn.train.build_parser().parse_args(["--epochs", "1", "1", "1"])  # CARN has two stages
    assert "argument --epochs: takes 2 numbers (E1 E2), got 3" in capsys.readouterr().err


def error_of(entry_point, arguments, capsys) -> str:
    """Run a console script's function: it must answer with one line on stderr and exit status 2."""
    assert entry_point.cli(arguments) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("model", ["carn", "camhg"])
def test_data_mistakes_get_one_line_and_leave_nothing(reference_backend, model, tmp_path, capsys):
    train = ENTRY_POINTS[f"{model}.train"]
    runs = ["--runs-dir", str(tmp_path / "runs"), "--run-name", "r", "--no-progress"]
    assert "add --data-root DIR" in error_of(train, ["--dataset", "iemocap4", *runs], capsys)
    assert "is not a folder" in error_of(train, ["--dataset", "iemocap4", "--data-root", str(tmp_path / "no"), *runs],
                                         capsys)
    assert "--data-root is for the published" in error_of(train, ["--data-root", str(tmp_path), *runs], capsys)
    (tmp_path / "empty").mkdir()  # a folder without the label file: found only after the run folder is made
    assert "IEMOCAP_features_raw_4way.pkl" in error_of(
        train, ["--dataset", "iemocap4", "--data-root", str(tmp_path / "empty"), *runs], capsys)
    assert not (tmp_path / "runs").exists()  # not even the empty runs/<model>/<dataset>/ above the run folder


@pytest.mark.parametrize("model", ["carn", "camhg"])
def test_run_folder_mistakes(model, tmp_path, capsys):
    train = ENTRY_POINTS[f"{model}.train"]
    run_dir = tmp_path / model / "embedded" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("someone's run")
    err = error_of(train, ["--runs-dir", str(tmp_path), "--run-name", "taken"], capsys)
    assert "already exists" in err and f"--resume {run_dir}" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    assert "nothing to resume" in error_of(train, ["--resume", str(run_dir)], capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # no empty checkpoints/ left behind
    assert "no such folder" in error_of(train, ["--resume", str(tmp_path / "nowhere")], capsys)
    assert "no such folder" in error_of(train, ["--resume", str(tmp_path / "nowhere"), "--threads", "2"], capsys)
    evaluate = ENTRY_POINTS[f"{model}.evaluate"]
    assert "holds no checkpoints/last.pt" in error_of(evaluate, [str(run_dir)], capsys)
    assert "does not exist" in error_of(evaluate, [str(run_dir / "last.pt")], capsys)


def test_gcnet_dataset_folder_holds_both_iemocap_variants(tmp_path):
    """GCNet keeps IEMOCAP_features_raw_{4,6}way.pkl in dataset/IEMOCAP/: --data-root dataset/ finds both."""
    root = tmp_path / "dataset" / "IEMOCAP"
    vids = [f"Ses0{s}F_impro01" for s in range(1, 6)]
    utterances = {vid: [f"{vid}_F000", f"{vid}_M001"] for vid in vids}
    for ways in (4, 6):
        labels = {vid: [0, ways - 1] for vid in vids}
        content = [utterances, labels, {vid: ["F", "M"] for vid in vids}, {vid: ["hi", "ho"] for vid in vids},
                   set(vids[:4]), {vids[4]}]
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"IEMOCAP_features_raw_{ways}way.pkl", "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    for name, size in (("wav2vec-large-c-UTT", 3), ("deberta-large-4-UTT", 4), ("manet_UTT", 2)):
        (root / "features" / name).mkdir(parents=True)
        for u in (u for us in utterances.values() for u in us):
            np.save(root / "features" / name / f"{u}.npy", np.ones(size, np.float32))
    for dataset, classes in (("iemocap4", 4), ("iemocap6", 6)):
        splits = load_dataset(dataset, tmp_path / "dataset", valid_fraction=0.0)
        assert splits.info.num_classes == classes and [d.vid for d in splits.test] == [vids[4]]


def run_module(module: str, *arguments, cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "KERNELS_BACKEND": "reference", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a process that starts with it ignored (as pytest-xdist's workers
    # leave it, and as a shell does for background jobs) never sees Ctrl-C, and Python keeps it ignored
    return subprocess.Popen([sys.executable, "-m", module, *arguments], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


@pytest.mark.slow  # about 13-22 s on a shared 2-core machine: a Python start, an interrupted run, a resume
def test_ctrl_c_saves_says_how_to_resume_and_the_run_resumes(reference_backend, tmp_path, capsys):
    """SIGINT mid-training: exit 130, the resume command printed, no traceback; the run then resumes from there,
    evaluate takes its folder, and the other model's evaluate refuses its checkpoint in one line."""
    run_dir = tmp_path / "runs" / "carn" / "embedded" / "r"
    # more epochs than a loaded machine runs before the signal arrives (stdout is read with a delay)
    process = run_module("carn.train", *TINY_CARN, "--epochs", "1", "5000", "--runs-dir", "runs", "--run-name", "r",
                         cwd=tmp_path)
    lines = []
    for line in process.stdout:  # wait for the first finished epoch, then press Ctrl-C
        lines.append(line)
        if line.startswith("epoch 1/5001"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(lines) + out + err
    assert "Traceback" not in err and f"--resume {Path('runs/carn/embedded/r')}" in err, err
    assert lines[0].startswith("CARN (full) on embedded") and "run folder runs/carn/embedded/r" in lines[0]
    saved = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("epoch_*.pt"))
    assert saved and not list((run_dir / "checkpoints").glob("*.tmp"))

    assert carn.train.cli(["--resume", str(run_dir), "--stop-after-epoch", str(saved[-1] + 1), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming after epoch {saved[-1]} of 5001" in out and f"epoch {saved[-1] + 1}/5001 (stage 2)" in out

    assert carn.evaluate.cli([str(run_dir), "--no-plots", "--no-progress"]) == 0  # a run folder
    assert (run_dir / "evaluation" / "table1_last_test.md").is_file()
    capsys.readouterr()
    assert "CARN checkpoint" in error_of(camhg.evaluate, [str(run_dir)], capsys)


def test_finished_run_checkpoints_and_other_model(reference_backend, tmp_path, capsys):
    """A short CaM-HG run: checkpoints numbered from 1 (last, best, every N-th), config.json, per-epoch lines;
    --resume says it is finished; evaluate takes the folder; CARN's evaluate refuses it."""
    arguments = [*TINY_CAMHG, "--runs-dir", str(tmp_path), "--run-name", "done", "--keep-checkpoints", "2"]
    assert camhg.train.cli(arguments) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "camhg" / "embedded" / "done"
    assert f"run folder {run_dir}" in out.splitlines()[0]
    assert "epoch 1/2 (phase 1) | train loss" in out and "epoch 2/2 (phase 3)" in out and "WAF1" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "epoch_002.pt", "last.pt"]
    assert (run_dir / "config.json").is_file() and (run_dir / "missing_rates.json").is_file()
    assert "this run is finished" in error_of(camhg.train, ["--resume", str(run_dir)], capsys)
    assert camhg.evaluate.cli([str(run_dir), "--no-plots", "--no-progress", "--split", "valid"]) == 0
    assert (run_dir / "evaluation" / "missing_rates.json").is_file()
    capsys.readouterr()
    assert "CaM-HG checkpoint" in error_of(carn.evaluate, [str(run_dir / "checkpoints" / "best.pt")], capsys)


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    """The real command line (python -m): a mistake costs one line and exit status 2."""
    process = run_module("camhg.train", "--dataset", "iemocap6", "--no-progress", cwd=tmp_path)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and err.strip().count("\n") == 0 and "--data-root" in err, err
    assert not (tmp_path / "runs").exists()


def test_checkpoints_kept_every_nth_epoch_and_the_newest(tmp_path):
    from mer.training import CheckpointManager

    checkpoints = CheckpointManager(tmp_path, keep_every=3)
    for epoch in range(1, 8):
        checkpoints.save({"epoch_weights": epoch}, epoch=epoch)
    assert [p.name for p in checkpoints.epoch_files()] == ["epoch_003.pt", "epoch_006.pt", "epoch_007.pt"]
    none = CheckpointManager(tmp_path / "none", keep_every=0)
    for epoch in range(1, 4):
        none.save({}, epoch=epoch)
    assert [p.name for p in none.epoch_files()] == ["epoch_003.pt"] and none.last_path.is_file()


_FAULTS_OF_A_64_MB_TENSOR = """
import resource, sys, torch
import camhg.ablations, camhg.evaluate, camhg.train, carn.ablations, carn.evaluate, carn.train  # noqa: F401
from mer.cli import run_command

def main(argv):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 20, dtype=torch.uint8)  # written: every page faults in
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return 0

sys.exit(run_command(main, []))
"""


@pytest.mark.skipif("[never]" in (Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
                                  if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else "[never]"),
                    reason="no transparent huge pages on this machine")
def test_entry_points_back_large_tensors_with_huge_pages():
    """``run_command`` (every entry point, after importing its modules) has PyTorch ask for 2 MB pages for large CPU
    tensors: a 64 MB tensor faults in far fewer than its 16,384 pages of 4 KB; an explicit
    ``THP_MEM_ALLOC_ENABLE=0`` is kept."""
    faults = {}
    for setting in ("default", "0"):
        env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
        if setting != "default":
            env["THP_MEM_ALLOC_ENABLE"] = setting
        env["PYTHONPATH"] = str(REPO)
        result = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_64_MB_TENSOR], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        faults[setting] = int(result.stdout.split()[-1])
    assert faults["0"] >= (64 << 20) // 4096 and faults["default"] < faults["0"] // 8, faults


def test_learning_curves_average_the_seeds_and_refuse_a_bad_sweep(tmp_path, capsys):
    """``mer.learning_curves``: per variant and epoch the seeds' mean and sample std (unfinished runs left out), a
    plot; a missing folder or metric is one error line, exit 2."""
    rng = np.random.default_rng()
    values = rng.uniform(20, 80, size=(2, 3))  # seeds x epochs
    for seed in range(3):
        run = tmp_path / "sweep" / f"full-seed{seed}"
        run.mkdir(parents=True)
        rows = ["epoch,phase,val_WAF1"] + [f"{e},{1 + (e > 1)},{values[seed, e] if seed < 2 else 99}" for e in range(3)]
        (run / "metrics.csv").write_text("\n".join(rows) + "\n")
        if seed < 2:  # seed 2 never finished
            (run / "missing_rates.json").write_text("{}")
    out = tmp_path / "curves" / "full"
    assert mer.learning_curves.cli([str(tmp_path / "sweep"), str(out)]) == 0
    with open(out.with_suffix(".csv"), newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in table] == [0, 1, 2] and {row["n"] for row in table} == {"2"}
    for row, column in zip(table, values.T):
        assert float(row["mean"]) == pytest.approx(column.mean(), abs=0.006)
        assert float(row["std"]) == pytest.approx(column.std(ddof=1), abs=0.006)
    assert out.with_suffix(".png").stat().st_size > 0
    capsys.readouterr()
    for argv, message in (([str(tmp_path / "nothing"), str(out)], "is not a folder"),
                          ([str(tmp_path / "sweep"), str(out), "--metric", "val_acc"], "no finished run with")):
        assert mer.learning_curves.cli(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [err.strip()] and message in err, err
