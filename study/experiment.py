"""Experiment configs for ``study.tune`` (and ``study.bias_sweep``): TOML -> frozen dataclasses.

An experiment TOML has these tables (every key optional; see ``experiments/default.toml``)::

    name = "default"                 # results/<name>/
    [data]      path = "synthetic"   # or a canonical dataset folder; [data.synthetic] generator knobs
    [split]     k = 3, split_seed = 0
    [train]     fixed training keys (fer_core.config.TrainConfig), the base every trial starts from
    [search]    num_samples, search_seed, scheduler ("asha" | "fifo"), grace_period, ...
    [search.space]  name = [choices]  or  name = {low = .., high = .., log = true, int = false}
    [resources] cpus_per_trial, gpus_per_trial (fractional; -1 = detect), address, dashboard, ...

Search-space names are ``TrainConfig`` keys; ``arch`` is the scientific choice, the rest nuisance.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from fer_core.config import SplitConfig, TrainConfig, from_dict, load_toml, merge, parse_overrides

logger = logging.getLogger(__name__)

_UNKNOWN_HP = "{where}: search.space key {0!r} is not a training key; known: {1}"
_BAD_RANGE = ("{where}: search.space.{0} must be a list of choices or a table "
              "{{low = .., high = .., log = false, int = false}}, got {1!r}")
OBJECTIVES = ("accuracy", "weighted", "pareto")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from: ``"synthetic"`` or a canonical dataset folder."""

    path: str = "synthetic"
    synthetic: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchConfig:
    """The Optuna searcher and the trial scheduler."""

    num_samples: int = 8
    search_seed: int = 0
    scheduler: str = "asha"
    grace_period: int = 2
    reduction_factor: int = 2
    max_concurrent: int = 0
    n_startup_trials: int = 4
    objective: str = "accuracy"
    fairness_attr: str = "gender"
    fairness_weight: float = 1.0
    checkpoint_seconds: float = 60.0
    max_failures: int = 2
    refit: bool = True
    start_from_train: bool = False
    space: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"search.scheduler must be 'asha' or 'fifo', got {self.scheduler!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"search.objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "pareto" and self.scheduler == "asha":
            raise ValueError("search.objective = 'pareto' (multi-objective) cannot use ASHA, which prunes on "
                             "one metric; set search.scheduler = 'fifo' or objective = 'weighted'")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial resources and the Ray runtime to use."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = -1.0
    address: str = ""
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    num_cpus: int = 0


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole study: data, folds, fixed training keys, search, resources."""

    name: str = "default"
    results_dir: str = "results"
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()

    def __post_init__(self) -> None:
        validate_space(self.search.space, self.name, self.train)
        if self.search.start_from_train:
            train_point(self)  # a [train] value outside the space fails now, not when the search starts


def validate_space(space: dict[str, Any], where: str, base: TrainConfig | None = None) -> None:
    """Every searched name is a training key, with a list of choices or a numeric range.

    Each listed choice must make a valid training config with the other keys at ``base``'s values (a
    choice that cannot go with a fixed key fails now, not in its trials).
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    fixed = dataclasses.asdict(base) if base is not None else {}
    for name, spec in space.items():
        if name not in known:
            raise KeyError(_UNKNOWN_HP.format(name, sorted(known), where=where))
        is_range = isinstance(spec, dict) and {"low", "high"} <= set(spec) <= {"low", "high", "log", "int"}
        if not (isinstance(spec, list) and spec) and not is_range:
            raise ValueError(_BAD_RANGE.format(name, spec, where=where))
        for choice in spec if isinstance(spec, list) else []:  # a bad choice fails now, not in its trial
            try:
                from_dict(TrainConfig, {**fixed, name: choice}, "TrainConfig")
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}: search.space.{name} = {spec!r}: {exc}") from None


_OUTSIDE = ("{where}: search.start_from_train = true makes [train] the first trial, but train.{0} = {1!r} is "
            "outside search.space.{0} = {2!r}; set train.{0} inside it, widen the space, or turn "
            "start_from_train off")


def train_point(exp: ExperimentConfig) -> dict[str, Any]:
    """The searched keys at their ``[train]`` values: the first trial when ``search.start_from_train``.

    Starting from the recipe one already trusts means the search's best, by the same validation score,
    is never one it did not try against that recipe.
    """
    point = {}
    for name, spec in exp.search.space.items():
        value = getattr(exp.train, name)
        inside = (value in spec if isinstance(spec, list)
                  else spec["low"] <= value <= spec["high"] and (not spec.get("int") or value == int(value)))
        if not inside:
            raise ValueError(_OUTSIDE.format(name, value, spec, where=exp.name))
        point[name] = value
    return point


def load_config(cls: type, path: str | None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Any:
    """A ``cls`` from defaults < TOML file < ``extra`` (e.g. smoke-test settings) < command-line overrides."""
    data = load_toml(path) if path else {}
    if extra:
        data = merge(data, extra)
    if overrides:
        data = merge(data, parse_overrides(overrides))
    where = f"{path or 'defaults'}{' + command line' if overrides else ''}"
    return from_dict(cls, data, where)


def load_experiment(path: str | None, overrides: list[str] | None = None,
                    extra: dict[str, Any] | None = None) -> ExperimentConfig:
    """The study's config: defaults < TOML file < ``extra`` < command-line overrides."""
    return load_config(ExperimentConfig, path, overrides, extra)


def trial_train_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The base training config with one trial's searched values applied (validated)."""
    return from_dict(TrainConfig, {**dataclasses.asdict(base), **params}, "trial")
