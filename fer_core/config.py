"""Frozen configuration objects loaded from TOML, then overridden by ``key=value`` arguments.

Configuration flows one way: defaults in the dataclass, then the TOML file, then the command line. An
unknown key or a value of the wrong type is an error that names the key (and the file) before any work
starts. Every result row carries :func:`config_hash` of the resolved configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_UNKNOWN_KEY = "{where}: unknown config key {key!r}; known keys: {known}"
_BAD_TYPE = "{where}: key {key!r} must be {want}, got {got!r} ({gtype})"
_BAD_CHOICE = "{where}: key {key!r} must be one of {choices}, got {got!r}"
_BAD_OVERRIDE = "override {0!r} is not of the form key=value"
_BAD_RANGE = "{where}: key {key!r} must be {cond}, got {got!r}"

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
INPUT_NORMS = ("dataset", "equalize", "image")
MITIGATIONS = ("none", "resample", "reweight", "groupdro", "groupheads", "adversary")
LANDMARK_SELECT = ("blend", "network")  # which validation score picks the network's epoch (Trainer)
LANDMARK_INPUTS = ("points", "mesh")  # what the landmark model reads (fer_core.landmarks.landmark_features)


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe: the architecture (scientific) and its nuisance hyperparameters.

    The defaults are the project's default recipe, the one ``study.kfold`` and the bias sweep use when
    no tuned configuration is given.
    """

    arch: str = "main"
    width: float = 1.0
    stem_pool: bool = True
    input_norm: str = "dataset"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "onecycle"
    label_smoothing: float = 0.1
    dropout: float = 0.3
    aug_strength: float = 1.0
    mixup: float = 0.0
    erase: float = 0.0
    ema: float = 0.0
    sam: float = 0.0
    patience: int = 20
    val_fraction: float = 0.1
    seed: int = 0
    mitigation: str = "none"
    group_attr: str = "gender"
    dro_eta: float = 0.1
    adv_weight: float = 1.0
    device: str = "auto"
    amp: bool = True
    init: str = ""
    teachers: tuple[str, ...] = ()
    distill: float = 0.5
    landmark_weight: float = 0.0
    landmark_mirror: bool = False
    landmark_input: str = "points"
    landmark_select: str = "network"
    face_align: bool = False

    def __post_init__(self) -> None:
        where = "TrainConfig"
        if self.init:  # made absolute here, in the driver: Ray trials run in other working directories
            path = Path(self.init).expanduser()
            _check(where, "init", self.init, path.is_file(),
                   "a model file saved by study.kfold or study.tune (or \"\" for fresh weights)")
            object.__setattr__(self, "init", str(path.resolve()))
        resolved = []
        for teacher in self.teachers:  # absolute, as init is
            path = Path(teacher).expanduser()
            _check(where, "teachers", teacher, (path / "predictions.parquet").is_file() and
                   (path / "models").is_dir(), "a list of study.kfold result folders (each with "
                   "predictions.parquet and models/)")
            resolved.append(str(path.resolve()))
        object.__setattr__(self, "teachers", tuple(resolved))
        _check(where, "distill", self.distill, 0 <= self.distill <= 1,
               "in [0, 1] (the teachers' share of each training target)")
        _check(where, "landmark_weight", self.landmark_weight, 0 <= self.landmark_weight <= 1,
               "in [0, 1] (the face-mesh landmarks' share of the predicted probabilities; 0: off)")
        _choice(where, "landmark_input", self.landmark_input, LANDMARK_INPUTS)
        _choice(where, "landmark_select", self.landmark_select, LANDMARK_SELECT)
        _check(where, "landmark_mirror", self.landmark_mirror,
               not self.landmark_mirror or self.landmark_input == "points",
               'false with landmark_input = "mesh" (it mirrors the landmark points)')
        _choice(where, "optimizer", self.optimizer, OPTIMIZERS)
        _choice(where, "schedule", self.schedule, SCHEDULES)
        _choice(where, "mitigation", self.mitigation, MITIGATIONS)
        _choice(where, "input_norm", self.input_norm, INPUT_NORMS)
        _check(where, "width", self.width, math.isfinite(self.width) and self.width > 0, "finite and > 0")
        _check(where, "epochs", self.epochs, self.epochs >= 1, ">= 1")
        _check(where, "batch_size", self.batch_size, self.batch_size >= 2, ">= 2")
        _check(where, "lr", self.lr, self.lr > 0, "> 0")
        _check(where, "val_fraction", self.val_fraction, 0 <= self.val_fraction <= 0.5,
               "in [0, 0.5] (the share of training images held out for early stopping; 0: none)")
        _check(where, "patience", self.patience, self.patience >= 1,
               ">= 1 (epochs without a better validation score before stopping)")
        _check(where, "dro_eta", self.dro_eta, math.isfinite(self.dro_eta) and self.dro_eta >= 0,
               "finite and >= 0 (group DRO's step size)")
        _check(where, "label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)")
        _check(where, "dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)")
        _check(where, "aug_strength", self.aug_strength, self.aug_strength >= 0, ">= 0")
        _check(where, "mixup", self.mixup, math.isfinite(self.mixup) and self.mixup >= 0,
               "finite and >= 0 (0: off)")
        _check(where, "erase", self.erase, 0 <= self.erase <= 1, "a probability in [0, 1] (0: off)")
        _check(where, "ema", self.ema, 0 <= self.ema < 1, "a decay in [0, 1) (0: off)")
        _check(where, "sam", self.sam, math.isfinite(self.sam) and self.sam >= 0,
               "a radius, finite and >= 0 (0: off)")
        _check(where, "adv_weight", self.adv_weight, math.isfinite(self.adv_weight) and self.adv_weight >= 0,
               "finite and >= 0")


