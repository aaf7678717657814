"""Write a bias sweep's report from its tables alone: ``python -m study.report RESULTS_DIR [--out DIR]``.

Reads ``RESULTS_DIR/predictions.parquet`` (required), ``fairness.parquet`` and ``paired.parquet``
(computed with :mod:`fer_core.fairness` and saved to ``--out`` when missing) and the dataset's class x
group composition: ``composition.parquet`` (columns ``attribute``, ``group``, ``label``, ``n``), else
the manifest of the canonical dataset named by ``[data] path`` in ``RESULTS_DIR/config.toml``, else the
distinct test images of the predictions table. Writes to ``--out`` (default ``RESULTS_DIR``):

- ``report.md``: composition; accuracy and macro-F1 at level 0; per-group gaps at level 0; how gaps
  change with each bias kind and level; mitigation effects and their cost; findings; caveats.
- ``accuracy_vs_level_<kind>.png``, ``gap_vs_level_<kind>.png``: mean over folds x seeds with 95% t
  intervals, one panel per architecture, one line per mitigation.
- ``confusion_<attribute>.png``: row-normalised confusion matrix of every group at level 0.
- ``composition.png``: class x group counts; ``pareto.png``: accuracy vs gap of every configuration.

Settings (``--config FILE`` with a ``[report]`` table, or ``key=value``): ``n_boot`` (bootstrap resamples
when fairness.parquet is recomputed, default 200), ``seed``, ``attributes`` (default: those of
fairness.parquet, else the predictions' attribute columns), ``focus.<attribute>=<group>`` (the group each
signed gap is measured against; default: as in paired.parquet, else sorted order), ``min_group``
(groups smaller than this are flagged, default 30). ``--smoke-test`` simulates a small sweep's
predictions table (no training) and reports on it.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # files only; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402

from fer_core.config import from_dict, load_toml, parse_overrides  # noqa: E402
from fer_core.fairness import (  # noqa: E402
    BASELINE_KIND,
    BASELINE_LEVEL,
    CROSS,
    EQ_ODDS,
    GAP_METRICS,
    GAP_PARTS,
    NO_MITIGATION,
    RUN_KEYS,
    UNIT_KEYS,
    UNKNOWN,
    fairness_table,
    group_confusions,
    infer_classes,
    paired_tests,
    unit_intervals,
)
from study.common import run_cli, setup_logging, write_table  # noqa: E402

logger = logging.getLogger(__name__)

GAP_NAMES = {"accuracy_gap": "gap", "balanced_accuracy_gap": "balanced gap",  # short labels of GAP_METRICS,
             **GAP_PARTS, EQ_ODDS: "EO difference"}  # of the gap's parts and of the unsigned EO difference

NOT_ATTRIBUTES = {"run_id", "arch", "bias_kind", "bias_level", "bias_attr", "bias_group", "mitigation",
                  "fold", "seed", "split_seed",
                  "image_id", "y_true", "y_pred", "config_hash", "version", "subset", "label", "source_path"}
CLASSES = ("Focused", "Happy", "Neutral", "Surprised")
_NO_PREDICTIONS = ("{0}: no predictions.parquet; pass the results folder of `python -m study.bias_sweep` "
                   "(or try --smoke-test)")
_NOT_A_SWEEP = ("{0}: lacks the columns {1} of a bias sweep's predictions (a study.kfold or study.evaluate "
                "table?); pass the results folder of `python -m study.bias_sweep`")
_NO_RESULTS = "RESULTS_DIR is required unless --smoke-test is given"
_PAIRED_DIRECTION = re.compile(r"^\((?P<hi>.+) - (?P<lo>.+)\) run - reference$")


@dataclass(frozen=True)
class ReportConfig:
    """Report settings (the ``[report]`` table of ``--config``, or ``key=value``)."""

    n_boot: int = 200
    seed: int = 0
    attributes: tuple[str, ...] = ()
    focus: dict = field(default_factory=dict)
    min_group: int = 30


@dataclass
class Tables:
    """What the report is made from."""

    predictions: pd.DataFrame
    fairness: pd.DataFrame
    paired: pd.DataFrame
    intervals: pd.DataFrame
    composition: pd.DataFrame
    attributes: list[str]
    classes: list[str]


# ---- command line ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m study.report", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", metavar="RESULTS_DIR", help="folder with predictions.parquet")
    p.add_argument("--out", help="output folder (default RESULTS_DIR)")
    p.add_argument("--config", help="TOML whose [report] table holds the settings")
    p.add_argument("--smoke-test", action="store_true",
                   help="report on a simulated sweep (to --out, default the temporary folder it is in)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="report settings")
    return p.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace) -> ReportConfig:
    """Defaults < ``--config`` [report] < smoke-test settings < ``key=value``."""
    data = dict(load_toml(args.config).get("report", {})) if args.config else {}
    if args.smoke_test:
        data["n_boot"] = 5
    data.update(parse_overrides([o for o in args.overrides if "=" in o]))
    return from_dict(ReportConfig, data, args.config or "command line")


def main(argv: list[str] | None = None) -> int:
    """Write report.md and the plots of one results folder."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    cfg = resolve(args)
    if args.smoke_test:
        return _smoke_test(cfg, Path(args.out) if args.out else None)
    if args.results is None:
        raise SystemExit(_NO_RESULTS)
    results = Path(args.results)
    if not (results / "predictions.parquet").is_file():
        raise SystemExit(_NO_PREDICTIONS.format(results))
    out = Path(args.out) if args.out else results
    out.mkdir(parents=True, exist_ok=True)
    path = write_report(load_tables(results, cfg, out), out, cfg, source=results)
    print(f"report in {path}")
    return 0


