"""fer_core.fairness: group metrics checked against sklearn/fairlearn on subsets masked by hand, and the
paired tests against scipy.stats run by hand on tables with a known planted gap."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, recall_score

from fer_core.fairness import (
    EQ_ODDS,
    FAIRNESS_COLUMNS,
    GAP_PARTS,
    PAIRED_COLUMNS,
    RUN_KEYS,
    accuracy_gap,
    eq_odds_floor,
    expand_attributes,
    fairness_table,
    gap_direction,
    group_confusions,
    group_gap,
    group_labels,
    paired_tests,
    unit_intervals,
    unit_metrics,
)

CLASSES = ["Focused", "Happy", "Neutral", "Surprised"]


def _predictions(seed: int = 0, n: int = 240, folds: int = 3, seeds=(0,), runs=None) -> pd.DataFrame:
    """Random predictions; Female rows less accurate; a few null / 'unknown' attributes."""
    rng = np.random.default_rng(seed)
    runs = runs or [("main", "none", 0.0, "none"), ("main", "representational", 0.5, "none")]
    parts = []
    for r, key in enumerate(runs):
        for s in seeds:
            y_true = np.asarray(CLASSES)[np.arange(n) % 4]
            gender = np.where(np.arange(n) % 3 == 0, "Female", "Male").astype(object)
            age = np.asarray(["Adult", "Senior", "Baby"])[(np.arange(n) // 2) % 3].astype(object)
            gender[[5, 17, 40]] = None
            gender[[8]] = "unknown"
            age[[3, 17]] = None
            acc = np.where(gender == "Female", 0.6 - 0.1 * r, 0.85)
            wrong = np.asarray(CLASSES)[(np.arange(n) % 4 + rng.integers(1, 4, n)) % 4]
            y_pred = np.where(rng.random(n) < acc, y_true, wrong)
            parts.append(pd.DataFrame({
                **dict(zip(RUN_KEYS, key, strict=True)), "fold": np.arange(n) % folds, "seed": s,
                "image_id": [f"i{i}" for i in range(n)], "y_true": y_true, "y_pred": y_pred,
                "gender": gender, "age": age, "config_hash": "abc"}))
    return pd.concat(parts, ignore_index=True)


def _group_masks(run: pd.DataFrame, attribute: str) -> dict[str, np.ndarray]:
    """Masks built by hand (not through fer_core.fairness.group_labels)."""
    def clean(col):
        v = run[col].astype(object)
        return v.where(v.notna() & (v != "unknown"), None)
    if attribute == "gender x age":
        g, a = clean("gender"), clean("age")
        labels = (g.astype(str) + " x " + a.astype(str)).where(g.notna() & a.notna(), None)
    else:
        labels = clean(attribute)
    return {v: (labels == v).to_numpy() for v in labels.dropna().unique()}


def _sklearn_balanced(y_true, y_pred) -> float:
    """sklearn's balanced accuracy; it warns when a small group lacks a class, then skips that class."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
        return balanced_accuracy_score(y_true, y_pred)


@pytest.fixture(scope="module")
def preds():
    return _predictions()


@pytest.fixture(scope="module")
def table(preds):
    return fairness_table(preds, ["gender", "age"], CLASSES, n_boot=20, seed=1)


def _value(table, key, attribute, group, metric, col="value"):
    rows = table[(table[RUN_KEYS].apply(tuple, axis=1) == key) & (table["attribute"] == attribute)
                 & (table["group"] == group) & (table["metric"] == metric)]
    assert len(rows) == 1, (key, attribute, group, metric, len(rows))
    return rows.iloc[0][col]


def test_schema_and_attributes(table):
    assert list(table.columns[:len(FAIRNESS_COLUMNS)]) == FAIRNESS_COLUMNS
    assert set(table["attribute"]) == {"gender", "age", "gender x age"}
    assert (table["config_hash"] == "abc").all() and "version" in table
    assert expand_attributes(["gender", "age"], intersections=False) == ["gender", "age"]


@pytest.mark.parametrize("attribute", ["gender", "age", "gender x age"])
def test_group_metrics_match_sklearn_on_masked_subsets(preds, table, attribute):
    for key, run in preds.groupby(RUN_KEYS):
        for group, mask in _group_masks(run, attribute).items():
            yt, yp = run["y_true"].to_numpy()[mask], run["y_pred"].to_numpy()[mask]
            assert _value(table, key, attribute, group, "count") == mask.sum()
            assert _value(table, key, attribute, group, "accuracy", "n") == mask.sum()
            assert _value(table, key, attribute, group, "accuracy") == pytest.approx(accuracy_score(yt, yp))
            assert _value(table, key, attribute, group, "macro_f1") == pytest.approx(
                f1_score(yt, yp, average="macro", zero_division=0))
            assert _value(table, key, attribute, group, "balanced_accuracy") == pytest.approx(
                _sklearn_balanced(yt, yp))
            for c in CLASSES:
                assert _value(table, key, attribute, group, f"recall_{c}") == pytest.approx(
                    recall_score(yt == c, yp == c, zero_division=np.nan), nan_ok=True)  # NaN: class absent
                assert _value(table, key, attribute, group, f"selection_rate_{c}") == pytest.approx(
                    np.mean(yp == c))


