"""Averaging the architectures' test probabilities per image: an ensemble of the three CNNs vs one.

Reads per-image test predictions of the same k folds for several architectures (``predictions.parquet``
of ``benchmarks/kfold_fer4.py --out``, ``study.kfold``, or a bias sweep, whose unbiased, unmitigated runs
are used), averages the ``p_<class>`` columns of every combination of architectures per image, and prints
each combination's macro-F1 per fold, its mean ± std, and its paired difference to ``--base`` with a
95% t interval over folds. Nothing is trained: the ensembles cost no extra fits.

Run: ``python benchmarks/ensemble_fer4.py PREDICTIONS.parquet [more.parquet ...] [--base main]``, e.g.
on the fer4 sweep: ``python benchmarks/ensemble_fer4.py results/bias-fer4/predictions.parquet``.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import f1_score

KEYS = ["fold", "image_id"]


def load(paths: list[str]) -> pd.DataFrame:
    """Predictions of the lowest seed, without bias or mitigation where those columns exist."""
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    if "bias_kind" in frame:
        frame = frame[frame["bias_kind"].eq("none") & frame["mitigation"].eq("none")]
    if "seed" in frame:
        frame = frame[frame["seed"].eq(frame["seed"].min())]
    dup = frame.duplicated(["arch", *KEYS])
    if dup.any():
        raise SystemExit(f"{int(dup.sum())} duplicate (arch, fold, image_id) rows in {paths}: give each "
                         "architecture's predictions once")
    return frame


def fold_scores(frame: pd.DataFrame, archs: tuple[str, ...], classes: list[str]) -> pd.Series:
    """Macro-F1 per fold of the mean probability of ``archs`` (images present for all of them)."""
    cols = [f"p_{c}" for c in classes]
    parts = [frame[frame["arch"] == a].set_index(KEYS) for a in archs]
    index = parts[0].index
    for part in parts[1:]:
        if not part.index.sort_values().equals(index.sort_values()):
            raise SystemExit(f"{archs}: the architectures were not tested on the same folds and images")
    probs = sum(part.loc[index, cols].to_numpy(dtype=float) for part in parts) / len(parts)
    scored = pd.DataFrame({"fold": index.get_level_values("fold"),
                           "y_true": parts[0].loc[index, "y_true"].to_numpy(),
                           "y_pred": np.asarray(classes)[probs.argmax(1)]})
    # the project's macro-F1 (fer_core.metrics): every class counted, 0 for a class never predicted
    return pd.Series({fold: f1_score(g["y_true"], g["y_pred"], labels=classes, average="macro",
                                     zero_division=0)
                      for fold, g in scored.groupby("fold")})


def paired_difference(f1: pd.Series, base: pd.Series) -> str:
    """Mean per-fold difference in points, its 95% t interval over folds and the paired t-test's p."""
    diff = (f1 - base).to_numpy() * 100
    if len(diff) < 2:
        return f"{diff.mean():+.1f} points (one fold: no interval)"
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return (f"{diff.mean():+.1f} [{diff.mean() - half:+.1f}, {diff.mean() + half:+.1f}] points, "
            f"p {stats.ttest_1samp(diff, 0).pvalue:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("predictions", nargs="+")
    p.add_argument("--base", default="main", help="architecture the ensembles are compared with")
    args = p.parse_args()
    frame = load(args.predictions)
    classes = sorted(c.removeprefix("p_") for c in frame.columns if c.startswith("p_"))
    archs = sorted(frame["arch"].unique(), key=lambda a: (a != args.base, a))
    if args.base not in archs:
        raise SystemExit(f"--base {args.base!r}: no predictions of it; architectures: {archs}")
    base = fold_scores(frame, (args.base,), classes)
    print(f"{len(base)} folds, {frame['image_id'].nunique()} test images, architectures {archs}")
    for size in range(1, len(archs) + 1):
        for combo in itertools.combinations(archs, size):
            f1 = fold_scores(frame, combo, classes)
            line = (f"{' + '.join(combo):28s} per fold {np.round(f1.to_numpy(), 4).tolist()}  "
                    f"mean {f1.mean():.4f} ± {f1.std(ddof=1):.4f}")
            if combo != (args.base,):
                line += f"  vs {args.base}: {paired_difference(f1, base)}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
