"""The canonical dataset: what ``study.prepare`` writes and everything else reads.

A canonical dataset is a folder with three files:

- ``manifest.parquet``: one row per unique image, in the row order of ``pixels.npy``. Columns:
  ``image_id`` (hash of the decoded pixels), ``label`` (class name), ``source_path`` (relative to the
  imported root), ``subset`` (``"base"`` for the dataset proper, or the name of an extra-images folder
  such as ``"extra"``), then one column per attribute (``gender``, ``age``, ...; null where unknown).
- ``pixels.npy``: uint8 array (N, H, W), memory-mappable.
- ``import_report.json``: counts per class and group, every file skipped or merged and why, and the
  class order (``classes``) that label indices refer to.

The same :class:`FaceDataset` is produced in memory by :mod:`fer_core.synthetic`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
PIXELS = "pixels.npy"
REPORT = "import_report.json"
BASE_SUBSET = "base"
FIXED_COLUMNS = ("image_id", "label", "source_path", "subset")

_MISSING = "{0}: not a canonical dataset (missing {1}); create one with `python -m study.prepare`"
_MISMATCH = "{0}: manifest has {1} rows but pixels.npy has {2} images; re-run study.prepare"
_BAD_LABEL = "{0}: label {1!r} is not one of the classes {2}"


def image_id(pixels: np.ndarray) -> str:
    """Content hash of decoded pixels (shape included), used to join copies and merge duplicates."""
    arr = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha1(str(arr.shape).encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class FaceDataset:
    """Decoded images with labels and attributes, all in memory (or memory-mapped).

    Parameters
    ----------
    pixels
        uint8 array (N, H, W).
    manifest
        One row per image, columns as described in the module docstring.
    classes
        Class names; label index ``i`` means ``classes[i]``.
    name
        Short name for logs and result tables.
    """

    pixels: np.ndarray
    manifest: pd.DataFrame
    classes: tuple[str, ...]
    name: str = "dataset"
    report: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.manifest) != len(self.pixels):
            raise ValueError(_MISMATCH.format(self.name, len(self.manifest), len(self.pixels)))
        unknown = set(self.manifest["label"].unique()) - set(self.classes)
        if unknown:
            raise ValueError(_BAD_LABEL.format(self.name, sorted(unknown)[0], list(self.classes)))

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def labels(self) -> np.ndarray:
        """Integer labels (N,) indexing :attr:`classes`."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return self.manifest["label"].map(lookup).to_numpy(dtype=np.int64)

    @property
    def attributes(self) -> tuple[str, ...]:
        """Names of the attribute columns (gender, age, ...)."""
        return tuple(c for c in self.manifest.columns if c not in FIXED_COLUMNS)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return tuple(self.pixels.shape[1:3])

    def subset(self, mask: np.ndarray | pd.Series, name: str | None = None) -> FaceDataset:
        """Rows where ``mask`` is true, as a new dataset (pixels copied into memory)."""
        mask = np.asarray(mask, dtype=bool)
        return FaceDataset(
            pixels=np.asarray(self.pixels[mask]),
            manifest=self.manifest[mask].reset_index(drop=True),
            classes=self.classes,
            name=name or self.name,
            report=self.report,
        )

    def base(self) -> FaceDataset:
        """The dataset proper, without extra-images folders."""
        if "subset" not in self.manifest:
            return self
        return self.subset(self.manifest["subset"].eq(BASE_SUBSET).to_numpy())

    def extras(self) -> FaceDataset:
        """Only the images of extra-images folders (may be empty)."""
        if "subset" not in self.manifest:
            return self.subset(np.zeros(len(self), dtype=bool))
        return self.subset(self.manifest["subset"].ne(BASE_SUBSET).to_numpy())


def load_dataset(path: str | os.PathLike, *, mmap: bool = True) -> FaceDataset:
    """Read a canonical dataset folder written by :func:`save_dataset`."""
    root = Path(path)
    for fname in (MANIFEST, PIXELS):
        if not (root / fname).is_file():
            raise FileNotFoundError(_MISSING.format(root, fname))
    manifest = pd.read_parquet(root / MANIFEST)
    pixels = np.load(root / PIXELS, mmap_mode="r" if mmap else None)
    report = json.loads((root / REPORT).read_text()) if (root / REPORT).is_file() else {}
    classes = tuple(report.get("classes") or sorted(manifest["label"].unique()))
    return FaceDataset(pixels=pixels, manifest=manifest, classes=classes, name=root.name, report=report)


def save_dataset(ds: FaceDataset, out: str | os.PathLike, report: dict | None = None) -> Path:
    """Write ``ds`` as a canonical folder; each file is written to a temporary name, then renamed."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    full_report = dict(report if report is not None else ds.report)
    full_report["classes"] = list(ds.classes)
    _atomic(root / PIXELS, lambda p: np.save(p, np.ascontiguousarray(ds.pixels, dtype=np.uint8)))
    _atomic(root / MANIFEST, lambda p: ds.manifest.to_parquet(p, index=False))
    _atomic(root / REPORT, lambda fh: fh.write(json.dumps(full_report, indent=2, default=str).encode()))
    return root


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, target)
