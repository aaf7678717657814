"""A bias sweep's models on faces none of them saw, to check what the test folds say about women.

The sweep judges every mitigation on its test folds, the same 2194 images cut five ways. fer4 has 476 more
images, its ``Extra Data`` (the prepared dataset's ``extra`` subset: every image of that folder that is not
also in ``Data/``), all of women, which no run of a sweep without the ``augmented`` kind trains, validates
or is tested on. For every saved model of a sweep (``RESULTS_DIR/models/<run_id>.pt``) this script scores
those images, and beside it the women and the men of the run's own test fold (from its run file). Then,
per condition, each mitigation against none, paired over folds and seeds with a 95% t interval
(scipy.stats): the change of women's accuracy and macro-F1 on the unseen images next to the change of
women's accuracy on the test folds. If a mitigation reads women worse on the test folds, it should on
images it never saw as well; if the two disagree, the test-fold finding is not to be trusted.

With ``representational`` runs in the sweep, level 1.0 (no woman in training) against level 0 asks the
same of the representational bias.

Run: ``python benchmarks/unseen_fer4.py RESULTS_DIR --data DIR`` (``RESULTS_DIR`` of
``benchmarks/bias_fer4.py``; ``DIR`` the canonical fer4 folder the sweep trained on, which holds the
extras). Writes ``RESULTS_DIR/unseen.parquet`` (one row per model). It trains nothing; the face mesh runs
once per image (for models with aligned faces or mesh landmarks), then each model takes about a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from group_probe_fer4 import paired, saved_runs, sweep_parser  # noqa: E402  (shared with the probe)

from fer_core.checkpoint import load_model  # noqa: E402
from fer_core.data import BASE_SUBSET, FaceDataset, load_dataset  # noqa: E402
from fer_core.training import predict_saved  # noqa: E402

RUN_COLUMNS = ["run_id", "arch", "bias_kind", "bias_level", "mitigation", "fold", "seed"]


def unseen_rows(ds: FaceDataset, attr: str, group: str) -> np.ndarray:
    """Row indices of the extras (subset not base) of ``attr == group``; every extra must be of it."""
    extra = ds.manifest["subset"].ne(BASE_SUBSET).to_numpy()
    if not extra.any():
        raise SystemExit(f"{ds.name}: no extra images (subset other than {BASE_SUBSET!r}); import fer4 with "
                         f"experiments/datasets/fer4.toml, which keeps its Extra Data")
    values = ds.manifest.loc[extra, attr].fillna("unknown").astype(str)
    if values.ne(group).any():
        counts = values.value_counts().to_dict()
        raise SystemExit(f"{ds.name}: the extras are not all {attr} = {group!r} ({counts}); this script "
                         f"compares them with the test folds' {group!r} faces")
    return np.flatnonzero(extra)


def scores(y_true: np.ndarray, y_pred: np.ndarray, prefix: str) -> dict[str, float]:
    """Accuracy, macro-F1 over the classes present, and each class's recall (labels are class names)."""
    present = sorted(set(y_true))
    out = {f"{prefix}_accuracy": accuracy_score(y_true, y_pred),
           f"{prefix}_macro_f1": f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)}
    recalls = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    out.update({f"{prefix}_recall_{c}": r for c, r in zip(present, recalls, strict=True)})
    return out


def score_model(model_path: Path, run_path: Path, pixels: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                classes: list[str], attr: str, group: str) -> dict:
    """One model: the unseen images, and the ``group`` / other faces of its own test fold."""
    run = pd.read_parquet(run_path)
    saved = load_model(model_path)
    if list(saved.classes) != list(classes):
        raise SystemExit(f"{model_path}: classes {list(saved.classes)} are not the dataset's {classes}")
    names = np.asarray(classes)
    pred = names[predict_saved(saved, pixels, ids).argmax(1)]
    row = run.iloc[0][RUN_COLUMNS].to_dict()
    row.update(scores(names[labels], pred, "unseen"))
    member = run[attr].fillna("unknown").astype(str).eq(group)
    known = run[attr].notna() & run[attr].astype(str).ne("unknown")
    row.update(scores(run.loc[member, "y_true"].to_numpy(), run.loc[member, "y_pred"].to_numpy(),
                      "test_focus"))
    row["test_rest_accuracy"] = accuracy_score(run.loc[known & ~member, "y_true"],
                                               run.loc[known & ~member, "y_pred"])
    return row


def representational(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each representational level against level 0 without mitigation, paired over (fold, seed)."""
    plain = table[table["mitigation"].eq("none")]
    base = plain[plain["bias_kind"].eq("none")]  # level 0 (not the size-matched stereotypical 0)
    frames = []
    for level in sorted(plain.loc[plain["bias_kind"].eq("representational"), "bias_level"].unique()):
        part = plain[plain["bias_kind"].eq("representational") & plain["bias_level"].eq(level)]
        # paired() compares "mitigations" within a condition: here level 0 plays "none"
        both = pd.concat([base.assign(mitigation="none"), part.assign(mitigation=f"level {level:g}")])
        frames.append(paired(both.assign(bias_kind="representational", bias_level=level), metric))
    return pd.concat(frames) if frames else pd.DataFrame()


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser(__doc__.splitlines()[0])
    parser.add_argument("--attr", default="gender", help="attribute of the unseen images (default: gender)")
    parser.add_argument("--group", default="Female", help="their group (default: Female)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    pairs, skipped = saved_runs(args.results)
    ds = load_dataset(args.data)
    rows = unseen_rows(ds, args.attr, args.group)
    pixels, ids, labels = ds.pixels[rows], ds.manifest["image_id"].to_numpy()[rows], ds.labels[rows]
    classes = list(ds.classes)
    print(f"{len(rows)} unseen images ({args.attr} = {args.group}): "
          + ", ".join(f"{classes[c]} {n}" for c, n in enumerate(np.bincount(labels, minlength=len(classes)))))
    table = []
    for path, run in pairs:
        row = score_model(path, run, pixels, ids, labels, classes, args.attr, args.group)
        if row["bias_kind"] == "augmented" and row["bias_level"] > 0:
            skipped.append(path.name)  # trained on the extras: they are not unseen for it
            continue
        table.append(row)
    if skipped:
        print(f"{len(skipped)} models not scored (no run file yet, or trained on the extras): {skipped[:3]}")
    table = pd.DataFrame(table)
    table.to_parquet(args.results / "unseen.parquet", index=False)
    print(f"{len(table)} models scored; per model in {args.results / 'unseen.parquet'}\n")

    shown = ["unseen_accuracy", "unseen_macro_f1", "test_focus_accuracy", "test_focus_macro_f1",
             "test_rest_accuracy"] + [c for c in table if c.startswith("unseen_recall_")]
    means = table.groupby(["arch", "bias_kind", "bias_level", "mitigation"])[shown].mean() * 100
    print(f"Means over folds and seeds, points ('focus' = the test folds' {args.group} faces, 'rest' = the "
          f"others):")
    print(means.round(1).to_string())
    print("\nEach mitigation against none, paired over folds and seeds (points, 95% t interval):")
    for metric in ("unseen_accuracy", "test_focus_accuracy", "unseen_macro_f1"):
        result = paired(table, metric)
        if len(result):
            print(f"\n{metric}:\n" + result.round(3).to_string(index=False))
    if table["bias_kind"].eq("representational").any():
        print("\nRepresentational levels against level 0, no mitigation:")
        for metric in ("unseen_accuracy", "test_focus_accuracy"):
            result = representational(table, metric)
            if len(result):
                print(f"\n{metric}:\n" + result.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
