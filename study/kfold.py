"""Cross-validate one configuration: ``python -m study.kfold --data DIR --arch NAME [key=value ...]``.

Stratified k-fold (``k=5`` by default, ``split_seed=0``), images with the same pixel hash never on both
sides, validation for early stopping carved from the training folds. Writes to ``--out`` (default
``results/kfold-<arch>-<time>/``): ``folds.parquet`` (per-fold accuracy, macro/micro precision, recall,
F1, per-class F1, confusion matrix), ``predictions.parquet`` (every test image), ``models/fold<i>.pt``,
the resolved ``config.toml`` and ``command.txt``; prints mean ± std over folds.

Overrides are training keys (``epochs=30 lr=0.002 optimizer=sgd ...``, see ``fer_core.config.TrainConfig``)
or split keys (``k=10 split_seed=1``). ``--data synthetic`` uses the built-in generated faces.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fer_core.checkpoint import save_model
from fer_core.config import SplitConfig, TrainConfig, from_dict, load_toml, parse_overrides, to_dict
from fer_core.crossval import run_kfold
from fer_core.models import list_models
from study.common import load_data, make_run_dir, record_run, setup_logging, write_table

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall")
SMOKE = {"train": {"epochs": 2, "batch_size": 32}, "split": {"k": 2}, "synthetic": {"n": 160}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m study.kfold", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="canonical dataset folder, or 'synthetic'")
    p.add_argument("--arch", choices=list_models(), help="architecture (default: the config's)")
    p.add_argument("--config", help="TOML with [train] and [split] tables")
    p.add_argument("--out", help="output folder (default results/kfold-<arch>-<time>)")
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic run, 2 folds, 2 epochs")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)  # key=value may come before or after the options


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, SplitConfig, dict]:
    """Defaults < config file < smoke-test settings < command line; split keys go to [split]."""
    data = load_toml(args.config) if args.config else {}
    train, split = dict(data.get("train", {})), dict(data.get("split", {}))
    synthetic = dict(data.get("synthetic", {}))
    if args.smoke_test:
        train.update(SMOKE["train"])
        split.update(SMOKE["split"])
        synthetic.update(SMOKE["synthetic"])
    split_keys = {f.name for f in dataclasses.fields(SplitConfig)}
    for key, value in parse_overrides(args.overrides).items():
        (split if key in split_keys else train)[key] = value
    if args.arch:
        train["arch"] = args.arch
    where = args.config or "command line"
    return from_dict(TrainConfig, train, where), from_dict(SplitConfig, split, where), synthetic


def summarize(folds: pd.DataFrame) -> str:
    """Mean ± std over folds of the headline metrics, one line each."""
    lines = [f"{len(folds)}-fold cross-validation of {folds['arch'].iloc[0]}:"]
    for m in SUMMARY_METRICS:
        lines.append(f"  {m:16s} {folds[m].mean():.4f} ± {folds[m].std(ddof=1):.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run k-fold cross-validation of one configuration."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    train, split, synthetic = resolve(args)
    ds = load_data("synthetic" if args.smoke_test else args.data, synthetic).base()
    out = Path(args.out) if args.out else make_run_dir("results", f"kfold-{train.arch}")
    out.mkdir(parents=True, exist_ok=True)
    record_run(out, {"data": args.data, "train": to_dict(train), "split": to_dict(split)}, argv)
    logger.info("%s: %d images, classes %s; writing to %s", ds.name, len(ds), list(ds.classes), out)
    folds, preds, runs = run_kfold(train, split, ds)
    for run in runs:
        save_model(out / "models" / f"fold{run.fold}.pt", run.result.model, arch=train.arch,
                   classes=ds.classes, input_size=ds.image_size, mean=run.result.mean,
                   std=run.result.std, config=to_dict(train))
    meta = {"config_hash": folds["config_hash"].iloc[0]}
    write_table(folds, out / "folds.parquet", **meta)
    write_table(preds, out / "predictions.parquet", **meta)
    print(summarize(folds))
    print("per-class F1 (mean): " + ", ".join(
        f"{c} {np.mean(folds[f'f1_{c}']):.3f}" for c in ds.classes))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
