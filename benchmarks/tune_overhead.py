"""Overhead of ``study.tune`` against plain processes, on the same configurations and epochs, in one run.

(a) ``python -m study.tune`` runs a seeded study (FIFO scheduler, so no trial is cut short; no refit; no
    dashboard), wall time of the whole command including Ray's start-up;
(b) the old scripts' way: one process trains the same configurations one after another;
(c) the ideal: as many plain processes as cores (one thread each), the configurations dealt out among
    them, each process paying its own ``import torch`` and data generation.
Every configuration does identical work in all three: the trial's k folds for the same epochs, then
scoring the test folds (``study.trainable``'s functions). Prints the three wall times and (a)/(c);
target (a)/(c) <= 1.10.

Run: ``python benchmarks/tune_overhead.py [--trials 8] [--epochs 5] [--n 600] [--k 2]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
name = "overhead"
[data]
path = "synthetic"
[data.synthetic]
n = {n}
[split]
k = {k}
[train]
epochs = {epochs}
patience = 1000
batch_size = 32
[search]
num_samples = {trials}
n_startup_trials = {trials}
scheduler = "fifo"
refit = false
[search.space]
arch = ["main", "variant2"]
lr = {{ low = 1e-3, high = 1e-2, log = true }}
[resources]
cpus_per_trial = 1
dashboard = false
"""


def train_configs(config_path: str, params_list: list[dict], threads: int) -> float:
    """Train the given trial configurations in this process, exactly as a trial does; seconds taken."""
    start = time.perf_counter()
    import torch

    from study.common import load_data
    from study.experiment import load_experiment
    from study.trainable import final_scores, make_trainers, step_report

    torch.set_num_threads(threads)
    exp = load_experiment(config_path)
    data = load_data(exp.data.path, exp.data.synthetic).base()
    for params in params_list:
        trainers, tests = make_trainers(exp, data, params)
        while not all(tr.done for tr in trainers):
            step_report(trainers)
        final_scores(exp, data, trainers, tests)
    return time.perf_counter() - start


def run_tune(config: Path, results: Path) -> tuple[float, list[dict]]:
    """(a): the whole ``study.tune`` command; returns wall time and the trials' configurations."""
    import pandas as pd

    start = time.perf_counter()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-m", "study.tune", "--config", str(config), f"results_dir={results}"],
                   check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = pd.read_parquet(results / "overhead" / "summary.parquet")
    params = [{"arch": r.arch, "lr": float(r.lr)} for r in summary.itertuples()]
    return wall, params


def run_parallel(config: Path, params: list[dict], workers: int) -> float:
    """(c): ``workers`` fresh processes, configurations dealt round-robin."""
    start = time.perf_counter()
    chunks = [params[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(train_configs, [str(config)] * workers, chunks, [1] * workers))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tune-overhead-"))
    config = tmp / "overhead.toml"
    config.write_text(STUDY.format(n=args.n, k=args.k, epochs=args.epochs, trials=args.trials))
    a, params = run_tune(config, tmp / "results")
    c = run_parallel(config, params, args.workers)
    start = time.perf_counter()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # a fresh process, as a script would be
        pool.submit(train_configs, str(config), params, args.workers).result()
    b = time.perf_counter() - start
    print(f"{len(params)} configurations x {args.k} folds x {args.epochs} epochs, n={args.n}, "
          f"{args.workers} cores")
    print(f"(a) study.tune (Ray Tune + Optuna, reused workers): {a:7.1f} s")
    print(f"(b) one plain process, one config after another:   {b:7.1f} s")
    print(f"(c) {args.workers} plain processes filling the cores:        {c:7.1f} s")
    print(f"(a)/(c) = {a / c:.3f}   (target <= 1.10);  (b)/(c) = {b / c:.3f}")


if __name__ == "__main__":
    main()
