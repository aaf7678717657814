"""Face-mesh landmarks beside the CNN: does face geometry from a pretrained model add to fer4's macro-F1.

Every recipe probe of ``study.tune``'s CNNs stopped near macro-F1 0.82 on fer4's 2194 images (README,
"Which model"). This script measures an input the CNNs do not have: the 468 landmarks of MediaPipe's
face mesh, a model Google built for effects on phone-camera faces. Its publications do not name FER-2013
(from which fer4's images are sampled) among its training data, unlike the expression models of pip
packages, which are trained on FER-2013 and have seen fer4's test images; this cannot be checked from
here. The tool itself averages the landmark model in with ``landmark_weight`` (``fer_core.landmarks``);
this script measures it beside saved CNN predictions, without training again, in two steps:

1. ``extract`` runs the tool's face mesh (``fer_core.landmarks.FaceMesh``; get the model file once with
   ``python -m study.landmarks fetch``) on every image of a canonical dataset and writes the landmarks
   with a fingerprint of the dataset's pixels::

       python benchmarks/landmarks_fer4.py extract --data data/fer4 --out data/fer4-mesh.npz

2. ``score`` reads test predictions of k folds (``predictions.parquet`` of
   ``benchmarks/kfold_fer4.py --out``, ``study.kfold`` or a bias sweep, as ``benchmarks/ensemble_fer4.py``)
   and, fold by fold, fits a logistic regression on the landmarks of the images of the *other* folds (the
   fold's training images; its C chosen by a 3-fold search inside them; the tool's own landmark model,
   ``fer_core.landmarks.fit_landmark_head``), predicts the test fold, and
   averages those class probabilities with the CNN's, equal weights. It prints, per architecture, the
   CNN alone, the landmarks alone and the average: macro-F1 per fold, mean ± std and the paired
   difference to the CNN with its 95% t interval, and each row's gender gap. With several architectures
   (or seeds, named apart as ``NAME=PATH``) it also compares their average with and without landmarks::

       python benchmarks/landmarks_fer4.py score --data data/fer4 --landmarks data/fer4-mesh.npz
           results/kfold-fer4/main/predictions.parquet   # one command line

   Files written by stop 24's ``extract``, which ran MediaPipe's own pipeline (``mediapipe==0.10.14``
   in a second environment), are read too; there, a test image with no face found gets the training
   images' class shares from the landmark side. The landmarks are
   normalised per face: centred, turned so the line between the outer eye corners is level, and scaled
   to unit spread; only x and y are used (``--dims 3`` adds the mesh's depth estimate). ``extract`` also
   keeps the mesh's inner layers (``FaceMesh.embed``, what ``landmark_input = "mesh"`` reads), and
   ``score --input mesh`` fits the logistic regression on those instead of the points.

The test fold never reaches the landmark model: it is fitted on the other folds' images only.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ensemble_fer4, imported where needed

from fer_core.landmarks import EYE_CORNERS, N_LANDMARKS, landmark_features, normalise  # noqa: E402,F401


def pixels_fingerprint(pixels: np.ndarray) -> str:
    """sha256 of the pixel array's shape and bytes: the landmarks belong to exactly these images."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def need_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else exit with one line naming it and what it should be."""
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such file; {what}")
    return Path(path)


def extract(data: Path, out: Path) -> None:
    """Face-mesh landmarks of every image of ``data/pixels.npy`` (row order kept) to ``out`` (.npz)."""
    from fer_core.landmarks import MESH_SHA256, FaceMesh

    pixels = np.load(need_file(data / "pixels.npy", "--data is a canonical dataset folder (study.prepare)"))
    try:
        mesh = FaceMesh()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    landmarks, inner = mesh(pixels), mesh.embed(pixels)
    np.savez_compressed(out, landmarks=landmarks, inner=inner, pixels_sha256=pixels_fingerprint(pixels),
                        mesh_sha256=MESH_SHA256)
    print(f"{out}: landmarks and the mesh's inner layers of {len(pixels)} images")


