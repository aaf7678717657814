"""Import raw face-image folders into the canonical dataset form of :mod:`fer_core.data`.

One :class:`DatasetSpec` (a small TOML file read by :func:`load_spec`, or built from a plain folder by
:func:`folder_spec`) describes where everything is:

- class folders ``<root>/<classes_dir>/<class>/<image>``; classes are renamed by ``class_map``;
- attribute trees ``<root>/<dir>/<group>/<class>/<image>`` whose images are copies of class-folder images.
  They are joined to the images by decoded pixel content (:func:`fer_core.data.image_id`), never by file
  name, since copies get renamed;
- attribute tables (CSV, or JSON records) keyed by a path relative to ``<root>`` or by a bare file name;
- extra-images folders (class folders whose every image carries fixed attribute values, e.g. "all
  female"): their rows get ``subset = <name>`` instead of ``"base"``.

Every image is decoded by content with PIL (extensions are not trusted: a ``.png`` may hold a JPEG),
converted to one channel, made square as ``image_fit`` says (centre crop by default; the report counts
the non-square files) and resized to ``image_size``. Identical pixels with one label become one row
(the others are listed as merged); identical pixels with different labels are all dropped and listed as
a label conflict. An image that two sources put into different groups of one attribute gets a null value
and is listed as an attribute conflict. A file that cannot be used is listed under ``skipped`` with its
reason; nothing is dropped silently. :func:`import_dataset` returns a :class:`~fer_core.data.FaceDataset`
whose ``report`` is the import report (its keys: :data:`REPORT_KEYS`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from fer_core.config import to_dict
from fer_core.data import BASE_SUBSET, FaceDataset, image_id
from fer_core.dataset_spec import (
    IMAGE_FITS,
    AttributeTable,
    AttributeTree,
    DatasetError,
    DatasetSpec,
    Expected,
    path_problem,
)

logger = logging.getLogger(__name__)

SMOKE_FILES = 16
NULL_GROUP = "null"
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # greyscale deeper than 8 bits

# Skip reasons: constant strings, so the report can count them.
ZERO_BYTE = "zero-byte file"
NOT_IMAGE = "not an image"
CORRUPT = "corrupt or truncated image"
HIDDEN = "hidden file"
UNKNOWN_CLASS = "unknown class folder"
NOT_IN_CLASS = "not in a class folder"
NESTED = "in a folder nested inside a class folder"
NOT_IN_GROUP = "not in a group folder"
NO_MATCH = "matches no imported image"
MATCH_DROPPED = "matches an image dropped for a label conflict"
NO_KEY = "table row has no key"
NO_FILE = "no such file"
NOT_IMPORTED = "names a file that was not imported"
NO_NAME = "no file with this name"
AMBIGUOUS = "file name matches several different images"
SAME_LABEL = "same pixels, same label"
EXTRA_IN_BASE = "extra image duplicates a base image"
DIFFERENT_LABELS = "same pixels, different labels"
TABLE_LABEL = "table label disagrees with the class folder"

_NO_ROOT = "{0}: dataset root not found (set `root` in the spec or pass --root)"
_NO_DIR = "{0}: folder not found ({1} {2!r} of the spec)"
_NO_TABLE = "{0}: attribute table not found"
_BAD_TABLE = "{0}: cannot read attribute table: {1}"
_NO_KEY_COLUMN = "{0}: attribute table has no {1!r} column (columns: {2})"
_NOTHING = ("{0}: nothing usable to import ({1} files skipped: {2}); expected class folders "
            "<root>/<class>/<image>, or write a dataset spec (see experiments/datasets/fer4.toml)")
_SKIP_LOG = "skipped %s: %s%s"
_NON_SQUARE_NOTE = {
    "crop": "non-square images: {n}; each kept its centred square, resized to {size}x{size} "
            "(image_fit = \"crop\"; \"pad\" keeps the whole image, \"stretch\" distorts it)",
    "pad": "non-square images: {n}; each was padded to a square with its median border value, then "
           "resized to {size}x{size} (image_fit = \"pad\")",
    "stretch": "non-square images: {n}; each was stretched to {size}x{size}, distorting the face "
               "(image_fit = \"stretch\"; \"crop\" keeps its proportions)",
}
_MAX_SKIP_LOGS = 10


class BadImage(Exception):
    """A file that cannot be used as an image; ``args`` are (reason, detail)."""


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image scaled to 8 bits (PIL's ``convert("L")`` would clip it at 255).

    Mode ``I`` (32-bit integers, what some readers give 16-bit files) is taken as 16-bit when a value
    exceeds 255, as it is already 8-bit otherwise.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def read_gray(path: Path) -> Image.Image:
    """Decode ``path`` by content as one 8-bit channel, turned upright by its EXIF orientation.

    Raises
    ------
    BadImage
        With a constant reason (:data:`ZERO_BYTE`, :data:`NOT_IMAGE`, :data:`CORRUPT`) and PIL's detail.
    """
    if path.stat().st_size == 0:
        raise BadImage(ZERO_BYTE, "")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # a camera's orientation tag: faces upright
            if img.mode in ("P", "PA"):  # palette transparency must go through RGBA
                img = img.convert("RGBA")
            return _sixteen_bit_to_8(img) if img.mode in WIDE_GRAY_MODES else img.convert("L")
    except Image.UnidentifiedImageError as exc:
        raise BadImage(NOT_IMAGE, str(exc)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(CORRUPT, str(exc)) from None


def to_square(gray: Image.Image, size: int, fit: str = "crop") -> np.ndarray:
    """``gray`` as a ``size`` x ``size`` uint8 array (bilinear resizing).

    A non-square image is first made square as ``fit`` says: ``"crop"`` keeps the centred square (a face
    photo keeps its proportions and loses the sides), ``"pad"`` adds bands of the median border pixel on
    the short side, ``"stretch"`` resizes it as it is, distorting the face. A square image is only resized.
    """
    if fit not in IMAGE_FITS:
        raise ValueError(f"image fit must be one of {list(IMAGE_FITS)}, got {fit!r}")
    width, height = gray.size
    if width != height and fit == "crop":
        gray = ImageOps.fit(gray, (size, size), Image.Resampling.BILINEAR)
    elif width != height and fit == "pad":
        values = np.asarray(gray)
        border = np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])
        gray = ImageOps.pad(gray, (size, size), Image.Resampling.BILINEAR, color=int(np.median(border)))
    elif gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def decode_image(path: Path, size: int, fit: str = "crop") -> np.ndarray:
    """Decode ``path`` by content (extension ignored) as a (size, size) uint8 array; see :func:`to_square`.

    Raises
    ------
    BadImage
        As :func:`read_gray`.
    """
    return to_square(read_gray(path), size, fit)


def natural_key(text: str) -> list:
    """Sort key that puts ``Happy_2`` before ``Happy_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


