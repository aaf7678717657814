"""The bias sweep on fer4, then its report and headline numbers, with intervals.

Runs ``study.bias_sweep`` with ``experiments/bias_fer4.toml`` (three architectures, representational and
stereotypical levels of women's training images, all six mitigations, 5 folds), then ``study.report``,
and prints: the gender and age gaps at level 0; how each bias kind and level changes them; how much each
mitigation closes the gender gap and what it costs in macro-F1; and whether the target holds (the best
mitigation halves the unmitigated gender gap while losing at most 1 point of macro-F1).

The full sweep is hundreds of runs: hours on 2 CPU cores (the script prints its own estimate first).
``--quick`` runs one architecture, fewer levels, 3 folds and 15 epochs. The sweep resumes: run the same
command again after a stop. Signed gaps are accuracy of the other groups minus the focus group's
(``Male - Female``; ``rest - Senior`` for age), so positive means the focus group is recognised less well.
Each gap is given twice: in accuracy, and in balanced accuracy (mean per-class recall), which compares the
groups class by class. Their difference comes from the groups' class mix (fer4's men are mostly in the
hard Focused/Neutral classes): a model that reads every class equally well for women and men still has
an accuracy gap. Both are signed, so differences inside classes that go opposite ways cancel; the third,
the worst class's equalized-odds difference (largest gap in one class's recall or false-positive rate),
cannot, and is judged against the value chance alone gives it (``fer_core.fairness.eq_odds_floor``).

Run (from the repository root)::

    python benchmarks/bias_fer4.py [--quick] [--max-runs N] [--data data/fer4] [key=value ...]

``--data`` defaults to ``data/fer4``; when that folder does not exist it is imported from
``experiments/datasets/fer4.toml`` first. ``key=value`` arguments go to the sweep (e.g.
``resources.cpus_per_trial=2`` or ``sweep.tuned=results/default``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from fer_core.config import TrainConfig
from fer_core.fairness import EQ_ODDS, GAP_PARTS, RUN_KEYS, eq_odds_floor, unit_intervals
from fer_core.training import Trainer
from study import bias_sweep, prepare, report
from study.sweep_config import load_sweep, run_grid

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "bias_fer4.toml"
SPEC = ROOT / "experiments" / "datasets" / "fer4.toml"
QUICK = ["name=bias-fer4-quick", "split.k=3", "train.epochs=15", "train.patience=6",
         "sweep.archs=['main']", "sweep.levels.representational=[0.5, 1.0]",
         "sweep.levels.stereotypical=[1.0]", "sweep.n_boot=100"]
TARGET_GAP_FRACTION, TARGET_F1_LOSS = 0.5, 0.01
LABELS = {"accuracy_gap": "{} gap", "balanced_accuracy_gap": "{} balanced gap",
          EQ_ODDS: "{} equalized-odds difference", "macro_f1": "macro-F1"}
logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="1 architecture, fewer levels, 3 folds, 15 epochs")
    p.add_argument("--tables-only", action="store_true",
                   help="train nothing: tables, report and figures from the runs finished so far")
    p.add_argument("--max-runs", type=int, default=0, help="train at most N new runs (0 = all)")
    p.add_argument("--data", default="data/fer4", help="canonical fer4 folder (imported when missing)")
    p.add_argument("--address", default="", help="Ray cluster: 'auto' or 'ray://HOST:PORT'")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def ensure_data(path: Path) -> None:
    """Import fer4 into ``path`` unless a canonical dataset is already there."""
    if (path / "manifest.parquet").is_file():
        return
    print(f"importing fer4 into {path} ...", flush=True)
    if prepare.main([str(SPEC), "--out", str(path)]) != 0:
        raise SystemExit(f"could not import fer4 from {SPEC}; see the messages above")


def seconds_per_image_epoch(arch: str, size: int, threads: int) -> float:
    """Measured training cost of one image for one epoch (a few batches, after a warm-up one)."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (256, size, size), dtype=np.uint8), rng.integers(0, 4, 256)
    tr = Trainer(TrainConfig(arch=arch, batch_size=64, epochs=3), x, y, x[:64], y[:64], 4)
    tr.step()
    start = time.perf_counter()
    tr.step()
    return (time.perf_counter() - start) / (256 + 64 * 0.3)  # validation costs ~1/3 of training


