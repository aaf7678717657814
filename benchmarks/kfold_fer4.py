"""5-fold cross-validation of each architecture with the default recipe on the real fer4 dataset.

Prints, per architecture, the per-fold macro-F1, the mean ± std over folds, and the wall time; the target
for ``main`` is a mean macro-F1 >= 0.80. The canonical dataset is imported from ``../shared/data/fer4``
into a temporary folder unless ``--data`` names one already imported.

Run: ``python benchmarks/kfold_fer4.py [--arch main variant1 variant2] [--data DIR] [--threads 1]
[--folds 0 1 2] [--extra] [key=value ...]`` (overrides of the default recipe, e.g. ``epochs=60
width=2.0 mixup=0.2``). ``--folds`` runs only those folds of the k-fold split (to share one configuration
out over processes, or probe a recipe on a few folds); ``--extra`` adds fer4's ``Extra Data`` images
(those that are not copies of a ``Data`` image) to the part of each training fold that is fitted;
validation and test folds stay ``Data`` images only, and the folds are the same as without it. On this
project's 2-core machines one architecture takes roughly 12-40 minutes; run architectures (or folds) as
separate processes to use both cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fer_core.config import SplitConfig, TrainConfig, from_dict, parse_overrides
from fer_core.crossval import FoldRun, score_fold, split_validation
from fer_core.data import FaceDataset, load_dataset
from fer_core.models import list_models
from fer_core.splits import kfold_splits
from fer_core.training import fit

ROOT = Path(__file__).resolve().parents[1]
FER4 = ROOT.parent / "shared" / "data" / "fer4"


def canonical_fer4(data: str | None) -> Path:
    """The given canonical folder, or a fresh import of ../shared/data/fer4."""
    if data:
        return Path(data)
    from study import prepare

    out = Path(tempfile.mkdtemp(prefix="fer4-")) / "fer4"
    spec = ROOT / "experiments" / "datasets" / "fer4.toml"
    if prepare.main([str(spec), "--root", str(FER4), "--out", str(out)]) != 0:
        raise SystemExit("import of fer4 failed")
    return out


def extra_rows(full: FaceDataset, n_base: int) -> np.ndarray:
    """Rows of ``full`` after its base rows whose pixels are not those of any base image."""
    ids = full.manifest["image_id"].to_numpy()
    rows = np.arange(n_base, len(full))
    return rows[~np.isin(ids[rows], ids[:n_base])]


def run_folds(cfg: TrainConfig, split: SplitConfig, full: FaceDataset, folds: list[int] | None,
              extra: bool) -> list[FoldRun]:
    """The chosen folds of the k-fold split of the base images, optionally fitted with the extras too."""
    base = full.base()
    n_base = len(base)
    if not full.manifest["subset"].iloc[:n_base].eq("base").all():
        raise SystemExit("expected the base images first in the canonical dataset")
    extras = extra_rows(full, n_base) if extra else np.zeros(0, dtype=int)
    runs = []
    splits = kfold_splits(base.labels, base.manifest["image_id"].to_numpy(), split.k, split.split_seed)
    for fold, (train_idx, test_idx) in enumerate(splits):
        if folds and fold not in folds:
            continue
        fit_idx, val_idx = split_validation(base, train_idx, cfg, seed=split.split_seed * 1000 + fold)
        rows = np.concatenate([fit_idx, extras])  # base rows of `full` are those of `base`
        result = fit(cfg, full.pixels[rows], full.labels[rows], base.pixels[val_idx], base.labels[val_idx],
                     len(base.classes))
        run = score_fold(base, test_idx, result, fold)
        run.metrics["n_fit"] = len(rows)
        logging.info("fold %d: macro-F1 %.4f (%d fitted images, %d of them extra)", fold,
                     run.metrics["macro_f1"], len(rows), len(extras))
        runs.append(run)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="*", default=list_models())
    p.add_argument("--data", help="canonical fer4 folder (default: import into a temp folder)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write folds.parquet/predictions.parquet per arch here")
    p.add_argument("--folds", nargs="*", type=int, help="run only these folds (default: all k)")
    p.add_argument("--extra", action="store_true", help="also fit on the Extra Data images")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    full = load_dataset(canonical_fer4(args.data))
    ds = full.base()
    split = SplitConfig(k=args.k)
    print(f"fer4: {len(ds)} images, classes {ds.classes}; {args.k}-fold; "
          f"{len(extra_rows(full, len(ds))) if args.extra else 0} extra images fitted with every fold; "
          f"torch threads {torch.get_num_threads()}")
    for arch in args.arch:
        cfg = from_dict(TrainConfig, {**dataclasses.asdict(TrainConfig()), **parse_overrides(args.overrides),
                                      "arch": arch}, "command line")
        start = time.perf_counter()
        runs = run_folds(cfg, split, full, args.folds, args.extra)
        folds = pd.DataFrame([{"arch": arch, **r.metrics} for r in runs])
        preds = pd.concat([r.predictions for r in runs], ignore_index=True)
        wall = time.perf_counter() - start
        f1 = folds["macro_f1"]
        print(f"{arch}: macro-F1 per fold {[round(v, 4) for v in f1]}; mean {f1.mean():.4f} ± "
              f"{f1.std(ddof=1):.4f}; accuracy {folds['accuracy'].mean():.4f} ± "
              f"{folds['accuracy'].std(ddof=1):.4f}; "
              f"epochs run {folds['epochs_run'].tolist()}; wall {wall / 60:.1f} min", flush=True)
        if args.out:
            out = Path(args.out) / arch
            out.mkdir(parents=True, exist_ok=True)
            folds.to_parquet(out / "folds.parquet")
            preds.to_parquet(out / "predictions.parquet")


if __name__ == "__main__":
    main()
