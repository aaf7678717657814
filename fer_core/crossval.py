"""k-fold cross-validation of one configuration: per-fold metrics and per-image test predictions.

The test fold is used once, after training, to score the model: training, augmentation, early
stopping and model selection only ever see the training folds (validation is carved from them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fer_core import __version__
from fer_core.checkpoint import load_model
from fer_core.config import SplitConfig, TrainConfig, config_hash, to_dict
from fer_core.data import FaceDataset
from fer_core.fairness import UNKNOWN
from fer_core.landmarks import align_faces, fit_landmark_head, landmark_features
from fer_core.metrics import classification_metrics, confusion
from fer_core.splits import carve_validation, kfold_splits
from fer_core.training import (
    EpochCallback,
    FitResult,
    balancing_weights,
    evaluate,
    fit,
    predict_saved,
    to_tensor,
)

logger = logging.getLogger(__name__)

_TEACHER_FOLD = ("teachers: {0}: {1} images differ between its fold {2} test images and this run's ({3}); "
                 "a teacher must be a study.kfold run on the same data with the same k and split_seed, so "
                 "that its fold model never saw the test images of the fold it teaches")
_TEACHER_CLASSES = "teachers: {0}: its classes {1} are not the dataset's {2}"


@dataclass
class FoldRun:
    """One trained fold: its test metrics, confusion matrix, predictions and the fitted model."""

    fold: int
    metrics: dict[str, float]
    confusion: np.ndarray
    predictions: pd.DataFrame
    result: FitResult


def train_groups(ds: FaceDataset, idx: np.ndarray, cfg: TrainConfig) -> np.ndarray | None:
    """Group of each training image for the mitigations (``"unknown"`` where the attribute is null)."""
    if cfg.mitigation == "none":
        return None
    if cfg.group_attr not in ds.manifest:
        raise KeyError(f"mitigation {cfg.mitigation!r}: dataset {ds.name!r} has no attribute "
                       f"{cfg.group_attr!r}; attributes: {list(ds.attributes)}")
    return ds.manifest[cfg.group_attr].iloc[idx].fillna(UNKNOWN).astype(str).to_numpy()


def split_validation(ds: FaceDataset, train_idx: np.ndarray, cfg: TrainConfig, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Carve ``(fit_idx, val_idx)`` (dataset row indices) out of the training rows."""
    if cfg.val_fraction == 0:
        return train_idx, train_idx[:0]
    labels, ids = ds.labels[train_idx], ds.manifest["image_id"].to_numpy()[train_idx]
    fit_rel, val_rel = carve_validation(labels, ids, cfg.val_fraction, seed)
    return train_idx[fit_rel], train_idx[val_rel]


def check_teachers(ds: FaceDataset, cfg: TrainConfig, test_folds: list[np.ndarray]) -> None:
    """Refuse, before anything is trained, a teacher whose folds did not test exactly ``test_folds``."""
    ids = ds.manifest["image_id"].to_numpy()
    for folder in map(Path, cfg.teachers):
        for fold, test_idx in enumerate(test_folds):
            _check_teacher_fold(folder, fold, set(ids[test_idx]))


def _check_teacher_fold(folder: Path, fold: int, want: set[str]) -> None:
    preds = pd.read_parquet(folder / "predictions.parquet", columns=["fold", "image_id"])
    tested = set(preds.loc[preds["fold"] == fold, "image_id"])
    if tested != want:
        raise ValueError(_TEACHER_FOLD.format(folder, len(tested ^ want), fold, len(want)))


def teacher_targets(ds: FaceDataset, cfg: TrainConfig, fold: int | None, test_idx: np.ndarray,
                    fit_idx: np.ndarray) -> np.ndarray | None:
    """The teachers' class probabilities for the images to fit, averaged (``None`` without teachers).

    Each teacher is a ``study.kfold`` result folder; its ``models/fold<fold>.pt`` predicts (flip-averaged,
    with its own normalisation). Its ``predictions.parquet`` must show that this fold tested exactly
    ``test_idx``: otherwise the teacher could have trained on this fold's test images, and it is refused.
    ``fold=None`` (a refit on all the data, which has no test images) averages all its fold models.
    """
    if not cfg.teachers:
        return None
    probs = []
    for folder in map(Path, cfg.teachers):
        if fold is None:
            files = sorted((folder / "models").glob("fold*.pt"))
        else:
            _check_teacher_fold(folder, fold, set(ds.manifest["image_id"].to_numpy()[test_idx]))
            files = [folder / "models" / f"fold{fold}.pt"]
        for path in files:
            saved = load_model(path)
            if saved.classes != tuple(ds.classes):
                raise ValueError(_TEACHER_CLASSES.format(folder, list(saved.classes), list(ds.classes)))
            ids = ds.manifest["image_id"].to_numpy()[fit_idx]
            probs.append(predict_saved(saved, ds.pixels[fit_idx], ids))
    return np.mean(probs, axis=0)


