"""The Ray Tune trainable: one trial = one configuration trained on all k folds in lockstep.

Why lockstep: ASHA prunes on one number per step. Training the k folds side by side, one epoch each per
step, lets every report carry the k-fold mean validation macro-F1 of that epoch, so a trial is pruned on
the same cross-validated signal it is finally scored by, and never on one lucky fold. The validation
split of each fold is carved from that fold's training part; the test folds are touched once, after the
last epoch, to score the trial (``cv_*`` metrics), and never feed training, early stopping, pruning or the
choice of the best trial (which uses ``score``, the mean over folds of the best validation macro-F1).

Every report also carries each fold's metrics as flat keys (``f0_val_macro_f1``, ...), from which the
driver builds ``trials.parquet`` (one row per trial x fold x epoch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from fer_core.crossval import (
    attach_landmarks,
    landmark_val_blend,
    network_input,
    score_fold,
    split_validation,
    teacher_targets,
    train_groups,
)
from fer_core.data import FaceDataset
from fer_core.fairness import group_gap
from fer_core.splits import kfold_splits
from fer_core.training import Trainer
from study.experiment import ExperimentConfig, trial_train_config

logger = logging.getLogger(__name__)

FOLD_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_gap", "seconds")
STATE_FILE = "trainers.pt"


def make_trainers(exp: ExperimentConfig, ds: FaceDataset, params: dict[str, Any]
                  ) -> tuple[list[Trainer], list[np.ndarray]]:
    """One :class:`Trainer` per fold (validation carved from its training part) and each test fold."""
    cfg = trial_train_config(exp.train, params)
    ids = ds.manifest["image_id"].to_numpy()
    trainers, tests = [], []
    labels = ds.labels
    attr = exp.search.fairness_attr
    groups = ds.manifest[attr].to_numpy(dtype=object) if attr in ds.attributes else None
    folds = kfold_splits(labels, ids, exp.split.k, exp.split.split_seed, ds.classes)
    for fold, (train_idx, test_idx) in enumerate(folds):
        fit_idx, val_idx = split_validation(ds, train_idx, cfg, seed=exp.split.split_seed * 1000 + fold)
        trainers.append(Trainer(cfg, network_input(ds, fit_idx, cfg.face_align), labels[fit_idx],
                                network_input(ds, val_idx, cfg.face_align), labels[val_idx], len(ds.classes),
                                train_groups(ds, fit_idx, cfg),
                                None if groups is None else groups[val_idx],
                                teacher_targets(ds, cfg, fold, test_idx, fit_idx),
                                landmark_val_blend(cfg, ds, fit_idx, val_idx)))
        tests.append(test_idx)
    return trainers, tests


def step_report(trainers: list[Trainer]) -> dict[str, float]:
    """Advance every unfinished fold one epoch; the k-fold means plus per-fold flat keys."""
    report: dict[str, float] = {}
    for fold, tr in enumerate(trainers):
        metrics = tr.step() if not tr.done else tr.history[-1]
        for key in FOLD_KEYS:
            report[f"f{fold}_{key}"] = float(metrics.get(key, np.nan))
        report[f"f{fold}_epoch"] = float(metrics["epoch"])
        report[f"f{fold}_best_val_macro_f1"] = float(tr.best_val_score)
    k = len(trainers)
    for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_gap"):
        report[key] = float(np.mean([report[f"f{f}_{key}"] for f in range(k)]))
    # selection signal: each fold's validation score at the epoch early stopping keeps, averaged
    report["score"] = float(np.mean([tr.best_val_score for tr in trainers]))
    report["best_val_gap"] = float(np.mean([tr.best_metrics.get("val_gap", np.nan) for tr in trainers]))
    return report


def final_scores(exp: ExperimentConfig, ds: FaceDataset, trainers: list[Trainer],
                 tests: list[np.ndarray]) -> dict[str, float]:
    """Score each fold's best model once on its test fold: k-fold mean and std (``cv_*``)."""
    cfg = trainers[0].cfg
    runs = []
    for fold, (tr, test_idx) in enumerate(zip(trainers, tests, strict=True)):
        result = tr.result()
        # k folds cover every row once: a fold's training rows (fit and validation) are all the others
        attach_landmarks(result, cfg, ds, np.setdiff1d(np.arange(len(ds)), test_idx))
        runs.append(score_fold(ds, test_idx, result, fold))
    out: dict[str, float] = {}
    for key in ("accuracy", "macro_f1"):
        values = [r.metrics[key] for r in runs]
        out[f"cv_{key}"], out[f"cv_{key}_std"] = float(np.mean(values)), float(np.std(values, ddof=1))
    attr = exp.search.fairness_attr
    if attr in ds.attributes:
        gaps = [group_gap(r.predictions, attr) for r in runs]
        out["cv_gap"] = float(np.nanmean(gaps))
    return out


def objective(exp: ExperimentConfig, report: dict[str, float]) -> float:
    """The number ASHA and the searcher optimise (weighted mode subtracts the validation group gap)."""
    if exp.search.objective == "weighted":
        gap = report["best_val_gap"]
        return report["score"] - exp.search.fairness_weight * (0.0 if np.isnan(gap) else gap)
    return report["score"]


@contextlib.contextmanager
def save_state(trainers: list[Trainer]) -> Iterator[tune.Checkpoint]:
    """Checkpoint every fold's trainer (weights, optimizer, schedule, RNG) in one file.

    The file lives in a temporary folder that is deleted when the block exits: report the checkpoint
    inside the block (``tune.report`` copies it to the trial's storage before it returns), or every
    checkpoint of every trial would stay behind in the system's temporary folder.
    """
    with tempfile.TemporaryDirectory(prefix="fer-ckpt-") as tmp:
        torch.save({"trainers": [tr.state_dict() for tr in trainers],
                    "torch_rng": torch.get_rng_state()}, os.path.join(tmp, STATE_FILE))
        yield tune.Checkpoint.from_directory(tmp)


def load_state(trainers: list[Trainer], checkpoint: tune.Checkpoint) -> None:
    """Restore the trainers saved by :func:`save_state` (weights_only: tensors and numbers only)."""
    with checkpoint.as_directory() as path:
        state = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
    for tr, st in zip(trainers, state["trainers"], strict=True):
        tr.load_state_dict(st)
    torch.set_rng_state(state["torch_rng"])


def run_trial(config: dict[str, Any], exp: ExperimentConfig, data: FaceDataset) -> None:
    """Function trainable: ``config`` holds the searched hyperparameters of this trial.

    The trainers are checkpointed when ``search.checkpoint_seconds`` have passed since the last
    checkpoint, and when the trial finishes: a killed study loses at most that much work per trial,
    while Tune, which snapshots the whole experiment after every trial checkpoint (one is kept per
    trial), is not made to do so every epoch. ``0`` checkpoints every epoch, a negative value never.
    """
    torch.set_num_threads(max(1, int(exp.resources.cpus_per_trial)))
    trainers, tests = make_trainers(exp, data, config)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        load_state(trainers, checkpoint)
    every = exp.search.checkpoint_seconds
    last_saved = time.monotonic()
    while not all(tr.done for tr in trainers):
        report = step_report(trainers)
        report["objective"] = objective(exp, report)
        finished = all(tr.done for tr in trainers)
        if finished:
            report.update(final_scores(exp, data, trainers, tests))
        report["node_id"] = ray.get_runtime_context().get_node_id()
        if every >= 0 and (finished or time.monotonic() - last_saved >= every):
            with save_state(trainers) as ckpt:
                tune.report(report, checkpoint=ckpt)
            last_saved = time.monotonic()
        else:
            tune.report(report)
