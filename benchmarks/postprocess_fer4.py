"""Post-processing per gender group: does it halve the sweep's gender gap at <= 1 point of macro-F1.

None of the sweep's training mitigations (resampling, reweighting, group DRO) met issue 4's target on
fer4. This script measures the other family, post-processing: keep the trained, unmitigated model and add
a per-group offset to its log-probabilities before the arg-max (a group-specific decision rule, the
multiclass form of per-group thresholds; Fairlearn's ``ThresholdOptimizer`` is binary only). Nothing is
trained: it reads a bias sweep's unmitigated test predictions and writes each rule's predictions as a new
"mitigation", then judges them with the sweep's own tables (``fer_core.fairness.paired_tests``) and
``benchmarks/bias_fer4.py``'s target verdict. Two rules:

- ``prior`` (and ``prior-half``, half the offset): undo the group's class prior of the fold's *training*
  rows, rebuilt with the sweep's own bias draws. The offset of class ``c`` for group ``g`` is
  ``log p(c) - log p(c | g)`` (add-one counts), so a model that learnt "women are Happy" from the training
  mix is moved back to the overall class mix. Needs no labelled data beyond the training set.
- ``audit-acc`` / ``audit-bal``: offsets fitted (``scipy.optimize.differential_evolution``) to minimise
  the accuracy gap / the balanced-accuracy (class-by-class) gap while losing at most 0.5 point of
  macro-F1, on a labelled *audit* set of unbiased images. The only unbiased labelled images of a fold are
  its test images, so each test fold is cut in two halves (stratified by class x gender): the offsets
  fitted on one half are scored on the other, and the other way round. Every image is scored once, by
  offsets fitted without it. This is the best case for post-processing: a real deployment has no
  unbiased audit set of the test population, and the sweep's validation carve is drawn from the biased
  training part (at stereotypical 1.0 it holds no man in Happy or Surprised).

Both rules need each test image's gender at prediction time. Run (from the repository root)::

    python benchmarks/postprocess_fer4.py RESULTS_DIR [--data DIR]

``RESULTS_DIR`` is a bias sweep's folder (``predictions.parquet`` and ``config.toml``), e.g.
``results/bias-fer4`` of ``benchmarks/bias_fer4.py``; ``--data`` the canonical dataset it was trained on
(default: its config's data, synthetic faces included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy.optimize import differential_evolution
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bias_fer4  # noqa: E402  (the sweep benchmark's verdict, shared)

from fer_core.bias import apply_bias, bias_rng  # noqa: E402
from fer_core.fairness import paired_tests, unit_intervals  # noqa: E402
from study.bias_sweep import fold_rows  # noqa: E402
from study.common import load_data  # noqa: E402
from study.sweep_config import load_sweep  # noqa: E402

F1_TOLERANCE = 0.005    # the audit fit may lose this much macro-F1 on its own half
BOUND = 3.0             # offsets searched in [-BOUND, BOUND] (log-probability units)
_NO_FILE = "{0}: not found; give a bias sweep's results folder (predictions.parquet, config.toml)"
_NOT_GENDER = ("{0}: sweep.attr is {1!r}; this benchmark measures the Female/Male gap of a sweep whose "
               "target attribute is gender")
_MISMATCH = ("{0} fold {1}: the rebuilt test fold differs from the sweep's test images; give --data the "
             "dataset the sweep was trained on")


def prior_offsets(labels: np.ndarray, groups: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """``log p(c) - log p(c | g)`` per group of the training rows (add-one counts).

    A group with no training row (no woman at representational 1.0) gets no offset: the model learnt
    no prior for it to undo.
    """
    overall = np.bincount(labels, minlength=n_classes) + 1.0
    out = {}
    for g in np.unique(groups):
        own = np.bincount(labels[groups == g], minlength=n_classes) + 1.0
        out[g] = np.log(overall / overall.sum()) - np.log(own / own.sum())
    return out


def apply_offsets(logp: np.ndarray, groups: np.ndarray, offsets: dict[str, np.ndarray]) -> np.ndarray:
    """Adjusted log-probabilities: each row plus its group's offset (0 for a group without one)."""
    shift = np.zeros_like(logp)
    for group, offset in offsets.items():
        shift[groups == group] = offset
    return logp + shift


