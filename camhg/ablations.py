"""The ablation sweep of paper Table 4: the full model and its five variants, over seeds, by missing rate.

    python -m camhg.ablations --seeds 0 1 2

trains every (variant, seed) run under ``runs/camhg/<dataset>/ablations/<sweep-name>/`` (a finished run with the same
configuration is reused and a stopped one resumed, so an interrupted sweep continues where it stopped) and writes
the headline metric (WAF1, or Acc-2 for sentiment) by missing rate, mean ± std over the seeds, to
``results/camhg/ablations_<dataset>.{md,json,csv}`` (the per-seed tables beside it, and with several seeds
``ablations_<dataset>_differences``: each variant's average against the full model, Welch's t-test over the seeds;
``python -m mer.combine`` joins the per-seed tables of several sweeps). With ``--folds all`` (IEMOCAP)
every (variant, seed) runs on the five leave-one-session-out folds and the cells are mean ± std over all
(seed, fold) runs.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from mer.metrics import ResultTable, differences_from, mean_and_spread
from mer.protocols import FOLDS, validation_caption

from mer.cli import (
    UserError,
    add_data_options,
    add_model_options,
    add_sweep_options,
    check_data_options,
    new_parser,
    run_sweep_command,
    sweep_run,
)
from mer.data import EMBEDDED_NAMES

from .config import ABLATIONS, PRESETS, preset
from .train import add_camhg_protocol_options, preset_overrides, train

VARIANT_NAMES = {
    "full": "CaM-HG (full)",
    "no_hypergraph": "w/o hypergraph (H)",
    "no_imputation": "w/o imputation (I)",
    "no_moe": "w/o MoE",
    "no_causal_factor": "w/o causal factor (C)",
    "no_gating": "w/o gating (G)",
}


def run_variant(config, run_dir: Path, *, data_root, device: str, show_progress: bool,
                collect_only: bool = False) -> ResultTable:
    """The missing-rate table of one (variant, seed) run: reused when it finished with the same configuration,
    resumed when it was stopped, trained otherwise (``collect_only``: only reused)."""
    def train_run(resume: bool) -> str:
        train(None if resume else config, run_dir=run_dir, resume=resume, data_root=data_root, device=device,
              keep_every=0, plots=False, show_progress=show_progress)
        return " and evaluated"

    return ResultTable.load(sweep_run(run_dir, finished="missing_rates.json", configuration=config.to_dict,
                                      collect_only=collect_only, train=train_run))


def sweep(dataset: str, seeds, ablations, *, overrides: dict, runs_dir: Path, out_dir: Path, data_root=None,
          device: str = "auto", show_progress: bool = False, sweep_name: str = "default",
          collect_only: bool = False, fold_overrides: Optional[dict] = None) -> ResultTable:
    """Train and evaluate every (variant, seed) under ``runs_dir/camhg/<dataset>/ablations/<sweep_name>/``; save and
    return the mean ± std table. ``fold_overrides``: {IEMOCAP fold: its overrides} replacing ``overrides`` (runs
    ``<variant>-seed<seed>-fold<k>``; cells over all (seed, fold) runs)."""
    per_run = []
    for fold, run_overrides in (fold_overrides or {None: overrides}).items():
        suffix = "" if fold is None else f"-fold{fold}"
        for seed in seeds:
            table = None
            for ablation in ablations:
                config = preset(dataset, seed=seed, ablation=ablation, **run_overrides)
                run_dir = runs_dir / "camhg" / dataset / "ablations" / sweep_name / f"{ablation}-seed{seed}{suffix}"
                rates = run_variant(config, run_dir, data_root=data_root, device=device, show_progress=show_progress,
                                    collect_only=collect_only)
                metric = "WAF1" if "WAF1" in rates.rows else "Acc2"  # Table 4's metric: WAF1, or Acc-2 for sentiment
                if table is None:
                    validation = validation_caption(dataset, config.dataset_options, config.validation)
                    held_out = "test" if fold_overrides is None else "5-fold leave-one-session-out test"
                    table = ResultTable(f"CaM-HG ablations on {dataset}: {held_out} {metric} (%) by missing rate eta "
                                        f"({validation})", "model", rates.columns)
                table.add_row(VARIANT_NAMES[ablation], rates.rows[metric])
            table.save(out_dir / f"ablations_{dataset}_seed{seed}{suffix}")
            per_run.append(table)
    summary = mean_and_spread(per_run)
    summary.save(out_dir / f"ablations_{dataset}")
    if "full" in ablations and len(ablations) > 1 and len(per_run) > 1:
        differences_from(per_run, VARIANT_NAMES["full"], ["Average"]).save(out_dir / f"ablations_{dataset}_differences")
    return summary


MODULE = "camhg.ablations"


def build_parser():
    parser = new_parser(MODULE, __doc__)
    add_data_options(parser, sorted(PRESETS))
    add_model_options(parser, epochs=("K1", "K2", "K3"),
                      epochs_help="epochs of the three phases: discriminative warm-up, generative pre-training, "
                                  "joint fine-tuning (Algorithm 1)")
    add_camhg_protocol_options(parser)
    add_sweep_options(parser, model="camhg", ablations=ABLATIONS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_data_options(args, EMBEDDED_NAMES)
    overrides = {**preset_overrides(args, args.fold), "data_seed": args.data_seed}
    fold_overrides = None
    if args.folds == "all":
        fold_overrides = {fold: {**preset_overrides(args, fold), "data_seed": args.data_seed} for fold in FOLDS}
    try:
        preset(args.dataset, **overrides)
    except ValueError as error:
        raise UserError(str(error)) from None
    summary = sweep(args.dataset, args.seeds, args.ablations, overrides=overrides, runs_dir=args.runs_dir,
                    out_dir=args.out, data_root=args.data_root, device=args.device, show_progress=args.progress,
                    sweep_name=args.sweep_name, collect_only=args.collect_only, fold_overrides=fold_overrides)
    summary.print()
    return 0


def cli(argv=None) -> int:
    """Console script ``camhg-ablations``."""
    return run_sweep_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
