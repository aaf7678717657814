"""Overhead of ``study.tune`` against plain processes, on the same configurations and epochs, in one run.

The study is ``experiments/default.toml`` (what ``python -m study.tune`` runs with no arguments) with FIFO
scheduling, no refit, no dashboard and no early stopping, so that every configuration does the same work
in all three ways of running it:

(a) ``python -m study.tune``: wall time of the whole command, Ray's start-up and shut-down included;
(b) the old scripts' way: one process trains the configurations one after another (torch uses all cores);
(c) the ideal: one plain single-threaded process per core, each paying its own ``import torch`` and data
    generation once, then taking the next configuration whenever it is free.
A configuration is trained by ``study.trainable``'s functions in all three: its k folds in lockstep for
the epoch budget, then its test folds scored. Prints the three wall times, (a)/(c) (target <= 1.10) and
(a) - (c), the seconds Ray Tune adds (most of it a fixed start-up cost, so longer studies pay relatively
less).

Run: ``python benchmarks/tune_overhead.py [--trials N] [--epochs N] [--n N] [--k N]`` (default: the
default study's sizes, 6 x 3 folds x 12 epochs, about 4 minutes per way on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT = ROOT / "experiments" / "default.toml"
# every trial runs its whole budget, so that all three do the same work whatever the scheduler would cut
FIXED = ["name=overhead", "search.scheduler=fifo", "search.refit=false", "resources.dashboard=false",
         "train.patience=1000"]


def write_config(path: Path, args: argparse.Namespace) -> None:
    """``experiments/default.toml`` with the benchmark's sizes and the settings above."""
    from fer_core.config import to_dict, to_toml
    from study.experiment import load_experiment

    given = {"data.synthetic.n": args.n, "split.k": args.k, "train.epochs": args.epochs,
             "search.num_samples": args.trials, "search.n_startup_trials": args.trials}
    sizes = [f"{key}={value}" for key, value in given.items() if value is not None]
    path.write_text(to_toml(to_dict(load_experiment(str(DEFAULT), [*FIXED, *sizes]))))


_WORKER: dict = {}


def load_worker(config_path: str, threads: int) -> None:
    """Start-up of a plain worker process: ``import torch``, the config and the data, once."""
    import torch

    from study.common import load_data
    from study.experiment import load_experiment

    torch.set_num_threads(threads)
    exp = load_experiment(config_path)
    _WORKER.update(exp=exp, data=load_data(exp.data.path, exp.data.synthetic).base())


def train_one(params: dict) -> None:
    """Train one trial configuration exactly as a trial does: k folds in lockstep, then the test folds."""
    from study.trainable import final_scores, make_trainers, step_report

    exp, data = _WORKER["exp"], _WORKER["data"]
    trainers, tests = make_trainers(exp, data, params)
    while not all(tr.done for tr in trainers):
        step_report(trainers)
    final_scores(exp, data, trainers, tests)


def run_tune(config: Path, results: Path) -> tuple[float, list[dict]]:
    """(a): the whole ``study.tune`` command; returns wall time and the trials' configurations."""
    import pandas as pd

    start = time.perf_counter()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-m", "study.tune", "--config", str(config), f"results_dir={results}"],
                   check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = pd.read_parquet(results / "overhead" / "summary.parquet")
    space = list(tomllib.loads(config.read_text())["search"]["space"])
    params = [{key: row[key] for key in space} for row in summary.to_dict("records")]
    return wall, params


def run_pool(config: Path, params: list[dict], workers: int, threads: int) -> float:
    """(b) and (c): ``workers`` fresh processes, each taking the next configuration when it is free."""
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=load_worker,
                             initargs=(str(config), threads)) as pool:
        list(pool.map(train_one, params, chunksize=1))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, help="configurations (default: the default study's num_samples)")
    p.add_argument("--epochs", type=int, help="epochs per fold (default: the default study's)")
    p.add_argument("--n", type=int, help="synthetic faces (default: the default study's)")
    p.add_argument("--k", type=int, help="folds (default: the default study's)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tune-overhead-") as name:  # the study's files go with it
        tmp = Path(name)
        config = tmp / "overhead.toml"
        write_config(config, args)
        a, params = run_tune(config, tmp / "results")
        c = run_pool(config, params, args.workers, threads=1)
        b = run_pool(config, params, 1, threads=args.workers)  # a script: one process, all cores to torch
        doc = tomllib.loads(config.read_text())
    archs = ", ".join(p["arch"] for p in params)
    print(f"{len(params)} configurations ({archs}) x {doc['split']['k']} folds x "
          f"{doc['train']['epochs']} epochs, n={doc['data']['synthetic']['n']}, {args.workers} cores")
    print(f"(a) study.tune (Ray Tune + Optuna, reused workers): {a:7.1f} s")
    print(f"(b) one plain process, one config after another:   {b:7.1f} s")
    print(f"(c) {args.workers} plain processes filling the cores:        {c:7.1f} s")
    print(f"(a)/(c) = {a / c:.3f}   (target <= 1.10);  (b)/(c) = {b / c:.3f};  (a) - (c) = {a - c:.1f} s")


if __name__ == "__main__":
    main()
