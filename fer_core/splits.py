"""Leakage-free splits: stratified k-fold grouped by pixel hash, and validation carved from training.

Images with the same pixel hash (``image_id``) are one group, so copies can never sit on both sides of
a split. Everything is drawn from ``split_seed``; the same seed gives the same folds on every machine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

logger = logging.getLogger(__name__)

_TOO_FEW = "class {0!r} has {1} images, fewer than k={2} folds; use a smaller k"


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

    Used for early stopping, so it comes from inside the training folds, never from the test fold.
    """
    # with tiny classes, hold out one image per class rather than fail
    min_count = int(np.unique(labels, return_counts=True)[1].min())
    if min_count < 2:
        raise ValueError(_TOO_FEW.format("(smallest)", min_count, 2) + " or set val_fraction=0")
    n_splits = max(2, min(round(1 / fraction), min_count))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fit_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return fit_idx, val_idx