@pytest.mark.parametrize("attribute", ["gender", "age", "gender x age"])
def test_difference_ratio_and_overall_by_hand(preds, table, attribute):
    for key, run in preds.groupby(RUN_KEYS):
        masks = _group_masks(run, attribute)
        known = np.any(list(masks.values()), axis=0)
        yt, yp = run["y_true"].to_numpy(), run["y_pred"].to_numpy()
        accs = [accuracy_score(yt[m], yp[m]) for m in masks.values()]
        f1s = [f1_score(yt[m], yp[m], average="macro", zero_division=0) for m in masks.values()]
        assert _value(table, key, attribute, "difference", "accuracy") == pytest.approx(max(accs) - min(accs))
        assert _value(table, key, attribute, "ratio", "accuracy") == pytest.approx(min(accs) / max(accs))
        assert _value(table, key, attribute, "difference", "macro_f1") == pytest.approx(max(f1s) - min(f1s))
        assert _value(table, key, attribute, "overall", "accuracy") == pytest.approx(
            accuracy_score(yt[known], yp[known]))
        assert _value(table, key, attribute, "difference", "accuracy", "n") == known.sum()
        recalls = [recall_score(yt[m] == "Happy", yp[m] == "Happy", zero_division=np.nan)
                   for m in masks.values()]
        assert _value(table, key, attribute, "difference", "recall_Happy") == pytest.approx(
            np.nanmax(recalls) - np.nanmin(recalls))


@pytest.mark.parametrize("attribute", ["gender", "age"])
def test_one_vs_rest_equalized_odds_and_parity_against_fairlearn_loop(preds, table, attribute):
    for key, run in preds.groupby(RUN_KEYS):
        labels = run[attribute].astype(object)
        known = (labels.notna() & (labels != "unknown")).to_numpy()
        yt, yp, g = run["y_true"].to_numpy()[known], run["y_pred"].to_numpy()[known], labels[known].to_numpy()
        binary = [((yt == c).astype(int), (yp == c).astype(int)) for c in CLASSES]
        eo = [equalized_odds_difference(t, p, sensitive_features=g) for t, p in binary]
        dp = [demographic_parity_difference(t, p, sensitive_features=g) for t, p in binary]
        assert _value(table, key, attribute, "difference", "eq_odds_diff_ovr") == pytest.approx(max(eo))
        assert _value(table, key, attribute, "difference", "dem_parity_diff_ovr") == pytest.approx(max(dp))


def test_bootstrap_intervals_bracket_point_estimates(table):
    headline = ["accuracy", "balanced_accuracy", "macro_f1"]
    head = table[table["metric"].isin(headline) & (table["group"] != "difference")
                 & (table["group"] != "ratio")]
    assert head[["ci_low", "ci_high"]].notna().all().all()
    assert (head["ci_low"] <= head["value"] + 1e-12).all()
    assert (head["value"] <= head["ci_high"] + 1e-12).all()
    diff = table[(table["group"] == "difference") & (table["metric"] == "accuracy")]
    assert diff[["ci_low", "ci_high"]].notna().all().all() and (diff["ci_low"] <= diff["ci_high"]).all()
    rest = table[~table["metric"].isin(headline)]
    assert rest[["ci_low", "ci_high"]].isna().all().all()  # point values only (documented)


def test_no_bootstrap_gives_nan_intervals(preds):
    table = fairness_table(preds, ["gender"], CLASSES, n_boot=0, intersections=False)
    assert table[["ci_low", "ci_high"]].isna().all().all()


def test_null_attributes_are_counted_not_silently_dropped(preds, table, caplog):
    for key, run in preds.groupby(RUN_KEYS):
        for attribute, col in (("gender", run["gender"]), ("age", run["age"])):
            unknown = int((col.isna() | (col == "unknown")).sum())
            assert _value(table, key, attribute, "unknown", "count") == unknown
            counts = table[(table[RUN_KEYS].apply(tuple, axis=1) == key) & (table["attribute"] == attribute)
                           & (table["metric"] == "count")]
            assert counts["n"].sum() == len(run)  # every row in exactly one group or 'unknown'
    with caplog.at_level(logging.INFO, logger="fer_core.fairness"):
        fairness_table(preds, ["gender"], CLASSES, n_boot=0, intersections=False)
    assert "gender: 8 rows without a value" in caplog.text