def _smoke_test(cfg: ReportConfig, out: Path | None) -> int:
    """Report on a simulated sweep, into ``out`` or else a new temporary folder that is kept.

    The simulated table is written to a fresh folder, so no stale table in ``out`` is read; with
    ``out`` that folder is temporary, and the table is copied next to the report it made.
    """
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="report-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-smoke-") as tmp:
        results = Path(tmp)
        write_table(simulate_predictions(), results / "predictions.parquet")
        tables = load_tables(results, cfg, out)
        shutil.copy2(results / "predictions.parquet", out / "predictions.parquet")
    path = write_report(tables, out, cfg, source=out)
    print(f"report in {path}")
    return 0


# ---- tables ----

_REFOCUSED_IN_PLACE = ("%s measures the gaps against %s; the report recomputed its paired tests with focus "
                       "%s and left that file as the sweep wrote it (--out keeps the recomputed table)")


def load_tables(results: Path, cfg: ReportConfig, out: Path) -> Tables:
    """Read every table the report needs; compute (and save into ``out``) fairness and paired if missing."""
    predictions = pd.read_parquet(results / "predictions.parquet")
    missing = [c for c in [*RUN_KEYS, *UNIT_KEYS] if c not in predictions]
    if missing:
        raise SystemExit(_NOT_A_SWEEP.format(results / "predictions.parquet", missing))
    predictions["bias_level"] = predictions["bias_level"].astype(float)
    fairness = _read(results / "fairness.parquet")
    attributes = list(cfg.attributes) or _attributes(predictions, fairness)
    classes = infer_classes(predictions)
    if fairness is None:
        logger.info("no fairness.parquet: computing it (n_boot=%d), saved to %s", cfg.n_boot, out)
        fairness = fairness_table(predictions, attributes, classes, n_boot=cfg.n_boot, seed=cfg.seed)
        write_table(fairness, out / "fairness.parquet", n_boot=str(cfg.n_boot))
    paired = _read(results / "paired.parquet")
    stored = _focus_of(paired)
    focus = {**stored, **cfg.focus}
    if paired is None:
        paired = paired_tests(predictions, attributes, focus=focus or None)
        write_table(paired, out / "paired.parquet")
    elif any(stored.get(attr) != group for attr, group in cfg.focus.items()):
        # the paired gaps must have the signs of the intervals the report puts them beside
        paired = paired_tests(predictions, attributes, focus=focus)
        if out.resolve() == results.resolve():
            logger.warning(_REFOCUSED_IN_PLACE, results / "paired.parquet", stored, cfg.focus)
        else:
            write_table(paired, out / "paired.parquet")
    intervals = unit_intervals(predictions, attributes, focus=focus or None)
    composition = read_composition(results, predictions, attributes)
    return Tables(predictions, fairness, paired, intervals, composition, attributes, classes)


def _read(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    if "bias_level" in frame:
        frame["bias_level"] = frame["bias_level"].astype(float)
    return frame


def _attributes(predictions: pd.DataFrame, fairness: pd.DataFrame | None) -> list[str]:
    """Plain attributes of fairness.parquet, else the predictions' non-schema, non-probability columns."""
    if fairness is not None:
        return [a for a in fairness["attribute"].unique() if CROSS not in a]
    return [c for c in predictions.columns if c not in NOT_ATTRIBUTES and not c.startswith("p_")
            and not pd.api.types.is_numeric_dtype(predictions[c])]


def _focus_of(paired: pd.DataFrame | None) -> dict[str, str]:
    """The group each gap of paired.parquet was measured against (so the plots use the same sign)."""
    if paired is None:
        return {}
    focus = {}
    signed = paired[paired["metric"].isin(list(GAP_METRICS))]
    for attr, direction in signed[["attribute", "direction"]].drop_duplicates().itertuples(index=False):
        found = _PAIRED_DIRECTION.match(direction)
        if found and found["lo"] != "min":
            focus[attr] = found["lo"]
    return focus


def read_composition(results: Path, predictions: pd.DataFrame, attributes: list[str]) -> pd.DataFrame:
    """Class x group counts (``attribute``, ``group``, ``label``, ``n``; nulls as ``"unknown"``)."""
    path = results / "composition.parquet"
    if path.is_file():
        frame = pd.read_parquet(path)
        if {"attribute", "group", "label", "n"} <= set(frame.columns):
            return frame
        logger.warning("%s: columns %s lack attribute/group/label/n; ignored", path, list(frame.columns))
    rows = _manifest_rows(results)
    if rows is None:
        rows = predictions.drop_duplicates("image_id").rename(columns={"y_true": "label"})
        logger.info("composition from the %d distinct test images of the predictions", len(rows))
    parts = []
    for attr in [a for a in attributes if a in rows.columns]:
        counts = rows.groupby(["label", rows[attr].fillna(UNKNOWN).astype(str).rename("group")]).size()
        parts.append(counts.rename("n").reset_index().assign(attribute=attr))
    return pd.concat(parts, ignore_index=True)[["attribute", "group", "label", "n"]] if parts else \
        pd.DataFrame(columns=["attribute", "group", "label", "n"])


def _manifest_rows(results: Path) -> pd.DataFrame | None:
    """Base-subset rows of the canonical dataset named in ``config.toml`` ([data] path), if readable."""
    config = results / "config.toml"
    data = load_toml(config).get("data", {}) if config.is_file() else {}
    path = data.get("path") if isinstance(data, dict) else None
    if not path or path == "synthetic" or not (Path(path) / "manifest.parquet").is_file():
        return None
    manifest = pd.read_parquet(Path(path) / "manifest.parquet")
    logger.info("composition from %s", Path(path) / "manifest.parquet")
    return manifest[manifest["subset"] == "base"] if "subset" in manifest else manifest


# ---- formatting helpers ----

def fmt_ci(value: float, low: float, high: float, signed: bool = False) -> str:
    """``0.812 [0.790, 0.834]`` (``+0.052 [+0.011, +0.093]`` when ``signed``); no interval if NaN."""
    f = "{:+.3f}" if signed else "{:.3f}"
    if np.isnan(value):
        return "n/a"
    if np.isnan(low) or np.isnan(high):
        return f.format(value)
    return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]"


