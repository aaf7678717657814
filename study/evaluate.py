"""Run a saved model on new data: ``python -m study.evaluate --model FILE [FILE ...] --data X``.

With several model files (for example the seeds of one recipe, or its folds' models) each image's class
probabilities are averaged over them, each model preparing the pixels with its own normalisation: an
ensemble, which on fer4 scored 1.0-2.5 points of macro-F1 above one model (see the README).

``X`` is a canonical dataset folder (written by ``study.prepare``), a folder of images (searched
recursively; an image inside a folder named after one of the model's classes — after ``--class-map``
renaming, e.g. ``--class-map Engaged=Focused`` — is labelled with it; images in folders named otherwise
are predicted, not scored, and counted in a warning), or a single image file. Prints the
predictions (and accuracy, macro-F1 and the confusion matrix where labels are known) and writes
``predictions.parquet`` and ``metrics.json`` to ``--out``. Files that cannot be decoded are skipped,
counted and listed, never silently dropped. A non-square image is made square as ``--fit`` says
(default: its centred square, as ``study.prepare`` does); its original size is kept in the table.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from fer_core.checkpoint import SavedModel, load_model
from fer_core.data import image_id, load_dataset
from fer_core.dataset_spec import IMAGE_FITS
from fer_core.importer import BadImage, read_gray, to_square
from fer_core.metrics import classification_metrics, confusion
from fer_core.training import predict_saved
from study.common import make_run_dir, run_cli, setup_logging, write_table

logger = logging.getLogger(__name__)

_NO_IMAGES = "{0}: no decodable images found ({1} files skipped); nothing to evaluate"
_NOT_FOUND = "{0}: no such file or folder"
_SIZE = "{0}: images are {1}, the model expects {2}; re-import with study.prepare --size {3}"
_BAD_MAP_ITEM = "--class-map {0!r}: expected FOLDER=CLASS, e.g. --class-map Engaged=Focused"
_BAD_MAP = "--class-map {0}={1}: {1!r} is not one of the model's classes {2}"
_UNMATCHED = ("{0}: {1} images carry labels that are not the model's classes {2}: {3}; they are predicted "
              "but not scored. Rename them with --class-map LABEL=CLASS (e.g. --class-map {4}=...)")
_NON_SQUARE = ("%d of %d images were not square; each was made square by --fit %s before resizing to %dx%d "
               "(their sizes are in the table's original_size column)")
_MISMATCH = ("{0}: its {1} {2} differ from {3}'s {4}; models averaged together need the same classes, "
             "in the same order, and the same input size")
_ABSENT = ("classes {0} have no labelled image here: the macro averages count them as 0; macro-F1 over the "
           "{1} classes present: {2:.4f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m study.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, nargs="+", metavar="FILE",
                   help="model file (.pt) saved by study.kfold, study.tune or study.bias_sweep; with "
                        "several, their class probabilities are averaged")
    p.add_argument("--data", required=True, help="canonical dataset folder, image folder, or one image")
    p.add_argument("--class-map", nargs="*", default=[], metavar="FOLDER=CLASS",
                   help="rename label folders to the model's class names")
    p.add_argument("--fit", choices=IMAGE_FITS, default="crop",
                   help="how a non-square image is made square: keep its centred square (crop, the default "
                        "of study.prepare), pad its short side (pad) or distort it (stretch); use what the "
                        "model's training data was imported with")
    p.add_argument("--out", help="output folder (default results/evaluate-<time>)")
    p.add_argument("--show", type=int, default=20, help="print at most this many predictions (0: none)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load_inputs(data: Path, saved: SavedModel, class_map: dict[str, str], fit: str = "crop"
                ) -> tuple[np.ndarray, pd.DataFrame, list[dict]]:
    """Pixels (N, H, W), a frame with ``source_path``/``label`` (null if unknown), and skipped files.

    Image files are made square as ``fit`` says (:func:`fer_core.importer.to_square`), and the frame gets
    their ``original_size`` ("WxH"); a canonical dataset's pixels are used as they are.
    """
    if (data / "manifest.parquet").is_file():
        ds = load_dataset(data)
        if ds.image_size != saved.input_size:
            raise ValueError(_SIZE.format(data, ds.image_size, saved.input_size, saved.input_size[0]))
        frame = ds.manifest.reset_index(drop=True)
        if "subset" in frame and frame["subset"].nunique() > 1:
            logger.info("%s: images per subset %s (all are predicted)", data,
                        frame["subset"].value_counts().to_dict())
        frame["label"] = known_labels(frame["label"].map(lambda c: class_map.get(c, c)), saved, data)
        return np.asarray(ds.pixels), frame, []
    if not data.exists():
        raise FileNotFoundError(_NOT_FOUND.format(data))
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.is_file())
    pixels, rows, skipped, non_square = [], [], [], 0
    for path in files:
        try:
            gray = read_gray(path)
        except BadImage as exc:
            skipped.append({"path": str(path), "reason": exc.args[0], "detail": exc.args[1]})
            logger.warning("skipped %s: %s", path, exc.args[0])
            continue
        # an image's folder is its label; --data itself only when it is named after a class
        folder = class_map.get(path.parent.name, path.parent.name)
        if path.parent == data and folder not in saved.classes:
            folder = None
        pixels.append(to_square(gray, saved.input_size[0], fit))
        non_square += gray.width != gray.height
        rows.append({"source_path": str(path), "label": folder,
                     "original_size": f"{gray.width}x{gray.height}"})
    if not pixels:
        raise ValueError(_NO_IMAGES.format(data, len(skipped)))
    frame = pd.DataFrame(rows)
    if non_square:
        logger.warning(_NON_SQUARE, non_square, len(frame), fit, *saved.input_size)
    frame["label"] = known_labels(frame["label"], saved, data)
    return np.stack(pixels), frame, skipped


def known_labels(labels: pd.Series, saved: SavedModel, data: Path) -> pd.Series:
    """Labels that are the model's classes; others become null, counted and named in a warning."""
    unmatched = labels[labels.notna() & ~labels.isin(saved.classes)]
    if len(unmatched):
        counts = unmatched.value_counts().to_dict()
        logger.warning(_UNMATCHED.format(data, len(unmatched), list(saved.classes), counts,
                                         next(iter(counts))))
    return labels.where(labels.isin(saved.classes), None)