def test_intersection_labels_are_null_when_either_part_is():
    frame = pd.DataFrame({"gender": ["Female", None, "Male", "unknown"],
                          "age": ["Adult", "Adult", None, "Baby"]})
    assert group_labels(frame, "gender x age").tolist() == ["Female x Adult", None, None, None]


def test_single_group_has_no_between_group_rows(preds):
    one = preds[preds["gender"] == "Male"]
    table = fairness_table(one, ["gender"], CLASSES, n_boot=0, intersections=False)
    assert set(table["group"]) == {"Male", "overall"}


def test_unknown_labels_and_missing_columns_fail_fast(preds):
    with pytest.raises(ValueError, match="not among the classes"):
        fairness_table(preds, ["gender"], CLASSES[:3], n_boot=0)
    with pytest.raises(KeyError, match="ethnicity"):
        fairness_table(preds, ["ethnicity"], CLASSES, n_boot=0)


def test_group_confusions_match_sklearn(preds):
    run = preds[preds["bias_kind"] == "none"]
    got = group_confusions(run, "age", CLASSES)
    for group, mask in _group_masks(run, "age").items():
        np.testing.assert_array_equal(got[group], confusion_matrix(run["y_true"][mask], run["y_pred"][mask],
                                                                   labels=CLASSES))


def test_accuracy_gap_and_group_gap_keep_working(preds):
    run = preds[preds["bias_kind"] == "none"]
    masks = _group_masks(run, "gender")
    accs = [accuracy_score(run["y_true"][m], run["y_pred"][m]) for m in masks.values()]
    assert group_gap(run, "gender") == pytest.approx(max(accs) - min(accs))
    assert np.isnan(accuracy_gap(np.array([0, 1]), np.array([0, 1]), np.array(["A", None], dtype=object)))


# ---- paired tests ----

def _planted(effect: float, units: int = 6, n: int = 200, seed: int = 0) -> pd.DataFrame:
    """Level 0 and level 0.5 over ``units`` folds; at 0.5, ``effect`` of the Female predictions that were
    right are flipped wrong (effect=0: the same error process, fresh noise)."""
    rng = np.random.default_rng(seed)
    parts = []
    for kind, level in (("none", 0.0), ("representational", 0.5)):
        for fold in range(units):
            y_true = np.asarray(CLASSES)[rng.integers(0, 4, n)]
            gender = np.where(np.arange(n) % 2 == 0, "Female", "Male")
            right = rng.random(n) < 0.85
            if level:
                right &= ~((gender == "Female") & (rng.random(n) < effect))
            wrong = np.asarray(CLASSES)[(pd.Categorical(y_true, CLASSES).codes + 1) % 4]
            parts.append(pd.DataFrame({"arch": "main", "bias_kind": kind, "bias_level": level,
                                       "mitigation": "none", "fold": fold, "seed": 0, "y_true": y_true,
                                       "y_pred": np.where(right, y_true, wrong), "gender": gender}))
    return pd.concat(parts, ignore_index=True)


def _gaps_by_hand(frame: pd.DataFrame, level: float) -> np.ndarray:
    rows = frame[frame["bias_level"] == level]
    ok = rows["y_true"] == rows["y_pred"]
    acc = ok.groupby([rows["fold"], rows["gender"]]).mean().unstack()
    return (acc["Male"] - acc["Female"]).to_numpy()


def _balanced_gaps_by_hand(frame: pd.DataFrame, level: float) -> np.ndarray:
    def balanced(fold: pd.DataFrame, gender: str) -> float:
        rows = fold[fold["gender"] == gender]
        return balanced_accuracy_score(rows["y_true"], rows["y_pred"])
    rows = frame[frame["bias_level"] == level]
    return np.array([balanced(g, "Male") - balanced(g, "Female") for _, g in rows.groupby("fold")])


def _row(paired, metric, attribute):
    rows = paired[(paired["metric"] == metric) & (paired["attribute"] == attribute)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_planted_gap_is_found_and_matches_scipy_by_hand():
    frame = _planted(effect=0.3)
    paired = paired_tests(frame, ["gender"])
    assert list(paired.columns[:len(PAIRED_COLUMNS)]) == PAIRED_COLUMNS
    row = _row(paired, "accuracy_gap", "gender")
    run, ref = _gaps_by_hand(frame, 0.5), _gaps_by_hand(frame, 0.0)
    diff = run - ref
    res = stats.ttest_rel(run, ref)
    ci = res.confidence_interval(0.95)
    assert row["direction"] == "(Male - Female) run - reference"
    assert row["comparison"] == "bias" and "bias_kind=none bias_level=0 mitigation=none" in row["reference"]
    assert row["n_pairs"] == 6 and row["test"] == "ttest_rel+wilcoxon"
    assert row["mean_diff"] == pytest.approx(diff.mean())
    assert row["mean_diff"] == pytest.approx(0.85 * 0.3 / 1, abs=0.06)  # Female accuracy drops ~0.25
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert row["p_value"] == pytest.approx(res.pvalue)
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(diff, method="exact").pvalue)
    assert row["effect_size"] == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert row["ci_low"] > 0
    acc = _row(paired, "accuracy", "all")
    assert acc["mean_diff"] < 0 and acc["direction"] == "run - reference"


