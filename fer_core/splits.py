"""Leakage-free splits: stratified k-fold grouped by pixel hash, and validation carved from training.

Images with the same pixel hash (``image_id``) are one group, so copies can never sit on both sides of
a split. Everything is drawn from ``split_seed``; the same seed gives the same folds on every machine.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

logger = logging.getLogger(__name__)

_TOO_FEW = "class {0!r} has {1} images, fewer than k={2} folds; use a smaller k"
_NO_CARVE = ("validation carve: class {0!r} has {1} training image, too few to hold one out and keep one; "
             "set val_fraction=0 or give the class more images")
_SMALL_CLASS = ("validation carve: class %r has %d training images, fewer than the carve's %d parts, so "
                "it may have none in validation")


def kfold_splits(labels: np.ndarray, groups: np.ndarray, k: int, split_seed: int,
                 classes: tuple[str, ...] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, test_idx)`` for ``k`` stratified folds; ``groups`` never straddle a split.

    Checked when called (not on first iteration): a class with fewer than ``k`` images is an error naming
    it (by ``classes[code]`` when the class names are given).
    """
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    if counts.min() < k:
        value = values[counts.argmin()].item()
        name = classes[value] if classes is not None else value
        raise ValueError(_TOO_FEW.format(name, int(counts.min()), k))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=split_seed)
    return splitter.split(np.zeros(len(labels)), labels, groups)


def carve_validation(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into ``(fit_idx, val_idx)`` with about ``fraction`` held out for validation.

    Used for early stopping, so it comes from inside the training folds, never from the test fold. The
    carve is one part of ``round(1 / fraction)`` stratified parts (at least 2, and no more than the largest
    class has images), so every class gives about ``fraction`` of its images; a class with fewer images
    than parts may give none (logged), and one with fewer than 2 cannot be split (an error).
    """
    values, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        raise ValueError(_NO_CARVE.format(values[counts.argmin()].item(), int(counts.min())))
    n_splits = max(2, min(round(1 / fraction), int(counts.max())))  # more parts than any class has: refused
    if counts.min() < n_splits:
        logger.warning(_SMALL_CLASS, values[counts.argmin()].item(), int(counts.min()), n_splits)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # said above, in the terms of this carve
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        fit_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return fit_idx, val_idx
