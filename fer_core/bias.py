"""Biased training sets: representational, stereotypical and augmented bias of one target group.

A bias is applied to the *training* rows of one fold only; the test fold is never touched, so every
level of a sweep is scored on the same test images. :class:`BiasSpec` names the kind, its strength
``level`` in [0, 1] (0 = the unbiased training fold) and the target group (``attr`` = ``group``, by
default gender = Female); :func:`apply_bias` returns the training rows to use.

Kinds and what ``level`` means:

- ``representational``: keep ``1 - level`` of the target group's training images (level 0.5, 0.75,
  0.9, 1.0 keep 1/2, 1/4, 1/10, none), in every class alike, so the group's class mix is unchanged;
  every other image is kept.
- ``stereotypical``: inside each chosen class the target group's share ``p`` moves to
  ``p + level * (1 - p)`` (``direction = "up"``) or ``p * (1 - level)`` (``"down"``); images outside
  the chosen classes are untouched. Oversampling is not allowed, so a skewed share can only be drawn
  from a smaller class: at most ``n_gaining / new_share`` images, where ``n_gaining`` counts the images
  of the group that gains share. With ``size_level`` (what a sweep uses) every level, 0 included, cuts
  each chosen class to its size at level ``size_level`` (the sweep's strongest), so class sizes stay
  the same from level to level and only the share changes; level 0 is then the size-matched unbiased
  reference of this kind. Without it (``size_level = 0``) a class keeps every image of the gaining
  group, so it shrinks as the level grows. Cut classes are logged, and :func:`bias_summary` reports
  the class sizes of the result.
- ``augmented``: add ``level`` of the dataset's extra images (rows whose ``subset`` is not
  ``"base"``) that belong to the target group, e.g. fer4's female ``Extra Data``. An extra whose
  ``image_id`` equals a test image's is never added (the importer merges identical pixels already;
  this check makes sure) and is counted in the log.

Draws come from one permutation of the dataset's rows per call, so the caller passes a generator seeded
by ``(split_seed, fold)`` (:func:`bias_rng`): then levels are nested (the target images kept at level
0.9 are a subset of those kept at 0.75; the extras added at 0.25 are a subset of those added at 0.5),
and the same seed gives the same rows on every machine. Example::

    spec = BiasSpec("representational", 0.75)
    rows = apply_bias(ds, train_idx, spec, bias_rng(split_seed=0, fold=2), test_idx=test_idx)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from fer_core.config import _check, _choice
from fer_core.data import BASE_SUBSET, FaceDataset

logger = logging.getLogger(__name__)

KINDS = ("none", "representational", "stereotypical", "augmented")
DIRECTIONS = ("up", "down")

_NONE_LEVEL = "BiasSpec: kind 'none' is the unbiased baseline and takes level 0, got {0!r}"
_NO_CLASSES = "BiasSpec: kind 'stereotypical' needs the classes whose group share it skews (classes=...)"
_NO_ATTR = "bias: dataset {0!r} has no attribute {1!r}; attributes: {2}"
_NO_GROUP = "bias: attribute {0!r} of dataset {1!r} has no group {2!r}; groups: {3}"
_NO_CLASS = "bias: dataset {0!r} has no class {1!r}; classes: {2}"
_NO_EXTRAS = ("bias: kind 'augmented' needs extra images of {0} = {1!r} (rows whose subset is not "
              "'base'); dataset {2!r} has none")
_SIZE_KIND = "BiasSpec: size_level is for kind 'stereotypical' only, got kind {0!r}"
_SIZE_BELOW = ("BiasSpec: level {0!r} exceeds size_level {1!r}; the class size must be reachable at every "
               "level, so size_level is the strongest level of the sweep")
_TEST_ROWS = "apply_bias: {0} training rows are also test rows; pass the training fold only"


@dataclass(frozen=True)
class BiasSpec:
    """One bias of the training set: its kind, strength and target group.

    Parameters
    ----------
    kind
        ``"none"``, ``"representational"``, ``"stereotypical"`` or ``"augmented"``.
    level
        Strength in [0, 1]; 0 leaves the training fold as it is (see the module docstring).
    attr, group
        The target group: rows whose attribute ``attr`` equals ``group``.
    classes
        Stereotypical only: the classes inside which the group's share is skewed.
    direction
        Stereotypical only: ``"up"`` moves the share toward 1, ``"down"`` toward 0.
    size_level
        Stereotypical only: when > 0, every level cuts each chosen class to its size at this level,
        so that only the share changes between levels (``level`` may not exceed it); 0: classes shrink.
    """

    kind: str = "none"
    level: float = 0.0
    attr: str = "gender"
    group: str = "Female"
    classes: tuple[str, ...] = ()
    direction: str = "up"
    size_level: float = 0.0

    def __post_init__(self) -> None:
        _choice("BiasSpec", "kind", self.kind, KINDS)
        _choice("BiasSpec", "direction", self.direction, DIRECTIONS)
        _check("BiasSpec", "level", self.level, 0.0 <= self.level <= 1.0, "in [0, 1]")
        if self.kind == "none" and self.level != 0:
            raise ValueError(_NONE_LEVEL.format(self.level))
        if self.kind == "stereotypical" and not self.classes:
            raise ValueError(_NO_CLASSES)
        _check("BiasSpec", "size_level", self.size_level, 0.0 <= self.size_level <= 1.0, "in [0, 1]")
        if self.size_level and self.kind != "stereotypical":
            raise ValueError(_SIZE_KIND.format(self.kind))
        if self.size_level and self.level > self.size_level:
            raise ValueError(_SIZE_BELOW.format(self.level, self.size_level))
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def label(self) -> str:
        """Short text for logs: ``representational 0.75``."""
        return f"{self.kind} {self.level:g}"


def bias_rng(split_seed: int, fold: int) -> np.random.Generator:
    """The generator of one fold's bias draws: same ``(split_seed, fold)``, same rows at every level."""
    return np.random.default_rng([split_seed, fold, 0xB1A5])