def _scores(y: np.ndarray, pred: np.ndarray, male: np.ndarray, n_classes: int) -> tuple[float, float, float]:
    """(accuracy gap, balanced-accuracy gap, macro-F1), fast enough to sit inside the offset search.

    Gaps are Male - Female, as in the sweep; classes absent from both the labels and the predictions are
    left out of macro-F1, as scikit-learn does.
    """
    k = n_classes
    cms = [np.bincount(y[m] * k + pred[m], minlength=k * k).reshape(k, k) for m in (male, ~male)]
    acc = [np.trace(cm) / cm.sum() for cm in cms]
    bal = [np.mean(np.diag(cm)[cm.sum(1) > 0] / cm.sum(1)[cm.sum(1) > 0]) for cm in cms]
    total = cms[0] + cms[1]
    tp, denom = np.diag(total), total.sum(0) + total.sum(1)
    return acc[0] - acc[1], bal[0] - bal[1], float(np.mean(2 * tp[denom > 0] / denom[denom > 0]))


def fit_audit_offsets(logp: np.ndarray, y: np.ndarray, groups: np.ndarray, metric: str, seed: int,
                      generations: int = 60) -> dict[str, np.ndarray]:
    """Per-group offsets (Female, Male; class 0 fixed at 0) that shrink ``metric``'s gap on these rows.

    Minimises ``|gap| + 10 * max(0, F1_0 - F1_TOLERANCE - F1)``: the gap, and a steep price for macro-F1
    lost beyond the tolerance. ``generations``: the search's budget (differential evolution's
    ``maxiter``).
    """
    n_classes, male = logp.shape[1], groups == "Male"
    which = 0 if metric == "accuracy_gap" else 1
    f1_0 = _scores(y, logp.argmax(1), male, n_classes)[2]

    def unpack(theta: np.ndarray) -> dict[str, np.ndarray]:
        k = n_classes - 1
        return {"Female": np.r_[0.0, theta[:k]], "Male": np.r_[0.0, theta[k:]]}

    def cost(theta: np.ndarray) -> float:
        s = _scores(y, apply_offsets(logp, groups, unpack(theta)).argmax(1), male, n_classes)
        return abs(s[which]) + 10 * max(0.0, f1_0 - F1_TOLERANCE - s[2])

    bounds = [(-BOUND, BOUND)] * (2 * (n_classes - 1))
    found = differential_evolution(cost, bounds, seed=seed, maxiter=generations, popsize=12, tol=0,
                                   polish=False, init="sobol", x0=np.zeros(len(bounds)))
    return unpack(found.x)


def audit_predictions(logp: np.ndarray, y: np.ndarray, groups: np.ndarray, metric: str, seed: int,
                      generations: int = 60) -> np.ndarray:
    """Cross-fitted predictions: each half scored by offsets fitted on the other half only."""
    strata = np.char.add(groups.astype(str), y.astype(str))
    pred = np.full(len(y), -1)
    halves = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(logp, strata)
    for fit_rows, score_rows in halves:
        offsets = fit_audit_offsets(logp[fit_rows], y[fit_rows], groups[fit_rows], metric, seed, generations)
        pred[score_rows] = apply_offsets(logp[score_rows], groups[score_rows], offsets).argmax(1)
    return pred


def postprocessed(preds: pd.DataFrame, sweep_dir: Path, data: str | None, seed: int = 0,
                  generations: int = 60) -> pd.DataFrame:
    """Every rule's predictions for every unmitigated run of the sweep, tagged as a new mitigation.

    ``seed`` (with the fold) seeds the audit halves and the offset search; ``generations`` is the
    search's budget.
    """
    exp = load_sweep(str(sweep_dir / "config.toml"))
    ds = load_data(data) if data else load_data(exp.data.path, exp.data.synthetic)
    classes = list(ds.classes)
    attr = exp.sweep.attr
    if attr != "gender":
        raise SystemExit(_NOT_GENDER.format(sweep_dir / "config.toml", attr))
    conditions = {(s.kind, float(s.level)): s for s in exp.sweep.conditions()}
    manifest_groups = ds.manifest[attr].fillna("unknown").astype(str).to_numpy()
    folds = {}
    out = []
    base = preds[preds["mitigation"] == "none"]
    for (run_id, kind, level, fold, split_seed), run in base.groupby(
            ["run_id", "bias_kind", "bias_level", "fold", "split_seed"], sort=True):
        if split_seed not in folds:
            folds[split_seed] = fold_rows(ds, exp.split.k, int(split_seed))
        train_idx, test_idx = folds[split_seed][fold]
        if set(ds.manifest["image_id"].iloc[test_idx]) != set(run["image_id"]):
            raise SystemExit(_MISMATCH.format(run_id, fold))
        rows = apply_bias(ds, train_idx, conditions[(kind, float(level))], bias_rng(int(split_seed), fold),
                          test_idx=test_idx)
        offsets = prior_offsets(ds.labels[rows], manifest_groups[rows], len(classes))
        logp = np.log(np.clip(run[[f"p_{c}" for c in classes]].to_numpy(dtype=float), 1e-12, None))
        y = run["y_true"].map(classes.index).to_numpy()
        groups = run[attr].fillna("unknown").astype(str).to_numpy()
        rules = {"prior": apply_offsets(logp, groups, offsets).argmax(1),
                 "prior-half": apply_offsets(logp, groups, {g: o / 2 for g, o in offsets.items()}).argmax(1)}
        known = np.isin(groups, ["Female", "Male"])
        for name, metric in (("audit-acc", "accuracy_gap"), ("audit-bal", "balanced_accuracy_gap")):
            pred = logp.argmax(1)  # images of unknown gender keep the model's answer
            pred[known] = audit_predictions(logp[known], y[known], groups[known], metric,
                                            seed=1000 * seed + int(fold), generations=generations)
            rules[name] = pred
        for name, pred in rules.items():
            out.append(run.assign(mitigation=name, run_id=f"{run_id}+{name}",
                                  y_pred=np.asarray(classes)[pred]))
        print(f"{run_id}: post-processed", flush=True)
    return pd.concat([base, *out], ignore_index=True)


