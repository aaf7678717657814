"""Cross-validate one configuration: ``python -m study.kfold --data DIR --arch NAME [key=value ...]``.

Stratified k-fold (``k=5`` by default, ``split_seed=0``), images with the same pixel hash never on both
sides, validation for early stopping carved from the training folds. Writes to ``--out`` (default
``results/kfold-<arch>-<time>/``): ``folds.parquet`` (per-fold accuracy, macro/micro precision, recall,
F1, per-class F1, confusion matrix), ``predictions.parquet`` (every test image), ``models/fold<i>.pt``,
the resolved ``config.toml`` and ``command.txt``; prints mean ± std over folds.

Overrides are training keys (``epochs=30 lr=0.002 optimizer=sgd ...``, see ``fer_core.config.TrainConfig``)
or split keys (``k=10 split_seed=1``), flat or dotted (``train.lr=0.002 split.k=10``). ``--config`` may be
an experiment file (its ``[data]`` path and ``[data.synthetic]`` are used); ``--data`` overrides its path,
and ``--data synthetic`` uses the built-in generated faces.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fer_core.checkpoint import check_init, save_model
from fer_core.config import SplitConfig, TrainConfig, from_dict, load_toml, parse_overrides, to_dict
from fer_core.crossval import check_teachers, run_kfold
from fer_core.models import list_models
from fer_core.splits import kfold_splits
from study.common import (
    SYNTHETIC,
    data_settings,
    load_data,
    make_run_dir,
    record_run,
    run_cli,
    setup_logging,
    write_table,
)

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall")
SMOKE = {"train": {"epochs": 2, "batch_size": 32}, "split": {"k": 2}, "synthetic": {"n": 160}}
READ_TABLES = {"train", "split", "data", "synthetic"}
OTHER_TABLES = {"name", "results_dir", "search", "resources", "sweep"}  # other commands' keys of a file
_UNKNOWN_TABLE = ("{0}: unknown top-level key(s) {1}; study.kfold reads [train], [split] and [data] "
                  "(path, [data.synthetic])")
_UNKNOWN_KEY = ("command line: {0!r} is neither a training key ({1}) nor a split key ({2}); dotted keys "
                "train.X, split.X and data.path / data.synthetic.X work too")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m study.kfold", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="canonical dataset folder, or 'synthetic' (default: the config's "
                   "[data] path, else synthetic)")
    p.add_argument("--arch", choices=list_models(), help="architecture (default: the config's)")
    p.add_argument("--config", help="TOML with [train], [split] and [data] tables (an experiment file "
                   "works: its [search] and [resources] are ignored)")
    p.add_argument("--out", help="output folder (default results/kfold-<arch>-<time>)")
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic run, 2 folds, 2 epochs")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)  # key=value may come before or after the options


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, SplitConfig, str, dict]:
    """Training and split configs, dataset and generator keys: defaults < file < smoke test < command line.

    The file may be an experiment file: its ``[data]`` is read, the tables of other commands
    (``[search]``, ``[resources]``, ``[sweep]``) are ignored. Command-line keys are training or split keys,
    flat (``lr=0.01 k=3``) or dotted (``train.lr=0.01 split.k=3 data.path=DIR``). ``--data`` wins over both.
    """
    file = load_toml(args.config) if args.config else {}
    unknown = set(file) - READ_TABLES - OTHER_TABLES
    if unknown:
        raise KeyError(_UNKNOWN_TABLE.format(args.config, sorted(unknown)))
    path, synthetic = data_settings(file, args.config)
    train, split = dict(file.get("train", {})), dict(file.get("split", {}))
    from_dict(TrainConfig, train, args.config)  # the file's own mistakes are named as the file's
    from_dict(SplitConfig, split, args.config)
    if args.smoke_test:
        train.update(SMOKE["train"])
        split.update(SMOKE["split"])
        synthetic.update(SMOKE["synthetic"])
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    split_keys = {f.name for f in dataclasses.fields(SplitConfig)}
    for key, value in parse_overrides(args.overrides).items():
        if key in ("train", "split") and isinstance(value, dict):
            (train if key == "train" else split).update(value)
        elif key == "data":
            cli_path, cli_synthetic = data_settings({"data": value}, "command line")
            path = cli_path or path
            synthetic.update(cli_synthetic)
        elif key in split_keys:
            split[key] = value
        elif key in train_keys:
            train[key] = value
        else:
            raise KeyError(_UNKNOWN_KEY.format(key, sorted(train_keys), sorted(split_keys)))
    if args.arch:
        train["arch"] = args.arch
    data = SYNTHETIC if args.smoke_test else args.data or path or SYNTHETIC
    return (from_dict(TrainConfig, train, "command line"), from_dict(SplitConfig, split, "command line"),
            data, synthetic)


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
    train, split, data, synthetic = resolve(args)
    ds = load_data(data, synthetic).base()
    # a class too small for k is refused here, before any output folder is made
    folds = kfold_splits(ds.labels, ds.manifest["image_id"].to_numpy(), split.k, split.split_seed, ds.classes)
    check_init(train.init, [train.arch], [train.width], "init")  # so is a starting model of another arch
    check_teachers(ds, train, [test for _, test in folds])  # and teachers that saw these test folds
    out = Path(args.out) if args.out else make_run_dir("results", f"kfold-{train.arch}")
    out.mkdir(parents=True, exist_ok=True)
    used = {"path": data, "synthetic": synthetic} if data == SYNTHETIC and synthetic else {"path": data}
    record_run(out, {"data": used, "train": to_dict(train), "split": to_dict(split)}, argv)
    logger.info("%s: %d images, classes %s; writing to %s", ds.name, len(ds), list(ds.classes), out)
    folds, preds, runs = run_kfold(train, split, ds)
    for run in runs:
        save_model(out / "models" / f"fold{run.fold}.pt", run.result.model, arch=train.arch,
                   classes=ds.classes, input_size=ds.image_size, mean=run.result.mean,
                   std=run.result.std, config=to_dict(train), landmarks=run.result.landmarks)
    meta = {"config_hash": folds["config_hash"].iloc[0]}
    write_table(folds, out / "folds.parquet", **meta)
    write_table(preds, out / "predictions.parquet", **meta)
    print(summarize(folds))
    print("per-class F1 (mean): " + ", ".join(
        f"{c} {np.mean(folds[f'f1_{c}']):.3f}" for c in ds.classes))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.kfold"))
