"""study.visualize: every plot is written as a real PNG, and summary.json matches the manifest."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_core.data import FaceDataset, image_id, save_dataset
from study.visualize import draw_samples, main

CLASSES = ("Focused", "Happy", "Neutral")


def _handmade(with_attributes: bool = True) -> FaceDataset:
    """24 base + 5 extra images of 12x12; gender and age with nulls; Neutral has 2 base images only."""
    rng = np.random.default_rng(3)
    labels = ["Focused"] * 12 + ["Happy"] * 10 + ["Neutral"] * 2 + ["Happy"] * 3 + ["Focused"] * 2
    subset = ["base"] * 24 + ["extra"] * 5
    gender = (["Male"] * 9 + ["Female"] * 2 + [None] + ["Female"] * 7 + ["Male"] * 3
              + [None, "Female"] + ["Female"] * 5)
    age = ["Adult", "Senior", None, "Baby"] * 7 + ["Adult"]
    pixels = rng.integers(0, 256, size=(len(labels), 12, 12), dtype=np.uint8)
    manifest = pd.DataFrame({"image_id": [image_id(p) for p in pixels], "label": labels,
                             "source_path": [f"img/{i}.png" for i in range(len(labels))], "subset": subset})
    if with_attributes:
        manifest["gender"], manifest["age"] = gender, age
    return FaceDataset(pixels=pixels, manifest=manifest, classes=CLASSES, name="handmade")


def _check_pngs(out, names):
    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG", name
            assert img.size[0] > 300 and img.size[1] > 200, (name, img.size)
            img.load()  # decodes fully: a truncated file fails here


def _expected_counts(manifest: pd.DataFrame, classes) -> dict:
    """Counts recomputed from the manifest with pandas, independently of study.visualize."""
    base = manifest[manifest["subset"] == "base"]
    expected = {"class_counts": {}, "composition": {}}
    for name, rows in manifest.groupby("subset"):
        counts = rows["label"].value_counts().reindex(classes, fill_value=0)
        expected["class_counts"][name] = {k: int(v) for k, v in counts.items()}
    for attr in manifest.columns.drop(["image_id", "label", "source_path", "subset"]):
        table = pd.crosstab(base["label"], base[attr].fillna("unknown")).reindex(classes, fill_value=0)
        expected["composition"][attr] = {c: {g: int(n) for g, n in row.items()}
                                         for c, row in table.iterrows()}
    return expected


def test_smoke_test_writes_every_plot(tmp_path):
    out = tmp_path / "viz"
    assert main(["synthetic", "--smoke-test", "--out", str(out)]) == 0
    pngs = ["class_distribution.png", "composition_gender.png", "composition_age.png", "samples.png",
            "intensity_histograms.png"]
    _check_pngs(out, pngs)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["files"]) == sorted([*pngs, "summary.json"])
    assert sum(summary["class_counts"]["base"].values()) == summary["n_base"] == 96
    assert sum(summary["class_counts"]["extra"].values()) == 16


def test_canonical_dataset_with_nulls(tmp_path):
    data = save_dataset(_handmade(), tmp_path / "data")
    out = tmp_path / "viz"
    assert main([str(data), "--out", str(out), "--per-class", "3", "--seed", "1"]) == 0
    _check_pngs(out, ["class_distribution.png", "composition_gender.png", "composition_age.png",
                      "samples.png", "intensity_histograms.png"])
    summary = json.loads((out / "summary.json").read_text())
    manifest = pd.read_parquet(data / "manifest.parquet")
    expected = _expected_counts(manifest, list(CLASSES))
    assert summary["class_counts"] == expected["class_counts"]
    for attr, counts in expected["composition"].items():
        assert summary["composition"][attr]["counts"] == counts
        assert summary["composition"][attr]["groups"][-1] == "unknown"
    shares = summary["composition"]["gender"]["shares_pct"]
    assert shares["Focused"] == {"Female": pytest.approx(16.7), "Male": 75.0, "unknown": pytest.approx(8.3)}
    assert shares["all"]["Female"] == pytest.approx(100 * 10 / 24, abs=0.05)
    by_id = manifest.set_index("image_id")
    for cls, ids in summary["samples"]["image_ids"].items():
        assert len(ids) == min(3, expected["class_counts"]["base"][cls])
        assert set(by_id.loc[ids, "label"]) == {cls} and set(by_id.loc[ids, "subset"]) == {"base"}


def test_dataset_without_attributes(tmp_path):
    data = save_dataset(_handmade(with_attributes=False), tmp_path / "data")
    out = tmp_path / "viz"
    assert main([str(data), "--out", str(out), "--per-class", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["composition"] == {} and list(summary["intensity"]) == ["by_class"]
    assert not list(out.glob("composition_*.png"))
    _check_pngs(out, ["class_distribution.png", "samples.png", "intensity_histograms.png"])


def test_samples_follow_the_seed():
    base = _handmade().base()
    first, again, other = (draw_samples(base, 4, seed) for seed in (0, 0, 1))
    assert all(np.array_equal(first[c], again[c]) for c in CLASSES)
    assert any(not np.array_equal(first[c], other[c]) for c in ("Focused", "Happy"))


@pytest.mark.parametrize("make", [lambda p: p, lambda p: p / "missing"], ids=["no-manifest", "no-folder"])
def test_not_a_canonical_folder_is_a_clear_error(tmp_path, caplog, make):
    target = make(tmp_path / "raw")
    (tmp_path / "raw").mkdir()
    assert main([str(target), "--out", str(tmp_path / "viz")]) == 1
    assert str(target) in caplog.text and "study.prepare" in caplog.text
    assert not (tmp_path / "viz").exists()


def test_experiment_file_sets_the_generator_and_smoke_test_needs_no_dataset(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text('[data]\npath = "synthetic"\n\n[data.synthetic]\nn = 40\nn_extra = 0\n')
    assert main(["--config", str(config), "--out", str(tmp_path / "a")]) == 0  # DATASET from [data]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["n_base"] == 40
    assert main(["--smoke-test", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["n_base"] == 96


@pytest.mark.parametrize("args, words", [
    (["synthetic", "nn=3"], "unknown config key 'nn'"),
    (["synthetic", "n=abc"], "key 'n' must be int"),
    (["synthetic", "--per-class", "1000"], "--per-class must be between 1 and 64"),
    ([], "no DATASET given"),
])
def test_bad_arguments_are_one_clear_error(tmp_path, caplog, args, words):
    assert main([*args, "--out", str(tmp_path / "viz")]) == 1
    assert words in caplog.text