def estimate(overrides: list[str]) -> None:
    """Print the grid size and a runtime estimate from a measured per-image cost (no early stopping)."""
    exp = load_sweep(str(CONFIG), overrides)
    ds = bias_sweep.load_data(exp.data.path, exp.data.synthetic)
    grid = run_grid(exp, {a: TrainConfig(arch=a, epochs=exp.train.epochs) for a in exp.sweep.archs})
    threads = max(1, int(exp.resources.cpus_per_trial))
    cost = {a: seconds_per_image_epoch(a, ds.image_size[0], threads) for a in exp.sweep.archs}
    n_train = len(ds.base()) * (exp.split.k - 1) / exp.split.k
    total = sum(cost[r.arch] * n_train * r.cfg.epochs for r in grid)
    slots = max(1, int(len(os.sched_getaffinity(0)) / max(exp.resources.cpus_per_trial, 1)))
    print(f"{len(grid)} runs ({len(exp.sweep.archs)} archs x {len(exp.sweep.conditions())} conditions x "
          f"{len(exp.sweep.mitigations)} mitigations x {exp.split.k} folds x {len(exp.sweep.seeds)} seeds); "
          f"measured {', '.join(f'{a} {1e3 * c:.1f} ms' for a, c in cost.items())} per image-epoch; "
          f"estimated at most {total / slots / 3600:.1f} h on {slots} parallel runs of this machine "
          "(early stopping and smaller biased training sets make it shorter)", flush=True)


def fmt(row: pd.Series, scale: float = 100.0) -> str:
    """``+3.1 [+0.4, +5.8]`` (points)."""
    return f"{scale * row['mean_diff']:+.1f} [{scale * row['ci_low']:+.1f}, {scale * row['ci_high']:+.1f}]"


def level0_gaps(out: Path, attrs: list[str]) -> None:
    """Signed gaps at level 0 without mitigation (fold t-interval) and the pooled bootstrap difference."""
    preds = pd.read_parquet(out / "predictions.parquet")
    base = preds[(preds["bias_kind"] == "none") & (preds["mitigation"] == "none")]
    units = unit_intervals(base, attrs, focus={"gender": "Female", "age": "Senior"})
    fair = pd.read_parquet(out / "fairness.parquet")
    print("\n== gaps at level 0, no mitigation (accuracy points; 95% intervals) ==")
    balanced = units[units["metric"] == "balanced_accuracy_gap"].set_index(["arch", "attribute"])
    for _, u in units[units["metric"] == "accuracy_gap"].iterrows():
        pooled = fair[(fair["arch"] == u["arch"]) & (fair["bias_kind"] == "none")
                      & (fair["mitigation"] == "none") & (fair["attribute"] == u["attribute"])
                      & (fair["group"] == "difference") & (fair["metric"] == "accuracy")]
        extra = ""
        if len(pooled):
            p = pooled.iloc[0]
            extra = (f"; pooled max-min {100 * p['value']:.1f} "
                     f"[{100 * p['ci_low']:.1f}, {100 * p['ci_high']:.1f}] (bootstrap)")
        print(f"{u['arch']:9s} {u['attribute']:6s} ({u['direction']}): {100 * u['mean']:+.1f} "
              f"[{100 * u['ci_low']:+.1f}, {100 * u['ci_high']:+.1f}] (p {u['p_value']:.3f}) over "
              f"{u['n_units']} folds{extra}")
        b = balanced.loc[(u["arch"], u["attribute"])]
        print(f"{'':9s} {'':6s} class by class (balanced accuracy): {100 * b['mean']:+.1f} "
              f"[{100 * b['ci_low']:+.1f}, {100 * b['ci_high']:+.1f}] (p {b['p_value']:.3f})")


def bias_effects(paired: pd.DataFrame) -> None:
    """Change of each gap and of macro-F1 with each bias kind and level (no mitigation) vs level 0."""
    rows = paired[(paired["comparison"] == "bias") & (paired["mitigation"] == "none")]
    print("\n== change vs level 0 (no mitigation), points, paired over folds ==")
    for (arch, kind, level), g in rows.groupby(["arch", "bias_kind", "bias_level"], sort=True):
        cells = [f"{LABELS[r['metric']].format(r['attribute'])} {fmt(r)}" for _, r in g.iterrows()
                 if r["metric"] in LABELS]
        print(f"{arch:9s} {kind:16s} {level:<5g} " + "; ".join(cells))


def class_recalls(out: Path) -> None:
    """Recall of every class for women and men (pooled over folds), per arch x condition, no mitigation.

    Where a stereotype acts, it shows here: a group loses recall in the classes it was scarce in.
    """
    fair = pd.read_parquet(out / "fairness.parquet")
    rows = fair[(fair["mitigation"] == "none") & (fair["attribute"] == "gender")
                & fair["group"].isin(["Female", "Male"]) & fair["metric"].str.startswith("recall_")]
    print("\n== recall by class, Female / Male (no mitigation; %, pooled over folds) ==")
    for (arch, kind, level), g in rows.groupby(["arch", "bias_kind", "bias_level"], sort=True):
        wide = g.pivot_table(index="metric", columns="group", values="value")
        cells = [f"{m.removeprefix('recall_')} {100 * r['Female']:.1f} / {100 * r['Male']:.1f}"
                 for m, r in wide.iterrows()]
        print(f"{arch:9s} {kind:16s} {level:<5g} " + "; ".join(cells))


