"""Paper Table 1 (full model) and Table 2 (full model and four ablations) over several seeds, mean ± std.

``python -m carn.ablations --seeds 0 1 2`` trains every variant of ``carn.config.ABLATIONS`` once per seed with
``carn.train.run_training`` (runs under ``runs/carn/<dataset>/ablations/``), evaluates each under the six
available-modality conditions and writes ``table1`` and ``table2`` (.md, .json, .csv) under ``results/carn/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from mer.data import DATASET_NAMES
from mer.metrics import ResultTable, mean_and_spread

from .config import ABLATION_TITLES, ABLATIONS, preset
from .evaluate import table_columns
from .train import DataSpec, run_training


def merged(rows: dict[str, ResultTable], task: str, title: str) -> ResultTable:
    """One table whose rows are the single rows of the runs' saved tables."""
    table = ResultTable(title, "model", table_columns(task))
    for name, run_table in rows.items():
        table.add_row(name, next(iter(run_table.rows.values())))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--dataset", default="embedded", choices=DATASET_NAMES)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--num-dialogues", type=int, nargs=3, default=None, metavar=("TRAIN", "VALID", "TEST"),
                        help="embedded dataset sizes (default: the generator's)")
    parser.add_argument("--epochs-stage1", type=int, default=None)
    parser.add_argument("--epochs-stage2", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("results/carn"))
    parser.add_argument("--sweep-name", default=None, help="runs go to runs/carn/<dataset>/ablations/<name>")
    parser.add_argument("--collect-only", action="store_true",
                        help="train nothing: build the tables from the runs of --sweep-name (several processes "
                        "may share a sweep, e.g. one per ablation)")
    args = parser.parse_args(argv)
    if args.collect_only and args.sweep_name is None:
        parser.error("--collect-only needs the --sweep-name of the runs to collect")

    options = dict(preset(args.dataset).dataset_options)
    if args.num_dialogues is not None:
        options["num_dialogues"] = tuple(args.num_dialogues)
    data = DataSpec(args.dataset, args.data_root, args.data_seed, options)
    splits = data.load()
    epochs = {k: v for k, v in {"epochs_stage1": args.epochs_stage1, "epochs_stage2": args.epochs_stage2}.items()
              if v is not None}
    train_config = dataclasses.replace(preset(args.dataset).train, **epochs)
    overrides = {"hidden": args.hidden} if args.hidden is not None else {}
    sweep = args.runs_dir / "carn" / args.dataset / "ablations" / (args.sweep_name or time.strftime("%Y%m%d-%H%M%S"))
    for seed in args.seeds:
        for ablation in args.ablations:
            if args.collect_only:
                continue
            began = time.perf_counter()
            result = run_training(
                data, seed=seed, ablation=ablation, model_overrides=overrides, train_config=train_config,
                run_dir=sweep / f"{ablation}-seed{seed}", device=args.device, show_progress=False,
                make_plots=False, splits=splits, verbose=False,
            )
            print(f"seed {seed} {ablation}: average {result.results['Average']} "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
    if not {"full"} <= set(args.ablations):
        return None  # a partial sweep: another process (or --collect-only) writes the tables
    task = splits.info.task
    # Each run saved its own Table 1 row (run_training); the sweep's tables are built from those files.
    per_seed = [
        {ABLATION_TITLES[a]: ResultTable.load(sweep / f"{a}-seed{seed}" / "table1.json") for a in args.ablations}
        for seed in args.seeds
    ]
    hidden = overrides.get("hidden", preset(args.dataset).model.get("hidden"))
    caption = (f"CARN on {args.dataset} (test split; {train_config.epochs_stage1}+{train_config.epochs_stage2} epochs, "
               f"hidden {hidden}, batch {train_config.batch_size}, lr {train_config.lr:g}, "
               f"dataset options {options}; seeds {args.seeds})")
    full = ABLATION_TITLES["full"]
    tables = {
        "table1": mean_and_spread([merged({full: rows[full]}, task, f"Table 1: {caption}") for rows in per_seed]),
        "table2": mean_and_spread([merged(rows, task, f"Table 2 (ablations): {caption}") for rows in per_seed]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.print()
        table.save(args.out / name)
    return tables


if __name__ == "__main__":
    main()