def test_no_planted_gap_gives_an_interval_that_includes_zero():
    paired = paired_tests(_planted(effect=0.0, seed=3), ["gender"])
    row = _row(paired, "accuracy_gap", "gender")
    assert row["ci_low"] < 0 < row["ci_high"] and row["p_value"] > 0.05


def test_few_pairs_use_ttest_only():
    row = _row(paired_tests(_planted(effect=0.3, units=3), ["gender"]), "accuracy_gap", "gender")
    assert row["n_pairs"] == 3 and row["test"] == "ttest_rel" and np.isnan(row["p_wilcoxon"])


def test_identical_runs_give_zero_variance_explicitly_without_warnings():
    frame = _planted(effect=0.0)
    base = frame[frame["bias_level"] == 0.0]
    frame = pd.concat([base, base.assign(bias_kind="representational", bias_level=0.5)], ignore_index=True)
    paired = paired_tests(frame, ["gender"])  # filterwarnings=error: any scipy warning fails the test
    assert (paired["mean_diff"] == 0).all() and (paired["p_value"] == 1).all()
    assert (paired["p_wilcoxon"] == 1).all() and paired["test"].str.contains("zero variance").all()


def test_mitigation_comparisons_and_missing_references(caplog):
    frame = _planted(effect=0.3)
    mitigated = frame.assign(mitigation="reweight")
    orphan = frame[frame["bias_level"] == 0.5].assign(arch="variant1")  # has no level-0 reference
    paired = paired_tests(pd.concat([frame, mitigated, orphan], ignore_index=True), ["gender"])
    both = paired[(paired["mitigation"] == "reweight") & (paired["bias_level"] == 0.5)]
    assert set(both["comparison"]) == {"bias", "mitigation"}
    mit = both[(both["comparison"] == "mitigation") & (both["metric"] == "accuracy")].iloc[0]
    assert mit["reference"] == "arch=main bias_kind=representational bias_level=0.5 mitigation=none"
    assert mit["mean_diff"] == 0  # identical predictions
    assert "variant1" not in set(paired["arch"])
    assert "no reference run group" in caplog.text


def test_a_kind_with_its_own_level_zero_is_compared_with_it():
    frame = _planted(effect=0.3)  # none 0 and representational 0.5 (Female predictions made worse)
    # a size-matched stereotypical sweep: its level 0 = the degraded runs, its level 1 = the clean ones
    own_zero = frame[frame["bias_level"] == 0.5].assign(bias_kind="stereotypical", bias_level=0.0)
    level_one = frame[frame["bias_level"] == 0.0].assign(bias_kind="stereotypical", bias_level=1.0)
    paired = paired_tests(pd.concat([frame, own_zero, level_one], ignore_index=True), ["gender"])
    stereo = paired[(paired["bias_kind"] == "stereotypical") & (paired["metric"] == "accuracy_gap")]
    at_one = stereo[stereo["bias_level"] == 1.0].iloc[0]
    at_zero = stereo[stereo["bias_level"] == 0.0].iloc[0]
    assert at_one["reference"] == "arch=main bias_kind=stereotypical bias_level=0 mitigation=none"
    assert at_zero["reference"] == "arch=main bias_kind=none bias_level=0 mitigation=none"
    gaps_degraded, gaps_clean = _gaps_by_hand(frame, 0.5), _gaps_by_hand(frame, 0.0)
    assert at_one["mean_diff"] == pytest.approx((gaps_clean - gaps_degraded).mean())
    assert at_zero["mean_diff"] == pytest.approx((gaps_degraded - gaps_clean).mean())
    rep = paired[(paired["bias_kind"] == "representational") & (paired["metric"] == "accuracy_gap")]
    assert rep.iloc[0]["reference"] == "arch=main bias_kind=none bias_level=0 mitigation=none"


def test_gap_direction_conventions():
    two = pd.Series(["Male", "Female", None], dtype=object)
    assert gap_direction(two)[0] == "Male - Female"
    assert gap_direction(two, "Male")[0] == "Female - Male"
    many = pd.Series(["Adult", "Senior", "Baby"], dtype=object)
    assert gap_direction(many)[0] == "max - min"
    direction, sensitive, _ = gap_direction(many, "Senior")
    assert direction == "rest - Senior" and sensitive.tolist() == ["rest", "Senior", "rest"]
    with pytest.raises(ValueError, match="not among the groups"):
        gap_direction(many, "Teen")


