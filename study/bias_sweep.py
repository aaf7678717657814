"""Bias sweep: ``python -m study.bias_sweep [--config FILE] [--address auto|ray://H:P] [key=value ...]``.

Trains the grid architectures x bias kinds x levels x mitigations x folds x seeds (see
:mod:`study.sweep_config` for the TOML schema and :mod:`fer_core.bias` for the bias kinds) as Ray tasks,
on this machine or on a cluster. The dataset enters Ray's object store once; every run biases its fold's
training part (the test fold is untouched and the same at every level), carves validation from the biased
part, trains, and predicts every test image. Without ``--config`` it runs
``experiments/bias_synthetic.toml`` (synthetic faces with a planted bias).

Writes ``results/<name>/``: ``config.toml`` and ``command.txt``; ``runs/<run_id>.parquet``, one file per
finished run, written atomically (its per-run summary is in the file's metadata), and, with
``sweep.save_models`` (the default), the run's model in ``models/<run_id>.pt``; then, from the run files,
``predictions.parquet`` (every test image of every run, with its attributes), ``runs.parquet`` (one row
per run: training-set counts, accuracy, macro-F1, gap, seconds), ``fairness.parquet``
(``fer_core.fairness.fairness_table``) and ``paired.parquet`` (``fer_core.fairness.paired_tests``: each
level and mitigation against level 0 without mitigation, over the same folds and seeds). A run that still
fails after ``sweep.max_failures`` retries is listed in ``failed_runs.json`` and the sweep goes on.

Resume: run the same command again, or ``python -m study.bias_sweep --resume results/<name>``; runs whose
file exists with the same config hash are skipped, the rest are trained. ``--max-runs N`` stops after N
new runs (the tables are written from what exists). ``--smoke-test``: 8 tiny runs, no dashboard.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray
import torch

from fer_core import __version__
from fer_core.bias import BiasSpec, apply_bias, bias_rng, bias_summary, check_spec
from fer_core.checkpoint import check_init, save_model
from fer_core.config import config_hash, load_toml, to_dict
from fer_core.crossval import check_teachers, train_on_split
from fer_core.data import BASE_SUBSET, FaceDataset
from fer_core.fairness import RUN_KEYS, fairness_table, paired_tests, unit_intervals, unit_metrics
from fer_core.splits import kfold_splits
from study.common import load_data, record_run, run_cli, setup_logging, write_table
from study.runtime import start_ray, trial_resources
from study.sweep_config import RunSpec, SweepExperiment, load_sweep, recipes, run_grid

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "bias_synthetic.toml"
SMOKE = {"name": "smoke-bias-sweep",
         "data": {"path": "synthetic", "synthetic": {"n": 160, "image_size": 32, "n_extra": 0}},
         "split": {"k": 2}, "train": {"epochs": 1, "batch_size": 16},
         "sweep": {"archs": ["main"], "tuned": "", "kinds": ["representational"],
                   "levels": {"representational": [1.0]}, "mitigations": ["none", "reweight"],
                   "seeds": [0], "n_boot": 20},
         "resources": {"dashboard": False}}
RUN_INFO = "run_info"
TAG_COLUMNS = ("run_id", "arch", "bias_kind", "bias_level", "bias_attr", "bias_group", "mitigation",
               "fold", "seed", "split_seed", "config_hash", "version")
_NO_ATTR = "sweep.fairness_attrs: {0!r} is not an attribute of dataset {1!r}; attributes: {2}"
_NO_CONFIG = "{0}: no config.toml; --resume needs a folder written by study.bias_sweep"
_NOT_A_SWEEP = ("{0}: its config.toml has no [sweep] table, so it was not written by study.bias_sweep (by "
                "study.tune or study.kfold?); --resume needs a bias sweep's results folder")
_FAILED = "run {0}/{1} FAILED: {2}: {3}"


@dataclass(frozen=True)
class RunTask:
    """What a worker needs for one run: the grid cell, its fold's rows, and the thread count."""

    spec: RunSpec
    train_idx: np.ndarray
    test_idx: np.ndarray
    split_seed: int
    threads: int = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m study.bias_sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help=f"sweep TOML (default {DEFAULT_CONFIG.name})")
    p.add_argument("--resume", metavar="RESULTS_DIR", help="continue the sweep in this folder")
    p.add_argument("--address", default="", help="Ray cluster: 'auto' or 'ray://HOST:PORT'")
    p.add_argument("--max-runs", type=int, default=0, help="train at most N new runs (0 = all)")
    p.add_argument("--tables-only", action="store_true",
                   help="train nothing: write the tables from the runs finished so far")
    p.add_argument("--smoke-test", action="store_true", help="8 one-epoch runs on 160 synthetic faces")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace) -> tuple[SweepExperiment, Path]:
    """The sweep config and its results folder (the saved config when resuming)."""
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.toml").is_file():
            raise FileNotFoundError(_NO_CONFIG.format(out))
        if "sweep" not in load_toml(out / "config.toml"):
            raise ValueError(_NOT_A_SWEEP.format(out))
        return load_sweep(str(out / "config.toml"), args.overrides), out
    exp = load_sweep(args.config or str(DEFAULT_CONFIG), args.overrides, SMOKE if args.smoke_test else None)
    return exp, Path(exp.results_dir) / exp.name