def group_levels(table: pd.DataFrame, units: pd.DataFrame) -> None:
    """Each group's accuracy and balanced accuracy under every rule, where a gender gap is detectable.

    A gap can close by reading the worse-off group better or the better-off group worse; the verdict
    alone does not say which.
    """
    gaps = units[(units["attribute"] == "gender") & (units["mitigation"] == "none")
                 & units["metric"].isin(["accuracy_gap", "balanced_accuracy_gap"])]
    detectable = gaps[gaps["p_value"].map(bias_fer4.detectable)]
    shown = detectable[["arch", "bias_kind", "bias_level"]].drop_duplicates()
    print("\n== per group, where a gap is detectable (%, mean over folds; macro-F1 of the images of "
          "known gender): accuracy / balanced accuracy ==")
    for arch, kind, level in shown.itertuples(index=False):
        cond = table[(table["arch"] == arch) & (table["bias_kind"] == kind) & (table["bias_level"] == level)
                     & table["gender"].isin(["Female", "Male"])]
        for rule, run in cond.groupby("mitigation", sort=True):
            frame = MetricFrame(metrics={"acc": accuracy_score, "bal": balanced_accuracy_score},
                                y_true=run["y_true"], y_pred=run["y_pred"],
                                sensitive_features=run["gender"].astype(str).rename("gender"),
                                control_features=run["fold"].rename("fold"))
            by = 100 * frame.by_group.groupby(level="gender").mean()
            f1 = 100 * np.mean([f1_score(g["y_true"], g["y_pred"], average="macro")
                                for _, g in run.groupby("fold")])
            print(f"{arch:9s} {kind:16s} {level:<5g} {rule:10s} Female {by.loc['Female', 'acc']:.1f} / "
                  f"{by.loc['Female', 'bal']:.1f}  Male {by.loc['Male', 'acc']:.1f} / "
                  f"{by.loc['Male', 'bal']:.1f}  macro-F1 {f1:.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("results", help="a bias sweep's results folder")
    p.add_argument("--data", help="canonical dataset the sweep used (default: its config's data.path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the audit halves and the offset search")
    p.add_argument("--generations", type=int, default=60,
                   help="budget of each audit offset search (differential evolution generations)")
    p.add_argument("--out", help="also write the predictions table with every rule's rows to this Parquet "
                   "file (y_pred is the rule's answer; the p_<class> columns stay the model's)")
    args = p.parse_args(argv)
    sweep_dir = Path(args.results)
    for name in ("predictions.parquet", "config.toml"):
        if not (sweep_dir / name).is_file():
            raise SystemExit(_NO_FILE.format(sweep_dir / name))
    start = time.perf_counter()
    preds = pd.read_parquet(sweep_dir / "predictions.parquet")
    group = preds["bias_group"].iloc[0]
    table = postprocessed(preds, sweep_dir, args.data, args.seed, args.generations)
    if args.out:
        table.to_parquet(args.out, index=False)
    rules = sorted(set(table["mitigation"]) - {"none"})
    print(f"post-processed {table.loc[table['mitigation'] == 'none', 'run_id'].nunique()} unmitigated runs "
          f"with {len(rules)} rules ({', '.join(rules)}) in {time.perf_counter() - start:.0f} s")
    paired = paired_tests(table, ["gender"], focus={"gender": group})
    units = unit_intervals(table, ["gender"], focus={"gender": group})
    for metric in ("accuracy_gap", "balanced_accuracy_gap"):
        bias_fer4.target_verdict(bias_fer4.mitigation_effects(paired, units, metric), metric)
    group_levels(table, units)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