def test_unit_metrics_and_intervals_by_hand():
    frame = _planted(effect=0.3)
    units = unit_metrics(frame, ["gender"], classes=CLASSES)
    gap = units[(units["metric"] == "accuracy_gap") & (units["bias_level"] == 0.5)].sort_values("fold")
    np.testing.assert_allclose(gap["value"], _gaps_by_hand(frame, 0.5))
    balanced = units[(units["metric"] == "balanced_accuracy_gap") & (units["bias_level"] == 0.5)]
    np.testing.assert_allclose(balanced.sort_values("fold")["value"], _balanced_gaps_by_hand(frame, 0.5))
    acc = units[(units["metric"] == "accuracy") & (units["bias_level"] == 0.0)].sort_values("fold")
    rows = frame[frame["bias_level"] == 0.0]
    np.testing.assert_allclose(acc["value"], (rows["y_true"] == rows["y_pred"]).groupby(rows["fold"]).mean())
    intervals = unit_intervals(frame, ["gender"])
    row = intervals[(intervals["metric"] == "accuracy_gap") & (intervals["bias_level"] == 0.5)].iloc[0]
    res = stats.ttest_1samp(_gaps_by_hand(frame, 0.5), 0.0)
    assert row["p_value"] == pytest.approx(res.pvalue) and row["n_units"] == 6
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(res.confidence_interval(0.95)))


def test_unit_intervals_stay_inside_the_metric_range():
    """Two folds, accuracy 0.95 and 0.55: the t interval (quantile 12.7) would run past 1; it is cut at 1
    and its other end is scipy's."""
    parts = []
    for fold, right in ((0, 19), (1, 11)):
        y_pred = ["Happy"] * right + ["Neutral"] * (20 - right)
        parts.append(pd.DataFrame({"y_true": "Happy", "y_pred": y_pred, "gender": ["Female", "Male"] * 10})
                     .assign(arch="main", bias_kind="none", bias_level=0.0, mitigation="none", fold=fold,
                             seed=0))
    intervals = unit_intervals(pd.concat(parts, ignore_index=True), ["gender"]).set_index("metric")
    raw = stats.ttest_1samp([0.95, 0.55], 0.0).confidence_interval(0.95)
    assert raw.high > 1 and raw.low < 0  # what would be printed without the cut
    assert intervals.loc["accuracy", "ci_high"] == 1.0 and intervals.loc["accuracy", "ci_low"] == 0.0
    assert intervals.loc["accuracy", "mean"] == pytest.approx(0.75)
    gap = intervals.loc["accuracy_gap"]
    assert -1.0 <= gap["ci_low"] <= gap["mean"] <= gap["ci_high"] <= 1.0


def test_unit_metrics_do_not_depend_on_row_order():
    frame = pd.concat([_planted(effect=0.3), _planted(effect=0.3, seed=1).assign(mitigation="groupdro")])
    shuffled = frame.sample(frac=1, random_state=0)
    keys = [*RUN_KEYS, "fold", "seed", "attribute", "metric"]
    a = unit_metrics(frame, ["gender"]).sort_values(keys).reset_index(drop=True)
    b = unit_metrics(shuffled, ["gender"]).sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    rows = frame[(frame["mitigation"] == "groupdro") & (frame["bias_level"] == 0.5)]
    by_hand = (rows["y_true"] == rows["y_pred"]).groupby(rows["fold"]).mean().to_numpy()
    got = b[(b["mitigation"] == "groupdro") & (b["bias_level"] == 0.5) & (b["metric"] == "accuracy")]
    np.testing.assert_allclose(got.sort_values("fold")["value"], by_hand)


def _hard_class_mix() -> pd.DataFrame:
    """Four folds at level 0: 80 of 100 Focused faces (recall 0.6) are Male, 80 of 100 Happy ones (0.95)
    Female, both groups read alike; at level 0.5 Female Happy recall falls to 0.55."""
    n_per = 100
    parts = []
    for level, female_loss in ((0.0, 0.0), (0.5, 0.4)):
        for fold in range(4):
            rows = []
            for c, female_share in (("Focused", 0.2), ("Happy", 0.8)):  # Focused: hard, mostly male
                hit = 0.6 if c == "Focused" else 0.95
                for gender, count in (("Female", int(n_per * female_share)),
                                      ("Male", n_per - int(n_per * female_share))):
                    rate = hit - (female_loss if (gender, c) == ("Female", "Happy") else 0.0)
                    right = np.arange(count) < round(rate * count)
                    wrong = "Happy" if c == "Focused" else "Focused"
                    rows.append(pd.DataFrame({"y_true": c, "y_pred": np.where(right, c, wrong),
                                              "gender": gender}))
            kind = "representational" if level else "none"
            parts.append(pd.concat(rows).assign(arch="main", bias_kind=kind, bias_level=level,
                                                mitigation="none", fold=fold, seed=0))
    return pd.concat(parts, ignore_index=True)


