"""Dataset specs: the small TOML files that describe a raw dataset's layout for :mod:`fer_core.importer`.

A spec names the class folders, a class map, attribute trees, attribute tables, extra-images folders and
the counts expected from the files (see ``experiments/datasets/fer4.toml``). :func:`load_spec` reads and
checks one (an unknown key or a wrong type is an error naming the key and the file); :func:`folder_spec`
builds one for a plain folder of class subfolders with an optional ``attributes.csv``/``.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from fer_core.config import from_dict, load_toml, merge, parse_overrides
from fer_core.data import BASE_SUBSET

logger = logging.getLogger(__name__)

TABLE_NAMES = ("attributes.csv", "attributes.json")
TABLE_KEYS = ("auto", "path", "filename")
IMAGE_FITS = ("crop", "pad", "stretch")  # how a non-square image becomes square (see importer.to_square)
ABSOLUTE = "absolute path in table"
ESCAPES = "path escapes the dataset root"
_UNKNOWN_KEY = "{where}: unknown key {key!r}; known keys: {known}"
_MISSING_KEY = "{where}: missing required key {key!r}"
_NOT_TABLES = "{where}: key {key!r} must be a list of tables ([[{key}]]), got {got!r}"
_NOT_STR_MAP = "{where}: key {key!r} must map names to strings, got {got!r}"
_NOT_INT_MAP = "{where}: key {key!r} must map names to integers, got {got!r}"
_BAD_SIZE = "{where}: key 'image_size' must be >= 8, got {got!r}"
_BAD_FIT = "{where}: key 'image_fit' must be one of {choices}, got {got!r}"
_BAD_TABLE_KEY = "{where}: key 'key' must be one of {choices}, got {got!r}"
_BAD_DIR = "{where}: key {key!r} must be a relative path inside the dataset root, got {got!r}"
_BAD_MAP_TARGET = "{where}: class_map sends {raw!r} to {got!r}, which is not in classes {classes}"
_BAD_EXTRA_NAME = "{where}: extras name {got!r} is reserved or used twice"


class DatasetError(ValueError):
    """A dataset spec or folder that cannot be imported; the message names the file and the reason."""


@dataclass(frozen=True)
class AttributeTree:
    """Attribute given by folders: every image under ``<dir>/<group>/`` (any depth) has value ``group``.

    Parameters
    ----------
    attribute
        Name of the manifest column (lowercased).
    dir
        Folder relative to the dataset root, holding one folder per group.
    value_map
        Optional renaming of group folder names to values; unmapped groups keep their folder name.
    """

    attribute: str
    dir: str
    value_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AttributeTable:
    """Attribute given by a CSV file (header row) or a JSON file (list of records, or key -> record).

    Parameters
    ----------
    path
        The table, relative to the dataset root.
    key
        ``"path"``: the key column holds paths relative to the dataset root; ``"filename"``: bare file
        names (must be unambiguous); ``"auto"``: ``path`` if the table has that column, else ``filename``.
    key_column
        Name of the key column; defaults to the value of ``key``.
    columns
        Attribute columns to use; all but the key and ``label`` when empty. A ``label`` column, when
        present, is checked against the class folder.
    """

    path: str
    key: str = "auto"
    key_column: str = ""
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtraFolder:
    """Extra-images folder laid out like the class folders; its rows get ``subset = name``.

    Parameters
    ----------
    dir
        Folder relative to the dataset root, holding one folder per class.
    name
        Value of the ``subset`` column for its images.
    attributes
        Attribute values every image of the folder carries (final values, after any ``value_map``).
    """

    dir: str
    name: str = "extra"
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Expected:
    """Counts the dataset's makers publish, compared with the *files* read (before merging).

    Parameters
    ----------
    images
        Decoded files in the class folders.
    classes
        Decoded files per class (final class names).
    groups
        Attribute -> group -> annotation files (tree files, table rows) with that value.
    extras
        Extra folder name -> decoded files.
    extra_duplicates
        Extra folder name -> distinct images that are also base images.
    """

    images: int | None = None
    classes: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    extras: dict[str, int] = field(default_factory=dict)
    extra_duplicates: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a raw dataset's images, labels and attributes are.

    Parameters
    ----------
    name
        Short name for logs and tables.
    root
        Dataset root; in a spec file, relative to the spec file's folder.
    classes_dir
        Folder of class folders, relative to ``root``.
    classes
        Final class names, in label-index order; when given (or when ``class_map`` is), class folders
        that are neither in it nor keys of ``class_map`` are skipped as unknown. Default: sorted names.
    class_map
        Renaming of class folder names (``Engaged = "Focused"``), in class folders and trees alike.
    image_size
        Height and width of the imported images.
    image_fit
        How a non-square image is made square before resizing: ``"crop"`` keeps its centred square,
        ``"pad"`` pads the short side with the median of its border pixels, ``"stretch"`` distorts it.
    attribute_trees, attribute_tables, extras
        See :class:`AttributeTree`, :class:`AttributeTable`, :class:`ExtraFolder`.
    expected
        Published counts to check against (see :class:`Expected`).
    """

    name: str = "dataset"
    root: str = "."
    classes_dir: str = "."
    classes: tuple[str, ...] = ()
    class_map: dict[str, str] = field(default_factory=dict)
    image_size: int = 48
    image_fit: str = "crop"
    attribute_trees: tuple[AttributeTree, ...] = ()
    attribute_tables: tuple[AttributeTable, ...] = ()
    extras: tuple[ExtraFolder, ...] = ()
    expected: Expected = field(default_factory=Expected)


