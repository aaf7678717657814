"""Classification metrics from scikit-learn, flattened into dicts for tables."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

logger = logging.getLogger(__name__)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Macro-averaged F1 over all ``num_classes`` labels (absent classes count as 0)."""
    return float(f1_score(y_true, y_pred, labels=np.arange(num_classes), average="macro", zero_division=0))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]
                           ) -> dict[str, float]:
    """Accuracy, macro and micro precision/recall/F1, and per-class F1 (``f1_<class>``)."""
    labels = np.arange(len(classes))
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                     zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out.update({f"f1_{c}": float(v) for c, v in zip(classes, per_class, strict=True)})
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows = true class, columns = predicted)."""
    return confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
