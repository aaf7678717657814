"""Group fairness metrics through ``fairlearn.metrics.MetricFrame``, and paired tests between runs.

:func:`accuracy_gap` is the between-group accuracy difference used inside training and search (the
validation gap of the fairness-aware objective); :func:`group_gap` does the same on a prediction table.

The bias sweep's tables come from a predictions table (one row per model x test image, the schema of
:func:`fer_core.crossval.prediction_frame` plus ``run_id``, ``arch``, ``bias_kind``, ``bias_level``,
``mitigation``, ``fold`` and ``seed``). A *run group* is one combination of :data:`RUN_KEYS`, pooled over
folds and seeds; a *unit* is one (fold, seed) model inside a run group.

- :func:`fairness_table`: per run group x attribute x group x metric, pooled; bootstrap intervals from
  ``MetricFrame(n_boot=..., ci_quantiles=...)`` for the headline metrics.
- :func:`unit_metrics`: per unit accuracy, macro-F1, the signed accuracy and balanced-accuracy gaps
  and the unsigned worst-class equalized-odds difference of every attribute.
- :func:`paired_tests`: every bias level against level 0 and every mitigation against none, paired on
  (fold, seed), with ``scipy.stats``; :func:`unit_intervals`: the same statistics of one run group alone.

Group values that are null (or the string ``"unknown"``) belong to no group: they are counted in a
``group="unknown"``, ``metric="count"`` row and in a log line, never silently dropped.
"""

from __future__ import annotations

import functools
import itertools
import logging

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy import stats
from sklearn.metrics import accuracy_score

from fer_core import __version__

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"
RUN_KEYS = ["arch", "bias_kind", "bias_level", "mitigation"]
UNIT_KEYS = ["fold", "seed"]
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1")  # the bootstrapped metrics
# Signed per-unit gaps between groups. The accuracy gap mixes how well each group's faces are read with
# which classes the group's faces are in (fer4: most men's images are in the hard Focused/Neutral pair);
# the balanced-accuracy gap (mean per-class recall) compares the groups class by class, without that mix.
GAP_METRICS = {"accuracy_gap": "accuracy", "balanced_accuracy_gap": "balanced_accuracy"}
# Both signed gaps can hide groups read differently inside classes when the differences cancel (fer4: men's
# Focused faces read better, women's Neutral ones). The worst class's one-vs-rest equalized-odds difference,
# the largest gap in recall or false-positive rate between the groups, cannot cancel; it is never negative.
EQ_ODDS = "eq_odds_diff_ovr"
# The accuracy gap of two groups a - b splits exactly in two (Kitagawa's decomposition, the groups' mean as
# reference): the class-mix part, sum over classes of (share_a - share_b) x mean recall, which a model that
# reads every class equally well for both groups still has; and the within-class part, sum of mean share x
# (recall_a - recall_b), what the groups' per-class recalls add to it. The class-mix part can shrink only
# if the classes are read more alike for everybody: no reweighting of the groups moves it directly.
GAP_PARTS = {"accuracy_gap_mix": "class-mix part", "accuracy_gap_within": "within-class part"}
SIGNED = (*GAP_METRICS, *GAP_PARTS)  # the signed gaps: in [-1, 1], tested against 0
SUMMARIES = ("overall", "difference", "ratio")  # between-group summary rows of fairness_table
CI_LEVEL = 0.95
CI_QUANTILES = [(1 - CI_LEVEL) / 2, 1 - (1 - CI_LEVEL) / 2]
CROSS = " x "  # "gender x age": an intersection of two attributes, its groups "Female x Adult"
BASELINE_KIND, BASELINE_LEVEL, NO_MITIGATION = "none", 0.0, "none"
MIN_WILCOXON = 6  # fewer pairs: ttest_rel only
FAIRNESS_COLUMNS = [*RUN_KEYS, "attribute", "group", "metric", "value", "ci_low", "ci_high", "n"]
PAIRED_COLUMNS = [*RUN_KEYS, "comparison", "reference", "attribute", "metric", "direction", "n_pairs",
                  "mean_diff", "ci_low", "ci_high", "effect_size", "p_value", "p_wilcoxon", "test"]

_MISSING_COLUMNS = ("predictions table lacks columns {0}; it needs {1} "
                    "(see fer_core.crossval.prediction_frame)")
_BAD_LABELS = "predictions hold labels {0} that are not among the classes {1}"
_NO_INTERSECTION = "attribute {0!r}: an intersection names exactly two columns, like 'gender x age'"


