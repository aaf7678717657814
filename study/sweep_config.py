"""The bias sweep's configuration: TOML -> frozen dataclasses, the run grid, and each architecture's recipe.

A sweep TOML has these tables (every key optional; see ``experiments/bias_synthetic.toml``)::

    name = "bias"                    # results/<name>/
    results_dir = "results"
    [data]      path = "synthetic"   # or a canonical dataset folder; [data.synthetic] generator knobs
    [split]     k = 5, split_seed = 0         # folds, validation carving and bias subsampling
    [train]     the default recipe (fer_core.config.TrainConfig keys)
    [sweep]     archs, tuned, kinds, attr, group, stereotypical_classes, direction,
                stereotypical_sizes, mitigations,
                seeds, n_boot, fairness_attrs, max_failures, max_in_flight, save_models
    [sweep.levels]  representational = [...], stereotypical = [...], augmented = [...]
    [resources] as for study.tune: cpus_per_trial, gpus_per_trial, address, dashboard, ...

The grid is architectures x conditions x mitigations x folds x seeds, where the conditions are the
unbiased baseline (``bias_kind = "none"``, level 0), every level in (0, 1] of every listed kind, and,
with ``stereotypical_sizes = "matched"`` (the default), the size-matched level 0 of the stereotypical
kind.

Recipes: without ``tuned`` every architecture trains with ``[train]``. With ``tuned = "results/x"``
(a ``study.tune`` results folder) the architecture of its ``best.toml`` trains with that file's
``[train]`` table; every other architecture gets the best completed trial of its own in the folder's
``summary.parquet`` when the search tried it, else the default recipe ``[train]``. The sweep then sets
``arch``, ``mitigation``, ``group_attr`` (= ``sweep.attr``) and ``seed`` of every run.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fer_core.bias import KINDS, BiasSpec
from fer_core.config import (
    MITIGATIONS,
    SplitConfig,
    TrainConfig,
    _check,
    _choice,
    config_hash,
    from_dict,
    load_toml,
    to_dict,
)
from fer_core.models import list_models
from study.experiment import DataConfig, ResourcesConfig, load_config

logger = logging.getLogger(__name__)

BIAS_KINDS = tuple(k for k in KINDS if k != "none")
_UNKNOWN_ARCH = "sweep.archs: unknown architecture {0!r}; known: {1}"
_BAD_LEVEL = "sweep.levels.{0}: level {1!r} must be in (0, 1]; level 0 is the baseline, always run"
_NO_LEVELS = "sweep.kinds lists {0!r} but sweep.levels.{0} is empty"
_NO_BEST = "{0}: no best.toml; sweep.tuned must be a study.tune results folder whose search finished"
_EMPTY = "sweep.{0} is empty"
_REPEATED = "sweep.{0}: {1!r} is listed more than once ({2}); list each value once"


def _no_repeats(key: str, values) -> None:
    """A repeated value would train the same runs twice, or add a class's images twice."""
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(_REPEATED.format(key, value, list(values)))
        seen.add(value)