@dataclass
class _Image:
    path: str  # relative to the dataset root, POSIX separators
    label: str
    subset: str
    pixels: np.ndarray
    image_id: str


@dataclass
class _Row:
    image: _Image  # the copy that is kept
    copies: list[_Image]  # every file with these pixels, the kept one included
    votes: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))

    def extra_copies(self, subset: str) -> list[_Image]:
        """Copies from extra folder ``subset`` merged into this base row."""
        return [c for c in self.copies if c.subset == subset != self.image.subset]


def import_dataset(spec: DatasetSpec, *, smoke_test: bool = False) -> FaceDataset:
    """Import the raw dataset described by ``spec``.

    Parameters
    ----------
    spec
        Validated spec; its ``root`` is used as is (relative to the working directory).
    smoke_test
        Read at most :data:`SMOKE_FILES` files per folder (a fast end-to-end check).

    Returns
    -------
    FaceDataset
        Unique images in manifest order (base first), with the import report as ``report``.

    Raises
    ------
    DatasetError
        A folder named by the spec is missing, or nothing usable remains.
    """
    return _Importer(spec, smoke_test).run()


class _Importer:
    """One import: the state the steps share (rows by image id, and the report lists)."""

    def __init__(self, spec: DatasetSpec, smoke_test: bool) -> None:
        self.spec, self.smoke_test = spec, smoke_test
        self.root = Path(spec.root)
        self.rows: dict[str, _Row] = {}
        self.dropped: set[str] = set()
        self.by_path: dict[str, str] = {}
        self.by_name: dict[str, set[str]] = defaultdict(set)
        self.files: dict[str, Counter] = defaultdict(Counter)  # subset -> class -> decoded files
        self.annotations: dict[str, Counter] = defaultdict(Counter)  # attribute -> group -> files/rows
        self.matched: Counter = Counter()  # attribute -> annotations joined to a row
        self.annotated: dict[str, set[str]] = defaultdict(set)  # attribute -> image ids with annotations
        self.extra_duplicates: dict[str, Counter] = defaultdict(Counter)  # subset -> files, images
        self.non_square: Counter = Counter()  # subset -> decoded files that were not square
        self.attributes: list[str] = []
        self.skip_counts: Counter = Counter()  # reason -> entries, to log only the first few
        self.lists: dict[str, list[dict]] = {k: [] for k in
                                             ("skipped", "merged", "label_conflicts", "attribute_conflicts",
                                              "label_mismatches")}

    def run(self) -> FaceDataset:
        if not self.root.is_dir():
            raise DatasetError(_NO_ROOT.format(self.root))
        images = self._scan_classes(self._folder(self.spec.classes_dir, "classes_dir"), BASE_SUBSET)
        for extra in self.spec.extras:
            images += self._scan_classes(self._folder(extra.dir, "extras dir"), extra.name)
        self._pool(images)
        for table in self.spec.attribute_tables:
            self._apply_table(table)
        for tree in self.spec.attribute_trees:
            self._apply_tree(tree)
        self._apply_extra_attributes()
        if not self.rows:
            reasons = dict(Counter(s["reason"] for s in self.lists["skipped"]))
            raise DatasetError(_NOTHING.format(self.root, len(self.lists["skipped"]), reasons))
        return self._build()

    # ---- reading -------------------------------------------------------------------------------

    def _folder(self, rel: str, what: str) -> Path:
        folder = self.root / rel
        if not folder.is_dir():
            raise DatasetError(_NO_DIR.format(folder, what, rel))
        return folder

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def skip(self, path: str, reason: str, detail: str = "", **extra: Any) -> None:
        """List ``path`` under ``skipped`` with a constant ``reason``; log the first few per reason."""
        entry = {"path": path, "reason": reason, **({"detail": detail} if detail else {}), **extra}
        self.lists["skipped"].append(entry)
        self.skip_counts[reason] += 1
        if self.skip_counts[reason] <= _MAX_SKIP_LOGS:
            logger.warning(_SKIP_LOG, path, reason, f" ({detail})" if detail else "")

    def _decode(self, path: Path, subset: str | None = None) -> np.ndarray | None:
        """Pixels of ``path``, or None when it is skipped; a non-square image of ``subset`` is counted."""
        if path.name.startswith("."):
            self.skip(self._rel(path), HIDDEN)
            return None
        try:
            gray = read_gray(path)
        except BadImage as exc:
            self.skip(self._rel(path), exc.args[0], exc.args[1])
            return None
        if gray.width != gray.height and subset is not None:
            self.non_square[subset] += 1
        return to_square(gray, self.spec.image_size, self.spec.image_fit)

    def _walk(self, folder: Path) -> list[Path]:
        """All files under ``folder`` (sorted; at most :data:`SMOKE_FILES` per folder in a smoke test)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            names = sorted(filenames, key=natural_key)
            found += [Path(dirpath) / n for n in (names[:SMOKE_FILES] if self.smoke_test else names)]
        return found

    def _class_name(self, raw: str) -> str | None:
        """Final class name of folder ``raw``, or None when the spec's class list/map excludes it."""
        spec = self.spec
        final = spec.class_map.get(raw, raw)
        restricted = bool(spec.classes or spec.class_map)
        if restricted and raw not in spec.class_map and final not in spec.classes:
            return None
        return final

    def _scan_classes(self, folder: Path, subset: str) -> list[_Image]:
        """Decode ``folder/<class>/<file>``; loose files, unknown and nested folders are skipped.

        Trees, extras and tables inside ``folder`` (e.g. with ``classes_dir = "."``) are left to their
        own step, and a folder holding one is not a class.
        """
        claimed = self._claimed_inside(folder)
        images = []
        for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
            hidden = entry.name.startswith(".")
            if entry.resolve() in claimed:
                continue
            if entry.is_file():
                self.skip(self._rel(entry), HIDDEN if hidden else NOT_IN_CLASS)
                continue
            holds_claimed = any(entry.resolve() in c.parents for c in claimed)
            label = None if hidden or holds_claimed else self._class_name(entry.name)
            for path in self._walk(entry):
                if label is None:
                    if not any(c == path.resolve() or c in path.resolve().parents for c in claimed):
                        self.skip(self._rel(path), HIDDEN if hidden else UNKNOWN_CLASS)
                elif path.parent != entry:
                    self.skip(self._rel(path), NESTED)
                elif (pixels := self._decode(path, subset)) is not None:
                    images.append(_Image(self._rel(path), label, subset, pixels, image_id(pixels)))
        return images

    def _claimed_inside(self, folder: Path) -> set[Path]:
        """Resolved tree and extras folders and table files strictly inside ``folder``."""
        spec, top = self.spec, folder.resolve()
        rels = [t.dir for t in spec.attribute_trees] + [e.dir for e in spec.extras]
        rels += [t.path for t in spec.attribute_tables]
        return {c for c in ((self.root / r).resolve() for r in rels) if top in c.parents}

    # ---- merging -------------------------------------------------------------------------------

    def _pool(self, images: list[_Image]) -> None:
        """One row per distinct pixels; same label -> merged, different labels -> all dropped."""
        groups: dict[str, list[_Image]] = defaultdict(list)
        for img in images:
            groups[img.image_id].append(img)
            self.files[img.subset][img.label] += 1
            self.by_path[img.path] = img.image_id
            self.by_name[Path(img.path).name].add(img.image_id)
        for iid, copies in groups.items():
            if any(c.subset == BASE_SUBSET for c in copies):
                extras = Counter(c.subset for c in copies if c.subset != BASE_SUBSET)
                for subset, n in extras.items():
                    self.extra_duplicates[subset].update(files=n, images=1)
            labels = sorted({c.label for c in copies})
            if len(labels) > 1:
                self._conflict(iid, copies, DIFFERENT_LABELS)
                continue
            base = [c for c in copies if c.subset == BASE_SUBSET]
            row = _Row(image=(base or copies)[0], copies=copies)
            for other in copies:
                if other is not row.image:
                    self._merge(row, other)
            self.rows[iid] = row

    def _merge(self, row: _Row, other: _Image) -> None:
        in_base = row.image.subset == BASE_SUBSET and other.subset != BASE_SUBSET
        self.lists["merged"].append({
            "image_id": other.image_id, "kept": row.image.path, "merged": other.path, "subset": other.subset,
            "reason": EXTRA_IN_BASE if in_base else SAME_LABEL})

    def _conflict(self, iid: str, copies: list[_Image], reason: str, **extra: Any) -> None:
        self.dropped.add(iid)
        self.lists["label_conflicts"].append({
            "image_id": iid, "reason": reason, "paths": [c.path for c in copies],
            "labels": [c.label for c in copies], "subsets": [c.subset for c in copies], **extra})
        logger.warning("label conflict, dropped: %s", ", ".join(f"{c.path} ({c.label})" for c in copies))

    # ---- attributes ----------------------------------------------------------------------------

    def _add_attribute(self, name: str) -> str:
        name = name.strip().lower()
        if name not in self.attributes:
            self.attributes.append(name)
        return name

    def _vote(self, iid: str, attribute: str, value: str, source: str, where: str) -> bool:
        """Record that ``source`` gives ``value``; False (and skipped) if ``iid`` has no row."""
        if iid in self.rows:
            self.rows[iid].votes[attribute].append((value, source))
            self.matched[attribute] += 1
            self.annotated[attribute].add(iid)
            return True
        self.skip(where, MATCH_DROPPED if iid in self.dropped else NO_MATCH)
        return False

    def _apply_tree(self, tree: AttributeTree) -> None:
        """Join ``<dir>/<group>/**/<file>`` to the rows by pixel content."""
        attribute = self._add_attribute(tree.attribute)
        top = self._folder(tree.dir, "attribute_trees dir")
        for path in self._walk(top):
            parts = path.relative_to(top).parts
            if len(parts) < 2:
                self.skip(self._rel(path), NOT_IN_GROUP)
                continue
            pixels = self._decode(path)
            if pixels is None:
                continue
            value = tree.value_map.get(parts[0], parts[0])
            self.annotations[attribute][value] += 1
            iid, rel = image_id(pixels), self._rel(path)
            if self._vote(iid, attribute, value, rel, rel) and len(parts) == 3:
                self._check_tree_class(rel, parts[1], self.rows[iid])

    def _check_tree_class(self, rel: str, folder: str, row: _Row) -> None:
        label = self.spec.class_map.get(folder, folder)
        if label != row.image.label:
            self.lists["label_mismatches"].append({"path": rel, "folder_label": label,
                                                   "label": row.image.label, "kept": row.image.path})

    def _apply_extra_attributes(self) -> None:
        for extra in self.spec.extras:
            fixed = {self._add_attribute(k): v for k, v in extra.attributes.items()}
            for row in self.rows.values():
                if row.image.subset == extra.name:
                    for attribute, value in fixed.items():
                        row.votes[attribute].append((value, f"{extra.dir} (all {value})"))

    def _apply_table(self, table: AttributeTable) -> None:
        """Join a table's rows to the images by path or file name; check labels; record attributes."""
        path = self.root / table.path
        records = _read_table(path, table)
        columns = list(dict.fromkeys(k for _, rec in records for k in rec))
        key, by_path = _key_column(table, columns, path)
        wanted = {x.lower() for x in table.columns}
        attrs = {c: self._add_attribute(c) for c in columns
                 if c not in (key, "label") and (not wanted or c in wanted)}
        for line, rec in records:
            where = f"{table.path}:{line}"
            values = {a: _cell(rec.get(c)) for c, a in attrs.items() if _cell(rec.get(c))}
            for attribute, value in values.items():
                self.annotations[attribute][value] += 1
            iid = self._table_image(_cell(rec.get(key)), by_path, where)
            if iid is not None and self._table_label(iid, rec.get("label"), where):
                for attribute, value in values.items():
                    self._vote(iid, attribute, value, where, where)

    def _table_image(self, value: str, by_path: bool, where: str) -> str | None:
        """Image id that a table key names, or None (skipped with the reason)."""
        if not value:
            self.skip(where, NO_KEY)
            return None
        if by_path:
            return self._table_path(value, where)
        ids = self.by_name.get(value, set())
        if len(ids) != 1:
            self.skip(value, AMBIGUOUS if ids else NO_NAME, where=where)
            return None
        return self._known(next(iter(ids)), value, where)

    def _table_path(self, value: str, where: str) -> str | None:
        problem = path_problem(value)
        norm = posixpath.normpath(value.replace("\\", "/"))
        if problem is None and not (self.root / norm).is_file():
            problem = NO_FILE
        if problem is None and norm not in self.by_path:
            problem = NOT_IMPORTED
        if problem is not None:
            self.skip(value, problem, where=where)
            return None
        return self._known(self.by_path[norm], value, where)

    def _known(self, iid: str, value: str, where: str) -> str | None:
        if iid in self.rows:
            return iid
        self.skip(value, MATCH_DROPPED, where=where)
        return None

    def _table_label(self, iid: str, label: Any, where: str) -> bool:
        """False (row dropped as a label conflict) if the table's label disagrees with the folder."""
        label = _cell(label)
        row = self.rows[iid]
        if not label or self.spec.class_map.get(label, label) == row.image.label:
            return True
        del self.rows[iid]
        self._conflict(iid, row.copies, TABLE_LABEL, table=where, table_label=label)
        return False

    # ---- output --------------------------------------------------------------------------------

    def _resolve(self, row: _Row, attribute: str) -> str | None:
        votes = row.votes.get(attribute, [])
        values = sorted({v for v, _ in votes})
        if len(values) <= 1:
            return values[0] if values else None
        sources = {v: [s for w, s in votes if w == v] for v in values}
        self.lists["attribute_conflicts"].append({
            "image_id": row.image.image_id, "source_path": row.image.path, "attribute": attribute,
            "values": sources})
        logger.warning("attribute conflict, %s set to null: %s %s", attribute, row.image.path, sources)
        return None

    def _ordered_rows(self) -> tuple[list[_Row], tuple[str, ...]]:
        present = sorted({r.image.label for r in self.rows.values()})
        classes = tuple(self.spec.classes) + tuple(c for c in present if c not in self.spec.classes)
        subsets = [BASE_SUBSET] + [e.name for e in self.spec.extras]
        rank = {c: i for i, c in enumerate(classes)}
        rows = sorted(self.rows.values(), key=lambda r: (subsets.index(r.image.subset), rank[r.image.label],
                                                          natural_key(r.image.path)))
        return rows, classes

    def _build(self) -> FaceDataset:
        rows, classes = self._ordered_rows()
        manifest = pd.DataFrame({
            "image_id": [r.image.image_id for r in rows],
            "label": [r.image.label for r in rows],
            "source_path": [r.image.path for r in rows],
            "subset": [r.image.subset for r in rows],
        })
        for attribute in self.attributes:
            manifest[attribute] = pd.Series([self._resolve(r, attribute) for r in rows], dtype="str")
        pixels = np.stack([r.image.pixels for r in rows])  # (N, H, W)
        ds = FaceDataset(pixels=pixels, manifest=manifest, classes=classes, name=self.spec.name)
        report = _build_report(ds, self)
        return dataclasses.replace(ds, report=report)