def mitigation_effects(paired: pd.DataFrame, units: pd.DataFrame, metric: str) -> list[dict]:
    """Reduction of the gender gap ``metric`` and macro-F1 cost of every mitigation at every condition."""
    rows = paired[paired["comparison"] == "mitigation"]
    gap = units[(units["metric"] == metric) & (units["attribute"] == "gender")
                & (units["mitigation"] == "none")].set_index(["arch", "bias_kind", "bias_level"])
    print(f"\n== mitigations vs none at the same condition ({LABELS[metric].format('gender')}, macro-F1; "
          "points) ==")
    found = []
    for (arch, kind, level, mitigation), g in rows.groupby(
            ["arch", "bias_kind", "bias_level", "mitigation"], sort=True):
        g = g.set_index(["attribute", "metric"])
        if ("gender", metric) not in g.index or ("all", "macro_f1") not in g.index:
            continue
        d_gap, d_f1 = g.loc[("gender", metric)], g.loc[("all", "macro_f1")]
        before = gap["mean"].get((arch, kind, level), np.nan)
        p_before = gap["p_value"].get((arch, kind, level), np.nan)
        # share of the gap's size removed: a gap pushed past 0 to a larger gap the other way did not close
        closed = 1 - abs(before + d_gap["mean_diff"]) / abs(before) if abs(before) > 1e-9 else np.nan
        found.append({"arch": arch, "kind": kind, "level": level, "mitigation": mitigation,
                      "gap_before": before, "p_before": p_before, "closed": closed,
                      "f1_change": d_f1["mean_diff"]})
        share = f"{100 * closed:.0f}% closed" if detectable(p_before) else "not detectable"
        print(f"{arch:9s} {kind:16s} {level:<5g} {mitigation:9s} gap change {fmt(d_gap)} of "
              f"{100 * before:+.1f} ({share}); macro-F1 {fmt(d_f1)}")
    return found


def gap_parts(paired: pd.DataFrame, units: pd.DataFrame) -> None:
    """The gender accuracy gap split into its class-mix and within-class parts, and each mitigation's change.

    The class-mix part is what a model reading every class equally well for women and men would still
    show; a mitigation moves it only by changing how well the classes are read for everybody. So a
    mitigation that holds accuracy can halve a gap made mostly of class mix only by moving the within-class
    part the other way: reading the better-read group worse inside its classes.
    """
    print("\n== gender accuracy gap = class-mix part + within-class part (points; 95% t intervals) ==")
    at = units[units["attribute"] == "gender"].set_index([*RUN_KEYS, "metric"])
    changes = paired[(paired["comparison"] == "mitigation") & (paired["attribute"] == "gender")
                     & paired["metric"].isin(list(GAP_PARTS))]
    for key in at.index.droplevel("metric").unique():
        arch, kind, level, mitigation = key
        if mitigation != "none" or (*key, "accuracy_gap_mix") not in at.index:
            continue
        gap, mix, within = (at.loc[(*key, m)] for m in ("accuracy_gap", *GAP_PARTS))
        need = gap["mean"] * TARGET_GAP_FRACTION - mix["mean"]
        print(f"{arch:9s} {kind:16s} {level:<5g} gap {interval(gap)} = class mix {interval(mix)} + within "
              f"classes {interval(within)}; halving it with the class mix held needs a within-class part "
              f"of {100 * need:+.1f}")
        mine = changes[(changes["arch"] == arch) & (changes["bias_kind"] == kind)
                       & (changes["bias_level"] == level)]
        for mitigation, m in mine.groupby("mitigation", sort=True):
            m = m.set_index("metric")
            print(f"{'':32s} {mitigation:10s} class mix {fmt(m.loc['accuracy_gap_mix'])}, within classes "
                  f"{fmt(m.loc['accuracy_gap_within'])}")


def interval(row: pd.Series) -> str:
    """``-6.6 [-11.7, -1.5]`` (points) of a :func:`unit_intervals` row."""
    return f"{100 * row['mean']:+.1f} [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"


def detectable(p_value: float) -> bool:
    """The unmitigated gap's one-sample t-test over folds rejects 0 at 5% (a share of 0 means nothing)."""
    return bool(p_value < 0.05)


