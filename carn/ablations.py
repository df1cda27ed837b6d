"""Paper Table 1 (full model) and Table 2 (full model and four ablations) over several seeds, mean ± std.

``python -m carn.ablations --seeds 0 1 2`` trains every variant of ``carn.config.ABLATIONS`` once per seed with
``carn.train.run_training`` (runs under ``runs/carn/<dataset>/ablations/<sweep-name>/``; a finished run with the same
configuration is reused and a stopped one resumed, so an interrupted sweep continues where it stopped), evaluates each under the six
available-modality conditions and writes ``table1`` and ``table2`` (.md, .json, .csv) under ``results/carn/``, and
with several seeds ``table2_differences`` (each variant's averages against the full model: mean difference, 95 %
confidence interval, Welch's t-test p over the seeds).
With ``--folds all`` (IEMOCAP) every (variant, seed) runs on the five leave-one-session-out folds
(``<variant>-seed<seed>-fold<k>``) and the cells are mean ± std over all (seed, fold) runs.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mer.cli import (
    UserError,
    folds_of,
    add_data_options,
    add_model_options,
    add_sweep_options,
    check_data_options,
    fraction,
    new_parser,
    run_sweep_command,
    sweep_run,
)
from mer.data import DATASET_NAMES, EMBEDDED_NAMES
from mer.metrics import ResultTable, differences_from, mean_and_spread
from mer.protocols import validation_caption

from .config import ABLATION_TITLES, ABLATIONS, model_config_for, preset, to_dict
from .evaluate import table_columns
from .train import DataSpec, add_carn_protocol_options, data_spec, model_overrides_of, run_training, train_config_of


def merged(rows: dict[str, ResultTable], task: str, title: str) -> ResultTable:
    """One table whose rows are the single rows of the runs' saved tables."""
    table = ResultTable(title, "model", table_columns(task))
    for name, run_table in rows.items():
        table.add_row(name, next(iter(run_table.rows.values())))
    return table


def run_variant(data: DataSpec, splits, *, seed: int, ablation: str, overrides: dict, train_config, run_dir: Path,
                device: str, show_progress: bool, collect_only: bool) -> ResultTable:
    """The Table 1 row of one (variant, seed) run: reused when it finished with the same configuration, resumed
    when it was stopped, trained otherwise (``collect_only``: only reused)."""
    def configuration() -> dict:
        return {"model_config": to_dict(model_config_for(splits.info, data.dataset, ablation=ablation, **overrides)),
                "train_config": to_dict(train_config), "data": dataclasses.asdict(data), "seed": seed,
                "ablation": ablation}

    def train(resume: bool) -> str:
        result = run_training(data, seed=seed, ablation=ablation, model_overrides=overrides,
                              train_config=train_config, run_dir=run_dir, resume=resume, device=device,
                              show_progress=show_progress, make_plots=False, splits=splits, verbose=False,
                              keep_every=0)
        return f", average {result.results['Average']}"

    return ResultTable.load(sweep_run(run_dir, finished="table1.json", configuration=configuration,
                                      collect_only=collect_only, train=train))


MODULE = "carn.ablations"


def build_parser():
    parser = new_parser(MODULE, __doc__)
    add_data_options(parser, DATASET_NAMES)
    add_model_options(parser, epochs=("E1", "E2"),
                      epochs_help="epochs of the two stages: full modalities, then randomly missing ones (section 3.4)")
    parser.add_argument("--missing-rate", type=fraction, default=None,
                        help="CARN only: eta of the stage-2 random masks (default: the preset's)")
    add_carn_protocol_options(parser)
    add_sweep_options(parser, model="carn", ablations=list(ABLATIONS))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_data_options(args, EMBEDDED_NAMES)
    train_config = train_config_of(args)
    overrides = model_overrides_of(args)
    sweep = args.runs_dir / "carn" / args.dataset / "ablations" / args.sweep_name
    folds = folds_of(args)
    per_run = []  # one {row title: table} per (seed, fold)
    for fold in folds:
        data = data_spec(args, fold)
        try:
            splits = data.load()
        except (ValueError, FileNotFoundError) as error:
            raise UserError(str(error)) from None
        suffix = "" if fold is None else f"-fold{fold}"
        for seed in args.seeds:
            per_run.append({
                ABLATION_TITLES[ablation]: run_variant(data, splits, seed=seed, ablation=ablation,
                                                       overrides=overrides, train_config=train_config,
                                                       run_dir=sweep / f"{ablation}-seed{seed}{suffix}",
                                                       device=args.device, show_progress=args.progress,
                                                       collect_only=args.collect_only)
                for ablation in args.ablations})
    if "full" not in args.ablations:
        print("no table written: the sweep lacks the full model (another process, or --collect-only, writes them)")
        return 0
    task = splits.info.task
    hidden = overrides.get("hidden", preset(args.dataset).model.get("hidden"))
    held_out = "test split" if len(folds) == 1 else f"5-fold leave-one-session-out, folds {folds}"
    caption = (f"CARN on {args.dataset} ({held_out}; {train_config.epochs_stage1}+{train_config.epochs_stage2} "
               f"epochs, stage 2 {train_config.stage2}, hidden {hidden}, batch {train_config.batch_size}, "
               f"lr {train_config.lr:g}, dataset options {data.dataset_options}; seeds {args.seeds}; "
               f"{validation_caption(args.dataset, data.dataset_options, args.validation)})")
    full = ABLATION_TITLES["full"]
    per_run_table2 = [merged(rows, task, f"Table 2 (ablations): {caption}") for rows in per_run]
    tables = {
        "table1": mean_and_spread([merged({full: rows[full]}, task, f"Table 1: {caption}") for rows in per_run]),
        "table2": mean_and_spread(per_run_table2),
    }
    if len(args.ablations) > 1 and len(per_run) > 1:  # each variant against the full model, over the runs
        averages = [column for column in table_columns(task) if column.startswith("Average")]
        tables["table2_differences"] = differences_from(per_run_table2, full, averages)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.print()
        table.save(args.out / name)
    return 0


def cli(argv=None) -> int:
    """Console script ``carn-ablations``."""
    return run_sweep_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