def check_spec(ds: FaceDataset, spec: BiasSpec) -> None:
    """Raise before any training if ``ds`` cannot carry ``spec`` (unknown attribute, group or class)."""
    if spec.kind == "none":
        return
    if spec.attr not in ds.attributes:
        raise KeyError(_NO_ATTR.format(ds.name, spec.attr, list(ds.attributes)))
    groups = sorted(ds.manifest[spec.attr].dropna().astype(str).unique())
    if spec.group not in groups:
        raise ValueError(_NO_GROUP.format(spec.attr, ds.name, spec.group, groups))
    for cls in spec.classes:
        if cls not in ds.classes:
            raise ValueError(_NO_CLASS.format(ds.name, cls, list(ds.classes)))
    if spec.kind == "augmented" and not extra_rows(ds, spec).size:
        raise ValueError(_NO_EXTRAS.format(spec.attr, spec.group, ds.name))


def target_mask(ds: FaceDataset, spec: BiasSpec) -> np.ndarray:
    """Boolean (N,): rows of the target group (unknown attribute values are not in it)."""
    if spec.attr not in ds.manifest:
        raise KeyError(_NO_ATTR.format(ds.name, spec.attr, list(ds.attributes)))
    return ds.manifest[spec.attr].astype(object).eq(spec.group).to_numpy(dtype=bool)


def extra_rows(ds: FaceDataset, spec: BiasSpec) -> np.ndarray:
    """Row indices of the extra images (subset not ``"base"``) of the target group."""
    if "subset" not in ds.manifest:
        return np.zeros(0, dtype=np.int64)
    extra = ds.manifest["subset"].ne(BASE_SUBSET).to_numpy()
    return np.flatnonzero(extra & target_mask(ds, spec))


def apply_bias(ds_full: FaceDataset, train_idx: np.ndarray, spec: BiasSpec, rng: np.random.Generator,
               *, test_idx: np.ndarray | None = None) -> np.ndarray:
    """The training rows of one fold under ``spec``, as sorted row indices into ``ds_full``.

    Parameters
    ----------
    ds_full
        The whole dataset, extras included (row indices refer to it).
    train_idx
        Rows of the fold's training part (base rows); never contains a test row.
    spec
        The bias to apply; kind ``"none"`` (or level 0) returns ``train_idx`` itself, sorted.
    rng
        Source of the draws; pass :func:`bias_rng` of the fold so that levels are nested.
    test_idx
        Rows of the fold's test part: checked to be disjoint from ``train_idx``, and extras with the
        same ``image_id`` as a test image are never added.

    Returns
    -------
    numpy.ndarray
        Sorted int64 row indices: a subset of ``train_idx``, plus extra rows for ``"augmented"``.
    """
    train_idx = np.unique(np.asarray(train_idx, dtype=np.int64))
    test_idx = np.zeros(0, dtype=np.int64) if test_idx is None else np.asarray(test_idx, dtype=np.int64)
    overlap = np.intersect1d(train_idx, test_idx)
    if overlap.size:
        raise ValueError(_TEST_ROWS.format(overlap.size))
    # one priority order over all rows, drawn first: the same (fold, seed) gives nested levels
    rank = np.empty(len(ds_full), dtype=np.int64)
    rank[rng.permutation(len(ds_full))] = np.arange(len(ds_full))
    if spec.kind == "none" or (spec.level == 0 and not spec.size_level):
        return train_idx
    if spec.kind == "representational":
        return _representational(ds_full, train_idx, spec, rank)
    if spec.kind == "stereotypical":
        return _stereotypical(ds_full, train_idx, spec, rank)
    return _augmented(ds_full, train_idx, spec, rank, test_idx)