@dataclass(frozen=True)
class LevelsConfig:
    """Bias levels per kind, each in (0, 1] (see :mod:`fer_core.bias` for what a level means)."""

    representational: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0)
    stereotypical: tuple[float, ...] = (0.5, 1.0)
    augmented: tuple[float, ...] = (0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        for kind in BIAS_KINDS:
            for level in getattr(self, kind):
                if not 0 < level <= 1:
                    raise ValueError(_BAD_LEVEL.format(kind, level))
            _no_repeats(f"levels.{kind}", getattr(self, kind))


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep varies (scientific: architecture, bias, mitigation) and how it reports.

    Parameters
    ----------
    archs
        Registered architectures to train.
    tuned
        A ``study.tune`` results folder whose best configurations to use ("" = the ``[train]`` recipe).
    kinds, levels
        Bias kinds and their levels; the baseline (kind ``none``, level 0) always runs.
    attr, group
        The target group of every bias and of the mitigations (``gender`` / ``Female``, or e.g.
        ``age`` / ``Senior``).
    stereotypical_classes, direction
        Classes whose target-group share the stereotypical bias skews, ``up`` (toward 1) or ``down``.
    stereotypical_sizes
        ``"matched"``: at every stereotypical level each chosen class has its size at the strongest
        level, so only the share changes, and a size-matched level 0 of this kind runs as its
        reference (paired tests compare against it); ``"shrink"``: classes shrink as the level grows.
    mitigations
        Training options of :class:`fer_core.config.TrainConfig` to compare.
    seeds
        Training seeds (weights, order, augmentation); folds and subsampling use ``split.split_seed``.
    n_boot
        Bootstrap resamples of the fairness intervals.
    fairness_attrs
        Attributes of the fairness tables (empty = every attribute of the dataset).
    intersections
        Also tabulate every pair of attributes (``"gender x age"``) in ``fairness.parquet``.
    focus
        ``{attribute: group}``: the group each attribute's signed gap is measured against in
        ``paired.parquet`` (the target ``attr``/``group`` always is); other attributes with more than
        two groups get the unsigned largest-minus-smallest gap.
    max_failures
        Retries of a run whose task raises or whose worker dies, before it is recorded as failed.
    max_in_flight
        Runs submitted at once (0 = as many as the cluster's CPUs/GPUs can run together).
    save_models
        Write every run's trained model to ``models/<run_id>.pt`` (loadable by ``study.evaluate``).
    """

    archs: tuple[str, ...] = ("main", "variant1", "variant2")
    tuned: str = ""
    kinds: tuple[str, ...] = ("representational", "stereotypical")
    levels: LevelsConfig = LevelsConfig()
    attr: str = "gender"
    group: str = "Female"
    stereotypical_classes: tuple[str, ...] = ("Happy",)
    direction: str = "up"
    stereotypical_sizes: str = "matched"
    mitigations: tuple[str, ...] = MITIGATIONS
    seeds: tuple[int, ...] = (0,)
    n_boot: int = 200
    fairness_attrs: tuple[str, ...] = ()
    intersections: bool = True
    focus: dict = field(default_factory=dict)
    max_failures: int = 2
    max_in_flight: int = 0
    save_models: bool = True

    def __post_init__(self) -> None:
        where = "sweep"
        for key in ("archs", "mitigations", "seeds"):
            if not getattr(self, key):
                raise ValueError(_EMPTY.format(key))
        for arch in self.archs:
            if arch not in list_models():
                raise KeyError(_UNKNOWN_ARCH.format(arch, list_models()))
        for kind in self.kinds:
            _choice(where, "kinds", kind, BIAS_KINDS)
            if not getattr(self.levels, kind):
                raise ValueError(_NO_LEVELS.format(kind))
        for mitigation in self.mitigations:
            _choice(where, "mitigations", mitigation, MITIGATIONS)
        _choice(where, "direction", self.direction, ("up", "down"))
        _choice(where, "stereotypical_sizes", self.stereotypical_sizes, ("matched", "shrink"))
        _check(where, "n_boot", self.n_boot, self.n_boot >= 0, ">= 0")
        _check(where, "max_failures", self.max_failures, self.max_failures >= 0, ">= 0")
        _check(where, "max_in_flight", self.max_in_flight, self.max_in_flight >= 0,
               ">= 0 (0: as many runs as the cluster can run together)")
        for key in ("archs", "kinds", "mitigations", "seeds", "stereotypical_classes", "fairness_attrs"):
            _no_repeats(key, getattr(self, key))
        if "stereotypical" in self.kinds and not self.stereotypical_classes:
            raise ValueError(_EMPTY.format("stereotypical_classes"))

    def conditions(self) -> list[BiasSpec]:
        """The baseline, then every (kind, level) of the sweep, in config order.

        With ``stereotypical_sizes = "matched"`` the stereotypical kind starts with its own level 0
        (its classes cut to their size at the strongest level, their shares unchanged).
        """
        specs = [BiasSpec("none", 0.0, self.attr, self.group)]
        for kind in self.kinds:
            levels = list(getattr(self.levels, kind))
            if kind != "stereotypical":
                specs += [BiasSpec(kind, level, self.attr, self.group) for level in levels]
                continue
            size_level = max(levels) if self.stereotypical_sizes == "matched" else 0.0
            levels = [0.0, *levels] if size_level else levels
            specs += [BiasSpec(kind, level, self.attr, self.group, self.stereotypical_classes,
                               self.direction, size_level) for level in levels]
        return specs


@dataclass(frozen=True)
class SweepExperiment:
    """A whole bias sweep: data, folds, default recipe, sweep grid, resources."""

    name: str = "bias"
    results_dir: str = "results"
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig = SweepConfig()
    resources: ResourcesConfig = ResourcesConfig()


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: what to train and on which fold; ``run_id`` names its result file."""

    arch: str
    bias: BiasSpec
    mitigation: str
    fold: int
    seed: int
    cfg: TrainConfig = field(repr=False)
    config_hash: str = ""

    @property
    def run_id(self) -> str:
        """``main__representational-0.75__reweight__fold2__seed0`` (file-name safe)."""
        return (f"{self.arch}__{self.bias.kind}-{self.bias.level:g}__{self.mitigation}"
                f"__fold{self.fold}__seed{self.seed}")

    @property
    def label(self) -> str:
        """``main representational 0.75 reweight fold 2 seed 0`` for progress lines."""
        return f"{self.arch} {self.bias.label} {self.mitigation} fold {self.fold} seed {self.seed}"


def load_sweep(path: str | None, overrides: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> SweepExperiment:
    """The sweep's config: defaults < TOML file < ``extra`` < command-line overrides."""
    return load_config(SweepExperiment, path, overrides, extra)


def recipes(exp: SweepExperiment) -> dict[str, TrainConfig]:
    """The base training config of every architecture (tuned where the tune folder has one)."""
    out = {arch: dataclasses.replace(exp.train, arch=arch) for arch in exp.sweep.archs}
    if not exp.sweep.tuned:
        return out
    folder = Path(exp.sweep.tuned)
    if not (folder / "best.toml").is_file():
        raise FileNotFoundError(_NO_BEST.format(folder))
    best = from_dict(TrainConfig, load_toml(folder / "best.toml").get("train", {}), f"{folder}/best.toml")
    tuned = {**_best_per_arch(folder), best.arch: best}
    for arch in out:
        if arch in tuned:
            out[arch] = tuned[arch]
        logger.info("recipe of %s: %s", arch, f"tuned ({folder})" if arch in tuned else "default [train]")
    return out


def _best_per_arch(folder: Path) -> dict[str, TrainConfig]:
    """Best completed trial of each architecture in a tune folder's ``summary.parquet`` (may be empty)."""
    summary_path, config_path = folder / "summary.parquet", folder / "config.toml"
    if not (summary_path.is_file() and config_path.is_file()):
        return {}
    from study.experiment import load_experiment, trial_train_config
    from study.results import best_trial

    tune_exp = load_experiment(str(config_path))
    summary = pd.read_parquet(summary_path)
    if "arch" not in summary:
        return {}
    out = {}
    for arch, trials in summary.groupby("arch"):
        best = best_trial(trials)
        if best is not None:
            params = {k: _plain(best[k]) for k in tune_exp.search.space}
            out[str(arch)] = trial_train_config(tune_exp.train, params)
    return out


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def run_grid(exp: SweepExperiment, base: dict[str, TrainConfig]) -> list[RunSpec]:
    """Every run of the sweep: arch x condition x mitigation x fold x seed, each with its config hash."""
    runs = []
    data, split = to_dict(exp.data), to_dict(exp.split)
    for arch in exp.sweep.archs:
        for bias in exp.sweep.conditions():
            for mitigation in exp.sweep.mitigations:
                for seed in exp.sweep.seeds:
                    cfg = dataclasses.replace(base[arch], arch=arch, mitigation=mitigation,
                                              group_attr=exp.sweep.attr, seed=seed)
                    chash = config_hash({"data": data, "split": split, "train": to_dict(cfg),
                                         "bias": to_dict(bias)})
                    runs += [RunSpec(arch, bias, mitigation, fold, seed, cfg, chash)
                             for fold in range(exp.split.k)]
    return runs
