"""Hyperparameter and architecture search: ``python -m study.tune [--config FILE] [key=value ...]``.

Ray Tune runs the trials (on this machine, or on a cluster with ``--address auto|ray://HOST:PORT``),
Optuna's seeded TPE proposes them, ASHA stops the weak ones early, and every trial is a k-fold
cross-validation with its folds in lockstep (see :mod:`study.trainable`). Without ``--config`` it runs
``experiments/default.toml`` (built-in synthetic faces, a few minutes on 2 cores).

Writes ``results/<name>/``: ``config.toml`` and ``command.txt``, ``trials.parquet`` (trial x fold x
epoch), ``summary.parquet`` (one row per trial), ``best.toml`` and ``best/model.pt``, Ray's experiment
state and TensorBoard logs under ``tune/``; prints the Ray dashboard URL, progress, and the top 5.

``python -m study.tune --resume results/<name>`` continues a study whose driver was stopped.
Overrides use dotted keys: ``search.num_samples=24 split.k=5 resources.gpus_per_trial=0.25``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import ray

from fer_core.checkpoint import check_init
from fer_core.config import to_dict
from fer_core.crossval import check_teachers
from fer_core.splits import kfold_splits
from study.common import load_data, record_run, run_cli, setup_logging
from study.experiment import ExperimentConfig, load_experiment
from study.results import best_trial, refit_best, top_table, write_best, write_outputs
from study.runtime import start_ray, trial_resources
from study.search import check_resumable, make_tuner, restore_tuner

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "default.toml"
SMOKE = {"name": "smoke", "data": {"path": "synthetic", "synthetic": {"n": 120}},
         "split": {"k": 2}, "train": {"epochs": 2, "batch_size": 16},
         "search": {"num_samples": 2, "grace_period": 1, "n_startup_trials": 2},
         "resources": {"dashboard": False}}
_EXISTS = ("{0} already holds a study; resume it with `python -m study.tune --resume {0}`, "
           "or choose another name (name=...)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m study.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"experiment TOML (default {DEFAULT_CONFIG.name})")
    p.add_argument("--resume", metavar="RESULTS_DIR", help="continue the study in this folder")
    p.add_argument("--address", default="", help="Ray cluster: 'auto' or 'ray://HOST:PORT'")
    p.add_argument("--smoke-test", action="store_true", help="2 tiny trials on 120 synthetic faces")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)  # key=value may come before or after the options


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    """The experiment config and its results folder (the saved config when resuming)."""
    if args.resume:
        out = Path(args.resume)
        check_resumable(out / "tune")  # before Ray starts: a torn state is refused at once
        return load_experiment(str(out / "config.toml"), args.overrides), out
    config = args.config or str(DEFAULT_CONFIG)
    exp = load_experiment(config, args.overrides, SMOKE if args.smoke_test else None)
    out = Path(exp.results_dir) / exp.name
    if (out / "tune").exists():
        if not args.smoke_test:
            raise FileExistsError(_EXISTS.format(out))
        shutil.rmtree(out / "tune")  # a smoke test always starts afresh
    return exp, out


def check_init_fits(exp: ExperimentConfig) -> None:
    """Refuse a ``train.init`` model that some trial of the search space could not start from."""
    space = exp.search.space
    if "teachers" in space:
        raise ValueError("search.space.teachers: the teachers are not searchable; set train.teachers, and "
                         "compare with and without them by study.kfold")
    if "init" in space:
        raise ValueError("search.space.init: the starting model is not searchable; set train.init to one "
                         "model file (or leave it empty), and compare with and without it by study.kfold")
    if not exp.train.init:
        return
    archs = space.get("arch", [exp.train.arch])
    widths = space.get("width", [exp.train.width])
    if isinstance(widths, dict):
        widths = [widths["low"], widths["high"]]
    searched = [k for k in ("arch", "width") if k in space]
    where = "train.init" + (f" with search.space.{' and '.join(searched)} {[space[k] for k in searched]}"
                            if searched else "")
    check_init(exp.train.init, archs, widths, where)


INTERRUPTED = 130  # the exit status of a study stopped before all its trials finished (as after Ctrl-C)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) a study and write its tables, best config and refit model."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    exp, out = resolve(args)
    check_init_fits(exp)
    data = load_data(exp.data.path, exp.data.synthetic).base()
    folds = kfold_splits(data.labels, data.manifest["image_id"].to_numpy(), exp.split.k, exp.split.split_seed,
                         data.classes)
    check_teachers(data, exp.train, [test for _, test in folds])
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        record_run(out, to_dict(exp), argv)
    start_ray(exp.resources, args.address)
    try:
        resources = trial_resources(exp.resources)
        logger.info("%s: %d images; %d-fold; trial resources %s; results in %s",
                    data.name, len(data), exp.split.k, resources, out)
        tuner = (restore_tuner if args.resume else make_tuner)(exp, data, resources, out)
        results = tuner.fit()
        finished = results.num_terminated + results.num_errors
        if finished < exp.search.num_samples:  # stopped (Ctrl-C): Tune saved its state; tables would mislead
            print(f"\nthe study stopped with {finished} of {exp.search.num_samples} trials finished; no "
                  f"table or best model written. Go on with: python -m study.tune --resume {out}")
            return INTERRUPTED
        summary = write_outputs(out, results, exp)
        print(f"\ntop 5 of {len(summary)} trials (objective = {exp.search.objective}):")
        print(top_table(summary, exp))
        best = best_trial(summary)
        if best is None:
            print("no trial completed all its folds; no best configuration")
            return 1
        doc = write_best(out, best, exp)
        s = doc["scores"]
        print(f"best: trial {doc['trial_id']} ({doc['train']['arch']}), {exp.split.k}-fold macro-F1 "
              f"{s['cv_macro_f1']:.4f} ± {s['cv_macro_f1_std']:.4f} -> {out / 'best.toml'}")
        if exp.search.refit:
            print(f"refit on all {len(data)} images -> {refit_best(out, doc, exp, data)}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.tune"))