def _by_rank(rows: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``rows`` in priority order (the fold's permutation)."""
    return rows[np.argsort(rank[rows], kind="stable")]


def _representational(ds: FaceDataset, train_idx: np.ndarray, spec: BiasSpec, rank: np.ndarray
                      ) -> np.ndarray:
    """Keep ``round((1 - level) * n)`` of the target group's ``n`` images in every class."""
    is_target = target_mask(ds, spec)[train_idx]
    labels = ds.labels[train_idx]
    keep = [train_idx[~is_target]]
    for label in np.unique(labels):
        rows = _by_rank(train_idx[is_target & (labels == label)], rank)
        keep.append(rows[:_round(len(rows) * (1.0 - spec.level))])
    return np.sort(np.concatenate(keep))


def stereotypical_counts(n_target: int, n_other: int, spec: BiasSpec) -> tuple[int, int]:
    """How many target and other images a class keeps to reach the skewed share without oversampling.

    Without ``size_level`` the group that gains share keeps all its images and the other is cut until
    the share is reached. With it, the class is first given its size at ``size_level`` and the new
    share is drawn at that size. A class without any image of the gaining group cannot be skewed and
    is kept as it is.
    """
    gaining = n_target if spec.direction == "up" else n_other
    if gaining == 0:
        return n_target, n_other
    p = n_target / (n_target + n_other)
    share = p + spec.level * (1.0 - p) if spec.direction == "up" else p * (1.0 - spec.level)
    if spec.size_level:
        size = sum(stereotypical_counts(n_target, n_other, replace(spec, level=spec.size_level,
                                                                   size_level=0.0)))
        n_t = min(n_target, _round(size * share))
        return n_t, min(n_other, size - n_t)
    if spec.direction == "up":
        return n_target, min(n_other, _round(n_target * (1.0 - share) / share))
    return min(n_target, _round(n_other * share / (1.0 - share))), n_other


def _stereotypical(ds: FaceDataset, train_idx: np.ndarray, spec: BiasSpec, rank: np.ndarray) -> np.ndarray:
    """Skew the target group's share inside each chosen class by cutting the group that loses share."""
    is_target = target_mask(ds, spec)[train_idx]
    labels = ds.manifest["label"].to_numpy()[train_idx]
    chosen = np.isin(labels, spec.classes)
    keep = [train_idx[~chosen]]
    for cls in spec.classes:
        target = _by_rank(train_idx[is_target & (labels == cls)], rank)
        other = _by_rank(train_idx[~is_target & (labels == cls)], rank)
        n_t, n_o = stereotypical_counts(len(target), len(other), spec)
        keep += [target[:n_t], other[:n_o]]
        if spec.level and not (len(target) if spec.direction == "up" else len(other)):
            logger.warning("stereotypical %g: class %s has no training image %s %s, so its share cannot "
                           "move: kept as it is", spec.level, cls,
                           "of" if spec.direction == "up" else "outside", spec.group)
        if n_t + n_o < len(target) + len(other):
            logger.info("stereotypical %g: class %s capped at %d of %d images (share of %s %.2f)",
                         spec.level, cls, n_t + n_o, len(target) + len(other), spec.group,
                         n_t / max(1, n_t + n_o))
    return np.sort(np.concatenate(keep))


def _augmented(ds: FaceDataset, train_idx: np.ndarray, spec: BiasSpec, rank: np.ndarray,
               test_idx: np.ndarray) -> np.ndarray:
    """Add ``round(level * n)`` of the ``n`` target-group extras that are not copies of a test image."""
    ids = ds.manifest["image_id"].to_numpy()
    extras = _by_rank(extra_rows(ds, spec), rank)
    copies = np.isin(ids[extras], ids[test_idx])
    if copies.any():
        logger.info("augmented: %d extra images equal a test image (same image_id); not added",
                    int(copies.sum()))
    extras = extras[~copies]
    added = extras[:_round(len(extras) * spec.level)]
    return np.sort(np.concatenate([train_idx, added]))


def _round(x: float) -> int:
    """Round half up (``np.round`` rounds half to even, which would break monotone counts)."""
    return int(np.floor(x + 0.5 + 1e-9))


def bias_summary(ds: FaceDataset, rows: np.ndarray, spec: BiasSpec) -> dict[str, float]:
    """Counts of a (biased) training set: images, target images and share, extras, chosen classes.

    Returns
    -------
    dict
        ``n_train``, ``n_target``, ``target_share``, ``n_extra`` and, per chosen class ``c``,
        ``n_<c>`` and ``target_share_<c>``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    is_target = target_mask(ds, spec)[rows]
    subset = ds.manifest.get("subset", pd.Series(BASE_SUBSET, index=ds.manifest.index))
    out = {"n_train": int(len(rows)), "n_target": int(is_target.sum()),
           "target_share": float(is_target.mean()) if len(rows) else float("nan"),
           "n_extra": int((subset.to_numpy()[rows] != BASE_SUBSET).sum())}
    labels = ds.manifest["label"].to_numpy()[rows]
    for cls in spec.classes:
        in_cls = labels == cls
        out[f"n_{cls}"] = int(in_cls.sum())
        out[f"target_share_{cls}"] = float(is_target[in_cls].mean()) if in_cls.any() else float("nan")
    return out
