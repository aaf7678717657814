"""Face-mesh landmarks beside the CNN: does face geometry from a pretrained model add to fer4's macro-F1.

Every recipe probe of ``study.tune``'s CNNs stopped near macro-F1 0.82 on fer4's 2194 images (README,
"Which model"). This script measures an input the CNNs do not have: the 468 landmarks of MediaPipe's
face mesh, a model Google built for effects on phone-camera faces. Its publications do not name FER-2013
(from which fer4's images are sampled) among its training data, unlike the expression models of pip
packages, which are trained on FER-2013 and have seen fer4's test images; this cannot be checked from
here. It works in two steps, in two Python environments:

1. ``extract`` runs the face mesh on every image of a canonical dataset (upscaled to ``--size`` pixels,
   default 192, the mesh's input size) and writes the landmarks, NaN where no face was found, with a
   fingerprint of the dataset's pixels. It needs ``mediapipe==0.10.14``, the last release whose wheel
   carries the face-mesh model (newer ones download models at run time), in an environment of its own:
   that release needs ``protobuf<5`` and the project's tensorboard needs ``protobuf>=6.31``::

       python3 -m venv .venv-mp && .venv-mp/bin/pip install mediapipe==0.10.14
       .venv-mp/bin/python benchmarks/landmarks_fer4.py extract --data data/fer4 --out data/fer4-mesh.npz

2. ``score`` (the project's environment) reads test predictions of k folds (``predictions.parquet`` of
   ``benchmarks/kfold_fer4.py --out``, ``study.kfold`` or a bias sweep, as ``benchmarks/ensemble_fer4.py``)
   and, fold by fold, fits a logistic regression on the landmarks of the images of the *other* folds (the
   fold's training images; its C chosen by a 3-fold search inside them), predicts the test fold, and
   averages those class probabilities with the CNN's, equal weights. It prints, per architecture, the
   CNN alone, the landmarks alone and the average: macro-F1 per fold, mean ± std and the paired
   difference to the CNN with its 95% t interval, and each row's gender gap. With several architectures
   (or seeds, named apart as ``NAME=PATH``) it also compares their average with and without landmarks::

       python benchmarks/landmarks_fer4.py score --data data/fer4 --landmarks data/fer4-mesh.npz
           results/kfold-fer4/main/predictions.parquet   # one command line

   A test image with no face found gets the training images' class shares from the landmark side, so
   the average is mostly the CNN's decision (nudged towards the common classes). The landmarks are
   normalised per face: centred, turned so the line between the outer eye corners is level, and scaled
   to unit spread; only x and y are used (``--dims 3`` adds the mesh's depth estimate).

The test fold never reaches the landmark model: it is fitted on the other folds' images only.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ensemble_fer4, imported where needed

N_LANDMARKS = 468  # face mesh without iris refinement
EYE_CORNERS = (33, 263)  # the outer corners of the two eyes in MediaPipe's face-mesh numbering


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


def extract(data: Path, out: Path, size: int) -> None:
    """Face-mesh landmarks of every image of ``data/pixels.npy`` (row order kept) to ``out`` (.npz)."""
    pixels = np.load(need_file(data / "pixels.npy", "--data is a canonical dataset folder (study.prepare)"))
    try:
        import cv2
        import mediapipe as mp
    except ImportError as err:
        raise SystemExit(f"extract needs mediapipe 0.10.14 in its own environment ({err}); see this "
                         "script's docstring") from None
    if not hasattr(mp, "solutions"):
        raise SystemExit(f"mediapipe {mp.__version__} has no bundled face mesh: install mediapipe==0.10.14")
    landmarks = np.full((len(pixels), N_LANDMARKS, 3), np.nan, dtype=np.float32)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                         min_detection_confidence=0.1) as mesh:
        for i, image in enumerate(pixels):
            big = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
            found = mesh.process(cv2.cvtColor(big, cv2.COLOR_GRAY2RGB)).multi_face_landmarks
            if found:
                landmarks[i] = [(p.x, p.y, p.z) for p in found[0].landmark]
    missing = int(np.isnan(landmarks[:, 0, 0]).sum())
    np.savez_compressed(out, landmarks=landmarks, pixels_sha256=pixels_fingerprint(pixels),
                        size=size, mediapipe=mp.__version__)
    print(f"{out}: landmarks of {len(pixels) - missing} of {len(pixels)} images; no face found in {missing}")


def normalise(landmarks: np.ndarray, dims: int = 2) -> np.ndarray:
    """Flat per-face features, invariant to the face's position, in-plane rotation and size.

    ``landmarks`` is (N, 468, 3) in image coordinates; rows of NaN (no face) stay NaN.
    """
    points = np.asarray(landmarks, dtype=np.float64)[:, :, :dims].copy()
    points -= points.mean(axis=1, keepdims=True)
    left, right = points[:, EYE_CORNERS[0], :2], points[:, EYE_CORNERS[1], :2]
    angle = np.arctan2(right[:, 1] - left[:, 1], right[:, 0] - left[:, 0])
    cos, sin = np.cos(-angle)[:, None], np.sin(-angle)[:, None]
    x, y = points[:, :, 0].copy(), points[:, :, 1].copy()
    points[:, :, 0], points[:, :, 1] = cos * x - sin * y, sin * x + cos * y
    spread = np.sqrt((points[:, :, :2] ** 2).sum(axis=(1, 2)) / points.shape[1])
    points /= spread[:, None, None]
    return points.reshape(len(points), -1)


def landmark_probabilities(features: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                           classes: list[str], seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression on ``features`` (rows: one test image each).

    Each row's probabilities come from a model fitted on the rows of the other folds only. Rows with NaN
    features (no face) get the class shares of the fitted rows.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    found = ~np.isnan(features).any(axis=1)
    probs = np.zeros((len(labels), len(classes)))
    for fold in np.unique(folds):
        test, fit = folds == fold, (folds != fold) & found
        search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                              {"logisticregression__C": [0.01, 0.1, 1.0]}, scoring="f1_macro",
                              cv=StratifiedKFold(3, shuffle=True, random_state=seed))
        search.fit(features[fit], labels[fit])
        probs[test] = [np.mean(labels[fit] == c) for c in classes]
        if (test & found).any():
            # a class with no fitted image is never predicted: its column stays 0
            fitted = search.predict_proba(features[test & found])
            columns = [classes.index(c) for c in search.classes_]
            probs[np.ix_(test & found, columns)] = fitted
            probs[np.ix_(test & found, [i for i in range(len(classes)) if i not in columns])] = 0.0
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
    if not {"landmarks", "pixels_sha256", "size", "mediapipe"} <= set(saved.files):
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
    features = normalise(saved["landmarks"], args.dims)
    missing = int(np.isnan(features).any(axis=1).sum())
    print(f"{args.landmarks}: no face found in {missing} of {len(features)} images "
          f"(mediapipe {saved['mediapipe']}, {int(saved['size'])} px); features: {args.dims}-d landmarks")
    fused, by_split = [], {}
    for arch, part in frame.groupby("arch", sort=True):
        part = part.sort_values(["fold", "image_id"]).reset_index(drop=True)
        if part["image_id"].duplicated().any():
            raise SystemExit(f"{arch}: an image is tested in two folds; give one k-fold run per architecture")
        split = tuple(zip(part["fold"], part["image_id"], strict=True))
        if split not in by_split:  # architectures tested on the same folds share one landmark model
            by_split[split] = landmark_probabilities(features[row.loc[part["image_id"]].to_numpy()],
                                                     part["y_true"].to_numpy(), part["fold"].to_numpy(),
                                                     classes)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="face-mesh landmarks of a dataset (needs mediapipe 0.10.14)")
    ex.add_argument("--data", required=True, type=Path, help="canonical dataset folder (study.prepare)")
    ex.add_argument("--out", required=True, type=Path, help="landmarks file to write (.npz)")
    ex.add_argument("--size", type=int, default=192, help="images are upscaled to this many pixels")
    sc = sub.add_parser("score", help="CNN, landmarks and their average on the same k folds")
    sc.add_argument("--data", required=True, help="the canonical dataset the predictions were made on")
    sc.add_argument("--landmarks", required=True, help="file written by extract")
    sc.add_argument("--dims", type=int, choices=(2, 3), default=2, help="landmark coordinates used")
    sc.add_argument("predictions", nargs="+", metavar="[NAME=]PREDICTIONS",
                    help="predictions.parquet of k-fold runs; NAME= renames its architecture (seeds apart)")
    args = p.parse_args()
    if args.command == "extract":
        extract(args.data, args.out, args.size)
    else:
        score(args)


if __name__ == "__main__":
    main()