def fmt_p(p: float) -> str:
    """p-value text."""
    return "n/a" if np.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def md_table(frame: pd.DataFrame) -> str:
    """A Markdown table of ``frame`` (values as they are, a ``|`` inside one escaped)."""
    if frame.empty:
        return "_(no rows)_\n"

    def cell(v) -> str:
        return str(v).replace("|", "\\|")
    head = "| " + " | ".join(map(cell, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def _baseline(frame: pd.DataFrame, mitigation: str | None = None) -> pd.DataFrame:
    rows = frame[(frame["bias_kind"] == BASELINE_KIND) & (frame["bias_level"] == BASELINE_LEVEL)]
    return rows if mitigation is None else rows[rows["mitigation"] == mitigation]


def _config_name(row) -> str:
    level = "" if row.bias_kind == BASELINE_KIND else f" {row.bias_level:g}"
    return f"{row.arch} / {row.bias_kind}{level} / {row.mitigation}"


def _excludes_zero(low: float, high: float) -> bool:
    return bool(low > 0 or high < 0)


# ---- report sections ----

def section_composition(t: Tables) -> list[str]:
    """Class x group counts of every attribute."""
    lines = ["## Data composition", "",
             "Test images per class and group (each image is tested once per seed, in its own fold).", ""]
    for attr, rows in t.composition.groupby("attribute", sort=False):
        wide = rows.pivot_table(index="label", columns="group", values="n", aggfunc="sum", fill_value=0)
        wide["total"] = wide.sum(axis=1)
        lines += [f"**{attr}**", "", md_table(wide.reset_index().rename(columns={"label": "class"}))]
    return [*lines, "![composition](composition.png)", ""]


def section_accuracy(t: Tables) -> list[str]:
    """Accuracy and macro-F1 per architecture x mitigation at level 0."""
    rows = _baseline(t.intervals)
    rows = rows[rows["metric"].isin(["accuracy", "macro_f1"])]
    table = []
    for (arch, mitigation), g in rows.groupby(["arch", "mitigation"]):
        m = g.set_index("metric")
        table.append({"arch": arch, "mitigation": mitigation, "units": int(m.loc["accuracy", "n_units"]),
                      **{k: fmt_ci(m.loc[k, "mean"], m.loc[k, "ci_low"], m.loc[k, "ci_high"])
                         for k in ("accuracy", "macro_f1")}})
    return ["## Accuracy at level 0 (no bias)", "",
            "Mean over folds x seeds (units) with 95% t intervals.", "", md_table(pd.DataFrame(table))]


def section_gaps(t: Tables) -> list[str]:
    """Per-group accuracy, between-group differences and signed gaps at level 0."""
    lines = ["## Group gaps at level 0", "",
             "Per-group accuracy pooled over folds x seeds with 95% bootstrap intervals (fairness.parquet); "
             "`difference` = largest minus smallest group accuracy (never negative); `signed gap` = mean "
             "over units of the gap in the stated direction with a 95% t interval and a one-sample "
             "t-test; `balanced gap` = the same for balanced accuracy (mean per-class recall), which "
             "compares the groups class by class, every class weighing alike (so it leaves out the "
             "groups' class mix: one group's faces more often in classes that are hard for everyone); "
             "the signed gap is split exactly into a "
             "`class-mix part` (the gap a model reading every class equally well for both groups would "
             "still have) and a `within-class part` (what the groups' per-class recalls add); "
             "`EO`/`DP` = worst-class one-vs-rest "
             "equalized-odds / demographic-parity differences.", ""]
    fair = _baseline(t.fairness)
    gaps = _baseline(t.intervals)
    for attr in t.attributes:
        table = []
        for (arch, mitigation), g in fair[fair["attribute"] == attr].groupby(["arch", "mitigation"]):
            table.append(_gap_row(arch, mitigation, g, gaps, attr))
        lines += [f"**{attr}**", "", md_table(pd.DataFrame(table))]
    return lines


def _gap_row(arch: str, mitigation: str, fair: pd.DataFrame, gaps: pd.DataFrame, attr: str) -> dict:
    acc = fair[fair["metric"] == "accuracy"].set_index("group")
    groups = [g for g in acc.index if g not in ("overall", "difference", "ratio")]
    row = {"arch": arch, "mitigation": mitigation}
    row.update({f"{g} (n={int(acc.loc[g, 'n'])})": fmt_ci(*acc.loc[g, ["value", "ci_low", "ci_high"]])
                for g in groups})
    if "difference" in acc.index:
        row["difference"] = fmt_ci(*acc.loc["difference", ["value", "ci_low", "ci_high"]])
    mine = gaps[(gaps["arch"] == arch) & (gaps["mitigation"] == mitigation) & (gaps["attribute"] == attr)]
    for metric, name in (("accuracy_gap", "signed gap"), *GAP_PARTS.items(),
                         ("balanced_accuracy_gap", "balanced gap")):
        s = mine[mine["metric"] == metric]
        if len(s):
            s = s.iloc[0]
            row[name] = f"{s['direction']}: {fmt_ci(s['mean'], s['ci_low'], s['ci_high'], True)}"
            if metric not in GAP_PARTS:
                row[f"p ({name})"] = fmt_p(s["p_value"])
    other = fair[fair["group"] == "difference"].set_index("metric")["value"]
    for name, metric in (("EO", "eq_odds_diff_ovr"), ("DP", "dem_parity_diff_ovr")):
        row[name] = f"{other.get(metric, np.nan):.3f}"
    return row


def section_bias(t: Tables, kinds: list[str]) -> list[str]:
    """Change of accuracy and gaps at every bias level against level 0 (paired)."""
    lines = ["## How gaps change with bias", "",
             "Each bias level against level 0 with the same architecture and mitigation, paired on "
             "(fold, seed): mean difference (run - reference) with 95% t interval and ttest_rel p. "
             "Level 0 is the unbiased baseline, except for a kind that has its own level 0 (a "
             "stereotypical sweep with size-matched classes: the same class sizes as its biased levels, "
             "the original shares); that level 0 is itself compared with the unbiased baseline.", ""]
    rows = t.paired[t.paired["comparison"] == "bias"]
    for kind in kinds:
        lines += [f"### {kind}", "", md_table(_diff_table(rows[rows["bias_kind"] == kind])),
                  f"![accuracy vs level](accuracy_vs_level_{kind}.png)",
                  f"![gap vs level](gap_vs_level_{kind}.png)", ""]
    return lines


def section_mitigation(t: Tables) -> list[str]:
    """Each mitigation against none at the same bias kind and level (paired)."""
    rows = t.paired[t.paired["comparison"] == "mitigation"]
    if rows.empty:
        return ["## Mitigation effects", "", "No mitigated run group in this sweep.", ""]
    return ["## Mitigation effects", "",
            "Each mitigation against no mitigation at the same architecture, bias kind and level, paired "
            "on (fold, seed). The macro-F1 column is the cost (negative = worse).", "",
            md_table(_diff_table(rows))]


def _diff_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run group: the paired difference of every metric (``+d [lo, hi] (p)``)."""
    out = []
    for key, g in rows.groupby(RUN_KEYS, sort=True):
        line = dict(zip(RUN_KEYS, key, strict=True))
        line["pairs"] = int(g["n_pairs"].max())
        for r in g.itertuples(index=False):
            name = r.metric if r.metric not in GAP_NAMES else \
                f"{GAP_NAMES[r.metric]} {r.attribute} ({_gap_direction(r.direction)})"
            line[f"Δ {name}"] = f"{fmt_ci(r.mean_diff, r.ci_low, r.ci_high, True)} (p {fmt_p(r.p_value)})"
        out.append(line)
    return pd.DataFrame(out)


# ---- findings and caveats ----

def findings(t: Tables) -> list[str]:
    """Plain-language statements generated from the numbers, each with its interval."""
    out = _best_finding(t) + _gap_findings(t) + _bias_findings(t) + _mitigation_findings(t)
    front = pareto_front(_pareto_points(t.fairness, t.attributes[0])) if t.attributes else pd.DataFrame()
    if len(front):
        names = "; ".join(f"{_config_name(r)} (accuracy {r.accuracy:.3f}, {t.attributes[0]} difference "
                          f"{r.gap:.3f})" for r in front.itertuples())
        out.append(f"Pareto front of accuracy vs {t.attributes[0]} difference: {names}.")
    return [f"- {line}" for line in out]


def _best_finding(t: Tables) -> list[str]:
    acc = _baseline(t.intervals)
    acc = acc[acc["metric"] == "accuracy"]
    if acc.empty:
        return ["No level-0 run group (bias_kind none, level 0): nothing to compare against."]
    best = acc.loc[acc["mean"].idxmax()]
    return [f"Without bias the most accurate configuration is {best['arch']} with mitigation "
            f"{best['mitigation']}: accuracy {fmt_ci(best['mean'], best['ci_low'], best['ci_high'])} "
            f"over {best['n_units']} folds x seeds."]


def _gap_findings(t: Tables) -> list[str]:
    out = []
    gaps = _baseline(t.intervals, NO_MITIGATION)
    other = gaps.set_index(["arch", "attribute", "metric"])
    for r in gaps[gaps["metric"] == "accuracy_gap"].itertuples():
        ci = fmt_ci(r.mean, r.ci_low, r.ci_high, signed=True)
        out.append(_one_gap_finding(r, ci))
        if (r.arch, r.attribute, "balanced_accuracy_gap") in other.index and r.direction != "max - min":
            b = other.loc[(r.arch, r.attribute, "balanced_accuracy_gap")]
            verdict = "excludes 0" if _excludes_zero(b.ci_low, b.ci_high) else "does not exclude 0"
            out.append(f"{r.arch}, level 0, class by class: the {r.attribute} gap in balanced accuracy "
                       f"(mean per-class recall) is {fmt_ci(b['mean'], b.ci_low, b.ci_high, signed=True)} "
                       f"({verdict}, p {fmt_p(b.p_value)}).")
        if all((r.arch, r.attribute, part) in other.index for part in GAP_PARTS):
            mix, within = (other.loc[(r.arch, r.attribute, part)] for part in GAP_PARTS)
            out.append(f"{r.arch}, level 0: the {r.attribute} accuracy gap is a class-mix part "
                       f"{fmt_ci(mix['mean'], mix.ci_low, mix.ci_high, signed=True)} (the groups' faces are "
                       "in classes read differently well) plus a within-class part "
                       f"{fmt_ci(within['mean'], within.ci_low, within.ci_high, signed=True)} (the groups' "
                       "faces read differently well inside the classes).")
    return out


def _one_gap_finding(r, ci: str) -> str:
    """The level-0 accuracy gap of one arch x attribute in words (``r``: a row of the intervals)."""
    if r.direction == "max - min":
        return (f"{r.arch}, level 0: accuracy across {r.attribute} groups spans {ci} on average per fold "
                "(largest minus smallest; never negative, so not a test of no gap).")
    if _excludes_zero(r.ci_low, r.ci_high):
        hi, lo = r.direction.split(" - ")
        worse, better = (lo, hi) if r.mean > 0 else (hi, lo)
        return (f"{r.arch}, level 0: {worse} faces are recognised less accurately than {better} faces "
                f"(gap {r.direction} {ci}, p {fmt_p(r.p_value)}).")
    return f"{r.arch}, level 0: no detectable {r.attribute} gap ({r.direction} {ci}, p {fmt_p(r.p_value)})."


def _bias_findings(t: Tables) -> list[str]:
    """One line per bias kind x arch x metric (no mitigation): the change at every level."""
    out = []
    rows = t.paired[(t.paired["comparison"] == "bias") & (t.paired["mitigation"] == NO_MITIGATION)
                    & ~t.paired["metric"].isin(["macro_f1", *GAP_PARTS])]  # the parts: in the tables
    for (kind, arch, attr, metric), g in rows.groupby(["bias_kind", "arch", "attribute", "metric"]):
        what = f"the {attr} {GAP_NAMES[metric]} ({_gap_direction(g['direction'].iloc[0])})" \
            if metric in GAP_NAMES else metric
        g = g.sort_values("bias_level")
        own_zero = g[g["bias_level"] == BASELINE_LEVEL]  # a size-matched level 0 against the baseline
        g = g[g["bias_level"] != BASELINE_LEVEL]
        hits = [f"{lv:g}" for lv, lo, hi in zip(g["bias_level"], g["ci_low"], g["ci_high"], strict=True)
                if _excludes_zero(lo, hi)]
        levels = "; ".join(f"{r.bias_level:g}: {fmt_ci(r.mean_diff, r.ci_low, r.ci_high, True)}"
                           for r in g.itertuples())
        verdict = f"interval excludes 0 at level {', '.join(hits)}" if hits else "no detectable change"
        reference = "level 0"
        if len(own_zero):
            r = own_zero.iloc[0]
            reference = (f"its size-matched level 0 (which differs from the unbiased baseline by "
                         f"{fmt_ci(r.mean_diff, r.ci_low, r.ci_high, True)})")
        out.append(f"{kind} bias, {arch} without mitigation: {what} vs {reference} — {verdict} ({levels}).")
    return out


def _gap_direction(paired_direction: str) -> str:
    """``"Male - Female"`` out of ``"(Male - Female) run - reference"``."""
    return paired_direction.split(")")[0].lstrip("(")


def _mitigation_findings(t: Tables, top: int = 3) -> list[str]:
    """Per mitigation: how many gap comparisons move (interval excludes 0), the largest moves, the cost."""
    rows = t.paired[t.paired["comparison"] == "mitigation"]
    means = t.intervals.set_index([*RUN_KEYS, "attribute", "metric"])["mean"]
    out = []
    for mitigation, g in rows.groupby("mitigation"):
        gaps = g[g["metric"].isin(list(GAP_METRICS))].copy()
        ref = [means.get((r.arch, r.bias_kind, r.bias_level, NO_MITIGATION, r.attribute, r.metric), np.nan)
               for r in gaps.itertuples()]
        gaps["narrows"] = np.abs(np.asarray(ref) + gaps["mean_diff"].to_numpy()) < np.abs(ref)
        hits = gaps[[_excludes_zero(lo, hi) for lo, hi in zip(gaps["ci_low"], gaps["ci_high"], strict=True)]]
        cost = g[g["metric"] == "macro_f1"]["mean_diff"]
        line = (f"{mitigation} vs no mitigation: {len(hits)} of {len(gaps)} comparisons of accuracy or "
                f"balanced gaps move "
                f"(interval excludes 0; {int(hits['narrows'].sum())} narrow, {int((~hits['narrows']).sum())} "
                f"widen); macro-F1 change median {cost.median():+.3f} (range {cost.min():+.3f} to "
                f"{cost.max():+.3f}).")
        largest = hits.reindex(hits["mean_diff"].abs().sort_values(ascending=False).index[:top])
        if len(largest):
            line += " Largest: " + "; ".join(
                f"{r.attribute} {GAP_NAMES[r.metric]} of {r.arch} at {r.bias_kind} {r.bias_level:g} "
                f"{fmt_ci(r.mean_diff, r.ci_low, r.ci_high, True)} (p {fmt_p(r.p_value)})"
                for r in largest.itertuples()) + "."
        out.append(line)
    return out


def caveats(t: Tables, cfg: ReportConfig) -> list[str]:
    """Limits of the numbers: small groups, unknown attributes, interval assumptions, many tests."""
    counts = t.fairness[t.fairness["metric"] == "count"]
    known = counts[counts["group"] != UNKNOWN]
    small = known[known["n"] < cfg.min_group].groupby(["attribute", "group"])["n"].min()
    out = []
    if len(small):
        listed = ", ".join(f"{a} = {g} (n >= {n})" for (a, g), n in small.items())
        out.append(f"Groups under {cfg.min_group} test rows in some run group: {listed}. Their metrics and "
                   "intervals are unreliable; the bootstrap is not stratified and may even lose them.")
    unknown = counts[counts["group"] == UNKNOWN].groupby("attribute")["n"].max()
    for attr, n in unknown.items():
        out.append(f"{attr}: up to {n} test rows per run group have no value; they are left out of the "
                   f"{attr} groups (counted as 'unknown' in fairness.parquet).")
    units = int(t.intervals["n_units"].max()) if len(t.intervals) else 0
    n_tests = int(t.paired["p_value"].notna().sum())
    out += [f"Intervals over units rest on {units} folds x seeds per run group; folds share training "
            "images, so t intervals are approximate, and wide when there are few units.",
            "Pooled bootstrap intervals (fairness.parquet) resample test rows as if independent; the same "
            "image tested under several seeds makes them somewhat too narrow.",
            "The between-group `difference` is largest minus smallest: never negative and biased upward, "
            "so its interval excludes 0 even with no true gap, and its percentile interval may not even "
            "contain the point estimate. Use the signed gaps and paired tests.",
            f"{n_tests} paired tests: at the 5% level about {0.05 * n_tests:.0f} would come out "
            "significant by chance alone; no correction for multiple comparisons is applied."]
    return [f"- {line}" for line in out]


# ---- plots ----

def _levels(intervals: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Rows of one bias kind, with level 0 drawn from the kind's own rows or the baseline's.

    A size-matched stereotypical sweep has its own level 0; other kinds start at the unbiased baseline.
    """
    rows = intervals["bias_kind"] == kind
    if not (rows & (intervals["bias_level"] == BASELINE_LEVEL)).any():
        rows |= (intervals["bias_kind"] == BASELINE_KIND) & (intervals["bias_level"] == BASELINE_LEVEL)
    return intervals[rows]


def plot_vs_level(intervals: pd.DataFrame, kind: str, panels: list[tuple[str, str]], path: Path) -> Path:
    """Mean and 95% t interval vs bias level: one column per arch, one row per (attribute, metric)."""
    data = _levels(intervals, kind)
    archs, mitigations = sorted(data["arch"].unique()), sorted(data["mitigation"].unique())
    fig, axes = plt.subplots(len(panels), len(archs), figsize=(max(6.0, 4.2 * len(archs)), 3.3 * len(panels)),
                             squeeze=False, sharex=True, sharey="row")
    colors = dict(zip(mitigations, plt.cm.tab10.colors, strict=False))
    span = max(float(data["bias_level"].max()), 1e-9)
    for i, (attr, metric) in enumerate(panels):
        rows = data[(data["attribute"] == attr) & (data["metric"] == metric)]
        for j, arch in enumerate(archs):
            ax = axes[i, j]
            for k, mit in enumerate(mitigations):
                g = rows[(rows["arch"] == arch) & (rows["mitigation"] == mit)].sort_values("bias_level")
                x = g["bias_level"] + (k - (len(mitigations) - 1) / 2) * 0.012 * span  # dodge the bars
                ax.errorbar(x, g["mean"], yerr=[g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]],
                            marker="o", ms=4, capsize=3, color=colors[mit], label=mit)
            if metric in GAP_METRICS:
                ax.axhline(0, color="0.5", lw=0.8, ls="--")
            ax.set_title(arch if i == 0 else "")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(_panel_label(rows, attr, metric))
            if i == len(panels) - 1:
                ax.set_xlabel(f"{kind} bias level")
    fig.suptitle(f"{kind} bias: mean over folds x seeds, 95% t interval", y=1.0)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), title="mitigation", loc="upper center",
               bbox_to_anchor=(0.5, 0.965), ncol=len(mitigations), fontsize=8,
               title_fontsize=8, frameon=False)
    return _save(fig, path, tight=False)