def landmark_probabilities(features: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                           classes: list[str], seed: int = 0, kind: str = "points") -> np.ndarray:
    """Out-of-fold class probabilities of the tool's landmark model (rows: one test image each).

    Each row's probabilities come from :func:`fer_core.landmarks.fit_landmark_head` fitted on the rows of
    the other folds only. Rows with NaN features (no face found, in files of MediaPipe's own pipeline)
    get the class shares of the fitted rows.
    """
    from fer_core.landmarks import fit_landmark_head

    codes = np.array([classes.index(c) for c in labels])
    found = ~np.isnan(features).any(axis=1)
    probs = np.zeros((len(labels), len(classes)))
    for fold in np.unique(folds):
        test, fit = folds == fold, (folds != fold) & found
        probs[test] = np.bincount(codes[fit], minlength=len(classes)) / fit.sum()
        if (test & found).any():  # a class with no fitted image is never predicted
            head = fit_landmark_head(features[fit], codes[fit], len(classes), 1.0, seed=seed, kind=kind)
            probs[test & found] = head.predict_proba(features[test & found])
    return probs


def gender_gaps(rows, classes: list[str]):
    """Male - Female accuracy per fold (Fairlearn's MetricFrame), or ``None`` without both genders."""
    import pandas as pd
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import accuracy_score

    if "gender" not in rows or not {"Male", "Female"} <= set(rows["gender"].dropna()):
        return None
    rows = rows[rows["gender"].isin(["Male", "Female"])]
    y_pred = np.asarray(classes)[rows[[f"p_{c}" for c in classes]].to_numpy().argmax(1)]
    acc = MetricFrame(metrics=accuracy_score, y_true=rows["y_true"], y_pred=y_pred,
                      sensitive_features={"gender": rows["gender"].to_numpy()},
                      control_features={"fold": rows["fold"].to_numpy()}).by_group
    return pd.Series({fold: acc.loc[(fold, "Male")] - acc.loc[(fold, "Female")]
                      for fold in sorted(rows["fold"].unique())})


def load_predictions(specs: list[str]):
    """The predictions of ``[NAME=]PATH`` arguments; ``NAME`` renames the one architecture of ``PATH``.

    Each file is read as ``benchmarks/ensemble_fer4.py`` reads it (its lowest seed, unbiased and
    unmitigated runs of a sweep), so runs of one architecture with other seeds can be told apart by name.
    """
    import ensemble_fer4
    import pandas as pd

    frames = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).is_file() else ("", "", spec)
        need_file(Path(path), "give predictions.parquet files of k-fold runs")
        frame = ensemble_fer4.load([path])
        if name:
            if frame["arch"].nunique() != 1:
                raise SystemExit(f"{spec}: a name renames one architecture; {path} holds "
                                 f"{sorted(frame['arch'].unique())}")
            frame = frame.assign(arch=name)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    dup = frame.duplicated(["arch", "fold", "image_id"])
    if dup.any():
        raise SystemExit(f"{int(dup.sum())} images are given twice for one architecture: name the runs "
                         "of one architecture apart (NAME=PATH)")
    return frame