def train_on_split(cfg: TrainConfig, ds: FaceDataset, train_idx: np.ndarray, test_idx: np.ndarray, *,
                   fold: int = 0, split_seed: int = 0, on_epoch_end: EpochCallback | None = None,
                   extra_idx: np.ndarray | None = None) -> FoldRun:
    """Fit on ``train_idx`` (validation carved from it), then score once on ``test_idx``.

    ``extra_idx`` rows (e.g. a dataset's extra images) are fitted with every fold but never carved into
    validation, so the validation and test images, and the carve itself, are the same with or without them.
    """
    fit_idx, val_idx = split_validation(ds, np.asarray(train_idx), cfg, seed=split_seed * 1000 + fold)
    if extra_idx is not None:
        fit_idx = np.concatenate([fit_idx, np.asarray(extra_idx, dtype=fit_idx.dtype)])
    labels = ds.labels
    result = fit(cfg, network_input(ds, fit_idx, cfg.face_align), labels[fit_idx],
                 network_input(ds, val_idx, cfg.face_align), labels[val_idx], len(ds.classes),
                 train_groups=train_groups(ds, fit_idx, cfg),
                 soft_targets=teacher_targets(ds, cfg, fold, test_idx, fit_idx), on_epoch_end=on_epoch_end,
                 val_blend=landmark_val_blend(cfg, ds, fit_idx, val_idx))
    attach_landmarks(result, cfg, ds, np.concatenate([fit_idx, val_idx]))
    run = score_fold(ds, test_idx, result, fold)
    run.metrics["n_fit"] = len(fit_idx)
    return run


def landmark_val_blend(cfg: TrainConfig, ds: FaceDataset, fit_idx: np.ndarray, val_idx: np.ndarray
                       ) -> tuple[np.ndarray, float] | None:
    """With ``landmark_weight`` > 0: the landmark model's validation probabilities and weight (else None).

    ``study.tune``'s ASHA signal and selection then score the blend that is used (and early stopping too,
    with ``landmark_select = "blend"``; see :class:`~fer_core.training.Trainer`). This landmark
    model is fitted on ``fit_idx`` only, never on the validation images it scores; the one kept with the
    model (:func:`attach_landmarks`) is fitted afterwards on all the training images.
    """
    if cfg.landmark_weight <= 0 or len(val_idx) == 0:
        return None
    ids, kind = ds.manifest["image_id"].to_numpy(), cfg.landmark_input
    head = fit_landmark_head(landmark_features(ds.pixels[fit_idx], ids[fit_idx], kind=kind),
                             ds.labels[fit_idx], len(ds.classes), cfg.landmark_weight, seed=cfg.seed,
                             mirror=cfg.landmark_mirror, kind=kind,
                             sample_weight=landmark_sample_weight(ds, fit_idx, cfg))
    val = landmark_features(ds.pixels[val_idx], ids[val_idx], kind=kind)
    return head.predict_proba(val), cfg.landmark_weight


def attach_landmarks(result: FitResult, cfg: TrainConfig, ds: FaceDataset, rows: np.ndarray) -> None:
    """With ``landmark_weight`` > 0, fit the face-mesh landmark model on ``rows`` (training images only).

    The CNN's validation images are among ``rows``: they choose its early-stopping epoch, and the landmark
    model, which has no epochs, chooses its regularisation by a 3-fold search inside ``rows``.
    """
    if cfg.landmark_weight <= 0:
        return
    rows = np.asarray(rows)
    features = landmark_features(ds.pixels[rows], ds.manifest["image_id"].to_numpy()[rows],
                                 kind=cfg.landmark_input)
    result.landmarks = fit_landmark_head(features, ds.labels[rows], len(ds.classes), cfg.landmark_weight,
                                         seed=cfg.seed, mirror=cfg.landmark_mirror, kind=cfg.landmark_input,
                                         sample_weight=landmark_sample_weight(ds, rows, cfg))