# ------------------------------------------------------------------------------------------- one run

def fold_rows(ds: FaceDataset, k: int, split_seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds of the base images, as row indices into ``ds`` (extras are never test rows)."""
    base = np.flatnonzero(ds.manifest["subset"].eq(BASE_SUBSET).to_numpy()) if "subset" in ds.manifest \
        else np.arange(len(ds))
    ids = ds.manifest["image_id"].to_numpy()[base]
    return [(base[tr], base[te]) for tr, te in kfold_splits(ds.labels[base], ids, k, split_seed, ds.classes)]


def run_one(ds: FaceDataset, task: RunTask) -> tuple[pd.DataFrame, dict, dict]:
    """Bias the fold's training part, train on it, predict the untouched test fold.

    Returns
    -------
    tuple
        The tagged prediction table (one row per test image), the run's summary (training-set
        counts, test accuracy, macro-F1, gap of the target attribute, seconds) and the trained model
        with its input normalisation (``{"model": module on the CPU, "mean": ..., "std": ...}``).
    """
    torch.set_num_threads(task.threads)
    spec, start = task.spec, time.perf_counter()
    rows = apply_bias(ds, task.train_idx, spec.bias, bias_rng(task.split_seed, spec.fold),
                      test_idx=task.test_idx)
    run = train_on_split(spec.cfg, ds, rows, task.test_idx, fold=spec.fold, split_seed=task.split_seed)
    preds = tag_predictions(run.predictions, spec, task.split_seed)
    info = {**bias_summary(ds, rows, spec.bias), "accuracy": run.metrics["accuracy"],
            "macro_f1": run.metrics["macro_f1"], "gap": signed_gap(preds, spec.bias.attr, spec.bias.group),
            "best_epoch": run.metrics["best_epoch"], "epochs_run": run.metrics["epochs_run"],
            "seconds": time.perf_counter() - start}
    trained = {"model": run.result.model.cpu(), "mean": run.result.mean, "std": run.result.std,
               "landmarks": run.result.landmarks}
    return preds, info, trained


def signed_gap(preds: pd.DataFrame, attr: str, group: str) -> float:
    """Accuracy of the other groups minus that of ``group`` in one run (NaN when a side is missing)."""
    if preds[attr].astype(object).eq(group).all() or not preds[attr].astype(object).eq(group).any():
        return float("nan")
    units = unit_metrics(preds, [attr], focus={attr: group})
    return float(units.loc[units["metric"] == "accuracy_gap", "value"].iloc[0])


def tag_predictions(preds: pd.DataFrame, spec: RunSpec, split_seed: int) -> pd.DataFrame:
    """Prediction rows with the run's keys in front (the README's ``predictions.parquet`` columns, Tables)."""
    tags = {"run_id": spec.run_id, "arch": spec.arch, "bias_kind": spec.bias.kind,
            "bias_level": float(spec.bias.level), "bias_attr": spec.bias.attr,
            "bias_group": spec.bias.group, "mitigation": spec.mitigation, "fold": spec.fold,
            "seed": spec.seed, "split_seed": split_seed, "config_hash": spec.config_hash,
            "version": __version__}
    body = preds.drop(columns=[c for c in tags if c in preds])
    return pd.concat([pd.DataFrame(tags, index=body.index), body], axis=1)


@ray.remote
def _run_task(ds: FaceDataset, task: RunTask) -> tuple[pd.DataFrame, dict, dict]:
    """Ray task around :func:`run_one`; Ray reuses its worker processes, so each imports torch once."""
    logging.basicConfig(level=logging.WARNING)
    return run_one(ds, task)


# ------------------------------------------------------------------------------------------- resume

def run_file(out: Path, spec: RunSpec) -> Path:
    """Where a finished run's predictions are stored."""
    return out / "runs" / f"{spec.run_id}.parquet"