def test_balanced_gap_separates_class_mix_from_per_class_errors():
    """Both groups are read equally well inside every class, but one group's faces sit in the hard class:
    the accuracy gap shows the class mix, the balanced-accuracy gap is 0 and its paired test finds no
    effect; then Female faces lose recall in one class and the balanced gap moves by the planted amount."""
    frame = _hard_class_mix()
    units = unit_metrics(frame, ["gender"], classes=["Focused", "Happy"])
    at = units[units["bias_level"] == 0.0].set_index("metric")["value"].groupby(level=0).mean()
    # Male: 80 Focused at 0.6 + 20 Happy at 0.95 = 0.67; Female: 20 at 0.6 + 80 at 0.95 = 0.88
    assert at["accuracy_gap"] == pytest.approx(0.67 - 0.88)
    assert at["balanced_accuracy_gap"] == pytest.approx(0.0, abs=1e-12)
    row = _row(paired_tests(frame, ["gender"]), "balanced_accuracy_gap", "gender")
    assert row["mean_diff"] == pytest.approx(0.4 / 2)  # Female Happy recall -0.4, one of two classes
    assert row["direction"] == "(Male - Female) run - reference"


def test_accuracy_gap_splits_into_class_mix_and_within_class_parts():
    """Kitagawa's decomposition by hand. Level 0: groups read alike, so the whole gap is class mix. Level
    0.5: Female Happy recall 0.55; Male - Female = 0.67 - 0.56 = +0.11 = mix (0.8 - 0.2) x 0.6 + (0.2 -
    0.8) x (0.95 + 0.55) / 2 = -0.09, plus within-class 0.5 x (0.95 - 0.55) = +0.20."""
    frame = _hard_class_mix()
    units = unit_metrics(frame, ["gender"], classes=["Focused", "Happy"])
    by_level = units.groupby(["bias_level", "metric"])["value"].mean()
    assert by_level[(0.0, "accuracy_gap_mix")] == pytest.approx(0.67 - 0.88)
    assert by_level[(0.0, "accuracy_gap_within")] == pytest.approx(0.0, abs=1e-12)
    assert by_level[(0.5, "accuracy_gap")] == pytest.approx(0.11)
    assert by_level[(0.5, "accuracy_gap_mix")] == pytest.approx(-0.09)
    assert by_level[(0.5, "accuracy_gap_within")] == pytest.approx(0.20)
    parts = units[units["metric"].isin(list(GAP_PARTS))]
    assert (parts["direction"] == "Male - Female").all()
    row = _row(paired_tests(frame, ["gender"]), "accuracy_gap_within", "gender")
    assert row["mean_diff"] == pytest.approx(0.20) and row["direction"] == "(Male - Female) run - reference"
    intervals = unit_intervals(frame, ["gender"]).set_index(["bias_level", "metric"])
    assert intervals.loc[(0.5, "accuracy_gap_mix"), "ci_low"] >= -1.0  # signed: range [-1, 1]
    assert intervals.loc[(0.0, "accuracy_gap_within"), "p_value"] == 1.0  # tested against 0, as a gap is


def test_gap_parts_add_up_with_missing_classes_and_groups():
    """On random predictions the parts add up to the accuracy gap fold by fold, also where a class has
    images of one group only; a fold with one group has none, an attribute with no sign (three groups, no
    focus) has no parts, and the same attribute with a focus has them."""
    rng = np.random.default_rng(3)
    n = 800
    gender = rng.choice(["Female", "Male"], n)
    y_true = np.where(gender == "Male", rng.choice(CLASSES, n, p=[0.5, 0.2, 0.2, 0.1]),
                      rng.choice(CLASSES, n))  # men mostly in the hard first class
    hit = rng.random(n) < np.where(y_true == CLASSES[0], 0.5, 0.9)
    y_pred = np.where(hit, y_true, rng.choice(CLASSES, n))
    frame = pd.DataFrame({"arch": "main", "bias_kind": "none", "bias_level": 0.0, "mitigation": "none",
                          "fold": rng.integers(0, 4, n), "seed": 0, "y_true": y_true, "y_pred": y_pred,
                          "gender": gender, "age": rng.choice(["Adult", "Senior", "Baby"], n)})
    frame = frame[~((frame["fold"] == 1) & (frame["y_true"] == CLASSES[1]) & (frame["gender"] == "Male"))]
    assert frame.groupby(["fold", "y_true"])["gender"].nunique().min() == 1  # fold 1: a class of women only
    units = unit_metrics(frame, ["gender"], classes=CLASSES)
    wide = units[units["attribute"] == "gender"].pivot_table(
        index=[*RUN_KEYS, "fold"], columns="metric", values="value")
    assert len(wide) == frame.groupby([*RUN_KEYS, "fold"]).ngroups
    np.testing.assert_allclose(wide["accuracy_gap_mix"] + wide["accuracy_gap_within"], wide["accuracy_gap"],
                               atol=1e-12)
    alone = unit_metrics(_predictions(), ["gender"], classes=CLASSES)  # every fold holds one gender
    assert alone[alone["metric"].isin(list(GAP_PARTS))]["value"].isna().all()
    assert not unit_metrics(frame, ["age"], classes=CLASSES)["metric"].isin(list(GAP_PARTS)).any()
    focused = unit_metrics(frame, ["age"], classes=CLASSES, focus={"age": "Senior"})
    wide = focused.pivot_table(index=[*RUN_KEYS, "fold"], columns="metric", values="value")
    np.testing.assert_allclose(wide["accuracy_gap_mix"] + wide["accuracy_gap_within"], wide["accuracy_gap"],
                               atol=1e-12)


