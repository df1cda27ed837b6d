"""Join the per-seed tables of several ablation sweeps and compare every variant with the full model.

    python -m mer.combine results/camhg/sweep_a results/camhg/sweep_b --out results/camhg/joined

reads ``<stem>_seed<S>.json`` in every folder (the per-seed tables that ``camhg.ablations`` writes; sweeps of other
variants or seeds of the same configuration: a row that two folders hold for the same seed must be identical, as a
retrained deterministic run is) and writes to ``--out`` the joined per-seed tables, ``<stem>`` (mean ± std over the
seeds) and ``<stem>_differences`` (each variant against the baseline over the seeds: mean difference, 95 %
confidence interval, Welch's t-test p, difference in spreads; :func:`mer.metrics.differences_from`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from mer.cli import UserError, new_parser, run_command
from mer.metrics import differences_from, mean_and_spread, merge_seed_tables

MODULE = "mer.combine"


def build_parser():
    parser = new_parser(MODULE, __doc__)
    parser.add_argument("folders", type=Path, nargs="+", metavar="FOLDER", help="result folders of the sweeps")
    parser.add_argument("--stem", default="ablations_embedded",
                        help="table name before _seed<S>.json (camhg.ablations: ablations_<dataset>)")
    parser.add_argument("--baseline", default="CaM-HG (full)", help="the row every other row is compared with")
    parser.add_argument("--columns", nargs="+", default=["Average"], help="columns to compare")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder of the joined tables (required, no default: name it after the sweeps)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        per_seed = merge_seed_tables(args.folders, args.stem)
        differences = differences_from(list(per_seed.values()), args.baseline, args.columns)
    except ValueError as error:
        raise UserError(str(error)) from None
    for seed, table in per_seed.items():
        table.save(args.out / f"{args.stem}_seed{seed}")
    summary = mean_and_spread(list(per_seed.values()))
    summary.save(args.out / args.stem)
    differences.save(args.out / f"{args.stem}_differences")
    summary.print()
    print()
    differences.print()
    return 0


def cli(argv=None) -> int:
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
