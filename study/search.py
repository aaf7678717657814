"""The Ray Tune experiment of ``study.tune``: Optuna's TPE proposes, ASHA prunes, folds run in lockstep.

The search layer is thin: the space function only declares distributions (no work happens in it, as
Ray's OptunaSearch requires), and the trainable (:mod:`study.trainable`) turns a config into a frozen
``TrainConfig`` and calls the library's trainer. The dataset enters Ray's object store once, through
``tune.with_parameters``; reused worker processes (``reuse_actors=True``) pay ``import torch`` once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from fer_core.data import FaceDataset
from study.experiment import ExperimentConfig, train_point
from study.trainable import run_trial

logger = logging.getLogger(__name__)

PARETO_METRICS = ["score", "best_val_gap"]


class SearchSpace:
    """Define-by-run space from ``[search.space]``: lists are categorical, tables are ranges.

    A module-level class (not a closure) so that Ray can pickle it into the experiment state.
    """

    def __init__(self, space: dict[str, Any]) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        """Declare one distribution per searched key."""
        for name, spec in self.space.items():
            if isinstance(spec, list):
                trial.suggest_categorical(name, spec)
            elif spec.get("int"):
                trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
            else:
                trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))


_GRACE = ("search.grace_period = {0} is more than the largest epoch budget, {1} (train.epochs, or the "
          "top of search.space.epochs): ASHA could never judge a trial. Lower search.grace_period or raise "
          "the budget")


def max_epochs(exp: ExperimentConfig) -> int:
    """The largest epoch budget any trial can get (ASHA's ``max_t``)."""
    spec = exp.search.space.get("epochs")
    if spec is None:
        return exp.train.epochs
    return int(max(spec) if isinstance(spec, list) else spec["high"])


class TrialLines(tune.Callback):
    """One line per finished trial (on top of Ray's periodic trial table)."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        """Print the trial's config and scores."""
        r = trial.last_result or {}
        cv = f"cv macro-F1 {r['cv_macro_f1']:.3f}" if "cv_macro_f1" in r else "pruned"
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        print(f"trial {trial.trial_id} done after {r.get('training_iteration', 0)} epochs: "
              f"val score {r.get('score', float('nan')):.3f}, {cv} | {params}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        """Report a trial that failed for good (after its retries)."""
        print(f"trial {trial.trial_id} FAILED: {trial.error_file}", flush=True)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def make_searcher(exp: ExperimentConfig) -> OptunaSearch:
    """Seeded TPE over the experiment's space; two objectives in ``pareto`` mode.

    With ``search.start_from_train`` the first trial is the ``[train]`` recipe itself (Optuna enqueues it).
    """
    s = exp.search
    sampler = optuna.samplers.TPESampler(seed=s.search_seed, n_startup_trials=s.n_startup_trials)
    first = [train_point(exp)] if s.start_from_train else None
    if s.objective == "pareto":
        return OptunaSearch(space=SearchSpace(s.space), metric=PARETO_METRICS, mode=["max", "min"],
                            sampler=sampler, points_to_evaluate=first)
    return OptunaSearch(space=SearchSpace(s.space), metric="objective", mode="max", sampler=sampler,
                        points_to_evaluate=first)


def make_scheduler(exp: ExperimentConfig) -> ASHAScheduler | None:
    """ASHA on the k-fold objective per epoch, or ``None`` (FIFO: every trial runs its budget)."""
    if exp.search.scheduler != "asha":
        return None
    if max_epochs(exp) < exp.search.grace_period:
        raise ValueError(_GRACE.format(exp.search.grace_period, max_epochs(exp)))
    return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(exp),
                         grace_period=exp.search.grace_period, reduction_factor=exp.search.reduction_factor)


def make_trainable(exp: ExperimentConfig, data: FaceDataset, resources: dict[str, float]):
    """The trainable with the dataset put into the object store once and the per-trial resources."""
    return tune.with_resources(tune.with_parameters(run_trial, exp=exp, data=data), resources)


def make_tuner(exp: ExperimentConfig, data: FaceDataset, resources: dict[str, float], storage: Path
               ) -> tune.Tuner:
    """A new Tuner writing its state under ``storage/<name>``."""
    s = exp.search
    pareto = s.objective == "pareto"
    tune_config = tune.TuneConfig(
        metric=None if pareto else "objective", mode=None if pareto else "max",
        search_alg=make_searcher(exp), scheduler=make_scheduler(exp), num_samples=s.num_samples,
        max_concurrent_trials=s.max_concurrent or None, reuse_actors=True)
    return tune.Tuner(make_trainable(exp, data, resources), tune_config=tune_config,
                      run_config=run_config(exp, storage))


def reporter(exp: ExperimentConfig) -> tune.CLIReporter:
    """Ray's trial table with the k-fold means only (not every per-fold key), every 30 s."""
    # Ray's newer output engine ignores custom reporters and prints every metric of every trial.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    metrics = {"training_iteration": "epoch", "val_macro_f1": "val_f1", "score": "score",
               "cv_macro_f1": "cv_f1"}
    return tune.CLIReporter(metric_columns=metrics, parameter_columns=list(exp.search.space),
                            max_report_frequency=30, print_intermediate_tables=True)


def run_config(exp: ExperimentConfig, storage: Path) -> tune.RunConfig:
    """Failures retried ``max_failures`` times; one checkpoint kept per trial."""
    return tune.RunConfig(
        name="tune", storage_path=str(storage.resolve()), verbose=1, callbacks=[TrialLines()],
        progress_reporter=reporter(exp),
        failure_config=tune.FailureConfig(max_failures=exp.search.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


# what Tune restores from: the newest of each (one per driver session, named by its start time)
_STATE_FILES = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
_TORN_STATE = ("{file}: {what}. The driver was stopped while Ray Tune was copying its experiment state into "
               "the results folder, so the study cannot be resumed from it (resuming would start the search "
               "again beside the old trials). The trials' own results are in {tune}/*/result.json. "
               "Run the study again into a new results_dir, or delete {tune} and run it again.")


def check_resumable(tune_dir: Path) -> None:
    """Refuse, naming the file, an experiment state that a killed driver left empty or cut short.

    Tune writes its state on the driver and copies it into the results folder in the background; a
    SIGKILL during that copy leaves the newest file empty or truncated, and ``Tuner.restore`` would then
    quietly start the study from nothing.
    """
    if not tune.Tuner.can_restore(str(tune_dir.resolve())):
        raise FileNotFoundError(f"{tune_dir}: no Ray Tune experiment state to resume (tuner.pkl missing)")
    for pattern in _STATE_FILES:
        files = sorted(tune_dir.glob(pattern))
        if not files:
            continue
        newest = files[-1]  # the timestamp in the name sorts as text
        what = None
        if newest.stat().st_size == 0:
            what = "the file is empty"
        elif pattern.startswith("experiment_state"):  # JSON (search_gen_state-*.json is a pickle)
            try:
                json.loads(newest.read_text())
            except ValueError as err:
                what = f"the file is not complete JSON ({err})"
        if what:
            raise ValueError(_TORN_STATE.format(file=newest, what=what, tune=tune_dir))


def restore_tuner(exp: ExperimentConfig, data: FaceDataset, resources: dict[str, float], storage: Path
                  ) -> tune.Tuner:
    """Continue a study whose driver stopped: unfinished trials resume from their last checkpoint.

    The caller checks the folder first with :func:`check_resumable` (``study.tune`` does, before Ray starts).
    """
    path = str((storage / "tune").resolve())
    return tune.Tuner.restore(path, trainable=make_trainable(exp, data, resources),
                              resume_unfinished=True, resume_errored=True)