def score(args: argparse.Namespace) -> None:
    import ensemble_fer4  # the fold scores and the paired difference
    import pandas as pd

    from fer_core.data import load_dataset

    try:
        dataset = load_dataset(args.data)  # memory-mapped pixels and the manifest
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    pixels = dataset.pixels
    saved = np.load(need_file(Path(args.landmarks), "--landmarks is a file written by extract"))
    if not {"landmarks", "pixels_sha256"} <= set(saved.files):
        raise SystemExit(f"{args.landmarks}: not a landmarks file of extract (it holds {saved.files})")
    if str(saved["pixels_sha256"]) != pixels_fingerprint(pixels):
        raise SystemExit(f"{args.landmarks}: its landmarks were extracted from other images than "
                         f"{args.data}/pixels.npy; run extract on that dataset")
    row = pd.Series(np.arange(len(dataset.manifest)), index=dataset.manifest["image_id"])
    frame = load_predictions(args.predictions)
    classes = sorted(c.removeprefix("p_") for c in frame.columns if c.startswith("p_"))
    cols = [f"p_{c}" for c in classes]
    unknown = ~frame["image_id"].isin(row.index)
    if unknown.any():
        raise SystemExit(f"{int(unknown.sum())} predicted images are not in {args.data} "
                         f"(e.g. {frame.loc[unknown, 'image_id'].iloc[0]}): give the dataset they came from")
    if args.input == "mesh":
        if "inner" not in saved.files:
            raise SystemExit(f"{args.landmarks}: no inner layers of the mesh in it (written by an older "
                             "extract); run extract again")
        features = saved["inner"].astype(np.float64)
    else:
        features = normalise(saved["landmarks"], args.dims)
    missing = int(np.isnan(features).any(axis=1).sum())
    source = (f"mediapipe {saved['mediapipe']}" if "mediapipe" in saved.files
              else f"the tool's face mesh {str(saved['mesh_sha256'])[:12]}")
    print(f"{args.landmarks}: no face found in {missing} of {len(features)} images ({source}); "
          "features: " + ("the mesh's inner layers" if args.input == "mesh" else f"{args.dims}-d landmarks"))
    fused, by_split = [], {}
    for arch, part in frame.groupby("arch", sort=True):
        part = part.sort_values(["fold", "image_id"]).reset_index(drop=True)
        if part["image_id"].duplicated().any():
            raise SystemExit(f"{arch}: an image is tested in two folds; give one k-fold run per architecture")
        split = tuple(zip(part["fold"], part["image_id"], strict=True))
        if split not in by_split:  # architectures tested on the same folds share one landmark model
            by_split[split] = landmark_probabilities(features[row.loc[part["image_id"]].to_numpy()],
                                                     part["y_true"].to_numpy(), part["fold"].to_numpy(),
                                                     classes, kind=args.input)
        mesh = by_split[split]
        alone = part.assign(arch=f"{arch} landmarks", **dict(zip(cols, mesh.T, strict=True)))
        both = part.assign(arch=f"{arch} + landmarks",
                           **dict(zip(cols, ((part[cols].to_numpy() + mesh) / 2).T, strict=True)))
        fused.append(both)
        table = pd.concat([part, alone, both], ignore_index=True)
        cnn = ensemble_fer4.fold_scores(table, (arch,), classes)
        base_gaps = gender_gaps(part, classes)
        for name in (arch, f"{arch} landmarks", f"{arch} + landmarks"):
            f1 = ensemble_fer4.fold_scores(table, (name,), classes)
            line = (f"{name:22s} per fold {np.round(f1.to_numpy(), 4).tolist()}  "
                    f"mean {f1.mean():.4f} ± {f1.std(ddof=1):.4f}")
            if name != arch:
                line += f"  vs {arch}: {ensemble_fer4.paired_difference(f1, cnn)}"
            gaps = gender_gaps(table[table["arch"] == name], classes)
            if gaps is not None:
                line += f"; gender gap (Male - Female accuracy) {100 * gaps.mean():+.1f} points"
                if name != arch:
                    line += f", its change {ensemble_fer4.paired_difference(gaps, base_gaps)}"
            print(line, flush=True)
    archs = sorted(frame["arch"].unique())
    if len(archs) > 1:
        table = pd.concat([frame, *fused], ignore_index=True)
        cnns = ensemble_fer4.fold_scores(table, tuple(archs), classes)
        both = ensemble_fer4.fold_scores(table, tuple(f"{a} + landmarks" for a in archs), classes)
        print(f"{' + '.join(archs)} averaged: mean {cnns.mean():.4f} ± {cnns.std(ddof=1):.4f}; each with "
              f"landmarks, averaged: mean {both.mean():.4f} ± {both.std(ddof=1):.4f}  "
              f"vs the CNNs averaged: {ensemble_fer4.paired_difference(both, cnns)}")


