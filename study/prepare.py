"""Import a raw dataset into the canonical form that every other entry point reads.

Usage (from the repository root)::

    python -m study.prepare experiments/datasets/fer4.toml --root ../shared/data/fer4 --out data/fer4
    python -m study.prepare path/to/folder --out data/mine          # class folders (+ attributes.csv)
    python -m study.prepare synthetic --out data/synth n=2000 seed=0

``SOURCE`` is a dataset spec (``.toml``, see ``experiments/datasets/fer4.toml`` and
:class:`fer_core.importer.DatasetSpec`), a plain folder whose subfolders are classes (an
``attributes.csv``/``attributes.json`` at its top is joined by path), or ``synthetic`` (the built-in
procedural faces of :mod:`fer_core.synthetic`). ``key=value`` arguments override spec keys (or synthetic
config keys). A spec's ``root`` is relative to the spec file; ``--root`` (relative to the working
directory) replaces it. The output folder gets ``manifest.parquet``, ``pixels.npy`` and
``import_report.json``; the command exits 1 with a message naming the file if the source cannot be
imported or nothing usable remains.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import shlex
import sys
from pathlib import Path

from fer_core.config import parse_overrides
from fer_core.data import FaceDataset, save_dataset
from fer_core.dataset_spec import IMAGE_FITS, DatasetError, DatasetSpec, folder_spec, load_spec
from fer_core.importer import import_dataset
from study.common import run_cli

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
SMOKE_SYNTHETIC_N = 64

_NO_SOURCE = "{0}: no such spec file or folder"
_NO_SYNTHETIC = "synthetic data needs fer_core.synthetic, which is not available"
_BAD_SYNTHETIC = "synthetic: {0}"
_WROTE = "wrote %d images (%s) to %s"
_BAD_SIZE = "--size must be >= 8 pixels, got {0}"
_ONE_CLASS = ("{0}: the dataset has only the class(es) {1}; no model can be trained on it. Was one class "
              "folder given instead of the folder that holds the class folders?")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m study.prepare``."""
    parser = argparse.ArgumentParser(prog="python -m study.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("source", help="dataset spec (.toml), folder of class folders, or 'synthetic'")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override spec keys (e.g. image_size=64) or synthetic config keys (n=500)")
    parser.add_argument("--out", required=True, type=Path, help="output folder of the canonical dataset")
    parser.add_argument("--root", help="dataset root, replacing the spec's `root` (relative to the CWD)")
    parser.add_argument("--size", type=int, help="image height and width in pixels (default: spec, or 48)")
    parser.add_argument("--fit", choices=IMAGE_FITS,
                        help="how a non-square image is made square: keep its centred square (crop), pad "
                             "its short side (pad) or distort it (stretch); default: spec, or crop")
    parser.add_argument("--smoke-test", action="store_true",
                        help="read only a few files per folder (or 64 synthetic faces): a quick check")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the import; 0 on success, 1 with a logged message if nothing could be imported."""
    args = build_parser().parse_intermixed_args(argv)  # key=value may follow the options
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.size is not None and args.size < 8:
            raise DatasetError(_BAD_SIZE.format(args.size))
        ds = load_source(args)
    except DatasetError as exc:
        logger.error("%s", exc)
        return 1
    if len(ds.classes) < 2:
        logger.warning(_ONE_CLASS.format(args.source, list(ds.classes)))
    report = {**ds.report, "command": shlex.join(["python", "-m", "study.prepare",
                                                   *(sys.argv[1:] if argv is None else argv)])}
    save_dataset(ds, args.out, report)
    log_summary(ds, report)
    logger.info(_WROTE, len(ds), ", ".join(ds.classes), args.out)
    return 0


def load_source(args: argparse.Namespace) -> FaceDataset:
    """The dataset named by ``args.source``: synthetic, a spec file, or a plain folder."""
    if args.source == SYNTHETIC:
        return _synthetic(args)
    source = Path(args.source)
    if source.is_file():
        spec = load_spec(source, args.overrides)
    elif source.is_dir():
        spec = folder_spec(source, args.overrides)
    else:
        raise DatasetError(_NO_SOURCE.format(source))
    return import_dataset(_with_args(spec, args), smoke_test=args.smoke_test)


def _with_args(spec: DatasetSpec, args: argparse.Namespace) -> DatasetSpec:
    changes = {}
    if args.root is not None:
        changes["root"] = args.root
    if args.size is not None:
        changes["image_size"] = args.size
    if args.fit is not None:
        changes["image_fit"] = args.fit
    return dataclasses.replace(spec, **changes)


def _synthetic(args: argparse.Namespace) -> FaceDataset:
    """The built-in synthetic faces, with ``key=value`` overrides of its config (imported lazily)."""
    if importlib.util.find_spec("fer_core.synthetic") is None:
        raise DatasetError(_NO_SYNTHETIC)
    from fer_core.synthetic import make_dataset

    try:
        overrides = parse_overrides(args.overrides)
        if args.smoke_test:
            overrides.setdefault("n", SMOKE_SYNTHETIC_N)
        if args.size is not None:
            overrides["image_size"] = args.size
        return make_dataset(**overrides)
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(_BAD_SYNTHETIC.format(exc.args[0] if exc.args else exc)) from None


def log_summary(ds: FaceDataset, report: dict) -> None:
    """Log rows per subset and class, base rows per group, skips, merges, conflicts and notes."""
    counts = report.get("counts", {})
    for subset, per_class in counts.get("rows", {}).items():
        logger.info("rows %s: %s", subset, per_class)
    for attr, groups in counts.get("groups", {}).items():
        logger.info("base rows by %s: %s", attr, groups)
    for key in ("skipped", "merged", "label_conflicts", "attribute_conflicts"):
        logger.info("%s: %d %s", key, len(report.get(key, [])), counts.get(key, {}))
    for check in report.get("expected", []):
        log = logger.info if check["ok"] else logger.warning
        log("expected %s = %s, found %s", check["what"], check["expected"], check["found"])
    for note in report.get("notes", []):
        logger.info("note: %s", note)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.prepare"))
