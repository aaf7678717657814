"""Plot what a dataset holds: ``python -m study.visualize DATASET --out DIR [--per-class 8] [--seed 0]``.

``DATASET`` is a canonical dataset folder (written by ``python -m study.prepare``) or ``synthetic``
(the built-in generated faces; ``key=value`` arguments and the ``[data.synthetic]`` table of an
experiment file given as ``--config`` set the generator, e.g. ``n=400 overrep_class=Focused
overrep_share=0.8``). Without ``DATASET``, the ``[data] path`` of ``--config`` is plotted. Writes to
``--out``:

- ``class_distribution.png``: images per class; extra-images subsets stacked on the base bars.
- ``composition_<attribute>.png`` for every attribute column: group counts per class (base subset,
  stacked bars) and each group's share of each class (annotated heatmap); nulls form the group
  ``unknown``.
- ``samples.png``: ``--per-class`` images per class drawn with ``--seed`` (grayscale, 0-255).
- ``intensity_histograms.png``: pixel-intensity histograms per class and per group of the first
  attribute (base subset).
- ``summary.json``: the counts and shares behind every plot, and the ids of the sampled images.

``--smoke-test`` plots a tiny synthetic dataset (with extra images) and needs no ``DATASET``. Exits 1
with a message saying what to do when ``DATASET`` is not a canonical folder or a key is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # files only; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402

from fer_core.config import load_toml, parse_overrides  # noqa: E402
from fer_core.data import BASE_SUBSET, MANIFEST, PIXELS, FaceDataset  # noqa: E402
from study.common import SYNTHETIC, data_settings, load_data, run_cli, setup_logging  # noqa: E402

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"
SMOKE = {"n": 96, "n_extra": 16}
_NOT_CANONICAL = ("{0}: not a canonical dataset folder (needs {1} and {2}). Import it first with "
                  "`python -m study.prepare {0} --out DIR` and pass DIR, or pass 'synthetic'")
_NO_PATH = "{0}: no such file or folder; pass a canonical dataset folder (see study.prepare) or 'synthetic'"
_FOLDER_OVERRIDES = "key=value overrides {0} set the synthetic generator; ignored for folder {1}"
MAX_PER_CLASS = 64  # the sample grid is one figure: per-class x classes thumbnails
_BAD_PER_CLASS = "--per-class must be between 1 and {1} (one figure holds the samples), got {0}"
_NO_DATASET = ("no DATASET given: pass a canonical dataset folder or 'synthetic', or a --config with "
               "[data] path")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m study.visualize", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", nargs="?",
                   help="canonical dataset folder, or 'synthetic' (default: the [data] path of --config)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and summary.json")
    p.add_argument("--per-class", type=int, default=8, help="sample images per class (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample draw (default 0)")
    p.add_argument("--config", help="experiment TOML: its [data] path is the default DATASET and its "
                   "[data.synthetic] table configures the generator")
    p.add_argument("--smoke-test", action="store_true",
                   help="plot a tiny synthetic dataset, 4 samples per class (DATASET is ignored)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="synthetic generator keys")
    args = p.parse_intermixed_args(argv)  # key=value may follow the options
    if args.dataset and "=" in args.dataset and not Path(args.dataset).exists():
        args.overrides.insert(0, args.dataset)  # no DATASET, only generator keys
        args.dataset = None
    return args


def check_dataset(spec: str) -> None:
    """Raise before any work if ``spec`` is neither ``synthetic`` nor a canonical folder."""
    if spec == SYNTHETIC:
        return
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(_NO_PATH.format(root))
    if not ((root / MANIFEST).is_file() and (root / PIXELS).is_file()):
        raise FileNotFoundError(_NOT_CANONICAL.format(root, MANIFEST, PIXELS))


def load(args: argparse.Namespace) -> FaceDataset:
    """The dataset named on the command line (a tiny synthetic one under ``--smoke-test``)."""
    path, synthetic = data_settings(load_toml(args.config), args.config) if args.config else (None, {})
    if args.smoke_test:
        synthetic.update(SMOKE)
    overrides = parse_overrides(args.overrides)
    spec = SYNTHETIC if args.smoke_test else args.dataset or path
    if spec is None:
        raise ValueError(_NO_DATASET)
    if spec != SYNTHETIC and overrides:
        logger.warning(_FOLDER_OVERRIDES.format(sorted(overrides), spec))
    check_dataset(spec)
    ds = load_data(spec, {**synthetic, **overrides})
    # A canonical folder is named after its directory; the import report knows the dataset's own name.
    return dataclasses.replace(ds, name=str(ds.report.get("name") or ds.name))


# ---------------------------------------------------------------------------------------------- counts


def group_values(manifest: pd.DataFrame, attribute: str) -> pd.Series:
    """The attribute column as strings, nulls replaced by ``"unknown"``."""
    col = manifest[attribute]
    return col.astype(object).where(col.notna(), UNKNOWN).astype(str)


def group_order(values: pd.Series) -> list[str]:
    """Known groups sorted, then ``"unknown"`` if present."""
    groups = sorted(set(values) - {UNKNOWN})
    return groups + [UNKNOWN] if UNKNOWN in set(values) else groups


def subset_counts(ds: FaceDataset) -> pd.DataFrame:
    """Images per class (rows, in class order) and subset (columns, ``base`` first)."""
    m = ds.manifest
    subsets = m["subset"] if "subset" in m else pd.Series(BASE_SUBSET, index=m.index)
    table = pd.crosstab(pd.Categorical(m["label"], categories=ds.classes), subsets.to_numpy(), dropna=False)
    order = [BASE_SUBSET] + sorted(c for c in table.columns if c != BASE_SUBSET)
    table = table.reindex(columns=order, fill_value=0)
    table.index = list(ds.classes)
    return table.astype(int)


def composition(base: FaceDataset, attribute: str) -> pd.DataFrame:
    """Images per class (rows, in class order) and group of ``attribute`` (columns), nulls as unknown."""
    values = group_values(base.manifest, attribute)
    table = pd.crosstab(pd.Categorical(base.manifest["label"], categories=base.classes),
                        values.to_numpy(), dropna=False)
    table = table.reindex(columns=group_order(values), fill_value=0)
    table.index = list(base.classes)
    return table.astype(int)


def shares(counts: pd.DataFrame) -> pd.DataFrame:
    """Row percentages of ``counts`` with an ``all`` row for the whole subset (0 for empty rows)."""
    full = pd.concat([counts, counts.sum().to_frame("all").T])
    totals = full.sum(axis=1).replace(0, np.nan)
    return full.div(totals, axis=0).mul(100).fillna(0.0)


def draw_samples(base: FaceDataset, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Row indices of up to ``per_class`` images of each class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    labels = base.manifest["label"].to_numpy()
    picks = {}
    for cls in base.classes:
        idx = np.flatnonzero(labels == cls)
        picks[cls] = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
    return picks


# -------------------------------------------------------------------------------------------- plotting


def save(fig: plt.Figure, out: Path, name: str, written: list[Path]) -> None:
    """Save ``fig`` as ``out/name``, close it, and record the path."""
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    logger.info("wrote %s", path)


def group_colors(groups: list[str]) -> dict[str, Any]:
    """One tab10 colour per known group; grey for ``unknown``."""
    palette = plt.get_cmap("tab10").colors
    known = [g for g in groups if g != UNKNOWN]
    colors = {g: palette[i % len(palette)] for i, g in enumerate(known)}
    colors[UNKNOWN] = (0.7, 0.7, 0.7)
    return colors


def stacked_bars(ax: plt.Axes, table: pd.DataFrame, colors: dict[str, Any] | None = None) -> None:
    """Bars per row of ``table``, one stacked segment per column, counts written in big segments."""
    bottom = np.zeros(len(table))
    # One segment per bar needs no inner label: the total above says it.
    tall = 0.04 * max(table.sum(axis=1).max(), 1) if table.shape[1] > 1 else np.inf
    for col in table.columns:
        values = table[col].to_numpy()
        bars = ax.bar(table.index, values, bottom=bottom, label=str(col),
                      color=None if colors is None else colors.get(col), edgecolor="white")
        ax.bar_label(bars, labels=[str(v) if v >= tall else "" for v in values], label_type="center",
                     fontsize=8)
        bottom += values
    ax.bar_label(bars, labels=[str(int(t)) for t in bottom], padding=2, fontsize=9, fontweight="bold")
    ax.set_ylim(0, max(bottom.max(), 1) * 1.12)


def plot_class_distribution(counts: pd.DataFrame, name: str) -> plt.Figure:
    """Images per class, base subset at the bottom, each extra-images subset stacked above it."""
    fig, ax = plt.subplots(figsize=(1.3 * len(counts) + 3.0, 4.2), layout="constrained")
    stacked_bars(ax, counts)
    extra = int(counts.drop(columns=BASE_SUBSET).to_numpy().sum())
    ax.set_title(f"{name}: images per class ({int(counts[BASE_SUBSET].sum())} base"
                 + (f" + {extra} extra)" if extra else ")"))
    ax.set_ylabel("images")
    if extra:
        ax.legend(title="subset", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def share_heatmap(ax: plt.Axes, pct: pd.DataFrame, counts: pd.DataFrame) -> Any:
    """Annotated heatmap of row shares (%, colour 0-100) with the counts under each share."""
    image = ax.imshow(pct.to_numpy(), cmap="Blues", vmin=0, vmax=100, aspect="auto")
    full = pd.concat([counts, counts.sum().to_frame("all").T])
    for (i, j), value in np.ndenumerate(pct.to_numpy()):
        ax.text(j, i, f"{value:.0f}%\n({full.iat[i, j]})", ha="center", va="center", fontsize=8,
                color="white" if value > 60 else "black")
    ax.set_xticks(range(pct.shape[1]), pct.columns, rotation=30, ha="right")
    ax.set_yticks(range(pct.shape[0]), pct.index)
    ax.axhline(len(pct) - 1.5, color="black", linewidth=1.5)
    return image


def plot_composition(counts: pd.DataFrame, attribute: str, name: str) -> plt.Figure:
    """Group counts per class (stacked bars) beside each group's share of each class (heatmap)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.8), layout="constrained",
                                      gridspec_kw={"width_ratios": (1.2, 1.0)})
    stacked_bars(left, counts, group_colors(list(counts.columns)))
    left.set_ylabel("images (base subset)")
    left.legend(title=attribute, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    left.set_title("counts per class")
    image = share_heatmap(right, shares(counts), counts)
    right.set_title(f"share of each class (%), {attribute}")
    fig.colorbar(image, ax=right, label="% of the class", shrink=0.85)
    fig.suptitle(f"{name}: class x {attribute} composition (base subset, {int(counts.to_numpy().sum())} "
                 "images; 'all' = whole subset)")
    return fig


def sample_title(row: pd.Series, attributes: tuple[str, ...]) -> str:
    """Short caption of one image: its attribute values, ``?`` where unknown."""
    return "/".join("?" if pd.isna(row[a]) else str(row[a]) for a in attributes)


def plot_samples(base: FaceDataset, picks: dict[str, np.ndarray], seed: int) -> plt.Figure:
    """Grid of sample images: one row per class, grayscale on a fixed 0-255 scale."""
    cols = max(max((len(p) for p in picks.values()), default=1), 1)
    fig, axes = plt.subplots(len(picks), cols, figsize=(max(1.3 * cols + 0.8, 6.0), 1.5 * len(picks) + 0.9),
                             squeeze=False, layout="constrained")
    for r, (cls, idx) in enumerate(picks.items()):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(idx):
                ax.imshow(base.pixels[idx[c]], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(sample_title(base.manifest.iloc[idx[c]], base.attributes), fontsize=7)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(f"{cls}\n(n={int((base.manifest['label'] == cls).sum())})", fontsize=10)
    caption = "/".join(base.attributes) or "no attributes"
    fig.suptitle(f"{base.name}: random base images per class\n(seed {seed}; captions: {caption})")
    return fig


def histogram_panel(ax: plt.Axes, pixels: np.ndarray, keys: np.ndarray, order: list[str],
                    colors: dict[str, Any] | None, title: str) -> dict[str, dict[str, float]]:
    """Overlaid density step histograms of the pixels of each key; return mean/std/n per key."""
    stats = {}
    for i, key in enumerate(order):
        values = np.asarray(pixels[keys == key], dtype=np.float64).ravel()
        if values.size == 0:
            continue
        stats[key] = {"mean": float(values.mean()), "std": float(values.std()),
                      "images": int((keys == key).sum())}
        color = colors[key] if colors else plt.get_cmap("tab10").colors[i % 10]
        ax.hist(values, bins=64, range=(0, 256), density=True, histtype="step", linewidth=1.6, color=color,
                label=f"{key} (n={stats[key]['images']}, mean {stats[key]['mean']:.0f})")
    ax.set_xlim(0, 256)
    ax.set_xlabel("pixel intensity (0-255)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return stats


def plot_intensity(base: FaceDataset) -> tuple[plt.Figure, dict[str, Any]]:
    """Pixel-intensity histograms per class, and per group of the first attribute if there is one."""
    panels = 2 if base.attributes else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.3), squeeze=False, layout="constrained")
    pixels = np.asarray(base.pixels)
    labels = base.manifest["label"].to_numpy()
    stats = {"by_class": histogram_panel(axes[0][0], pixels, labels, list(base.classes), None, "per class")}
    if base.attributes:
        attr = base.attributes[0]
        values = group_values(base.manifest, attr)
        order = group_order(values)
        stats[f"by_{attr}"] = histogram_panel(axes[0][1], pixels, values.to_numpy(), order,
                                              group_colors(order), f"per {attr} group")
    fig.suptitle(f"{base.name}: pixel intensities of the base subset ({len(base)} images)")
    return fig, stats


# ---------------------------------------------------------------------------------------------- driver


def table_dict(table: pd.DataFrame, digits: int | None = None) -> dict[str, dict[str, float]]:
    """``{row: {column: value}}`` with plain Python numbers (rounded when ``digits``)."""
    def conv(v):
        return round(float(v), digits) if digits is not None else int(v)
    return {str(r): {str(c): conv(v) for c, v in row.items()} for r, row in table.iterrows()}


def visualize(ds: FaceDataset, out: Path, per_class: int = 8, seed: int = 0) -> dict[str, Any]:
    """Write every plot of ``ds`` into ``out`` and return the summary (also written as summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    base, written = ds.base(), []
    counts = subset_counts(ds)
    save(plot_class_distribution(counts, ds.name), out, "class_distribution.png", written)
    summary = {"dataset": ds.name, "n_images": len(ds), "n_base": len(base), "classes": list(ds.classes),
               "image_size": list(ds.image_size), "attributes": list(ds.attributes),
               "class_counts": {str(s): table_dict(counts[[s]].T)[s] for s in counts.columns},
               "composition": {}}
    for attr in ds.attributes:
        table = composition(base, attr)
        save(plot_composition(table, attr, ds.name), out, f"composition_{attr}.png", written)
        summary["composition"][attr] = {"groups": list(table.columns), "counts": table_dict(table),
                                        "shares_pct": table_dict(shares(table), 1)}
    picks = draw_samples(base, per_class, seed)
    save(plot_samples(base, picks, seed), out, "samples.png", written)
    fig, summary["intensity"] = plot_intensity(base)
    save(fig, out, "intensity_histograms.png", written)
    summary["samples"] = {"seed": seed, "image_ids": {c: base.manifest["image_id"].iloc[i].tolist()
                                                      for c, i in picks.items()}}
    summary["files"] = [p.name for p in written] + ["summary.json"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s", out / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Plot the class distribution, class x group composition, samples and intensities of a dataset."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    if not 1 <= args.per_class <= MAX_PER_CLASS:
        logger.error(_BAD_PER_CLASS.format(args.per_class, MAX_PER_CLASS))
        return 1
    try:
        ds = load(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        logger.error("%s", exc.args[0] if exc.args else exc)  # a KeyError's str() adds quotes
        return 1
    logger.info("%s: %d images (%d base), classes %s, attributes %s", ds.name, len(ds), len(ds.base()),
                list(ds.classes), list(ds.attributes))
    visualize(ds, Path(args.out), min(args.per_class, 4) if args.smoke_test else args.per_class, args.seed)
    print(f"plots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "python -m study.visualize"))
