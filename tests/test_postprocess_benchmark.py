"""benchmarks/postprocess_fer4.py: per-group decision rules applied to a sweep's test predictions."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

_spec = importlib.util.spec_from_file_location(
    "postprocess_fer4", Path(__file__).resolve().parents[1] / "benchmarks" / "postprocess_fer4.py")
post = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(post)


@pytest.mark.parametrize("absent", [None, 2])
def test_fast_scores_agree_with_scikit_learn(absent):
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    if absent is not None:  # a class neither in the labels nor in the predictions
        y[y == absent], pred[pred == absent] = 0, 1
    male = rng.random(300) < 0.4
    acc_gap, bal_gap, f1 = post._scores(y, pred, male, 4)
    assert acc_gap == pytest.approx(accuracy_score(y[male], pred[male])
                                    - accuracy_score(y[~male], pred[~male]))
    assert bal_gap == pytest.approx(balanced_accuracy_score(y[male], pred[male])
                                    - balanced_accuracy_score(y[~male], pred[~male]))
    assert f1 == pytest.approx(f1_score(y, pred, average="macro"))


def test_prior_offsets_turn_a_group_prior_into_the_overall_class_mix():
    # training mix: women mostly class 1, men mostly class 0; class 2 is the largest overall
    labels = np.array([1] * 30 + [2] * 25 + [0] * 5 + [0] * 30 + [2] * 25 + [1] * 5)
    groups = np.array(["Female"] * 60 + ["Male"] * 60)
    offsets = post.prior_offsets(labels, groups, 4)
    # a model that only knows the group answers with the group's training mix; after the offset both
    # groups get the overall mix, whose largest class is 2
    for g in ("Female", "Male"):
        own = np.bincount(labels[groups == g], minlength=4) + 1.0
        adjusted = post.apply_offsets(np.log(own / own.sum())[None], np.array([g]), offsets)
        overall = np.bincount(labels, minlength=4) + 1.0
        shifted = np.exp(adjusted[0]) / np.exp(adjusted[0]).sum()
        assert shifted == pytest.approx(overall / overall.sum())
        assert adjusted.argmax(1)[0] == 2
    # a group without offsets keeps its log-probabilities
    logp = np.log(np.full((1, 4), 0.25))
    assert post.apply_offsets(logp, np.array(["unknown"]), offsets) == pytest.approx(logp)


def _planted(n: int = 600, seed: int = 0):
    """A model that reads every class well, but whose answers for men lean to class 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    groups = np.where(rng.random(n) < 0.5, "Male", "Female")
    logits = 2.0 * np.eye(4)[y] + rng.normal(0, 1, (n, 4))
    logits[groups == "Male", 0] += 3.0
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return logp, y, groups


@pytest.mark.parametrize("metric, which", [("accuracy_gap", 0), ("balanced_accuracy_gap", 1)])
def test_audit_rule_closes_a_planted_gap_on_images_it_was_not_fitted_on(metric, which):
    logp, y, groups = _planted()
    male = groups == "Male"
    before = post._scores(y, logp.argmax(1), male, 4)
    assert before[which] < -0.08  # the planted lean costs men recognition
    after = post._scores(y, post.audit_predictions(logp, y, groups, metric, seed=0), male, 4)
    assert abs(after[which]) < abs(before[which]) / 2
    assert after[2] > before[2] - 0.01  # undoing the lean does not cost macro-F1


def test_audit_predictions_score_each_image_with_offsets_fitted_without_it(monkeypatch):
    logp, y, groups = _planted(n=80)
    fitted = []

    def fake_fit(lp, yy, gg, metric, seed, generations):
        # remember the rows (by their unique log-probabilities) and answer "class k" for call k
        fitted.append({tuple(row) for row in np.round(lp, 9)})
        k = len(fitted) - 1
        return {"Female": 50.0 * np.eye(4)[k], "Male": 50.0 * np.eye(4)[k]}

    monkeypatch.setattr(post, "fit_audit_offsets", fake_fit)
    pred = post.audit_predictions(logp, y, groups, "accuracy_gap", seed=0)
    assert len(fitted) == 2 and not fitted[0] & fitted[1]
    assert len(fitted[0] | fitted[1]) == len(y)
    for row, k in zip(np.round(logp, 9), pred, strict=True):
        assert tuple(row) not in fitted[k]