def stored_hash(path: Path) -> str:
    """The config hash a run file was written with ("" when there is no such file)."""
    if not path.is_file():
        return ""
    return (pq.read_schema(path).metadata or {}).get(b"config_hash", b"").decode()


def is_done(out: Path, spec: RunSpec) -> bool:
    """A run is done when its file exists and was made by the same configuration (config hash)."""
    found = stored_hash(run_file(out, spec))
    if found and found != spec.config_hash:
        logger.warning("%s was made by another configuration; training it again", spec.run_id)
    return found == spec.config_hash


def model_file(out: Path, spec: RunSpec) -> Path:
    """Where a finished run's model is stored (``sweep.save_models``)."""
    return out / "models" / f"{spec.run_id}.pt"


def save_run_model(out: Path, spec: RunSpec, trained: dict, ds: FaceDataset, split_seed: int) -> Path:
    """The run's model as a ``study.evaluate`` model file; its config names the bias, fold and seeds."""
    config = {**to_dict(spec.cfg), "bias": to_dict(spec.bias), "fold": spec.fold, "split_seed": split_seed,
              "run_id": spec.run_id, "config_hash": spec.config_hash}
    return save_model(model_file(out, spec), trained["model"], arch=spec.arch, classes=ds.classes,
                      input_size=ds.image_size, mean=trained["mean"], std=trained["std"], config=config,
                      landmarks=trained["landmarks"])


def save_run(out: Path, spec: RunSpec, preds: pd.DataFrame, info: dict) -> None:
    """Write one run's file atomically, its summary in the Parquet metadata."""
    write_table(preds, run_file(out, spec), config_hash=spec.config_hash,
                **{RUN_INFO: json.dumps({"run_id": spec.run_id, **info})})


def read_run_info(path: Path) -> dict:
    """The summary that :func:`save_run` stored with a run's predictions."""
    return json.loads((pq.read_schema(path).metadata or {})[RUN_INFO.encode()])


# ------------------------------------------------------------------------------------------- driver

def capacity(resources: dict[str, float]) -> int:
    """How many runs the cluster can hold at once with ``resources`` per run."""
    total = ray.cluster_resources()
    slots = [total.get("CPU", 1) / max(resources["cpu"], 1e-9)]
    if resources.get("gpu"):
        slots.append(total.get("GPU", 0) / resources["gpu"])
    return max(1, int(min(slots)))


def submit(ds_ref: ray.ObjectRef, task: RunTask, resources: dict[str, float], retries: int) -> ray.ObjectRef:
    """Start one run as a Ray task, retried ``retries`` times on an exception or a dead worker."""
    options = {"num_cpus": resources["cpu"], "num_gpus": resources.get("gpu", 0), "max_retries": retries,
               "retry_exceptions": True}
    return _run_task.options(**options).remote(ds_ref, task)


def execute(tasks: list[RunTask], ds: FaceDataset, exp: SweepExperiment, out: Path) -> list[dict]:
    """Run ``tasks`` with at most N in flight; save each finished run; return the failures."""
    resources = trial_resources(exp.resources)
    limit = exp.sweep.max_in_flight or capacity(resources)
    logger.info("%d runs to train, %s per run, at most %d at once", len(tasks), resources, limit)
    ds_ref = ray.put(ds)  # once: every task reads the same object-store copy
    queue, pending, failures, done = list(tasks), {}, [], 0
    while queue or pending:
        while queue and len(pending) < limit:
            task = queue.pop(0)
            pending[submit(ds_ref, task, resources, exp.sweep.max_failures)] = task
        ready = []
        while not ready:  # a short timeout, so that Ctrl-C stops the sweep at once, not after a run
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        task, done = pending.pop(ready[0]), done + 1
        try:
            preds, info, trained = ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # after its retries
            failures.append({"run_id": task.spec.run_id, "error": type(exc).__name__, "message": str(exc)})
            print(_FAILED.format(done, len(tasks), task.spec.label, type(exc).__name__), flush=True)
            continue
        if exp.sweep.save_models:  # before the run file, which marks the run as done
            save_run_model(out, task.spec, trained, ds, task.split_seed)
        save_run(out, task.spec, preds, info)
        print(f"run {done}/{len(tasks)} done: {task.spec.label}: acc {info['accuracy']:.2f} "
              f"gap {info['gap']:.2f} ({info['seconds']:.1f} s)", flush=True)
    return failures


