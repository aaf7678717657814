"""How much a sweep's models' features say about a face's gender, inside each class: a linear probe.

The ``adversary`` mitigation trains a critic to tell each image's group from the features the classifier
sees (told the class too), and the features to defeat it; ``groupheads`` gives each group its own
classifier. Whether either really takes gender out of the features is a question about the trained
models, not about their accuracy, and this script measures it. For every saved model of a bias sweep
(``results/<name>/models/<run_id>.pt``) it computes the features of that run's own test images (the
images of its run file, never seen in training), and inside each class fits a logistic regression of
gender on them, scored by stratified 5-fold cross-validation (balanced accuracy: 0.5 is no information).
Per run it reports the mean over classes; per architecture, condition and mitigation the mean over folds,
and for each mitigation the paired difference to no mitigation with a 95% t interval over the folds.
A probe fitted inside a class can only use what the features say about gender *given* the class, which
is what a stereotype inside classes lets a model learn and what the critic is trained against.

Run: ``python benchmarks/group_probe_fer4.py RESULTS_DIR --data DIR [--attr gender] [--arch main]``
(``RESULTS_DIR`` of ``benchmarks/bias_fer4.py``, e.g. ``results/bias-fer4``; ``DIR`` the canonical fer4
folder the sweep trained on). It trains only the probes: about a second per model on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fer_core.checkpoint import load_model
from fer_core.data import load_dataset
from fer_core.landmarks import align_faces
from fer_core.training import to_tensor

MIN_PER_GROUP = 10  # a class needs this many test images of each group to be probed (5 folds of 2+)


def run_features(model_path: Path, run_path: Path, pixels_by_id: dict[str, np.ndarray]) -> pd.DataFrame:
    """The run's test rows (class, attributes) with the saved model's features of each test image."""
    rows = pd.read_parquet(run_path, columns=["run_id", "arch", "bias_kind", "bias_level", "mitigation",
                                              "fold", "seed", "image_id", "y_true", "gender", "age"])
    missing = set(rows["image_id"]) - set(pixels_by_id)
    if missing:
        raise SystemExit(f"{run_path}: {len(missing)} test images are not in --data (e.g. "
                         f"{sorted(missing)[0]}); give the canonical folder the sweep trained on")
    saved = load_model(model_path)
    if not hasattr(saved.model, "features"):
        raise SystemExit(f"{model_path}: architecture {saved.arch!r} has no features() to probe")
    pixels = np.stack([pixels_by_id[i] for i in rows["image_id"]])
    if saved.face_align:  # the network reads the faces the face mesh aligned
        pixels = align_faces(pixels, rows["image_id"].to_numpy())
    x = to_tensor(pixels, saved.mean, saved.std, torch.device("cpu"), saved.input_norm)
    with torch.no_grad():
        feats = saved.model.eval().features(x).numpy()
    return rows.assign(features=list(feats))


def probe_score(frame: pd.DataFrame, attr: str, seed: int = 0) -> dict[str, float]:
    """Cross-validated balanced accuracy of ``attr`` from the features.

    Inside each class with enough images of every group, and over all classes together (the plain,
    unconditional probe).
    """
    known = frame[frame[attr].notna() & frame[attr].astype(str).ne("unknown")]
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)

    def score(part: pd.DataFrame) -> float:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return float(cross_val_score(probe, np.stack(part["features"].to_list()), part[attr].astype(str),
                                     cv=cv, scoring="balanced_accuracy").mean())

    out = {}
    for cls, part in known.groupby("y_true"):
        if part[attr].nunique() > 1 and part[attr].value_counts().min() >= MIN_PER_GROUP:
            out[f"within_{cls}"] = score(part)
    out["within_class"] = float(np.mean(list(out.values()))) if out else float("nan")
    out["all_classes"] = score(known)
    return out


def paired(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each mitigation against none, paired over (fold, seed) within arch x condition."""
    keys = ["arch", "bias_kind", "bias_level"]
    lines = []
    for (arch, kind, level), part in frame.groupby(keys):
        wide = part.pivot_table(index=["fold", "seed"], columns="mitigation", values=metric)
        if "none" not in wide:
            continue
        for mitigation in wide.columns.drop("none"):
            pair = wide[[mitigation, "none"]].dropna() * 100
            if len(pair) < 2:
                continue
            test = stats.ttest_rel(pair[mitigation], pair["none"])
            ci = test.confidence_interval(0.95)
            lines.append({"arch": arch, "condition": f"{kind} {level:g}", "mitigation": mitigation,
                          "units": len(pair), "none": pair["none"].mean(),
                          "mitigated": pair[mitigation].mean(),
                          "change": (pair[mitigation] - pair["none"]).mean(), "low": ci.low, "high": ci.high,
                          "p": test.pvalue})
    return pd.DataFrame(lines)


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a script that reads a sweep's saved models: RESULTS_DIR and --data."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("results", type=Path, help="a bias sweep's results folder (with runs/ and models/)")
    parser.add_argument("--data", required=True, type=Path, help="the canonical folder the sweep trained on")
    return parser


def saved_runs(results: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """A sweep's saved models with their run files, and the models whose run has no file (not finished)."""
    models = sorted((results / "models").glob("*.pt"))
    if not models:
        raise SystemExit(f"{results / 'models'}: no saved models (the sweep's sweep.save_models=false?)")
    runs = [(path, results / "runs" / f"{path.stem}.parquet") for path in models]
    return [pair for pair in runs if pair[1].is_file()], [m.name for m, r in runs if not r.is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser(__doc__.splitlines()[0])
    parser.add_argument("--attr", default="gender", help="attribute to probe for (default: gender)")
    parser.add_argument("--arch", action="append", help="only these architectures (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    pairs, skipped = saved_runs(args.results)
    ds = load_dataset(args.data)
    pixels_by_id = dict(zip(ds.manifest["image_id"], ds.pixels, strict=True))
    rows = []
    for path, run in pairs:
        frame = run_features(path, run, pixels_by_id)
        if args.arch and frame["arch"].iloc[0] not in args.arch:
            continue
        head = frame.iloc[0][["run_id", "arch", "bias_kind", "bias_level", "mitigation", "fold", "seed"]]
        rows.append({**head.to_dict(), **probe_score(frame, args.attr)})
    if skipped:
        print(f"{len(skipped)} model files have no run file (run not finished?), not probed: {skipped[:3]}")
    table = pd.DataFrame(rows)
    print(f"{len(table)} models probed for {args.attr!r} (balanced accuracy, 50 = no information)\n")
    per_class = [c for c in table if c.startswith("within_") and c != "within_class"]
    means = table.groupby(["arch", "bias_kind", "bias_level", "mitigation"])[
        ["within_class", *per_class, "all_classes"]].mean() * 100
    print(means.round(1).to_string())
    for metric in ("within_class", "all_classes"):
        diffs = paired(table, metric)
        if len(diffs):
            print(f"\n== {metric}: each mitigation vs none, points, paired over folds (95% t interval) ==")
            for d in diffs.itertuples():
                print(f"{d.arch:9s} {d.condition:18s} {d.mitigation:11s} {d.none:5.1f} -> {d.mitigated:5.1f}"
                      f"  {d.change:+5.1f} [{d.low:+5.1f}, {d.high:+5.1f}]  p {d.p:.3f}  ({d.units} units)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