def _read_table(path: Path, table: AttributeTable) -> list[tuple[str, dict[str, Any]]]:
    """Records of a CSV (header row) or JSON table, column names lowercased, each with its line or index."""
    if not path.is_file():
        raise DatasetError(_NO_TABLE.format(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".json":
            records = _json_records(json.loads(text), table.key_column or _KEY_NAMES[table.key])
        else:
            records = [(str(i + 2), rec) for i, rec in enumerate(csv.DictReader(text.splitlines()))]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise DatasetError(_BAD_TABLE.format(path, exc)) from None
    if not all(isinstance(r, dict) for _, r in records):
        raise DatasetError(_BAD_TABLE.format(path, "every record must be an object"))
    return [(w, {str(k).strip().lower(): v for k, v in r.items() if k is not None}) for w, r in records]


def _cell(value: Any) -> str:
    """A table cell as stripped text; empty for a missing value (None, or an empty CSV cell)."""
    return "" if value is None else str(value).strip()


def _json_records(data: Any, key_name: str) -> list[tuple[str, Any]]:
    """``[{...}, ...]`` as is; ``{key: {...}}`` as records with the key under ``key_name``."""
    if isinstance(data, dict):
        return [(repr(k), {key_name: k, **v} if isinstance(v, dict) else v) for k, v in data.items()]
    if isinstance(data, list):
        return [(f"#{i}", rec) for i, rec in enumerate(data)]
    return [("#0", data)]


_KEY_NAMES = {"auto": "path", "path": "path", "filename": "filename"}


def _key_column(table: AttributeTable, columns: list[str], path: Path) -> tuple[str, bool]:
    """The key column and whether it holds paths (else bare file names)."""
    mode = table.key
    if mode == "auto":
        mode = "filename" if "filename" in columns and "path" not in columns else "path"
    key = (table.key_column or _KEY_NAMES[mode]).lower()
    if key not in columns:
        raise DatasetError(_NO_KEY_COLUMN.format(path, key, columns))
    return key, mode == "path"


def _build_report(ds: FaceDataset, imp: _Importer) -> dict[str, Any]:
    """The import report (written as ``import_report.json``); see :data:`REPORT_KEYS`."""
    report: dict[str, Any] = {
        "name": ds.name, "root": str(imp.root), "spec": to_dict(imp.spec), "smoke_test": imp.smoke_test,
        "image_size": list(ds.image_size), "attributes": list(imp.attributes), "counts": _counts(ds, imp),
    }
    report.update(imp.lists)
    # a smoke test reads a few files per folder: comparing with full counts would only add noise
    report["expected"] = [] if imp.smoke_test else _compare_expected(imp.spec.expected, report["counts"])
    report["notes"] = _notes(ds, imp, report)
    return report


REPORT_KEYS = """
name, root, spec (resolved), smoke_test, image_size [H, W], attributes, classes (added by save_dataset)
counts.files        subset -> class -> decoded files (before merging)
counts.rows         subset -> class -> manifest rows
counts.groups       attribute -> group -> base rows ("null": no value)
counts.groups_by_class  attribute -> class -> group -> base rows
counts.annotations  attribute -> group -> tree files / table rows giving that value (read, joined or not)
counts.extra_duplicates  extra subset -> {files, images}: its files / distinct images equal to a base image
counts.non_square   subset -> decoded files that were not square (made square as spec.image_fit says)
counts.skipped / merged / label_conflicts / attribute_conflicts   reason (or attribute) -> entries
skipped             [{path, reason, detail?, where?}]  every file or table row not used
merged              [{image_id, kept, merged, subset, reason}]  one per file folded into another row
label_conflicts     [{image_id, reason, paths, labels, subsets, table?, table_label?}]  dropped images
attribute_conflicts [{image_id, source_path, attribute, values: {value: [sources]}}]  set to null
label_mismatches    [{path, folder_label, label, kept}]  tree class folder differs from the image's label
expected            [{what, expected, found, ok}]  spec [expected] vs files read (empty in a smoke test)
notes               sentences explaining how files became rows
"""


def _counts(ds: FaceDataset, imp: _Importer) -> dict[str, Any]:
    m = ds.manifest
    base = m[m["subset"] == BASE_SUBSET]
    lists = imp.lists
    return {
        "files": {s: dict(c) for s, c in imp.files.items()},
        "rows": {s: {c: int(n) for c, n in g["label"].value_counts().sort_index().items()}
                 for s, g in m.groupby("subset", sort=False)},
        "groups": {a: _value_counts(base[a]) for a in imp.attributes},
        "groups_by_class": {a: {c: _value_counts(g[a]) for c, g in base.groupby("label")}
                            for a in imp.attributes},
        "annotations": {a: dict(sorted(imp.annotations[a].items())) for a in imp.attributes},
        "extra_duplicates": {s: {"files": c["files"], "images": c["images"]}
                             for s, c in imp.extra_duplicates.items()},
        "non_square": dict(imp.non_square),
        "skipped": dict(Counter(e["reason"] for e in lists["skipped"])),
        "merged": dict(Counter(e["reason"] for e in lists["merged"])),
        "label_conflicts": dict(Counter(e["reason"] for e in lists["label_conflicts"])),
        "attribute_conflicts": dict(Counter(e["attribute"] for e in lists["attribute_conflicts"])),
    }


def _value_counts(col: pd.Series) -> dict[str, int]:
    counts = {str(k): int(v) for k, v in col.value_counts().sort_index().items()}
    return {**counts, NULL_GROUP: int(col.isna().sum())}


def _compare_expected(exp: Expected, counts: dict[str, Any]) -> list[dict[str, Any]]:
    files = counts["files"]
    base = files.get(BASE_SUBSET, {})
    checks: list[tuple[str, int, int]] = []
    if exp.images is not None:
        checks.append(("images", exp.images, sum(base.values())))
    checks += [(f"classes.{c}", n, base.get(c, 0)) for c, n in exp.classes.items()]
    checks += [(f"groups.{a}.{g}", n, counts["annotations"].get(a, {}).get(g, 0))
               for a, groups in exp.groups.items() for g, n in groups.items()]
    checks += [(f"extras.{s}", n, sum(files.get(s, {}).values())) for s, n in exp.extras.items()]
    checks += [(f"extra_duplicates.{s}", n, counts["extra_duplicates"].get(s, {}).get("images", 0))
               for s, n in exp.extra_duplicates.items()]
    return [{"what": w, "expected": e, "found": f, "ok": e == f} for w, e, f in checks]


_SUBSET_NOTE = ("{subset}: {files} files decoded -> {rows} rows: {same} files merged into an identical "
                "image of the same label and folder; {conflict_files} files ({conflicts} distinct images) "
                "dropped because identical pixels carry different labels (see label_conflicts)")
_INTO_BASE_NOTE = ("; {into_base} files ({images} distinct images) equal a base image and were merged into "
                   "the base row (subset stays base, base annotations kept)")
_ATTR_NOTE = ("{attr}: {read} annotations read (tree files / table rows), {matched} joined to an image, "
              "covering {distinct} distinct images ({copies} are further copies of an already annotated "
              "image, e.g. of a merged duplicate); {conflicts} images with conflicting values set to null; "
              "base rows: {valued} with a value, {null} without; per group, annotations -> base rows: "
              "{per_group}")
_EXTRA_NOTE = ("{subset}: the {n} base images that also appear in this folder (which says {attr} = "
               "{value!r}) keep their base {attr}: {dist}")
_CASE_NOTE = ("{attr}: the groups {names} differ only in case or spaces and are kept apart; if they are "
              "one group, write them the same way in the attribute table or folders")
_EMPTY_CLASS_NOTE = "class {0!r} is listed in the spec but no image has it"
_SKIP_NOTE = "{n} files or table rows skipped (see skipped): {reasons}"
_EXPECTED_OK = ("all {n} expected counts of the spec match the files read; row counts are lower only by "
                "the merges and conflicts above")
_EXPECTED_BAD = "expected {what} = {expected}, found {found}"
_SMOKE_NOTE = (f"smoke test: at most {SMOKE_FILES} files per folder were read, so counts are partial and "
               "are not compared with the expected counts")


def _notes(ds: FaceDataset, imp: _Importer, report: dict[str, Any]) -> list[str]:
    """Sentences that explain how the files became rows, and any difference from the expected counts."""
    notes = [_subset_note(subset, imp, report) for subset in imp.files]
    notes += [_attr_note(attr, imp, report) for attr in imp.attributes]
    notes += _extra_notes(ds, imp)
    notes += _case_notes(imp, report)
    if imp.non_square:
        notes.append(_NON_SQUARE_NOTE[imp.spec.image_fit].format(n=sum(imp.non_square.values()),
                                                                 size=imp.spec.image_size))
    notes += [_EMPTY_CLASS_NOTE.format(c) for c in ds.classes if not (ds.manifest["label"] == c).any()]
    if report["skipped"]:
        notes.append(_SKIP_NOTE.format(n=len(report["skipped"]), reasons=report["counts"]["skipped"]))
    bad = [c for c in report["expected"] if not c["ok"]]
    notes += [_EXPECTED_BAD.format(**c) for c in bad]
    if report["expected"] and not bad:
        notes.append(_EXPECTED_OK.format(n=len(report["expected"])))
    if imp.smoke_test:
        notes.append(_SMOKE_NOTE)
    return notes


def _case_notes(imp: _Importer, report: dict[str, Any]) -> list[str]:
    """Groups of one attribute whose names differ only in case or spaces (``Female``, ``female ``).

    They are kept apart, as written; the note (also logged as a warning) says how to make them one.
    """
    notes = []
    for attr in imp.attributes:
        spellings = defaultdict(list)
        for group in report["counts"]["groups"][attr]:
            if group != NULL_GROUP:
                spellings[group.strip().casefold()].append(group)
        for names in (sorted(v) for v in spellings.values() if len(v) > 1):
            notes.append(_CASE_NOTE.format(attr=attr, names=names))
            logger.warning(notes[-1])
    return notes


def _subset_note(subset: str, imp: _Importer, report: dict[str, Any]) -> str:
    merged = Counter(e["reason"] for e in report["merged"] if e["subset"] == subset)
    conflicts = [e for e in report["label_conflicts"] if subset in e["subsets"]]
    note = _SUBSET_NOTE.format(
        subset=subset, files=sum(imp.files[subset].values()),
        rows=sum(report["counts"]["rows"].get(subset, {}).values()), same=merged[SAME_LABEL],
        conflicts=len(conflicts), conflict_files=sum(e["subsets"].count(subset) for e in conflicts))
    if subset == BASE_SUBSET:
        return note
    dups = report["counts"]["extra_duplicates"].get(subset, {})
    return note + _INTO_BASE_NOTE.format(into_base=merged[EXTRA_IN_BASE], images=dups.get("images", 0))


def _attr_note(attr: str, imp: _Importer, report: dict[str, Any]) -> str:
    groups = report["counts"]["groups"][attr]
    distinct = len(imp.annotated[attr])
    per_group = {g: f"{n} -> {groups.get(g, 0)}" for g, n in sorted(imp.annotations[attr].items())}
    return _ATTR_NOTE.format(per_group=per_group,
        attr=attr, read=sum(imp.annotations[attr].values()), matched=imp.matched[attr], distinct=distinct,
        copies=imp.matched[attr] - distinct, conflicts=report["counts"]["attribute_conflicts"].get(attr, 0),
        valued=sum(n for g, n in groups.items() if g != NULL_GROUP), null=groups[NULL_GROUP])


def _extra_notes(ds: FaceDataset, imp: _Importer) -> list[str]:
    """For extras with fixed attributes: how the base rows they duplicate are annotated."""
    m = ds.manifest
    notes = []
    for extra in imp.spec.extras:
        ids = {r.image.image_id for r in imp.rows.values() if r.extra_copies(extra.name)}
        dups = m[m["image_id"].isin(ids)]
        for attr, value in extra.attributes.items():
            attr = attr.strip().lower()
            dist = _value_counts(dups[attr]) if attr in dups else {NULL_GROUP: len(dups)}
            notes.append(_EXTRA_NOTE.format(subset=extra.name, n=len(dups), attr=attr, value=value,
                                            dist=dist))
    return notes
