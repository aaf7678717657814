"""benchmarks/ensemble_fer4.py: the ensemble averages each image's probabilities over architectures."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

CLASSES = ["Focused", "Happy", "Neutral", "Surprised"]
_spec = importlib.util.spec_from_file_location(
    "ensemble_fer4", Path(__file__).resolve().parents[1] / "benchmarks" / "ensemble_fer4.py")
ensemble = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ensemble)


def _preds(arch: str, y_true: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"arch": arch, "fold": np.arange(len(y_true)) % 2,
                          "image_id": [f"img{i}" for i in range(len(y_true))], "y_true": y_true})
    for j, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, j]
    return frame


def test_ensemble_follows_the_mean_probability_per_image():
    rng = np.random.default_rng(0)
    n = 40
    y = rng.choice(CLASSES, n)
    pa, pb = rng.dirichlet(np.ones(4), n), rng.dirichlet(np.ones(4), n)
    frame = pd.concat([_preds("a", y, pa), _preds("b", y, pb)], ignore_index=True)
    # shuffle the rows: images must be matched by (fold, image_id), not by position
    frame = frame.sample(frac=1, random_state=1).reset_index(drop=True)
    got = ensemble.fold_scores(frame, ("a", "b"), CLASSES)
    y_pred = np.asarray(CLASSES)[(pa + pb).argmax(1)]
    folds = np.arange(n) % 2
    want = [f1_score(y[folds == f], y_pred[folds == f], average="macro") for f in (0, 1)]
    assert got.to_numpy() == pytest.approx(want)
    alone = ensemble.fold_scores(frame, ("a",), CLASSES)
    want_a = [f1_score(y[folds == f], np.asarray(CLASSES)[pa.argmax(1)][folds == f], average="macro")
              for f in (0, 1)]
    assert alone.to_numpy() == pytest.approx(want_a)


def test_architectures_tested_on_different_images_are_refused():
    y = np.array(CLASSES * 2)
    probs = np.full((8, 4), 0.25)
    other = _preds("b", y, probs).assign(image_id=lambda f: f["image_id"] + "x")
    frame = pd.concat([_preds("a", y, probs), other], ignore_index=True)
    with pytest.raises(SystemExit, match="same folds and images"):
        ensemble.fold_scores(frame, ("a", "b"), CLASSES)
