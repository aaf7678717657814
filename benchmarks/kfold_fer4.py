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
import torch

from fer_core.config import SplitConfig, TrainConfig, from_dict, parse_overrides
from fer_core.crossval import FoldRun, fold_tables, train_on_split
from fer_core.data import BASE_SUBSET, FaceDataset, load_dataset
from fer_core.models import list_models
from fer_core.splits import kfold_splits

ROOT = Path(__file__).resolve().parents[1]
FER4 = ROOT.parent / "shared" / "data" / "fer4"


def load_fer4(data: str | None) -> FaceDataset:
    """The given canonical folder, or else ../shared/data/fer4 imported into a temporary folder.

    The temporary import is read into memory and deleted: the benchmark leaves nothing behind.
    """
    if data:
        return load_dataset(data)
    from study import prepare

    with tempfile.TemporaryDirectory(prefix="fer4-") as tmp:
        out = Path(tmp) / "fer4"
        spec = ROOT / "experiments" / "datasets" / "fer4.toml"
        if prepare.main([str(spec), "--root", str(FER4), "--out", str(out)]) != 0:
            raise SystemExit("import of fer4 failed")
        return load_dataset(out, mmap=False)


def extra_rows(full: FaceDataset) -> np.ndarray:
    """Row indices of the extra images in ``full`` (the importer keeps one row per distinct image)."""
    return np.flatnonzero(full.manifest["subset"].ne(BASE_SUBSET).to_numpy())


def run_folds(cfg: TrainConfig, split: SplitConfig, full: FaceDataset, folds: list[int] | None,
              extra: bool) -> list[FoldRun]:
    """The chosen folds of the k-fold split of the base images, optionally fitted with the extras too."""
    base_rows = np.flatnonzero(full.manifest["subset"].eq(BASE_SUBSET).to_numpy())
    base = full.base()  # row i of `base` is row base_rows[i] of `full`
    extras = extra_rows(full) if extra else np.zeros(0, dtype=int)
    runs = []
    splits = kfold_splits(base.labels, base.manifest["image_id"].to_numpy(), split.k, split.split_seed)
    for fold, (train_idx, test_idx) in enumerate(splits):
        if folds and fold not in folds:
            continue
        run = train_on_split(cfg, full, base_rows[train_idx], base_rows[test_idx], fold=fold,
                             split_seed=split.split_seed, extra_idx=extras)
        run.metrics.update(n_train=len(train_idx), n_extra=len(extras))
        logging.info("fold %d: macro-F1 %.4f (%d fitted images, %d of them extra)", fold,
                     run.metrics["macro_f1"], run.metrics["n_fit"], len(extras))
        runs.append(run)
    return runs


def _spread(values) -> str:
    """`` ± std`` over folds, or nothing for a single fold."""
    return f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""


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
    if args.folds and not set(args.folds) <= set(range(args.k)):
        p.error(f"--folds {args.folds}: fold numbers run from 0 to {args.k - 1} (k={args.k})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    full = load_fer4(args.data)
    ds = full.base()
    split = SplitConfig(k=args.k)
    print(f"fer4: {len(ds)} images, classes {ds.classes}; {args.k}-fold; "
          f"{len(extra_rows(full)) if args.extra else 0} extra images fitted with every fold; "
          f"torch threads {torch.get_num_threads()}")
    for arch in args.arch:
        cfg = from_dict(TrainConfig, {**dataclasses.asdict(TrainConfig()), **parse_overrides(args.overrides),
                                      "arch": arch}, "command line")
        start = time.perf_counter()
        runs = run_folds(cfg, split, full, args.folds, args.extra)
        folds, preds = fold_tables(cfg, split, runs)
        wall = time.perf_counter() - start
        f1, acc = folds["macro_f1"], folds["accuracy"]
        print(f"{arch}: macro-F1 per fold {[round(v, 4) for v in f1]}; mean {f1.mean():.4f}{_spread(f1)}; "
              f"accuracy {acc.mean():.4f}{_spread(acc)}; "
              f"epochs run {folds['epochs_run'].tolist()}; wall {wall / 60:.1f} min", flush=True)
        if args.out:
            out = Path(args.out) / arch
            out.mkdir(parents=True, exist_ok=True)
            folds.to_parquet(out / "folds.parquet")
            preds.to_parquet(out / "predictions.parquet")


if __name__ == "__main__":
    main()