def models(args: argparse.Namespace) -> None:
    """The CNN alone and with its landmark model, fold by fold, from a run trained with landmark_weight."""
    import ensemble_fer4
    import pandas as pd

    from fer_core.checkpoint import load_model
    from fer_core.data import load_dataset
    from fer_core.training import predict_saved

    try:
        dataset = load_dataset(args.data)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    run = Path(args.run)
    preds = pd.read_parquet(need_file(run / "predictions.parquet", "give a study.kfold result folder"))
    row = pd.Series(np.arange(len(dataset.manifest)), index=dataset.manifest["image_id"])
    unknown = ~preds["image_id"].isin(row.index)
    if unknown.any():
        raise SystemExit(f"{int(unknown.sum())} predicted images are not in {args.data}: give the dataset "
                         "the run was trained on")
    classes = list(dataset.classes)
    cols = [f"p_{c}" for c in classes]
    parts = []
    for fold, part in preds.groupby("fold", sort=True):
        saved = load_model(need_file(run / "models" / f"fold{fold}.pt", "the run's fold models"))
        if saved.landmarks is None:
            raise SystemExit(f"{run}/models/fold{fold}.pt: no landmark model (landmark_weight was 0)")
        idx = row.loc[part["image_id"]].to_numpy()
        both = predict_saved(saved, dataset.pixels[idx], part["image_id"].to_numpy())
        gap = float(np.abs(both - part[cols].to_numpy(np.float64)).max())
        if gap > 1e-4:
            raise SystemExit(f"fold {fold}: the saved model predicts {gap:.2g} away from predictions.parquet")
        head, saved.landmarks = saved.landmarks, None
        cnn = predict_saved(saved, dataset.pixels[idx])
        mesh = head.predict_proba(landmark_features(dataset.pixels[idx], part["image_id"].to_numpy(),
                                                    kind=head.features))
        for name, probs in (("CNN", cnn), (f"landmarks ({head.features})", mesh),
                            (f"+ landmarks (weight {head.weight})", both)):
            parts.append(part.assign(arch=name, **dict(zip(cols, probs.T, strict=True))))
    table = pd.concat(parts, ignore_index=True)
    base = ensemble_fer4.fold_scores(table, ("CNN",), classes)
    base_gaps = gender_gaps(table[table["arch"] == "CNN"], classes)
    for name in table["arch"].unique():
        f1 = ensemble_fer4.fold_scores(table, (name,), classes)
        line = (f"{name:26s} per fold {np.round(f1.to_numpy(), 4).tolist()}  "
                f"mean {f1.mean():.4f} ± {f1.std(ddof=1):.4f}")
        if name != "CNN":
            line += f"  vs CNN: {ensemble_fer4.paired_difference(f1, base)}"
        gaps = gender_gaps(table[table["arch"] == name], classes)
        if gaps is not None:
            line += f"; gender gap (Male - Female accuracy) {100 * gaps.mean():+.1f} points"
            if name != "CNN":
                line += f", its change {ensemble_fer4.paired_difference(gaps, base_gaps)}"
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="face-mesh landmarks of a dataset (python -m study.landmarks fetch)")
    ex.add_argument("--data", required=True, type=Path, help="canonical dataset folder (study.prepare)")
    ex.add_argument("--out", required=True, type=Path, help="landmarks file to write (.npz)")
    sc = sub.add_parser("score", help="CNN, landmarks and their average on the same k folds")
    sc.add_argument("--data", required=True, help="the canonical dataset the predictions were made on")
    sc.add_argument("--landmarks", required=True, help="file written by extract")
    sc.add_argument("--dims", type=int, choices=(2, 3), default=2, help="landmark coordinates used")
    sc.add_argument("--input", choices=("points", "mesh"), default="points",
                    help="what the logistic regression reads: the landmarks, or the mesh's inner layers")
    sc.add_argument("predictions", nargs="+", metavar="[NAME=]PREDICTIONS",
                    help="predictions.parquet of k-fold runs; NAME= renames its architecture (seeds apart)")
    md = sub.add_parser("models", help="a run trained with landmark_weight: its CNN alone and with landmarks")
    md.add_argument("run", help="study.kfold result folder (predictions.parquet and models/fold<i>.pt)")
    md.add_argument("--data", required=True, help="the canonical dataset the run was trained on")
    args = p.parse_args()
    if args.command == "extract":
        extract(args.data, args.out)
    elif args.command == "models":
        models(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
