"""Turn a finished Ray Tune experiment into the study's tables: trials.parquet, best.toml, top-5, refit.

``trials.parquet`` has one row per trial x fold x epoch (columns in the README, section Tables). It is
rebuilt from the experiment's stored results every time, so after a resume every completed trial appears
exactly once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import tune

from fer_core import __version__
from fer_core.checkpoint import save_model
from fer_core.config import config_hash, to_dict, to_toml
from fer_core.crossval import (
    attach_landmarks,
    landmark_val_blend,
    network_input,
    split_validation,
    teacher_targets,
    train_groups,
)
from fer_core.data import FaceDataset
from fer_core.training import fit
from study.common import write_table
from study.experiment import ExperimentConfig, trial_train_config
from study.trainable import FOLD_KEYS

logger = logging.getLogger(__name__)

COMPLETED, PRUNED, FAILED = "completed", "pruned", "failed"


def trial_status(result: tune.Result) -> str:
    """``completed`` (all folds scored on their test folds), ``pruned`` (stopped early) or ``failed``."""
    if result.error is not None:
        return FAILED
    return COMPLETED if "cv_macro_f1" in (result.metrics or {}) else PRUNED


def trial_rows(result: tune.Result, exp: ExperimentConfig, chash: str) -> list[dict[str, Any]]:
    """One row per fold x epoch of one trial (a single row with NaNs for a trial that never reported)."""
    config = result.config or {}  # None for a trial Tune never started
    base = {"study": exp.name, "trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name),
            "arch": config.get("arch", exp.train.arch), "status": trial_status(result),
            "config_hash": chash, "version": __version__}
    base.update({f"hp_{k}": v for k, v in config.items()})
    history = result.metrics_dataframe
    if history is None or history.empty:
        return [{**base, "fold": -1, "epoch": -1}]
    rows, seen = [], set()
    for _, rep in history.iterrows():
        for fold in range(exp.split.k):
            epoch = rep.get(f"f{fold}_epoch")
            if epoch is None or np.isnan(epoch) or (fold, epoch) in seen:
                continue  # a fold that stopped early repeats its last epoch; keep it once
            seen.add((fold, epoch))
            row = {**base, "fold": fold, "epoch": int(epoch)}
            row.update({k: rep.get(f"f{fold}_{k}", np.nan) for k in FOLD_KEYS})
            rows.append(row)
    return rows


def trials_table(results: tune.ResultGrid, exp: ExperimentConfig) -> pd.DataFrame:
    """All trials, folds and epochs of the experiment, sorted by trial and fold."""
    chash = config_hash(to_dict(exp))
    rows = [row for result in results for row in trial_rows(result, exp, chash)]
    frame = pd.DataFrame(rows)
    return frame.sort_values(["trial_id", "fold", "epoch"], ignore_index=True)


def summary_table(results: tune.ResultGrid) -> pd.DataFrame:
    """One row per trial: config, validation score, k-fold test scores and status."""
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id", ""), "status": trial_status(r),
               "epochs_run": m.get("training_iteration", 0), "node_id": m.get("node_id", "")}
        row.update({k: m.get(k, np.nan) for k in ("objective", "score", "best_val_gap", "cv_macro_f1",
                                                  "cv_macro_f1_std", "cv_accuracy", "cv_accuracy_std",
                                                  "cv_gap")})
        row.update(r.config)
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(summary: pd.DataFrame) -> pd.DataFrame:
    """Completed trials that no other completed trial beats on both score (max) and gap (min)."""
    done = summary[summary["status"] == COMPLETED].dropna(subset=["score", "best_val_gap"])
    keep = [i for i, a in done.iterrows()
            if not ((done["score"] >= a["score"]) & (done["best_val_gap"] <= a["best_val_gap"])
                    & ((done["score"] > a["score"]) | (done["best_val_gap"] < a["best_val_gap"]))).any()]
    return done.loc[keep].sort_values("score", ascending=False)


def best_trial(summary: pd.DataFrame) -> pd.Series | None:
    """The completed trial with the highest objective (validation-based: test folds play no part)."""
    done = summary[summary["status"] == COMPLETED]
    if done.empty:
        return None
    return done.sort_values(["objective", "trial_id"], ascending=[False, True]).iloc[0]


def write_best(out: Path, best: pd.Series, exp: ExperimentConfig) -> dict[str, Any]:
    """``best.toml``: the full training config of the best trial and its k-fold scores."""
    params = {k: _plain(best[k]) for k in exp.search.space}
    train = to_dict(trial_train_config(exp.train, params))
    scores = {k: float(best[k]) for k in ("cv_macro_f1", "cv_macro_f1_std", "cv_accuracy",
                                           "cv_accuracy_std", "score") if pd.notna(best[k])}
    doc = {"study": exp.name, "trial_id": str(best["trial_id"]), "k": exp.split.k,
           "split_seed": exp.split.split_seed, "scores": scores, "train": train}
    (out / "best.toml").write_text(to_toml(doc))
    return doc


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def refit_best(out: Path, doc: dict[str, Any], exp: ExperimentConfig, ds: FaceDataset) -> Path:
    """Train the best configuration on all the data (validation carved for early stopping); save it."""
    cfg = trial_train_config(exp.train, doc["train"])
    fit_idx, val_idx = split_validation(ds, np.arange(len(ds)), cfg, seed=exp.split.split_seed)
    labels = ds.labels
    res = fit(cfg, network_input(ds, fit_idx, cfg.face_align), labels[fit_idx],
              network_input(ds, val_idx, cfg.face_align), labels[val_idx], len(ds.classes),
              train_groups=train_groups(ds, fit_idx, cfg),
              soft_targets=teacher_targets(ds, cfg, None, np.arange(0), fit_idx),
              val_blend=landmark_val_blend(cfg, ds, fit_idx, val_idx))
    attach_landmarks(res, cfg, ds, np.arange(len(ds)))
    return save_model(out / "best" / "model.pt", res.model, arch=cfg.arch, classes=ds.classes,
                      input_size=ds.image_size, mean=res.mean, std=res.std, config=to_dict(cfg),
                      landmarks=res.landmarks)


def write_outputs(out: Path, results: tune.ResultGrid, exp: ExperimentConfig) -> pd.DataFrame:
    """trials.parquet, summary.parquet (and pareto.parquet); returns the per-trial summary."""
    chash = config_hash(to_dict(exp))
    write_table(trials_table(results, exp), out / "trials.parquet", config_hash=chash)
    summary = summary_table(results)
    summary["config_hash"], summary["version"] = chash, __version__
    write_table(summary, out / "summary.parquet", config_hash=chash)
    if exp.search.objective == "pareto":
        write_table(pareto_front(summary), out / "pareto.parquet", config_hash=chash)
    return summary


def top_table(summary: pd.DataFrame, exp: ExperimentConfig, n: int = 5) -> str:
    """The ``n`` best trials by objective, as text."""
    cols = ["trial_id", "status", "epochs_run", "objective", "cv_macro_f1", "cv_macro_f1_std", "cv_gap",
            *exp.search.space]
    cols = [c for c in cols if c in summary]
    top = summary.sort_values("objective", ascending=False, na_position="last").head(n)
    return top[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