_LISTS = {"attribute_trees": AttributeTree, "attribute_tables": AttributeTable, "extras": ExtraFolder}


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> DatasetSpec:
    """Read a dataset spec TOML, apply ``key=value`` overrides; ``root`` is relative to the spec's folder."""
    path = Path(path)
    try:
        data = load_toml(path)
        where = str(path)
        if overrides:
            data, where = merge(data, parse_overrides(overrides)), f"{path} + command line"
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(str(exc)) from None
    spec = spec_from_dict(data, where)
    return dataclasses.replace(spec, root=str(path.parent / spec.root))


def folder_spec(folder: str | os.PathLike, overrides: list[str] | None = None) -> DatasetSpec:
    """Spec of a plain folder of class folders.

    Its subfolders holding images are the classes; ``attributes.csv`` or ``attributes.json`` at its top,
    if present, is an attribute table keyed by path (or by file name if it has only a filename column).
    """
    folder = Path(folder)
    tables = [{"path": name} for name in TABLE_NAMES if (folder / name).is_file()]
    data: dict[str, Any] = {"name": folder.resolve().name, "root": str(folder), "attribute_tables": tables}
    try:
        data = merge(data, parse_overrides(overrides or []))
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    return spec_from_dict(data, f"{folder} (folder) + command line" if overrides else str(folder))


def spec_from_dict(data: dict[str, Any], where: str) -> DatasetSpec:
    """Validate a spec dict: an unknown key, a missing key or a wrong type raises, naming ``where``."""
    data = dict(data)
    for key, cls in _LISTS.items():
        if key in data:
            data[key] = tuple(_item(cls, item, f"{where} [{key} #{i + 1}]", key)
                              for i, item in enumerate(_table_list(data[key], where, key)))
    spec = _from_dict(DatasetSpec, data, where)
    _validate(spec, where)
    return spec


def _table_list(value: Any, where: str, key: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise DatasetError(_NOT_TABLES.format(where=where, key=key, got=value))
    return list(value)


def _item(cls: type, data: dict, where: str, key: str) -> Any:
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in data:
            raise DatasetError(_MISSING_KEY.format(where=where, key=f.name))
    return _from_dict(cls, data, where)


def _from_dict(cls: type, data: dict, where: str) -> Any:
    """:func:`fer_core.config.from_dict`, its errors turned into :class:`DatasetError`."""
    try:
        return from_dict(cls, data, where)
    except KeyError as exc:
        raise DatasetError(exc.args[0]) from None
    except (TypeError, ValueError) as exc:
        raise DatasetError(str(exc)) from None


def _validate(spec: DatasetSpec, where: str) -> None:
    """Checks that :func:`fer_core.config.from_dict` cannot do: value types in maps, ranges, paths."""
    if spec.image_size < 8:
        raise DatasetError(_BAD_SIZE.format(where=where, got=spec.image_size))
    if spec.image_fit not in IMAGE_FITS:
        raise DatasetError(_BAD_FIT.format(where=where, choices=list(IMAGE_FITS), got=spec.image_fit))
    _str_map(spec.class_map, where, "class_map")
    for raw, final in spec.class_map.items():
        if spec.classes and final not in spec.classes:
            raise DatasetError(_BAD_MAP_TARGET.format(where=where, raw=raw, got=final,
                                                      classes=list(spec.classes)))
    _relative(spec.classes_dir, where, "classes_dir")
    for tree in spec.attribute_trees:
        _str_map(tree.value_map, where, "value_map")
        _relative(tree.dir, where, "dir")
    for table in spec.attribute_tables:
        _relative(table.path, where, "path")
        if table.key not in TABLE_KEYS:
            raise DatasetError(_BAD_TABLE_KEY.format(where=where, choices=list(TABLE_KEYS), got=table.key))
    names = [BASE_SUBSET]
    for extra in spec.extras:
        _str_map(extra.attributes, where, "attributes")
        _relative(extra.dir, where, "dir")
        if extra.name in names or not extra.name:
            raise DatasetError(_BAD_EXTRA_NAME.format(where=where, got=extra.name))
        names.append(extra.name)
    _validate_expected(spec.expected, f"{where} [expected]")


def _validate_expected(exp: Expected, where: str) -> None:
    for key in ("classes", "extras", "extra_duplicates"):
        _int_map(getattr(exp, key), where, key)
    for attr, groups in exp.groups.items():
        if not isinstance(groups, dict):
            raise DatasetError(_NOT_INT_MAP.format(where=where, key=f"groups.{attr}", got=groups))
        _int_map(groups, where, f"groups.{attr}")


def _str_map(value: dict, where: str, key: str) -> None:
    if not all(isinstance(v, str) for v in value.values()):
        raise DatasetError(_NOT_STR_MAP.format(where=where, key=key, got=value))


def _int_map(value: dict, where: str, key: str) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        raise DatasetError(_NOT_INT_MAP.format(where=where, key=key, got=value))


def _relative(path: str, where: str, key: str) -> None:
    if path_problem(path) is not None:
        raise DatasetError(_BAD_DIR.format(where=where, key=key, got=path))


def path_problem(text: str) -> str | None:
    """Why a path from a table or spec is not a relative path inside the root (None if it is)."""
    unix = text.replace("\\", "/")
    if unix.startswith("/") or PureWindowsPath(text).drive:
        return ABSOLUTE
    norm = posixpath.normpath(unix)
    if norm == ".." or norm.startswith("../"):
        return ESCAPES
    return None