def _panel_label(rows: pd.DataFrame, attr: str, metric: str) -> str:
    if metric not in GAP_METRICS:
        return metric.replace("_", "-")
    direction = rows["direction"].iloc[0] if len(rows) else ""
    return f"{attr} {GAP_METRICS[metric].replace('_', ' ')} gap\n({direction})"


def plot_confusions(predictions: pd.DataFrame, attribute: str, classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrices per group (columns) and arch (rows) at level 0, no mitigation."""
    rows = _baseline(predictions, NO_MITIGATION)
    rows = rows if len(rows) else predictions
    archs = sorted(rows["arch"].unique())
    per_arch = {a: group_confusions(rows[rows["arch"] == a], attribute, classes) for a in archs}
    groups = sorted({g for c in per_arch.values() for g in c})
    size = (2.7 * len(groups) + 1.2, 2.6 * len(archs) + 0.8)
    fig, axes = plt.subplots(len(archs), len(groups), figsize=size, squeeze=False, layout="constrained")
    for i, arch in enumerate(archs):
        for j, group in enumerate(groups):
            ax = axes[i, j]
            cm = per_arch[arch].get(group, np.zeros((len(classes),) * 2))
            norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            image = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
            for (r, c), v in np.ndenumerate(norm):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
            ax.set_title(f"{arch} | {group} (n={int(cm.sum())})", fontsize=9)
            ax.set_xticks(range(len(classes)), classes if i == len(archs) - 1 else [], fontsize=8,
                          rotation=40, ha="right")
            ax.set_yticks(range(len(classes)), classes if j == 0 else [], fontsize=8)
            if i == len(archs) - 1:
                ax.set_xlabel("predicted", fontsize=8)
            if j == 0:
                ax.set_ylabel("true", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    fig.suptitle(f"Confusion by {attribute} (level 0, no mitigation; rows sum to 1)")
    return _save(fig, path, tight=False)


def plot_composition(composition: pd.DataFrame, classes: list[str], path: Path) -> Path:
    """Class x group counts, annotated with each group's share of the class, one panel per attribute."""
    attrs = list(dict.fromkeys(composition["attribute"]))
    widths = [max(3.0, 1.1 * composition[composition["attribute"] == a]["group"].nunique() + 1.5)
              for a in attrs]
    fig, axes = plt.subplots(1, len(attrs), figsize=(sum(widths) + 0.5, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, attr in zip(axes[0], attrs, strict=True):
        wide = composition[composition["attribute"] == attr].pivot_table(
            index="label", columns="group", values="n", aggfunc="sum", fill_value=0)
        wide = wide.reindex(sorted(wide.index, key=lambda c: (c not in classes, classes.index(c)
                                                              if c in classes else 0, c)))
        share = wide.div(wide.sum(axis=1).replace(0, 1), axis=0)
        ax.imshow(share.to_numpy(), vmin=0, vmax=1, cmap="Purples", aspect="auto")
        for (r, c), n in np.ndenumerate(wide.to_numpy()):
            ax.text(c, r, f"{n}\n{share.iat[r, c]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share.iat[r, c] > 0.6 else "black")
        ax.set_xticks(range(wide.shape[1]), wide.columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(wide.shape[0]), [f"{c} ({n})" for c, n in wide.sum(axis=1).items()], fontsize=8)
        ax.set_title(f"{attr}: images (share of class)", fontsize=10)
    return _save(fig, path)


def _pareto_points(fairness: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Per run group: pooled accuracy (``overall``) and accuracy difference of ``attribute``, with CIs."""
    rows = fairness[(fairness["attribute"] == attribute) & (fairness["metric"] == "accuracy")]
    # unstack, not pivot_table: that drops the all-NaN intervals of a table without bootstrap
    wide = rows.set_index([*RUN_KEYS, "group"])[["value", "ci_low", "ci_high"]].unstack("group")
    if "difference" not in wide["value"]:
        return pd.DataFrame(columns=[*RUN_KEYS, "accuracy", "gap"])
    out = pd.DataFrame({"accuracy": wide["value"]["overall"], "gap": wide["value"]["difference"],
                        "acc_low": wide["ci_low"]["overall"], "acc_high": wide["ci_high"]["overall"],
                        "gap_low": wide["ci_low"]["difference"], "gap_high": wide["ci_high"]["difference"]})
    return out.reset_index()


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Configurations no other beats on both accuracy (higher) and gap (lower), by increasing gap."""
    keep = []
    for r in points.itertuples():
        dominated = ((points["accuracy"] >= r.accuracy) & (points["gap"] <= r.gap)
                     & ((points["accuracy"] > r.accuracy) | (points["gap"] < r.gap))).any()
        keep.append(not dominated)
    return points[np.asarray(keep, dtype=bool)].sort_values("gap")


def plot_pareto(fairness: pd.DataFrame, attributes: list[str], path: Path) -> Path:
    """Accuracy vs between-group accuracy difference of every configuration, front numbered and listed."""
    fig, axes = plt.subplots(1, len(attributes), figsize=(7.2 * len(attributes), 5.0), squeeze=False)
    for ax, attr in zip(axes[0], attributes, strict=True):
        points = _pareto_points(fairness, attr)
        mitigations, archs = sorted(points["mitigation"].unique()), sorted(points["arch"].unique())
        colors = dict(zip(mitigations, plt.cm.tab10.colors, strict=False))
        markers = dict(zip(archs, "osD^v<>P*", strict=False))
        for r in points.itertuples():
            ax.plot(r.gap, r.accuracy, markers[r.arch], color=colors[r.mitigation], ms=6, alpha=0.7)
        _draw_front(ax, pareto_front(points))
        handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=f"mitigation {m}")
                   for m in mitigations]
        handles += [plt.Line2D([], [], color="0.3", marker=markers[a], ls="", label=f"arch {a}")
                    for a in archs]
        handles.append(plt.Line2D([], [], color="crimson", marker="o", mfc="none", label="Pareto front"))
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                  ncol=min(len(handles), 5), frameon=False)
        ax.set_xlabel(f"{attr}: accuracy difference (largest - smallest group, pooled)")
        ax.set_ylabel("accuracy (pooled)")
        ax.grid(alpha=0.3)
        ax.set_title(f"accuracy vs {attr} gap, {len(points)} configurations", fontsize=10)
    return _save(fig, path)


def _draw_front(ax, front: pd.DataFrame) -> None:
    """Step line through the front, its points numbered, their names and 95% intervals listed beside."""
    ax.step(front["gap"], front["accuracy"], where="post", color="crimson", lw=1.2, zorder=1)
    lines = []
    for i, r in enumerate(front.itertuples(), start=1):
        ax.plot(r.gap, r.accuracy, "o", ms=12, mfc="none", mec="crimson", mew=1.5, zorder=3)
        ax.annotate(str(i), (r.gap, r.accuracy), xytext=(7, 5), textcoords="offset points", fontsize=8,
                    color="crimson", weight="bold")
        lines.append(f"{i}. {_config_name(r)}\n   acc {fmt_ci(r.accuracy, r.acc_low, r.acc_high)}\n"
                     f"   gap {fmt_ci(r.gap, r.gap_low, r.gap_high)}")
    ax.text(1.02, 1.0, "Pareto front\n(95% bootstrap)\n\n" + "\n".join(lines), transform=ax.transAxes,
            va="top", fontsize=7, family="monospace", color="crimson")


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- the report ----

def write_report(t: Tables, out: Path, cfg: ReportConfig, source: Path | None = None) -> Path:
    """Draw every plot and write ``report.md`` into ``out``; returns its path."""
    kinds = sorted(k for k in t.predictions["bias_kind"].unique() if k != BASELINE_KIND)
    plot_composition(t.composition, t.classes, out / "composition.png")
    for kind in kinds:
        plot_vs_level(t.intervals, kind, [("all", "accuracy"), ("all", "macro_f1")],
                      out / f"accuracy_vs_level_{kind}.png")
        plot_vs_level(t.intervals, kind, [(a, m) for a in t.attributes for m in GAP_METRICS],
                      out / f"gap_vs_level_{kind}.png")
    for attr in t.attributes:
        plot_confusions(t.predictions, attr, t.classes, out / f"confusion_{attr}.png")
    if t.attributes:
        plot_pareto(t.fairness, t.attributes, out / "pareto.png")
    header = _header(t, source or out, kinds)
    body = (section_composition(t) + section_accuracy(t) + section_gaps(t) + section_bias(t, kinds)
            + section_mitigation(t) + ["## Findings", "", *findings(t), "", "## Caveats", "",
                                       *caveats(t, cfg), "", "## Plots", ""]
            + [f"![{a}](confusion_{a}.png)" for a in t.attributes] + ["![pareto](pareto.png)", ""])
    path = out / "report.md"
    path.write_text("\n".join(header + body))
    return path


def _header(t: Tables, source: Path, kinds: list[str]) -> list[str]:
    p = t.predictions

    def names(col: str) -> str:
        return ", ".join(sorted(map(str, p[col].unique())))

    return ["# Bias sweep report", "",
            f"Source: `{source}`: {len(p)} predictions, {p[RUN_KEYS].drop_duplicates().shape[0]} run groups, "
            f"architectures {names('arch')}, mitigations {names('mitigation')}, bias kinds "
            f"{', '.join(kinds) or 'none'}, {p['fold'].nunique()} fold(s) x {p['seed'].nunique()} seed(s); "
            f"classes {', '.join(t.classes)}.", ""]


# ---- a simulated sweep (for --smoke-test) ----

def simulate_predictions(seed: int = 0, n_images: int = 160, archs: tuple[str, ...] = ("main", "variant1"),
                         levels: dict | None = None, mitigations: tuple[str, ...] = ("none", "reweight"),
                         k: int = 3, seeds: tuple[int, ...] = (0,), penalty: float = 0.3) -> pd.DataFrame:
    """A predictions table as a bias sweep would write it, with a known planted effect.

    Female test images lose ``penalty x level`` accuracy under every bias kind (halved by any
    mitigation); nothing else depends on the groups. Each (fold, seed) unit shares a random accuracy
    shift across run groups, as real folds do.
    """
    rng = np.random.default_rng(seed)
    levels = levels or {"representational": (0.5, 1.0)}
    images = pd.DataFrame({"image_id": [f"img{i:05d}" for i in range(n_images)],
                           "y_true": np.asarray(CLASSES)[np.arange(n_images) % len(CLASSES)],
                           "gender": rng.choice(["Female", "Male"], n_images),
                           "age": rng.choice(["Adult", "Baby", "Children", "Senior"], n_images),
                           "fold": rng.permutation(np.arange(n_images) % k)})
    images.loc[rng.random(n_images) < 0.03, "age"] = None
    shift = rng.normal(0, 0.02, (k, len(seeds)))
    groups = [(BASELINE_KIND, BASELINE_LEVEL)] + [(kind, lv) for kind, lvs in levels.items() for lv in lvs]
    parts = []
    for a, arch in enumerate(archs):
        for (kind, level), mitigation, (s, sd) in _product(groups, mitigations, list(enumerate(seeds))):
            loss = penalty * level * (0.5 if mitigation != NO_MITIGATION else 1.0)
            p = 0.82 - 0.05 * a + shift[images["fold"], s] - loss * (images["gender"] == "Female")
            parts.append(_simulated_rows(images, p.to_numpy(), rng).assign(
                arch=arch, bias_kind=kind, bias_level=float(level), mitigation=mitigation, seed=sd,
                run_id=lambda f, arch=arch, kind=kind, level=level, mitigation=mitigation, sd=sd:
                    f"{arch}-{kind}-{level:g}-{mitigation}-f" + f["fold"].astype(str) + f"-s{sd}"))
    out = pd.concat(parts, ignore_index=True)
    out["config_hash"], out["version"] = "simulated", "0"
    return out


def _product(groups: list, mitigations: tuple[str, ...], seeds: list) -> list:
    return [(g, m, s) for g in groups for m in mitigations for s in seeds]


def _simulated_rows(images: pd.DataFrame, p_correct: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    n = len(images)
    true = images["y_true"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    wrong = (true + rng.integers(1, len(CLASSES), n)) % len(CLASSES)
    pred = np.where(rng.random(n) < np.clip(p_correct, 0, 1), true, wrong)
    probs = rng.dirichlet(np.ones(len(CLASSES)), n) * 0.4
    probs[np.arange(n), pred] += 0.6
    frame = images.assign(y_pred=np.asarray(CLASSES)[pred])
    for j, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, j].astype(np.float32)
    return frame


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.report"))