def make_tasks(exp: SweepExperiment, ds: FaceDataset, grid: list[RunSpec]) -> list[RunTask]:
    """One task per grid cell, with its fold's training and test rows."""
    folds = fold_rows(ds, exp.split.k, exp.split.split_seed)
    threads = max(1, int(exp.resources.cpus_per_trial))
    return [RunTask(spec, *folds[spec.fold], exp.split.split_seed, threads) for spec in grid]


def pending_runs(out: Path, grid: list[RunSpec], max_runs: int) -> list[RunSpec]:
    """The grid cells still to train (``max_runs`` of them at most when positive)."""
    todo = [spec for spec in grid if not is_done(out, spec)]
    if len(todo) < len(grid):
        print(f"resuming: {len(grid) - len(todo)} of {len(grid)} runs already done, skipped", flush=True)
    return todo[:max_runs] if max_runs > 0 else todo


def earlier_failures(out: Path, grid: list[RunSpec]) -> list[dict]:
    """After an invocation that trained nothing: the runs of ``failed_runs.json`` still not done.

    The file is rewritten without the runs another invocation has finished since, and kept otherwise,
    so ``--tables-only`` does not lose the record of a run that kept failing.
    """
    path = out / "failed_runs.json"
    if not path.is_file():
        return []
    done = {spec.run_id for spec in grid if is_done(out, spec)}
    left = [f for f in json.loads(path.read_text()) if f.get("run_id") not in done]
    write_failures(out, left)
    return left


def write_failures(out: Path, failures: list[dict]) -> None:
    """``failed_runs.json`` lists the runs that failed in this invocation (removed when none did)."""
    path = out / "failed_runs.json"
    if failures:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(failures, indent=2))
        os.replace(tmp, path)
    elif path.exists():
        path.unlink()


# ------------------------------------------------------------------------------------------- tables