@dataclass(frozen=True)
class SplitConfig:
    """How the data is cut into folds: ``k`` stratified folds drawn with ``split_seed``."""

    k: int = 5
    split_seed: int = 0

    def __post_init__(self) -> None:
        _check("SplitConfig", "k", self.k, self.k >= 2, ">= 2")


def _choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(_BAD_CHOICE.format(where=where, key=key, choices=list(choices), got=value))


def _check(where: str, key: str, value: Any, ok: bool, cond: str) -> None:
    if not ok:
        raise ValueError(_BAD_RANGE.format(where=where, key=key, cond=cond, got=value))


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the type hint, and the value coerced (int -> float only)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not args:
            return True, tuple(value)
        items = []
        for item in value:
            ok, coerced = _type_ok(item, args[0])
            if not ok:
                return False, value
            items.append(coerced)
        return True, tuple(items)
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if hint is Any:
        return True, value
    return isinstance(value, hint), value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", *, _prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, naming any unknown key or wrong type.

    ``where`` names the source (a file, ``command line``); keys of nested tables are named with their
    table, e.g. ``search.num_samples``.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{_prefix}{key}"
        if key not in fields:
            known = [f"{_prefix}{k}" for k in sorted(fields)]
            raise KeyError(_UNKNOWN_KEY.format(where=where, key=name, known=known))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise TypeError(_BAD_TYPE.format(where=where, key=name, want="a table",
                                                 got=value, gtype=type(value).__name__))
            kwargs[key] = from_dict(hint, value, where, _prefix=f"{name}.")
            continue
        ok, coerced = _type_ok(value, hint)
        if not ok:
            raise TypeError(_BAD_TYPE.format(where=where, key=name, want=_type_name(hint), got=value,
                                             gtype=type(value).__name__))
        kwargs[key] = coerced
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    """How a type reads in an error message: ``a list, e.g. [1, 2]`` for a tuple or list."""
    if typing.get_origin(hint) in (list, tuple) or hint in (list, tuple):
        return "a list, e.g. [1, 2]"
    return getattr(hint, "__name__", str(hint))


def parse_value(text: str) -> Any:
    """Parse a command-line value as a TOML literal (``3``, ``1e-3``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict ``{"a": {"b": 1}, "c": "x"}``."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ValueError(_BAD_OVERRIDE.format(item))
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(text)
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, naming the file in any parse error."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, then the TOML file at ``path``, then ``key=value`` overrides."""
    data: dict[str, Any] = load_toml(path) if path else {}
    where = str(path) if path else "config"
    if overrides:
        data = merge(data, parse_overrides(overrides))
        where = f"{where} + command line" if path else "command line"
    return from_dict(cls, data, where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists, for TOML and JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


# Training keys added after results were first written, with their defaults. While a key is at its
# default it is left out of the hash, so results written before it existed still match their
# configuration (a resumed study or sweep keeps them instead of training them again).
LATER_TRAIN_KEYS = {"width": 1.0, "mixup": 0.0, "erase": 0.0, "ema": 0.0, "adv_weight": 1.0, "init": "",
                    "stem_pool": True, "input_norm": "dataset", "teachers": [], "distill": 0.5,
                    "sam": 0.0, "landmark_weight": 0.0, "landmark_mirror": False,
                    "landmark_input": "points", "landmark_select": "blend", "face_align": False}


# Training keys that change nothing without the landmark model (landmark_weight 0): left out of the hash
# there, so changing their default does not orphan results trained without landmarks.
LANDMARK_ONLY_KEYS = ("landmark_select",)


def config_hash(cfg: Any) -> str:
    """Short stable hash of a resolved config (dataclass or dict)."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return hashlib.sha1(json.dumps(_hashable(data), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _hashable(data: Any) -> Any:
    """``data`` without the training keys that cannot have changed what it trained.

    Those of :data:`LATER_TRAIN_KEYS` at their defaults, and those of :data:`LANDMARK_ONLY_KEYS` when the
    landmark model is off.
    """
    if not isinstance(data, dict):
        return data
    is_train = "arch" in data and "epochs" in data
    return {k: _hashable(v) for k, v in data.items()
            if not (is_train and (k in LATER_TRAIN_KEYS and v == LATER_TRAIN_KEYS[k]
                                  or k in LANDMARK_ONLY_KEYS and not data.get("landmark_weight")))}


def to_toml(data: dict[str, Any]) -> str:
    """Write a nested dict of scalars and lists as TOML (tables after plain keys)."""
    lines: list[str] = []
    _emit_toml(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_toml(data: dict[str, Any], prefix: list[str], lines: list[str]) -> None:
    plain = {k: v for k, v in data.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and (plain or not tables):
        lines.append(f"\n[{'.'.join(prefix)}]")
    for key, value in plain.items():
        lines.append(f"{key} = {_toml_literal(value)}")
    for key, value in tables.items():
        _emit_toml(value, [*prefix, key], lines)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return json.dumps(str(value))
