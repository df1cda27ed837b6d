"""Validation learning curves of an ablation sweep, mean ± std over its seeds, as a CSV and a plot.

    python -m mer.learning_curves runs/camhg/embedded/ablations/L40 results/camhg/learning_curves_embedded_12+4+24
    python -m mer.learning_curves runs/carn/embedded/ablations/default results/carn/learning_curves_embedded_5+8 \
        --metric valid_average_WA

reads ``<sweep>/<variant>-seed<s>/metrics.csv`` of every finished run (one with ``missing_rates.json`` or
``table1.json``) and writes ``OUT.csv`` (one row per variant and epoch: the phase or stage, the metric of each seed,
their mean and sample std) and ``OUT.png`` (one curve per variant, the seed spread shaded, the phase or stage
boundaries as dotted lines).
"""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mer.cli import UserError, new_parser, run_command

MODULE = "mer.learning_curves"
RUN_NAME = re.compile(r"(?P<variant>.+)-seed(?P<seed>\d+)$")
FINISHED = ("missing_rates.json", "table1.json")


def read_sweep(sweep: Path, metric: str) -> tuple[dict, dict]:
    """{variant: {seed: {epoch: value}}} of the finished runs, and {epoch: phase or stage}."""
    if not sweep.is_dir():
        raise UserError(f"{sweep} is not a folder: give a sweep folder (runs/<model>/<dataset>/ablations/<name>)")
    curves, periods = {}, {}
    for run in sorted(sweep.iterdir()):
        match = RUN_NAME.match(run.name)
        if not match or not any((run / name).exists() for name in FINISHED):
            continue
        with open(run / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                epoch = int(row["epoch"])
                periods[epoch] = int(row.get("phase") or row.get("stage"))
                if row.get(metric):
                    curves.setdefault(match["variant"], {}).setdefault(int(match["seed"]), {})[epoch] = float(
                        row[metric])
    if not curves:
        raise UserError(f"{sweep}: no finished run with a {metric!r} column")
    return curves, periods


def build_parser():
    parser = new_parser(MODULE, __doc__)
    parser.add_argument("sweep", type=Path, help="the sweep folder (runs/<model>/<dataset>/ablations/<name>)")
    parser.add_argument("out", type=Path, help="output path without suffix: OUT.csv and OUT.png")
    parser.add_argument("--metric", default="val_WAF1", help="metrics.csv column (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    curves, periods = read_sweep(args.sweep, args.metric)
    seeds = sorted({seed for runs in curves.values() for seed in runs})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    with open(args.out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "epoch", "period", *[f"seed{s}" for s in seeds], "mean", "std", "n"])
        for variant, runs in curves.items():
            epochs = sorted(set.intersection(*(set(points) for points in runs.values())))
            values = np.array([[runs[s][e] for s in sorted(runs)] for e in epochs])
            mean = values.mean(axis=1)
            std = values.std(axis=1, ddof=1) if values.shape[1] > 1 else np.zeros_like(mean)
            for epoch, row, m, s in zip(epochs, values, mean, std):
                cells = [f"{runs[seed][epoch]:.2f}" if seed in runs else "" for seed in seeds]
                writer.writerow([variant, epoch, periods[epoch], *cells, f"{m:.2f}", f"{s:.2f}", len(row)])
            line, = axes.plot(epochs, mean, label=f"{variant} (n={values.shape[1]})")
            axes.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    for epoch in sorted(periods)[1:]:
        if periods[epoch] != periods[epoch - 1]:
            axes.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("epoch (dotted: phase or stage boundaries)")
    axes.set_ylabel(f"{args.metric} (validation, mean ± std over seeds)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(args.sweep.as_posix(), fontsize=9)
    figure.savefig(args.out.with_suffix(".png"), dpi=120)
    return 0


def cli(argv=None) -> int:
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
