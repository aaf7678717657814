"""A real search on fer4, confirmed by 5-fold cross-validation, next to the default recipe.

1. ``study.tune`` with ``experiments/fer4.toml`` (24 trials over the three architectures, 3 folds inside
   each trial, ASHA);
2. the top 3 configurations by validation score, each re-run with 5-fold cross-validation;
3. the default recipe's 5-fold macro-F1 (from ``--baseline DIR``, the ``--out`` of kfold_fer4.py for
   ``main``, or run here). Prints both; target: tuned best >= 0.85 mean macro-F1.

Run: ``python benchmarks/tune_fer4.py --data DIR [--baseline DIR] [key=value ...]`` (overrides of the
experiment, e.g. ``search.num_samples=12``). Hours on 2 CPU cores: run it in the background.
"""

from __future__ import annotations

import argparse
import logging
import tomllib
from pathlib import Path

import pandas as pd

from fer_core.config import SplitConfig, TrainConfig
from fer_core.crossval import run_kfold
from fer_core.data import load_dataset
from study import tune
from study.experiment import load_experiment, trial_train_config

ROOT = Path(__file__).resolve().parents[1]


def five_fold(cfg: TrainConfig, data) -> pd.Series:
    folds, _, _ = run_kfold(cfg, SplitConfig(k=5), data)
    return folds["macro_f1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="canonical fer4 folder")
    p.add_argument("--baseline", help="kfold_fer4.py --out folder holding main/folds.parquet")
    p.add_argument("--results", default="results", help="results_dir for the study")
    p.add_argument("--top", type=int, default=3, help="confirm this many best trials with 5 folds")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = str(ROOT / "experiments" / "fer4.toml")
    overrides = [f"data.path={args.data}", f"results_dir={args.results}", *args.overrides]
    study = Path(args.results) / load_experiment(config, overrides).name
    argv = ["--resume", str(study)] if (study / "tune").exists() else ["--config", config, *overrides]
    tune.main(argv)
    exp = load_experiment(str(study / "config.toml"))
    summary = pd.read_parquet(study / "summary.parquet")
    top = summary[summary["status"] == "completed"].sort_values("objective", ascending=False).head(args.top)
    data = load_dataset(args.data).base()
    rows = []
    for r in top.itertuples():
        cfg = trial_train_config(exp.train, {k: getattr(r, k) for k in exp.search.space})
        f1 = five_fold(cfg, data)
        rows.append((r.trial_id, cfg.arch, r.cv_macro_f1, f1.mean(), f1.std(ddof=1)))
        print(f"trial {r.trial_id} ({cfg.arch}): 3-fold {r.cv_macro_f1:.4f}, 5-fold {f1.mean():.4f} ± "
              f"{f1.std(ddof=1):.4f}", flush=True)
    if args.baseline:
        base = pd.read_parquet(Path(args.baseline) / "main" / "folds.parquet")["macro_f1"]
    else:
        base = five_fold(TrainConfig(), data)
    best = max(rows, key=lambda row: row[3])
    print(f"default recipe (main): 5-fold macro-F1 {base.mean():.4f} ± {base.std(ddof=1):.4f}")
    print(f"tuned best (trial {best[0]}, {best[1]}): 5-fold macro-F1 {best[3]:.4f} ± {best[4]:.4f} "
          f"(target >= 0.85)")
    print(f"best.toml of the study: {tomllib.loads((study / 'best.toml').read_text())['scores']}")


if __name__ == "__main__":
    main()
