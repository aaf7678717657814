"""Seeds and test-time shifts: how far averaging one recipe's models moves its 5-fold fer4 score.

For each seed, trains one recipe (default: ``main`` with the default recipe) on the k folds of fer4 and
keeps every test image's probabilities under three test-time views: ``flip`` (the average over the image
and its mirror image, which is what every entry point scores), ``shift5`` and ``shift9`` (the same average
over 5 or 9 positions shifted by up to 2 pixels, borders replicated). Prints, per view, each seed alone
and the ensembles of the first n seeds (their probabilities averaged per image), per fold and as mean ±
std, each with its paired difference to the first seed alone under ``flip`` (95% t interval over folds).

Run: ``python benchmarks/seed_ensemble_fer4.py [--data DIR] [--arch main] [--seeds 0 1 2 3 4]
[--folds 0 1] [--out DIR] [--threads 1] [key=value ...]``. With ``--out``, each seed's predictions go to
``DIR/seed<S>.parquet`` and are read back from there when present, so seeds can be shared out over
processes (one per core, each with its own ``--seeds``) and a last call with every seed only scores. One
seed of ``main`` takes about 18 minutes on one core of this project's 2-core machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ensemble_fer4  # noqa: E402  (per-image probability averaging and the paired difference)
import kfold_fer4  # noqa: E402  (the fer4 import and the fold runs)

from fer_core.config import SplitConfig, TrainConfig, config_hash, from_dict, parse_overrides  # noqa: E402
from fer_core.crossval import network_input, prediction_frame  # noqa: E402
from fer_core.data import FaceDataset  # noqa: E402
from fer_core.training import to_tensor  # noqa: E402

_CROSS = [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]
VIEWS = {"flip": [(0, 0)], "shift5": _CROSS, "shift9": _CROSS + [(2, 2), (2, -2), (-2, 2), (-2, -2)]}
PAD = 3


def shifted(x: torch.Tensor, dy: int, dx: int, pad: int = PAD) -> torch.Tensor:
    """``x`` (N, C, H, W) moved by ``dy`` rows and ``dx`` columns, the uncovered border replicated."""
    if not (dy or dx):
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


@torch.no_grad()
def view_probs(model: nn.Module, x: torch.Tensor, shifts: list[tuple[int, int]]) -> np.ndarray:
    """Softmax probabilities averaged over ``shifts`` of ``x`` and their mirror images."""
    model.eval()
    views = [v for dy, dx in shifts for v in (shifted(x, dy, dx), shifted(x, dy, dx).flip(-1))]
    return torch.stack([F.softmax(model(v).float(), dim=1) for v in views]).mean(0).numpy()


def seed_predictions(cfg: TrainConfig, full: FaceDataset, k: int, folds: list[int] | None = None
                     ) -> pd.DataFrame:
    """Test probabilities of ``cfg`` on the ``folds`` (default: all k): one row per (view, fold, image)."""
    row_of = pd.Series(np.arange(len(full)), index=full.manifest["image_id"])
    frames = []
    for run in kfold_fer4.run_folds(cfg, SplitConfig(k=k), full, folds, extra=False):
        rows = row_of.loc[run.predictions["image_id"]].to_numpy()
        model = run.result.model
        x = to_tensor(network_input(full, rows, run.result.face_align), run.result.mean, run.result.std,
                      next(model.parameters()).device)
        for view, shifts in VIEWS.items():
            probs = view_probs(model, x, shifts)
            if view == "flip":  # the same numbers every entry point scores
                scored = run.predictions[[f"p_{c}" for c in full.classes]].to_numpy()
                assert np.allclose(probs, scored, atol=1e-5), "flip view differs from the scored model"
            frame = prediction_frame(full, rows, probs.argmax(1), probs)
            frames.append(frame.assign(view=view, fold=run.fold))
    return pd.concat(frames, ignore_index=True).assign(seed=cfg.seed, recipe=recipe_hash(cfg))


def recipe_hash(cfg: TrainConfig) -> str:
    """Hash of the recipe without its seed: the seeds of one ensemble must share everything else."""
    return config_hash(dataclasses.replace(cfg, seed=0))


def ensemble_table(preds: pd.DataFrame, seeds: list[int], classes: list[str]) -> list[str]:
    """Lines: per view, each seed alone and the first n seeds averaged, vs the first seed's flip score."""
    frame = preds.assign(arch=[f"seed{s}" for s in preds["seed"]])
    members = [f"seed{s}" for s in seeds]
    flip = frame[frame["view"].eq("flip")]
    base = ensemble_fer4.fold_scores(flip, (members[0],), classes)
    lines = []
    for view in VIEWS:
        part = frame[frame["view"].eq(view)]
        combos = [(m,) for m in members] + [tuple(members[:n]) for n in range(2, len(members) + 1)]
        for combo in combos:
            f1 = ensemble_fer4.fold_scores(part, combo, classes)
            reference = view == "flip" and combo == (members[0],)
            vs = "(the reference)" if reference else (
                f"vs {members[0]} flip: " + ensemble_fer4.paired_difference(f1, base))
            name = combo[0] if len(combo) == 1 else f"{len(combo)} seeds averaged"
            lines.append(f"{view:7s} {name:18s} per fold {np.round(f1.to_numpy(), 4).tolist()}  "
                         f"mean {f1.mean():.4f}{spread(f1)}  {vs}")
    return lines


def spread(values: pd.Series) -> str:
    """`` ± std`` over folds, or nothing for a single fold."""
    return f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="main")
    p.add_argument("--data", help="canonical fer4 folder (default: import into a temp folder)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--folds", nargs="*", type=int, help="run only these folds (default: all k)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="folder for seed<S>.parquet (read back when present)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    full = kfold_fer4.load_fer4(args.data)
    out = Path(args.out) if args.out else None
    frames = []
    for seed in args.seeds:
        cfg = from_dict(TrainConfig, {**dataclasses.asdict(TrainConfig()), **parse_overrides(args.overrides),
                                      "arch": args.arch, "seed": seed}, "command line")
        path = out / f"seed{seed}.parquet" if out else None
        if path is not None and path.exists():
            frames.append(pd.read_parquet(path))
            if set(frames[-1]["recipe"]) != {recipe_hash(cfg)} or set(frames[-1]["seed"]) != {seed}:
                raise SystemExit(f"{path} holds another recipe or seed than --arch {args.arch} --seeds "
                                 f"{seed} {' '.join(args.overrides)}: give another --out folder")
            print(f"seed {seed}: read {path}", flush=True)
            continue
        start = time.perf_counter()
        frames.append(seed_predictions(cfg, full, args.k, args.folds))
        minutes = (time.perf_counter() - start) / 60
        print(f"seed {seed}: trained {args.k} folds in {minutes:.1f} min", flush=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            frames[-1].to_parquet(path)
    preds = pd.concat(frames, ignore_index=True)
    if args.folds:
        preds = preds[preds["fold"].isin(args.folds)]
    print(f"{args.arch}, folds {sorted(preds['fold'].unique().tolist())} of {args.k}, seeds {args.seeds}, "
          f"overrides {args.overrides or 'none'}")
    for line in ensemble_table(preds, args.seeds, list(full.classes)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