def landmark_sample_weight(ds: FaceDataset, rows: np.ndarray, cfg: TrainConfig) -> np.ndarray | None:
    """Weights of the landmark model's faces under a mitigation that weights examples, else None.

    ``resample`` and ``reweight`` weight the CNN's examples with :func:`balancing_weights` (drawn or in the
    loss); the landmark model, a logistic regression with no epochs to draw, is fitted
    with those weights under either. The other mitigations change the CNN's training alone, so the
    landmark model averaged into their predictions is fitted as without mitigation.
    """
    if cfg.mitigation not in ("resample", "reweight"):
        return None
    return balancing_weights(ds.labels[rows], train_groups(ds, rows, cfg))


def network_input(ds: FaceDataset, idx: np.ndarray, face_align: bool) -> np.ndarray:
    """The images of rows ``idx`` as the network reads them: as they are, or aligned by the face mesh."""
    if not face_align:
        return ds.pixels[idx]
    return align_faces(ds.pixels[idx], ds.manifest["image_id"].to_numpy()[idx])


def score_fold(ds: FaceDataset, test_idx: np.ndarray, result: FitResult, fold: int) -> FoldRun:
    """Test metrics and the per-image prediction table of a fitted model."""
    device = next(result.model.parameters()).device
    x_test = to_tensor(network_input(ds, test_idx, result.face_align), result.mean, result.std, device,
                       result.input_norm)
    y_test = ds.labels[test_idx]
    probs = evaluate(result.model, x_test, y_test, len(ds.classes))["probs"]
    if result.landmarks is not None:
        probs = result.landmarks.blend(probs, landmark_features(ds.pixels[test_idx],
                                                                ds.manifest["image_id"].to_numpy()[test_idx],
                                                                kind=result.landmarks.features))
    y_pred = probs.argmax(1)
    metrics = classification_metrics(y_test, y_pred, ds.classes)
    metrics.update(fold=fold, best_epoch=result.best_epoch, epochs_run=len(result.history),
                   n_train=0, n_test=len(test_idx))
    preds = prediction_frame(ds, test_idx, y_pred, probs)
    preds.insert(0, "fold", fold)
    return FoldRun(fold, metrics, confusion(y_test, y_pred, len(ds.classes)), preds, result)


def prediction_frame(ds: FaceDataset, idx: np.ndarray, y_pred: np.ndarray, probs: np.ndarray
                     ) -> pd.DataFrame:
    """One row per image: image_id, y_true, y_pred (class names), p_<class>, attribute columns."""
    rows = ds.manifest.iloc[idx].reset_index(drop=True)
    classes = np.asarray(ds.classes)
    frame = pd.DataFrame({"image_id": rows["image_id"], "y_true": rows["label"],
                          "y_pred": classes[np.asarray(y_pred, dtype=int)]})
    for j, c in enumerate(ds.classes):
        frame[f"p_{c}"] = probs[:, j].astype(np.float32)
    for attr in ds.attributes:
        if attr != "subset":
            frame[attr] = rows[attr]
    return frame


def run_kfold(cfg: TrainConfig, split: SplitConfig, ds: FaceDataset,
              on_epoch_end: EpochCallback | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[FoldRun]]:
    """Cross-validate ``cfg`` on ``ds``; returns (per-fold metrics, predictions, fold runs)."""
    runs = []
    groups = ds.manifest["image_id"].to_numpy()
    folds = kfold_splits(ds.labels, groups, split.k, split.split_seed, ds.classes)
    for fold, (train_idx, test_idx) in enumerate(folds):
        run = train_on_split(cfg, ds, train_idx, test_idx, fold=fold, split_seed=split.split_seed,
                             on_epoch_end=on_epoch_end)
        run.metrics["n_train"] = len(train_idx)
        logger.info("fold %d/%d: accuracy %.3f macro-F1 %.3f", fold + 1, split.k,
                    run.metrics["accuracy"], run.metrics["macro_f1"])
        runs.append(run)
    folds, preds = fold_tables(cfg, split, runs)
    return folds, preds, runs


def fold_tables(cfg: TrainConfig, split: SplitConfig, runs: list[FoldRun]
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-fold metrics and all predictions of ``runs``, tagged with the configuration and its hash."""
    tag = {"arch": cfg.arch, "seed": cfg.seed, "split_seed": split.split_seed,
           "config_hash": config_hash({"train": to_dict(cfg), "split": to_dict(split)}),
           "version": __version__}
    folds = pd.DataFrame([{**tag, **r.metrics, "confusion": r.confusion.ravel().tolist()} for r in runs])
    preds = pd.concat([r.predictions for r in runs], ignore_index=True)
    for key, value in tag.items():
        preds[key] = value
    return folds, preds
