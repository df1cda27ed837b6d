"""The ablation sweep of paper Table 4: the full model and its five variants, over seeds, by missing rate.

    python -m camhg.ablations --seeds 0 1 2

trains every (variant, seed) run under ``runs/camhg/<dataset>/ablations/`` (a finished run with the same
configuration is reused and a stopped one resumed, so an interrupted sweep continues where it stopped) and writes
the headline metric (WAF1, or Acc-2 for sentiment) by missing rate, mean ± std over the seeds, to
``results/camhg/ablations_<dataset>.{md,json,csv}`` (the per-seed tables beside it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mer.metrics import ResultTable, mean_and_spread

from .config import ABLATIONS, PRESETS, preset
from .train import preset_overrides, train

VARIANT_NAMES = {
    "full": "CaM-HG (full)",
    "no_hypergraph": "w/o hypergraph (H)",
    "no_imputation": "w/o imputation (I)",
    "no_moe": "w/o MoE",
    "no_causal_factor": "w/o causal factor (C)",
    "no_gating": "w/o gating (G)",
}


def run_variant(config, run_dir: Path, *, data_root, device: str, show_progress: bool) -> ResultTable:
    """The missing-rate table of one (variant, seed) run: reused when it finished with the same configuration,
    resumed when it was stopped, trained otherwise."""
    saved, started = run_dir / "missing_rates.json", (run_dir / "checkpoints" / "last.pt").exists()
    if (saved.exists() or started) and (
            json.loads((run_dir / "config.json").read_text()) != json.loads(json.dumps(config.to_dict()))):
        raise SystemExit(f"{run_dir} holds a run with another configuration: delete it or pass another --runs-dir")
    if saved.exists():
        print(f"{run_dir.name}: reusing the finished run", flush=True)
    else:
        began = time.perf_counter()
        train(None if started else config, run_dir=run_dir, resume=started, data_root=data_root, device=device,
              plots=False, show_progress=show_progress)
        print(f"{run_dir.name}: {'resumed' if started else 'trained'} and evaluated in "
              f"{time.perf_counter() - began:.0f} s", flush=True)
    return ResultTable.load(saved)


def sweep(dataset: str, seeds, ablations, *, overrides: dict, runs_dir: Path, out_dir: Path, data_root=None,
          device: str = "auto", show_progress: bool = False) -> ResultTable:
    """Train and evaluate every (variant, seed); save and return the mean ± std table."""
    per_seed = []
    for seed in seeds:
        table = None
        for ablation in ablations:
            config = preset(dataset, seed=seed, ablation=ablation, **overrides)
            rates = run_variant(config, runs_dir / "camhg" / dataset / "ablations" / f"{ablation}-seed{seed}",
                                data_root=data_root, device=device, show_progress=show_progress)
            metric = "WAF1" if "WAF1" in rates.rows else "Acc2"  # Table 4's metric: WAF1, or Acc-2 for sentiment
            if table is None:
                table = ResultTable(f"CaM-HG ablations on {dataset}: test {metric} (%) by missing rate eta",
                                    "model", rates.columns)
            table.add_row(VARIANT_NAMES[ablation], rates.rows[metric])
        table.save(out_dir / f"ablations_{dataset}_seed{seed}")
        per_seed.append(table)
    summary = mean_and_spread(per_seed)
    summary.save(out_dir / f"ablations_{dataset}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camhg.ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dataset", default="embedded", choices=sorted(PRESETS))
    parser.add_argument("--data-root", default=None, help="folder of the published features (not for embedded)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=ABLATIONS)
    parser.add_argument("--epochs", type=int, nargs=3, metavar=("K1", "K2", "K3"), default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--dims", default=None, help="embedded only: 'full' or 'small' feature sizes")
    parser.add_argument("--num-dialogues", type=int, default=None, help="embedded only: dataset size")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--out", default="results/camhg")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    overrides = preset_overrides(args)
    summary = sweep(args.dataset, args.seeds, args.ablations, overrides=overrides, runs_dir=Path(args.runs_dir),
                    out_dir=Path(args.out), data_root=args.data_root, device=args.device,
                    show_progress=args.progress)
    summary.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