def load_models(paths: list[str]) -> list[SavedModel]:
    """Every model file, refusing one whose classes or input size differ from the first's."""
    models = [load_model(path) for path in paths]
    for path, saved in zip(paths[1:], models[1:], strict=True):
        for what in ("classes", "input_size"):
            if getattr(saved, what) != getattr(models[0], what):
                raise ValueError(_MISMATCH.format(path, what.replace("_", " "), list(getattr(saved, what)),
                                                  paths[0], list(getattr(models[0], what))))
    return models


def predict(models: list[SavedModel], pixels: np.ndarray, frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``y_pred``, ``confidence`` and ``p_<class>`` columns to ``frame`` (probabilities averaged)."""
    ids = np.array([image_id(p) for p in pixels])  # content hashes: face-mesh landmarks once per image
    probs = np.mean([predict_saved(saved, pixels, ids) for saved in models], axis=0)
    saved = models[0]
    out = frame.copy()
    out["y_pred"] = np.asarray(saved.classes)[probs.argmax(1)]
    out["confidence"] = probs.max(1)
    for j, c in enumerate(saved.classes):
        out[f"p_{c}"] = probs[:, j]
    return out


def score(saved: SavedModel, preds: pd.DataFrame) -> dict:
    """Metrics on the rows whose label is known (empty dict if none)."""
    known = preds[preds["label"].notna()]
    if known.empty:
        return {}
    lookup = {c: i for i, c in enumerate(saved.classes)}
    y_true = known["label"].map(lookup).to_numpy()
    y_pred = known["y_pred"].map(lookup).to_numpy()
    metrics = classification_metrics(y_true, y_pred, saved.classes)
    metrics["n_labelled"] = len(known)
    present = np.unique(y_true)
    if len(present) < len(saved.classes):
        metrics["macro_f1_present"] = float(f1_score(y_true, y_pred, labels=present, average="macro"))
        logger.warning(_ABSENT.format([c for i, c in enumerate(saved.classes) if i not in present],
                                      len(present), metrics["macro_f1_present"]))
    metrics["confusion"] = confusion(y_true, y_pred, len(saved.classes)).tolist()
    return metrics


def parse_class_map(items: list[str]) -> dict[str, str]:
    """``["Engaged=Focused", ...]`` as ``{folder: class}``: split at the first ``=``, names kept as typed."""
    mapping = {}
    for item in items:
        folder, sep, name = item.partition("=")
        if not (folder and sep and name):
            raise ValueError(_BAD_MAP_ITEM.format(item))
        mapping[folder] = name
    return mapping


def main(argv: list[str] | None = None) -> int:
    """Predict with a saved model (or the average of several) and report metrics where labels exist."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    models = load_models(args.model)
    saved = models[0]
    class_map = parse_class_map(args.class_map)
    for folder, name in class_map.items():
        if name not in saved.classes:
            raise ValueError(_BAD_MAP.format(folder, name, list(saved.classes)))
    pixels, frame, skipped = load_inputs(Path(args.data), saved, class_map, args.fit)
    preds = predict(models, pixels, frame)
    metrics = score(saved, preds)
    out = Path(args.out) if args.out else make_run_dir("results", "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    model = args.model[0] if len(args.model) == 1 else args.model  # one path, or the ensemble's list
    write_table(preds, out / "predictions.parquet", model=json.dumps(model) if len(args.model) > 1 else model)
    report = {"model": model, "data": str(args.data), "fit": args.fit, "n_images": len(preds),
              "skipped": skipped, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    cols = ["source_path", "label", "y_pred", "confidence"]
    if args.show > 0:  # --show 0: the counts and metrics only
        print(preds[cols].head(args.show).to_string(index=False))
    by = f" by the average of {len(models)} models" if len(models) > 1 else ""
    print(f"{len(preds)} images predicted{by}, {len(skipped)} files skipped")
    if metrics:
        print(f"on {metrics['n_labelled']} labelled images: accuracy {metrics['accuracy']:.4f}, "
              f"macro-F1 {metrics['macro_f1']:.4f}")
        print(f"confusion (rows true, columns predicted; {', '.join(saved.classes)}):")
        print(np.array(metrics["confusion"]))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.evaluate"))