def accuracy_gap(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> float:
    """Largest accuracy difference between the known groups (NaN with fewer than two groups)."""
    groups = pd.Series(groups, dtype=object)
    known = groups.notna().to_numpy() & (groups.astype(str) != UNKNOWN).to_numpy()
    if pd.Series(groups[known]).nunique() < 2:
        return float("nan")
    frame = MetricFrame(metrics=accuracy_score, y_true=np.asarray(y_true)[known],
                        y_pred=np.asarray(y_pred)[known], sensitive_features=groups[known].to_numpy())
    return float(frame.difference(method="between_groups"))


def group_gap(predictions: pd.DataFrame, attr: str) -> float:
    """:func:`accuracy_gap` of a prediction table (columns ``y_true``, ``y_pred`` and ``attr``)."""
    return accuracy_gap(predictions["y_true"].to_numpy(), predictions["y_pred"].to_numpy(),
                        predictions[attr].to_numpy())


# ---- metric callables for MetricFrame (labels are integer class codes) ----

def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``.

    Equals ``sklearn.metrics.balanced_accuracy_score`` (which warns and skips classes absent from
    ``y_true``): a group without images of a class is scored on the classes it has.
    """
    cm = np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, -1)
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over the classes present in ``y_true`` or ``y_pred`` (sklearn's default labels).

    Equals ``f1_score(y_true, y_pred, average="macro", zero_division=0)``; counting absent classes as
    F1 0 would penalise a small group for lacking a class.
    """
    cm = np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, -1)
    support = cm.sum(0) + cm.sum(1)
    present = support > 0
    return float(np.mean(2 * np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def _recall(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """One-vs-rest true positive rate of class ``k`` (NaN when the class is absent)."""
    pos = y_true == k
    return float(np.mean(y_pred[pos] == k)) if pos.any() else float("nan")


def _false_positive_rate(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """One-vs-rest false positive rate of class ``k`` (NaN when every image is of class ``k``)."""
    neg = y_true != k
    return float(np.mean(y_pred[neg] == k)) if neg.any() else float("nan")


def _selection_rate(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """Share of images predicted as class ``k``."""
    return float(np.mean(y_pred == k)) if len(y_pred) else float("nan")


def _headline_metrics(num_classes: int) -> dict:
    return {"accuracy": _accuracy,
            "balanced_accuracy": functools.partial(_balanced_accuracy, num_classes=num_classes),
            "macro_f1": functools.partial(_macro_f1, num_classes=num_classes)}


def _per_class_metrics(classes: list[str]) -> dict:
    out = {}
    for k, c in enumerate(classes):
        out[f"recall_{c}"] = functools.partial(_recall, k=k)
        out[f"selection_rate_{c}"] = functools.partial(_selection_rate, k=k)
        out[f"fpr_{c}"] = functools.partial(_false_positive_rate, k=k)
    return out


# ---- attributes and groups ----

def expand_attributes(attributes: list[str], intersections: bool = True) -> list[str]:
    """``attributes`` plus, with ``intersections``, every pair as ``"a x b"`` (e.g. ``"gender x age"``)."""
    plain = [a for a in attributes if CROSS not in a]
    extra = [f"{a}{CROSS}{b}" for a, b in itertools.combinations(plain, 2)] if intersections else []
    return list(dict.fromkeys([*attributes, *extra]))


def group_labels(predictions: pd.DataFrame, attribute: str) -> pd.Series:
    """Group of every row (object dtype), None where unknown; ``"a x b"`` joins the two columns' values."""
    parts = attribute.split(CROSS)
    if len(parts) > 2:
        raise ValueError(_NO_INTERSECTION.format(attribute))
    cols = [_known(predictions[p]) for p in parts]
    if len(cols) == 1:
        return cols[0]
    joined = (cols[0].astype(str) + CROSS + cols[1].astype(str)).astype(object)
    return joined.where(cols[0].notna() & cols[1].notna(), None)


def _known(values: pd.Series) -> pd.Series:
    values = values.astype(object)
    unknown = values.isna() | (values.astype(str) == UNKNOWN)
    return values.where(~unknown, None)


def _check_columns(predictions: pd.DataFrame, attributes: list[str], extra: list[str]) -> None:
    needed = [*RUN_KEYS, "y_true", "y_pred", *extra]
    for attr in attributes:
        needed.extend(attr.split(CROSS))
    missing = [c for c in dict.fromkeys(needed) if c not in predictions.columns]
    if missing:
        raise KeyError(_MISSING_COLUMNS.format(missing, needed))


def _codes(labels: pd.Series, classes: list[str]) -> np.ndarray:
    codes = pd.Categorical(labels.astype(str), categories=list(classes)).codes.astype(np.int64)
    if (codes < 0).any():
        raise ValueError(_BAD_LABELS.format(sorted(set(labels[codes < 0].astype(str))), list(classes)))
    return codes


def infer_classes(predictions: pd.DataFrame) -> list[str]:
    """Class names in the order of the ``p_<class>`` columns (else sorted labels)."""
    probs = [c[2:] for c in predictions.columns if c.startswith("p_")]
    return probs or sorted(set(predictions["y_true"].astype(str)) | set(predictions["y_pred"].astype(str)))


def _tag(frame: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """Add ``config_hash`` (of the predictions; several joined by ',') and ``version``."""
    if "config_hash" in predictions:
        frame["config_hash"] = ",".join(sorted(predictions["config_hash"].dropna().astype(str).unique()))
    frame["version"] = __version__
    return frame


# ---- fairness_table ----

def fairness_table(predictions: pd.DataFrame, attributes: list[str], classes: list[str], *,
                   n_boot: int = 200, seed: int = 0, intersections: bool = True) -> pd.DataFrame:
    """Per-group metrics of every run group, pooled over folds and seeds, from ``MetricFrame``.

    Parameters
    ----------
    predictions
        The predictions table (columns :data:`RUN_KEYS`, ``y_true``, ``y_pred`` and the attributes).
    attributes
        Attribute columns, e.g. ``["gender", "age"]``; ``"a x b"`` names an intersection.
    classes
        Class names (the label codes' order).
    n_boot
        Bootstrap resamples of ``MetricFrame`` (0: no intervals, NaN).
    seed
        ``random_state`` of the bootstrap.
    intersections
        Add every pair of plain attributes as an intersection (``"gender x age"``).

    Returns
    -------
    pandas.DataFrame
        Tidy rows, columns :data:`FAIRNESS_COLUMNS` plus ``config_hash`` and ``version``. ``group`` is a
        group value, ``"unknown"`` (only ``metric="count"``: rows with a null attribute, excluded from
        the groups), or a between-group summary over the known rows: ``"overall"``, ``"difference"``
        (largest minus smallest group value) or ``"ratio"`` (smallest over largest). ``metric`` is
        ``count``, ``accuracy``, ``balanced_accuracy`` (mean per-class recall: the group's accuracy
        without its class mix), ``macro_f1``, ``recall_<class>``, ``selection_rate_<class>`` and, only
        on ``"difference"`` rows, ``eq_odds_diff_ovr`` and ``dem_parity_diff_ovr`` (one-vs-rest,
        worst class: the largest TPR or FPR difference of any class; the largest selection-rate
        difference of any class). ``ci_low``/``ci_high``: 95% percentile bootstrap of the whole pooled
        table resampled with replacement, only for the :data:`HEADLINE` metrics (group, overall,
        difference, ratio rows); NaN for the other metrics, whose bootstrap would cost
        ``n_boot x metrics x groups`` metric calls. ``n``: rows behind the value. The difference is
        max - min, never negative and biased upward, so its interval excludes 0 even without a true
        gap (and, the bootstrap being biased the same way, need not contain the point estimate): test
        "no effect" with :func:`paired_tests`, whose gaps are signed. Rows of the same image under
        several seeds are resampled as independent rows.

    Notes
    -----
    ``MetricFrame`` bootstraps one metric call per resample x group and copies every row into each
    call, so the cost grows with rows x ``n_boot`` x attributes: about 30 s of CPU per 2,500 rows with
    ``n_boot=200`` and gender, age and gender x age (about 3 s with ``n_boot=0``).
    """
    classes = list(classes)
    attrs = expand_attributes(attributes, intersections)
    _check_columns(predictions, attrs, [])
    rows = []
    for key, run in predictions.groupby(RUN_KEYS, sort=True, dropna=False):
        y_true, y_pred = _codes(run["y_true"], classes), _codes(run["y_pred"], classes)
        for attr in attrs:
            groups = group_labels(run, attr).to_numpy()
            found = _attribute_rows(y_true, y_pred, groups, classes, n_boot, seed, label=f"{key} {attr}")
            rows.extend({**dict(zip(RUN_KEYS, key, strict=True)), "attribute": attr, **r} for r in found)
    frame = pd.DataFrame(rows, columns=FAIRNESS_COLUMNS)
    frame["bias_level"] = frame["bias_level"].astype(float)
    frame["n"] = frame["n"].astype(np.int64)
    _log_unknown(frame)
    return _tag(frame, predictions)


def _one_vs_rest_rates(classes: list[str]) -> dict:
    """Recall and false-positive rate of every class: the rates equalized odds compares."""
    return {k: f for k, f in _per_class_metrics(classes).items() if not k.startswith("selection_rate_")}


def _log_unknown(frame: pd.DataFrame) -> None:
    unknown = frame[frame["group"] == UNKNOWN].groupby("attribute")["n"]
    for attr, total in unknown.sum().items():
        logger.info("%s: %d rows without a value (up to %d per run group) counted as 'unknown' and left "
                    "out of the %s groups", attr, total, unknown.max()[attr], attr)


def _attribute_rows(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, classes: list[str],
                    n_boot: int, seed: int, label: str) -> list[dict]:
    """Rows of one run group x attribute (see :func:`fairness_table`)."""
    known = pd.notna(groups)
    n_unknown, n_known = int((~known).sum()), int(known.sum())
    rows = []
    if n_unknown:
        logger.debug("%s: %d of %d rows have no group", label, n_unknown, len(groups))
        rows.append(_row(UNKNOWN, "count", n_unknown, n_unknown))
    if not n_known:
        return rows
    y_true, y_pred, groups = y_true[known], y_pred[known], groups[known].astype(str)
    head = _metric_frame(_headline_metrics(len(classes)), y_true, y_pred, groups, n_boot, seed)
    per_class = _metric_frame(_per_class_metrics(classes), y_true, y_pred, groups, 0, seed)
    sizes = pd.Series(groups).value_counts()
    for g in sorted(sizes.index):
        n = int(sizes[g])
        rows.append(_row(g, "count", n, n))
        rows.extend(_metric_rows(g, head, per_class, n, n_boot > 0, group=g))
    several = len(sizes) > 1
    for name in SUMMARIES if several else SUMMARIES[:1]:  # one group has no between-group summary
        rows.extend(_metric_rows(name, head, per_class, n_known, n_boot > 0))
    if several:
        rows.extend(_ovr_rows(per_class.difference(errors="coerce"), classes, n_known))
    return rows


def _metric_frame(metrics: dict, y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                  n_boot: int, seed: int) -> MetricFrame:
    boot = {"n_boot": n_boot, "ci_quantiles": CI_QUANTILES, "random_state": seed} if n_boot > 0 else {}
    return MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred,
                       sensitive_features=pd.Series(groups, name="group"), **boot)


def _summary(frame: MetricFrame, kind: str, group: str | None, with_ci: bool
             ) -> tuple[pd.Series, list[pd.Series] | None]:
    """Point values (a Series over metrics) and, ``with_ci``, the [low, high] Series of one row kind."""
    if group is not None:
        ci = [q.loc[group] for q in frame.by_group_ci] if with_ci else None
        return frame.by_group.loc[group], ci
    if kind == "overall":
        return frame.overall, frame.overall_ci if with_ci else None
    if kind == "difference":
        return frame.difference(errors="coerce"), frame.difference_ci() if with_ci else None
    return frame.ratio(errors="coerce"), frame.ratio_ci() if with_ci else None


def _metric_rows(name: str, head: MetricFrame, per_class: MetricFrame, n: int, with_ci: bool,
                 group: str | None = None) -> list[dict]:
    """Headline rows (with intervals when bootstrapped) and per-class point rows of one group/summary."""
    values, ci = _summary(head, name, group, with_ci)
    low, high = ci if ci is not None else (pd.Series(np.nan, index=values.index),) * 2
    rows = [_row(name, m, values[m], n, low[m], high[m]) for m in HEADLINE]
    class_values, _ = _summary(per_class, name, group, False)
    rows.extend(_row(name, m, v, n) for m, v in class_values.items() if not m.startswith("fpr_"))
    return rows


def _ovr_rows(diff: pd.Series, classes: list[str], n: int) -> list[dict]:
    """Worst-class one-vs-rest equalized odds and demographic parity differences."""
    eq_odds = [np.nanmax([diff[f"recall_{c}"], diff[f"fpr_{c}"]]) for c in classes
               if not (np.isnan(diff[f"recall_{c}"]) and np.isnan(diff[f"fpr_{c}"]))]
    parity = [diff[f"selection_rate_{c}"] for c in classes]
    return [_row("difference", "eq_odds_diff_ovr", max(eq_odds, default=np.nan), n),
            _row("difference", "dem_parity_diff_ovr", np.nanmax(parity), n)]


def _row(group: str, metric: str, value: float, n: int, low: float = np.nan, high: float = np.nan) -> dict:
    return {"group": group, "metric": metric, "value": float(value), "ci_low": float(low),
            "ci_high": float(high), "n": int(n)}


# ---- per-unit metrics and paired tests ----

def gap_direction(groups: pd.Series, focus: str | None = None
                  ) -> tuple[str, pd.Series, tuple[str, str] | None]:
    """How the signed accuracy gap of an attribute is defined.

    Parameters
    ----------
    groups
        Group of every row (None where unknown), as from :func:`group_labels`.
    focus
        The group the gap is measured against (e.g. the bias sweep's target group), or None.

    Returns
    -------
    tuple
        ``(direction, sensitive, pair)``. With ``focus``: the gap is accuracy of the other rows minus
        the focus group's (``"Male - Female"`` with two groups, ``"rest - Senior"`` with more). Without,
        two groups give "second minus first in sorted order" (``"Male - Female"``): positive means the
        first group is recognised less accurately. More groups give the unsigned ``"max - min"`` and
        ``pair`` None. ``sensitive`` is the feature to group by (``focus`` vs ``"rest"`` with a focus).
    """
    values = sorted(groups.dropna().astype(str).unique())
    if focus is not None:
        if focus not in values:
            raise ValueError(f"focus group {focus!r} is not among the groups {values}")
        rest = values[1 - values.index(focus)] if len(values) == 2 else "rest"
        sensitive = groups.where(groups.isna() | (groups == focus), rest)
        return f"{rest} - {focus}", sensitive, (rest, focus)
    if len(values) == 2:
        return f"{values[1]} - {values[0]}", groups, (values[1], values[0])
    return "max - min", groups, None


def unit_metrics(predictions: pd.DataFrame, attributes: list[str], *, classes: list[str] | None = None,
                 focus: dict[str, str] | None = None) -> pd.DataFrame:
    """Accuracy, macro-F1 and the signed gaps of every attribute, per unit (run group x fold x seed).

    Parameters
    ----------
    predictions
        The predictions table.
    attributes
        Attribute columns (``"a x b"`` for an intersection).
    classes
        Class names (default: :func:`infer_classes`).
    focus
        Optional ``{attribute: group}``: measure that attribute's gap against this group.

    Returns
    -------
    pandas.DataFrame
        Long rows: :data:`RUN_KEYS`, ``fold``, ``seed``, ``attribute`` (``"all"`` for accuracy and
        macro-F1), ``metric`` (``accuracy``, ``macro_f1`` or one of :data:`GAP_METRICS`:
        ``accuracy_gap``, the difference of the groups' accuracies, and ``balanced_accuracy_gap``, of
        their mean per-class recalls; or :data:`EQ_ODDS`, the largest difference between the groups'
        one-vs-rest recall or false-positive rate of any class, never negative: the fairness table's
        pooled ``eq_odds_diff_ovr`` of one unit; or, for an attribute with a sign (two groups, or a
        focus), :data:`GAP_PARTS`: ``accuracy_gap_mix`` and ``accuracy_gap_within``, which add up to
        ``accuracy_gap``), ``direction`` (the gap's sign convention, see
        :func:`gap_direction`; ``"worst class, |...|"`` for :data:`EQ_ODDS`; the metric name otherwise)
        and ``value``. A unit with fewer than two groups has a NaN gap (an attribute with no known value
        at all: NaN everywhere, and a log line); a rate is compared only where at least two groups have
        images it is defined on.
    """
    _check_columns(predictions, attributes, UNIT_KEYS)
    classes = list(classes) if classes is not None else infer_classes(predictions)
    keys = [*RUN_KEYS, *UNIT_KEYS]
    data = predictions[keys].copy()
    data["unit"] = data.groupby(keys, sort=True, dropna=False).ngroup().to_numpy()
    y_true, y_pred = _codes(predictions["y_true"], classes), _codes(predictions["y_pred"], classes)
    units = data.drop_duplicates("unit").set_index("unit")[keys].sort_index()  # unit order
    frames = [_overall_per_unit(units, data["unit"].to_numpy(), y_true, y_pred, len(classes))]
    for attr in attributes:
        direction, sensitive, pair = gap_direction(group_labels(predictions, attr), (focus or {}).get(attr))
        known = sensitive.notna().to_numpy()
        if not known.any():
            logger.warning("attribute %r: no prediction has a known value; its gaps are NaN", attr)
            frames += [units.assign(attribute=attr, metric=metric, direction=direction, value=np.nan)
                       for metric in GAP_METRICS]
            frames.append(units.assign(attribute=attr, metric=EQ_ODDS, value=np.nan,
                                       direction=f"worst class, |{direction}|"))
            continue
        group = pd.Series(sensitive[known].astype(str).to_numpy(), name="group")
        head = _headline_metrics(len(classes))
        frame = MetricFrame(metrics={gap: head[metric] for gap, metric in GAP_METRICS.items()},
                            y_true=y_true[known], y_pred=y_pred[known], sensitive_features=group,
                            control_features=pd.Series(data["unit"].to_numpy()[known], name="unit"))
        for gap_metric in GAP_METRICS:
            if pair is None:  # largest minus smallest: a unit with one group has no gap, not a gap of 0
                two = frame.by_group[gap_metric].groupby(level="unit").count() >= 2
                gap = frame.difference(errors="coerce")[gap_metric].where(two)
            else:
                by_group = frame.by_group[gap_metric].unstack("group")
                gap = by_group.get(pair[0], np.nan) - by_group.get(pair[1], np.nan)
            frames.append(units.assign(attribute=attr, metric=gap_metric, direction=direction,
                                       value=gap.reindex(units.index).astype(float)))
        eq_odds = _unit_eq_odds(y_true[known], y_pred[known], group.to_numpy(),
                                data["unit"].to_numpy()[known], classes)
        frames.append(units.assign(attribute=attr, metric=EQ_ODDS, direction=f"worst class, |{direction}|",
                                   value=eq_odds.reindex(units.index).astype(float)))
        if pair is not None:
            parts = _unit_gap_parts(y_true[known], y_pred[known], group.to_numpy(),
                                    data["unit"].to_numpy()[known], pair)
            frames += [units.assign(attribute=attr, metric=part, direction=direction,
                                    value=parts[part].reindex(units.index).astype(float))
                       for part in GAP_PARTS]
    out = pd.concat(frames, ignore_index=True)
    out["bias_level"] = out["bias_level"].astype(float)
    return out


def _unit_eq_odds(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, unit: np.ndarray,
                  classes: list[str]) -> pd.Series:
    """:data:`EQ_ODDS` of every unit (index): a rate is compared where at least two groups define it."""
    rates = MetricFrame(metrics=_one_vs_rest_rates(classes), y_true=y_true, y_pred=y_pred,
                        sensitive_features=pd.Series(groups, name="group"),
                        control_features=pd.Series(unit, name="unit")).by_group
    per_unit = rates.groupby(level="unit")
    spread = (per_unit.max() - per_unit.min()).where(per_unit.count() >= 2)
    return spread.max(axis=1)


def _unit_gap_parts(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, unit: np.ndarray,
                    pair: tuple[str, str]) -> pd.DataFrame:
    """:data:`GAP_PARTS` of the accuracy gap ``pair[0] - pair[1]`` of every unit (index; NaN without both).

    A class only one group has adds no within-class difference: that group's recall stands for both.
    """
    a, b = pair
    rows = pd.DataFrame({"unit": unit, "cls": y_true, "group": groups, "hit": y_true == y_pred})
    cells = rows[rows["group"].isin(pair)].groupby(["unit", "cls", "group"])["hit"].agg(["size", "mean"])
    sizes = cells["size"].unstack("group").reindex(columns=[a, b]).fillna(0.0)
    share = sizes / sizes.groupby(level="unit").transform("sum")
    recall = cells["mean"].unstack("group").reindex(columns=[a, b])
    rec_a, rec_b = recall[a].fillna(recall[b]), recall[b].fillna(recall[a])
    parts = pd.DataFrame({"accuracy_gap_mix": (share[a] - share[b]) * (rec_a + rec_b) / 2,
                          "accuracy_gap_within": (share[a] + share[b]) / 2 * (rec_a - rec_b)})
    both = (sizes.groupby(level="unit").sum() > 0).all(axis=1)
    return parts.groupby(level="unit").sum().where(both)


def _overall_per_unit(units: pd.DataFrame, unit: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
                      num_classes: int) -> pd.DataFrame:
    order = np.argsort(unit, kind="stable")
    bounds = np.flatnonzero(np.diff(unit[order])) + 1
    parts = [(y_true[i], y_pred[i]) for i in np.split(order, bounds)]  # one per unit, in unit order
    acc = [_accuracy(t, p) for t, p in parts]
    f1 = [_macro_f1(t, p, num_classes) for t, p in parts]
    return pd.concat([units.assign(attribute="all", metric="accuracy", direction="accuracy", value=acc),
                      units.assign(attribute="all", metric="macro_f1", direction="macro_f1", value=f1)])


def _t_summary(x: np.ndarray, y: np.ndarray | None = None, wilcoxon: bool = True,
               bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict:
    """Mean (of ``x - y`` when paired), 95% t interval, Cohen's d_z and t-test p; zero variance explicit.

    The interval is intersected with ``bounds``, the range the quantity can take: with two units the
    t quantile is 12.7 and an accuracy's interval would run past 0 and 1. The true value lies in the
    range, so the intersection covers it whenever the t interval does.

    Constant differences would make scipy warn (catastrophic cancellation) and return NaN: they get
    p = 1 when all are 0, otherwise p = NaN and effect size NaN (infinite), with the interval collapsed
    on the mean. With ``wilcoxon``, Wilcoxon's signed-rank p is added from :data:`MIN_WILCOXON` pairs on,
    from the exact null distribution (with ties or zeros scipy rounds the statistic conservatively; its
    default would run a permutation test, about a second per call for 10-13 pairs).
    """
    diff = x - y if y is not None else x
    n = len(diff)
    out = {"n_pairs": n, "mean_diff": float(np.mean(diff)) if n else np.nan, "ci_low": np.nan,
           "ci_high": np.nan, "effect_size": np.nan, "p_value": np.nan, "p_wilcoxon": np.nan,
           "test": "none (fewer than 2 pairs)"}
    if n < 2:
        return out
    mean = out["mean_diff"]
    spread = float(np.max(np.abs(diff - mean)))
    name = "ttest_rel" if y is not None else "ttest_1samp"
    if spread <= max(1e-12, 1e-9 * abs(mean)):
        out.update(ci_low=mean, ci_high=mean, effect_size=0.0 if mean == 0 else np.nan,
                   p_value=1.0 if mean == 0 else np.nan, test=f"{name} (zero variance)")
    else:
        res = stats.ttest_rel(x, y) if y is not None else stats.ttest_1samp(x, 0.0)
        ci = res.confidence_interval(CI_LEVEL)
        out.update(ci_low=max(float(ci.low), bounds[0]), ci_high=min(float(ci.high), bounds[1]),
                   p_value=float(res.pvalue), test=name,
                   effect_size=mean / float(np.std(diff, ddof=1)))
    if wilcoxon and n >= MIN_WILCOXON:
        out["test"] += "+wilcoxon"
        nonzero = np.any(diff != 0)
        out["p_wilcoxon"] = float(stats.wilcoxon(diff, method="exact").pvalue) if nonzero else 1.0
    return out


def _run_key(row: pd.Series | tuple) -> tuple:
    arch, kind, level, mitigation = row
    return (arch, kind, float(level), mitigation)


def _references(key: tuple, groups: set | dict) -> list[tuple[str, tuple]]:
    """(comparison, reference key) pairs of a run group: bias vs level 0, mitigation vs none.

    Level 0 is the kind's own level 0 when ``groups`` has one (a size-matched stereotypical sweep),
    else the unbiased baseline; a kind's own level 0 is compared with the baseline.
    """
    arch, kind, level, mitigation = key
    refs = []
    own = (arch, kind, BASELINE_LEVEL, mitigation)
    if level != BASELINE_LEVEL and own in groups:
        refs.append(("bias", own))
    elif not (kind == BASELINE_KIND and level == BASELINE_LEVEL):
        refs.append(("bias", (arch, BASELINE_KIND, BASELINE_LEVEL, mitigation)))
    if mitigation != NO_MITIGATION:
        refs.append(("mitigation", (arch, kind, level, NO_MITIGATION)))
    return refs


def _describe(key: tuple) -> str:
    arch, kind, level, mitigation = key
    return f"arch={arch} bias_kind={kind} bias_level={level:g} mitigation={mitigation}"


def paired_tests(predictions: pd.DataFrame, attributes: list[str], *,
                 focus: dict[str, str] | None = None) -> pd.DataFrame:
    """Every bias level against level 0 and every mitigation against none, paired on (fold, seed).

    Parameters
    ----------
    predictions
        The predictions table (needs ``fold`` and ``seed``).
    attributes
        Attribute columns whose gaps are compared (``"a x b"`` for an intersection).
    focus
        Optional ``{attribute: group}`` fixing each gap's sign (see :func:`gap_direction`).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`PAIRED_COLUMNS` plus ``config_hash`` and ``version``. One row per run group x
        comparison x metric. ``comparison="bias"``: against the same arch and mitigation at level 0 of the
        same bias kind when that run group exists (a size-matched stereotypical sweep), else at
        ``bias_kind="none"``, level 0; ``"mitigation"``: against the same arch, bias kind and level without
        mitigation (a biased, mitigated run group gets both rows). ``reference`` names the reference run
        group. ``metric`` is ``accuracy``, ``macro_f1`` (``attribute="all"``) or a gap of ``attribute``
        (:data:`GAP_METRICS`, :data:`GAP_PARTS` or :data:`EQ_ODDS`, see :func:`unit_metrics`);
        ``direction`` spells the sign:
        ``mean_diff`` is
        always run minus reference, of a gap defined as in ``direction`` (e.g. ``(Male - Female) run -
        reference``). Units are paired on (fold, seed) and units with a NaN value dropped; ``n_pairs`` says
        how many remain. ``ci_low``/``ci_high``: 95% t interval of the mean difference; ``effect_size``:
        Cohen's d_z (mean / sd of the differences); ``p_value``: ``ttest_rel``; ``p_wilcoxon``: Wilcoxon
        signed-rank from 6 pairs on (NaN below). A missing reference run group is logged and skipped.
    """
    units = unit_metrics(predictions, attributes, focus=focus)
    keyed = {_run_key(k): g for k, g in units.groupby(RUN_KEYS, sort=True, dropna=False)}
    match = [*UNIT_KEYS, "attribute", "metric", "direction"]
    rows = []
    for key, run in keyed.items():
        for comparison, ref_key in _references(key, keyed):
            if ref_key not in keyed:
                logger.warning("%s: no reference run group (%s); %s comparison skipped",
                               _describe(key), _describe(ref_key), comparison)
                continue
            pairs = run.merge(keyed[ref_key], on=match, suffixes=("", "_ref")).dropna(
                subset=["value", "value_ref"])
            for (attr, metric, direction), g in pairs.groupby(match[2:], sort=False):
                rows.append({**dict(zip(RUN_KEYS, key, strict=True)), "comparison": comparison,
                             "reference": _describe(ref_key), "attribute": attr, "metric": metric,
                             "direction": _paired_direction(metric, direction),
                             **_t_summary(g["value"].to_numpy(), g["value_ref"].to_numpy())})
    frame = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    frame["bias_level"] = frame["bias_level"].astype(float)
    return _tag(frame, predictions)


def _paired_direction(metric: str, direction: str) -> str:
    between_groups = metric in SIGNED or metric == EQ_ODDS
    return f"({direction}) run - reference" if between_groups else "run - reference"


def unit_intervals(predictions: pd.DataFrame, attributes: list[str], *,
                   focus: dict[str, str] | None = None) -> pd.DataFrame:
    """Mean over units of every run group's accuracy, macro-F1 and gaps, with 95% t intervals.

    Parameters
    ----------
    predictions
        The predictions table (needs ``fold`` and ``seed``).
    attributes
        Attribute columns (``"a x b"`` for an intersection).
    focus
        Optional ``{attribute: group}`` fixing each gap's sign (see :func:`gap_direction`).

    Returns
    -------
    pandas.DataFrame
        :data:`RUN_KEYS`, ``attribute``, ``metric``, ``direction``, ``n_units``, ``mean``, ``ci_low``,
        ``ci_high``, ``effect_size`` (mean / sd) and ``p_value`` (one-sample t-test of the gap against
        0; NaN for accuracy and macro-F1, where it means nothing). Units are the (fold, seed) models,
        so the interval is the cross-validated one (folds share training images, so it is approximate).
        Intervals are cut to the metric's range: [0, 1] for accuracy, macro-F1 and :data:`EQ_ODDS`, [-1, 1]
        for the signed gaps (:data:`SIGNED`).
    """
    units = unit_metrics(predictions, attributes, focus=focus)
    rows = []
    for key, g in units.groupby([*RUN_KEYS, "attribute", "metric", "direction"], sort=True, dropna=False):
        bounds = (-1.0, 1.0) if key[-2] in SIGNED else (0.0, 1.0)
        summary = _t_summary(g["value"].dropna().to_numpy(), wilcoxon=False, bounds=bounds)
        if key[-2] not in SIGNED:
            summary["p_value"] = np.nan
        rows.append({**dict(zip([*RUN_KEYS, "attribute", "metric", "direction"], key, strict=True)),
                     "n_units": summary["n_pairs"], "mean": summary["mean_diff"],
                     **{k: summary[k] for k in ("ci_low", "ci_high", "effect_size", "p_value")}})
    return pd.DataFrame(rows)


def eq_odds_floor(predictions: pd.DataFrame, attribute: str, *, focus: str | None = None,
                  n_perm: int = 100, seed: int = 0) -> pd.DataFrame:
    """Equalized-odds difference each unit would show by chance alone, and the test of the one it shows.

    :data:`EQ_ODDS` is a largest absolute difference, so finite test sets give it a positive value even
    for a model whose predictions do not depend on the group. To measure that floor, the attribute's
    known groups are shuffled among the images of the same unit and true class, ``n_perm`` times: each
    group keeps its size and class mix, and the predictions become independent of the group given the
    class, which is equalized odds' null hypothesis.

    Parameters
    ----------
    predictions
        The predictions table (needs ``fold`` and ``seed``).
    attribute
        Attribute column (``"a x b"`` for an intersection).
    focus
        Group the attribute is measured against, as for :func:`unit_metrics`.
    n_perm
        Shuffles per unit.
    seed
        Seed of the shuffles.

    Returns
    -------
    pandas.DataFrame
        One row per unit: :data:`RUN_KEYS`, ``fold``, ``seed``, ``observed`` (the unit's :data:`EQ_ODDS`),
        ``floor`` (its mean over the shuffles) and ``p_perm``, the share of shuffles at least as large
        as the observed value (with the add-one correction, so never 0); all three NaN for a unit with
        fewer than two groups.
    """
    if n_perm < 1:
        raise ValueError(f"n_perm must be at least 1, got {n_perm}")
    _check_columns(predictions, [attribute], UNIT_KEYS)
    keys = [*RUN_KEYS, *UNIT_KEYS]
    classes = infer_classes(predictions)
    _, sensitive, _ = gap_direction(group_labels(predictions, attribute), focus)
    known = sensitive.notna().to_numpy()
    rows = predictions.loc[known, keys].reset_index(drop=True)
    unit = rows.groupby(keys, sort=True, dropna=False).ngroup().to_numpy()
    y_true = _codes(predictions["y_true"][known], classes)
    y_pred = _codes(predictions["y_pred"][known], classes)
    groups = sensitive[known].astype(str).to_numpy()
    cell_of = unit * len(classes) + y_true
    cells = pd.Series(cell_of).groupby(cell_of).indices.values()
    observed = _unit_eq_odds(y_true, y_pred, groups, unit, classes)
    out = rows.groupby(keys, sort=True, dropna=False).size().reset_index()[keys]  # row i: unit i
    observed = observed.reindex(out.index).to_numpy()
    rng = np.random.default_rng(seed)
    draws = np.empty((len(out), n_perm))
    for i in range(n_perm):
        shuffled = groups.copy()
        for cell in cells:  # the images of one unit and true class trade groups
            shuffled[cell] = rng.permutation(groups[cell])
        draws[:, i] = _unit_eq_odds(y_true, y_pred, shuffled, unit, classes).reindex(out.index)
    exceed = (draws >= observed[:, None] - 1e-12).sum(axis=1)
    out["observed"] = observed
    out["floor"] = draws.mean(axis=1)
    out["p_perm"] = np.where(np.isnan(observed), np.nan, (exceed + 1) / (n_perm + 1))
    out["bias_level"] = out["bias_level"].astype(float)
    return out


def group_confusions(predictions: pd.DataFrame, attribute: str, classes: list[str]) -> dict[str, np.ndarray]:
    """Confusion matrix (counts; rows true class, columns predicted) of every known group, pooled."""
    classes = list(classes)
    groups = group_labels(predictions, attribute)
    y_true, y_pred = _codes(predictions["y_true"], classes), _codes(predictions["y_pred"], classes)
    out = {}
    for g in sorted(groups.dropna().astype(str).unique()):
        mask = (groups == g).to_numpy()
        out[g] = np.bincount(y_true[mask] * len(classes) + y_pred[mask],
                             minlength=len(classes) ** 2).reshape(len(classes), -1)
    return out