def test_unsigned_gap_needs_two_groups_in_a_unit_and_an_attribute_with_no_value_is_nan(caplog):
    """Largest minus smallest over the groups a unit has: a unit with one group gets NaN, not 0; an
    attribute no prediction knows gives NaN gaps and a log line instead of an error."""
    rng = np.random.default_rng(5)
    n = 600
    frame = pd.DataFrame({"arch": "main", "bias_kind": "none", "bias_level": 0.0, "mitigation": "none",
                          "fold": rng.integers(0, 3, n), "seed": 0, "y_true": rng.choice(CLASSES, n),
                          "age": rng.choice(["Adult", "Senior", "Baby"], n), "source": None})
    frame["y_pred"] = np.where(rng.random(n) < 0.7, frame["y_true"], rng.choice(CLASSES, n))
    frame = frame[(frame["fold"] != 2) | (frame["age"] == "Adult")]  # fold 2: adults only
    with caplog.at_level(logging.WARNING, logger="fer_core.fairness"):
        units = unit_metrics(frame, ["age", "source"], classes=CLASSES)
    gaps = units[(units["attribute"] == "age") & (units["metric"] == "accuracy_gap")]
    gaps = gaps.set_index("fold")["value"]
    accuracy = (frame["y_true"] == frame["y_pred"]).groupby([frame["fold"], frame["age"]]).mean()
    by_hand = accuracy.groupby(level="fold").max() - accuracy.groupby(level="fold").min()
    np.testing.assert_allclose(gaps[[0, 1]], by_hand[[0, 1]])
    assert np.isnan(gaps[2]) and by_hand[2] == 0.0  # what max - min over one group would have said
    source = units[units["attribute"] == "source"]
    assert set(source["metric"]) == {"accuracy_gap", "balanced_accuracy_gap", "eq_odds_diff_ovr"}
    assert source["value"].isna().all() and "'source': no prediction has a known value" in caplog.text
    paired = paired_tests(frame.assign(mitigation="reweight").pipe(lambda f: pd.concat([frame, f])),
                          ["age", "source"])
    assert (paired["attribute"] == "source").sum() == 0 and (paired["attribute"] == "age").any()


@pytest.mark.parametrize("attribute", ["gender", "age"])
def test_unit_equalized_odds_matches_fairlearn_per_fold(preds, attribute):
    """Per (run group, fold): the worst class's fairlearn ``equalized_odds_difference``, one class at a time;
    age has three groups (largest minus smallest rate). A fold with one group has none (fairlearn says 0)."""
    alone = unit_metrics(preds, ["gender"], classes=CLASSES)  # a fold of ``preds`` holds one gender
    assert alone[alone["metric"] == EQ_ODDS]["value"].isna().all()
    preds = _predictions(folds=4)  # every fold has every group
    units = unit_metrics(preds, [attribute], classes=CLASSES)
    got = units[units["metric"] == EQ_ODDS].set_index([*RUN_KEYS, "fold"])
    assert len(got) == preds.groupby([*RUN_KEYS, "fold"]).ngroups
    assert (got["direction"] == f"worst class, |{gap_direction(group_labels(preds, attribute))[0]}|").all()
    for key, run in preds.groupby([*RUN_KEYS, "fold"]):
        masks = _group_masks(run, attribute)
        known = np.any(list(masks.values()), axis=0)
        labels = np.select(list(masks.values()), list(masks), default="")[known]
        yt, yp = run["y_true"].to_numpy()[known], run["y_pred"].to_numpy()[known]
        eo = [equalized_odds_difference((yt == c).astype(int), (yp == c).astype(int),
                                        sensitive_features=labels) for c in CLASSES]
        assert got.loc[key, "value"] == pytest.approx(max(eo))


