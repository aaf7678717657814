"""5-fold cross-validation of each architecture with the default recipe on the real fer4 dataset.

Prints, per architecture, the per-fold macro-F1, the mean ± std over folds, and the wall time; the target
for ``main`` is a mean macro-F1 >= 0.80. The canonical dataset is imported from ``../shared/data/fer4``
into a temporary folder unless ``--data`` names one already imported.

Run: ``python benchmarks/kfold_fer4.py [--arch main variant1 variant2] [--data DIR] [--threads 1]
[key=value ...]`` (overrides of the default recipe, e.g. ``epochs=60``). On this project's 2-core machines
one architecture takes roughly 20-40 minutes; run architectures as separate processes to use both cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch

from fer_core.config import SplitConfig, TrainConfig, from_dict, parse_overrides
from fer_core.crossval import run_kfold
from fer_core.data import load_dataset
from fer_core.models import list_models

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="*", default=list_models())
    p.add_argument("--data", help="canonical fer4 folder (default: import into a temp folder)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write folds.parquet/predictions.parquet per arch here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(canonical_fer4(args.data)).base()
    split = SplitConfig(k=args.k)
    print(f"fer4: {len(ds)} images, classes {ds.classes}; {args.k}-fold; "
          f"torch threads {torch.get_num_threads()}")
    for arch in args.arch:
        cfg = from_dict(TrainConfig, {**dataclasses.asdict(TrainConfig()), **parse_overrides(args.overrides),
                                      "arch": arch}, "command line")
        start = time.perf_counter()
        folds, preds, _ = run_kfold(cfg, split, ds)
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