def read_runs(out: Path, grid: list[RunSpec]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predictions of every finished run of the grid (same config hash), and one summary row per run."""
    files = [run_file(out, spec) for spec in grid if stored_hash(run_file(out, spec)) == spec.config_hash]
    if not files:
        return pd.DataFrame(columns=list(TAG_COLUMNS)), pd.DataFrame()
    preds = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    keys = preds.drop_duplicates("run_id").set_index("run_id")[list(TAG_COLUMNS[1:])]
    info = pd.DataFrame([read_run_info(f) for f in files]).set_index("run_id")
    return preds, keys.join(info).reset_index()


def composition(ds: FaceDataset, attributes: list[str]) -> pd.DataFrame:
    """Class x group counts of the base images (``attribute``, ``group``, ``label``, ``n``)."""
    base = ds.base().manifest
    parts = []
    for attr in attributes:
        groups = base[attr].astype(object).where(base[attr].notna(), "unknown")
        counts = base.assign(group=groups).groupby(["group", "label"]).size().rename("n").reset_index()
        parts.append(counts.assign(attribute=attr)[["attribute", "group", "label", "n"]])
    return pd.concat(parts, ignore_index=True)


SWEEP_TABLES = ("predictions.parquet", "runs.parquet", "fairness.parquet", "paired.parquet")


def write_tables(out: Path, grid: list[RunSpec], exp: SweepExperiment, ds: FaceDataset) -> pd.DataFrame:
    """predictions, runs, composition, fairness and paired tables from the run files; returns predictions."""
    chash = config_hash(to_dict(exp))
    preds, runs = read_runs(out, grid)
    attrs = fairness_attributes(exp, ds)
    write_table(composition(ds, attrs), out / "composition.parquet", config_hash=chash)
    if preds.empty:
        stale = [name for name in SWEEP_TABLES if (out / name).exists()]
        for name in stale:  # made by another configuration, or by runs no longer in the grid
            (out / name).unlink()
        logger.warning("no finished run of this configuration yet: no predictions, fairness or paired tables"
                       + (f" (removed the earlier {', '.join(stale)})" if stale else ""))
        return preds
    write_table(preds, out / "predictions.parquet", config_hash=chash)
    write_table(runs, out / "runs.parquet", config_hash=chash)
    fairness = fairness_table(preds, attrs, list(ds.classes), n_boot=exp.sweep.n_boot,
                              seed=exp.split.split_seed, intersections=exp.sweep.intersections)
    write_table(fairness, out / "fairness.parquet", config_hash=chash)
    paired = paired_tests(preds, attrs, focus=focus_groups(exp))
    write_table(paired, out / "paired.parquet", config_hash=chash)
    return preds


def fairness_attributes(exp: SweepExperiment, ds: FaceDataset) -> list[str]:
    """The attributes of the fairness tables: ``sweep.fairness_attrs``, else every dataset attribute."""
    return list(exp.sweep.fairness_attrs or ds.attributes)


def focus_groups(exp: SweepExperiment) -> dict[str, str]:
    """Group each attribute's signed gap is measured against: the target group, plus ``sweep.focus``."""
    return {exp.sweep.attr: exp.sweep.group, **exp.sweep.focus}


def summary_lines(preds: pd.DataFrame, exp: SweepExperiment) -> list[str]:
    """One line per run group: accuracy, macro-F1 and the target attribute's signed gaps, 95% t intervals."""
    stats = unit_intervals(preds, [exp.sweep.attr], focus=focus_groups(exp)).set_index("metric")
    lines = []
    for key, g in stats.groupby(RUN_KEYS, sort=False):
        arch, kind, level, mitigation = key
        cells = [f"{m} {g.loc[m, 'mean']:.3f} [{g.loc[m, 'ci_low']:.3f}, {g.loc[m, 'ci_high']:.3f}]"
                 for m in ("accuracy", "macro_f1", "accuracy_gap", "balanced_accuracy_gap") if m in g.index]
        gap_dir = g.loc["accuracy_gap", "direction"] if "accuracy_gap" in g.index else ""
        lines.append(f"{arch:9s} {kind:16s} {level:<5g} {mitigation:9s} n={int(g['n_units'].iloc[0])}: "
                     + "  ".join(cells) + f"  ({gap_dir})")
    return lines


# ------------------------------------------------------------------------------------------- entry point

def validate(exp: SweepExperiment, ds: FaceDataset) -> None:
    """Fail before any training: every condition fits the dataset, every tabulated attribute exists."""
    check_spec(ds, BiasSpec("representational", 1.0, exp.sweep.attr, exp.sweep.group))
    for spec in exp.sweep.conditions():
        check_spec(ds, spec)
    for attr in fairness_attributes(exp, ds):
        if attr not in ds.attributes:
            raise KeyError(_NO_ATTR.format(attr, ds.name, list(ds.attributes)))
    for attr, group in exp.sweep.focus.items():
        check_spec(ds, BiasSpec("representational", 1.0, attr, group))


def prepare(args: argparse.Namespace, argv: list[str] | None
            ) -> tuple[SweepExperiment, Path, FaceDataset, list[RunSpec]]:
    """Config, results folder, dataset (extras kept) and run grid, all checked before training."""
    exp, out = resolve(args)
    base = recipes(exp)
    for arch, train in base.items():
        check_init(train.init, [train.arch], [train.width], f"init of the {arch} recipe")
    grid = run_grid(exp, base)
    ds = load_data(exp.data.path, exp.data.synthetic)
    validate(exp, ds)
    tests = [test for _, test in fold_rows(ds, exp.split.k, exp.split.split_seed)]
    for train in base.values():
        check_teachers(ds, train, tests)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    record_run(out, to_dict(exp), argv)
    logger.info("%s: %d base images, %d extras; %d-fold; %d runs in the grid; results in %s", ds.name,
                len(ds.base()), len(ds) - len(ds.base()), exp.split.k, len(grid), out)
    return exp, out, ds, grid


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) a bias sweep and write its tables."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    exp, out, ds, grid = prepare(args, argv)
    todo = [] if args.tables_only else pending_runs(out, grid, args.max_runs)
    failures: list[dict] = []
    if todo:
        joined = ray.is_initialized()  # a caller's runtime (a test, a notebook) is left running
        start_ray(exp.resources, args.address)
        try:
            failures = execute(make_tasks(exp, ds, todo), ds, exp, out)
        finally:
            if not joined:
                ray.shutdown()
    if todo:
        write_failures(out, failures)
    else:
        failures = earlier_failures(out, grid)
    preds = write_tables(out, grid, exp, ds)
    if not preds.empty:
        print("\nmean over folds x seeds [95% t interval]:")
        print("\n".join(summary_lines(preds, exp)))
    failed = f"{len(failures)} failed" if todo else f"{len(failures)} failed in an earlier invocation"
    print(f"\n{preds['run_id'].nunique() if len(preds) else 0} of {len(grid)} runs in {out}; "
          f"{failed}" + (f" (see {out / 'failed_runs.json'})" if failures else ""))
    return 1 if failures and todo else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.bias_sweep"))