def _swapped(swap: float, folds: int = 4) -> pd.DataFrame:
    """Focused and Neutral, 50 images per class x gender; men read ``swap`` better in Focused, women in
    Neutral."""
    parts = []
    for fold in range(folds):
        for c, other in (("Focused", "Neutral"), ("Neutral", "Focused")):
            for gender in ("Female", "Male"):
                better = (c, gender) in (("Focused", "Male"), ("Neutral", "Female"))
                right = np.arange(50) < round((0.8 + (swap / 2 if better else -swap / 2)) * 50)
                parts.append(pd.DataFrame({"y_true": c, "y_pred": np.where(right, c, other), "gender": gender,
                                           "fold": fold}))
    return pd.concat(parts, ignore_index=True).assign(arch="main", bias_kind="none", bias_level=0.0,
                                                      mitigation="none", seed=0)


def test_eq_odds_floor_is_positive_without_a_difference_and_below_a_planted_one():
    equal = eq_odds_floor(_swapped(0.0), "gender", n_perm=30)
    assert len(equal) == 4 and (equal["observed"] == 0).all()  # every cell read at 0.8
    assert (equal["floor"] > 0.02).all() and (equal["p_perm"] == 1).all()  # chance alone gives a difference
    planted = eq_odds_floor(_swapped(0.4), "gender", n_perm=30)  # recall 1.0 vs 0.6: 5 sd of a shuffle
    assert planted["observed"].to_numpy() == pytest.approx([0.4] * 4)
    assert (planted["floor"] < 0.2).all() and (planted["p_perm"] == 1 / 31).all()
    units = unit_metrics(_swapped(0.4), ["gender"])
    by_unit_metrics = units[units["metric"] == EQ_ODDS]["value"].to_numpy()
    assert by_unit_metrics == pytest.approx(planted["observed"].to_numpy())
    alone = eq_odds_floor(_predictions(), "gender", n_perm=2)  # every fold holds one gender: nothing to test
    assert alone[["observed", "floor", "p_perm"]].isna().all().all()


def test_eq_odds_floor_p_values_are_calibrated_when_predictions_ignore_the_group():
    """24 units whose errors do not depend on gender: the permutation p-values are about uniform (mean 0.5,
    sd of the mean 0.06), and the observed difference is about the floor."""
    rng = np.random.default_rng(7)
    n = 160
    y_true = np.asarray(CLASSES)[np.arange(n) % 4]
    parts = []
    for fold in range(24):
        guess = np.asarray(CLASSES)[rng.integers(0, 4, n)]
        parts.append(pd.DataFrame({"y_true": y_true, "y_pred": np.where(rng.random(n) < 0.75, y_true, guess),
                                   "gender": np.where(rng.random(n) < 0.4, "Female", "Male"), "fold": fold}))
    frame = pd.concat(parts, ignore_index=True).assign(arch="main", bias_kind="none", bias_level=0.0,
                                                       mitigation="none", seed=0)
    floor = eq_odds_floor(frame, "gender", n_perm=20, seed=1)
    assert len(floor) == 24 and 0.3 < floor["p_perm"].mean() < 0.7
    assert abs((floor["observed"] - floor["floor"]).mean()) < 0.03


def test_equalized_odds_sees_differences_that_cancel_in_the_signed_gaps():
    """Men read better in Focused and women in Neutral by the same amount, with the same class mix: both
    signed gaps are 0, the equalized-odds difference is the planted recall gap; a run without the swap
    is paired against it and the difference is found."""
    frame = pd.concat([_swapped(0.2), _swapped(0.0).assign(bias_kind="representational", bias_level=0.5)])
    units = unit_metrics(frame, ["gender"], classes=["Focused", "Neutral"])
    at = units[units["bias_level"] == 0.0].groupby("metric")["value"].mean()
    assert at["accuracy_gap"] == pytest.approx(0.0, abs=1e-12)
    assert at["balanced_accuracy_gap"] == pytest.approx(0.0, abs=1e-12)
    assert at[EQ_ODDS] == pytest.approx(0.2)  # recall 0.9 vs 0.7; the false-positive rates differ as much
    assert units[units["bias_level"] == 0.5].groupby("metric")["value"].mean()[EQ_ODDS] == pytest.approx(0.0)
    row = _row(paired_tests(frame, ["gender"]), EQ_ODDS, "gender")
    assert row["mean_diff"] == pytest.approx(-0.2)
    assert row["direction"] == "(worst class, |Male - Female|) run - reference"
    intervals = unit_intervals(frame, ["gender"]).set_index(["bias_level", "metric"])
    assert np.isnan(intervals.loc[(0.0, EQ_ODDS), "p_value"])  # never negative: no test against 0