def target_verdict(found: list[dict], metric: str) -> None:
    """Per condition: does the best mitigation halve the gender gap at <= 1 point of macro-F1."""
    print(f"\n== target on the {LABELS[metric].format('gender')}: best mitigation halves it, macro-F1 loss "
          "<= 1 point ==")
    frame = pd.DataFrame(found)
    if frame.empty:
        print("no mitigation comparisons (too few runs)")
        return
    for (arch, kind, level), g in frame.groupby(["arch", "kind", "level"], sort=True):
        before = g.iloc[0]
        if not detectable(before["p_before"]):
            print(f"{arch:9s} {kind:16s} {level:<5g} gap {100 * before['gap_before']:+.1f} "
                  f"(p {before['p_before']:.3f}): no detectable gap to halve")
            continue
        ok = g[(g["closed"] >= TARGET_GAP_FRACTION) & (g["f1_change"] >= -TARGET_F1_LOSS)]
        best = g.sort_values("closed", ascending=False).iloc[0]
        verdict = (f"MET by {', '.join(ok['mitigation'])}" if len(ok) else
                   f"NOT met (best {best['mitigation']}: {100 * best['closed']:.0f}% closed, "
                   f"macro-F1 {100 * best['f1_change']:+.1f})")
        print(f"{arch:9s} {kind:16s} {level:<5g} gap {100 * before['gap_before']:+.1f} "
              f"(p {before['p_before']:.3f}): {verdict}")


def eq_odds_against_chance(preds: pd.DataFrame, units: pd.DataFrame, n_perm: int = 200) -> pd.DataFrame:
    """Give the unmitigated gender equalized-odds differences of ``units`` a p-value against chance.

    The difference is never negative, so a test against 0 means nothing; instead each fold's value is
    paired with the mean of ``n_perm`` shuffles of gender inside its classes (its chance floor), and
    ``ttest_rel`` asks whether the model's exceeds it. Printed per condition; the p-value goes into
    ``units`` so that the target verdict calls a difference detectable on the same terms as the gaps.
    """
    base = preds[preds["mitigation"] == "none"]
    floor = eq_odds_floor(base, "gender", focus="Female", n_perm=n_perm)
    print(f"\n== gender equalized-odds difference without mitigation vs chance ({n_perm} shuffles of gender "
          "inside each fold's classes; points) ==")
    units = units.copy()
    for (arch, kind, level), g in floor.groupby(["arch", "bias_kind", "bias_level"], sort=True):
        g = g.dropna(subset=["observed"])
        excess = g["observed"] - g["floor"]
        test = stats.ttest_rel(g["observed"], g["floor"]) if len(g) > 1 else None
        p = float(test.pvalue) if test is not None else np.nan
        ci = test.confidence_interval(0.95) if test is not None else None
        interval = f" [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]" if ci is not None else ""
        beyond = int((g["p_perm"] <= 0.05).sum())
        print(f"{arch:9s} {kind:16s} {level:<5g} {100 * g['observed'].mean():.1f}, chance "
              f"{100 * g['floor'].mean():.1f}: excess {100 * excess.mean():+.1f}{interval} (p {p:.3f}); "
              f"{beyond} of {len(g)} folds beyond 95% of their own shuffles")
        at = ((units["arch"] == arch) & (units["bias_kind"] == kind) & (units["bias_level"] == level)
              & (units["mitigation"] == "none") & (units["attribute"] == "gender")
              & (units["metric"] == EQ_ODDS))
        units.loc[at, "p_value"] = p
    return units


def headline(out: Path) -> None:
    """Print the headline numbers from the sweep's tables."""
    paired = pd.read_parquet(out / "paired.parquet")
    preds = pd.read_parquet(out / "predictions.parquet")
    units = unit_intervals(preds, ["gender"], focus={"gender": "Female"})
    units = eq_odds_against_chance(preds, units)
    level0_gaps(out, ["gender", "age"])
    bias_effects(paired)
    class_recalls(out)
    gap_parts(paired, units)
    for metric in ("accuracy_gap", "balanced_accuracy_gap", EQ_ODDS):
        target_verdict(mitigation_effects(paired, units, metric), metric)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ensure_data(Path(args.data))
    overrides = [*(QUICK if args.quick else []), f"data.path={args.data}", *args.overrides]
    if not args.tables_only:
        estimate(overrides)
    start = time.perf_counter()
    sweep_args = ["--config", str(CONFIG), *overrides]
    sweep_args += [f"--max-runs={args.max_runs}"] if args.max_runs else []
    sweep_args += ["--tables-only"] if args.tables_only else []
    sweep_args += [f"--address={args.address}"] if args.address else []
    code = bias_sweep.main(sweep_args)
    print(f"sweep finished in {(time.perf_counter() - start) / 60:.1f} min (exit code {code})", flush=True)
    exp = load_sweep(str(CONFIG), overrides)
    out = Path(exp.results_dir) / exp.name
    if not (out / "paired.parquet").is_file():
        print(f"no paired.parquet in {out}: no run finished")
        return 1
    report.main([str(out)])
    headline(out)
    print(f"\nreport: {out / 'report.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
