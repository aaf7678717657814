"""apply_bias: which training rows each bias kind and level keeps (no training, no Ray)."""

from itertools import pairwise

import numpy as np
import pandas as pd
import pytest

from fer_core.bias import BiasSpec, apply_bias, bias_rng, bias_summary, check_spec, stereotypical_counts
from fer_core.data import FaceDataset
from fer_core.splits import kfold_splits
from fer_core.synthetic import make_dataset


@pytest.fixture(scope="module")
def ds() -> FaceDataset:
    # 40 extras of which 3 are made copies of base images below (same image_id), to test the guard
    return make_dataset(n=400, n_extra=40, image_size=16, seed=3)


@pytest.fixture(scope="module")
def fold(ds):
    """(train_idx, test_idx) of fold 0 of 4, row indices into the full dataset (base rows only)."""
    base = np.flatnonzero(ds.manifest["subset"].eq("base").to_numpy())
    train, test = next(kfold_splits(ds.labels[base], ds.manifest["image_id"].to_numpy()[base], 4, 0))
    return base[train], base[test]


def female(ds, rows):
    return ds.manifest["gender"].to_numpy()[rows] == "Female"


def run(ds, fold, spec, seed=0, fold_no=0):
    train, test = fold
    return apply_bias(ds, train, spec, bias_rng(seed, fold_no), test_idx=test)


def test_none_and_level_zero_return_the_training_fold(ds, fold):
    train, _ = fold
    for spec in (BiasSpec(), BiasSpec("representational", 0.0), BiasSpec("augmented", 0.0),
                 BiasSpec("stereotypical", 0.0, classes=("Happy",))):
        assert np.array_equal(run(ds, fold, spec), np.sort(train))


@pytest.mark.parametrize("level", [0.5, 0.75, 0.9, 1.0])
def test_representational_keeps_the_fraction_of_the_group_and_everyone_else(ds, fold, level):
    train, _ = fold
    rows = run(ds, fold, BiasSpec("representational", level))
    assert set(rows) <= set(train)
    assert set(train[~female(ds, train)]) <= set(rows)  # every non-target image kept
    labels = ds.manifest["label"].to_numpy()
    for cls in np.unique(labels[train]):
        n_before = int((female(ds, train) & (labels[train] == cls)).sum())
        n_after = int((female(ds, rows) & (labels[rows] == cls)).sum())
        assert n_after == int(np.floor(n_before * (1 - level) + 0.5))  # per class: group's class mix kept


def test_representational_levels_are_nested_and_seeded(ds, fold):
    kept = [set(run(ds, fold, BiasSpec("representational", lv))) for lv in (0.0, 0.5, 0.75, 0.9, 1.0)]
    assert all(later <= earlier for earlier, later in pairwise(kept))
    again = set(run(ds, fold, BiasSpec("representational", 0.75)))
    other_seed = set(run(ds, fold, BiasSpec("representational", 0.75), seed=1))
    other_fold = set(run(ds, fold, BiasSpec("representational", 0.75), fold_no=1))
    assert again == kept[2]
    assert other_seed != kept[2] and other_fold != kept[2]


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("level", [0.25, 0.5, 1.0])
def test_stereotypical_reaches_the_share_by_cutting_the_losing_group(ds, fold, direction, level):
    train, _ = fold
    spec = BiasSpec("stereotypical", level, classes=("Happy", "Focused"), direction=direction)
    rows = run(ds, fold, spec)
    labels = ds.manifest["label"].to_numpy()
    untouched = ~np.isin(labels[train], spec.classes)
    assert set(train[untouched]) <= set(rows)  # other classes keep every image
    for cls in spec.classes:
        before, after = train[labels[train] == cls], rows[labels[rows] == cls]
        p = female(ds, before).mean()
        want = p + level * (1 - p) if direction == "up" else p * (1 - level)
        assert abs(female(ds, after).mean() - want) < 1.5 / len(after)  # rounding of one image
        gaining = female(ds, before) if direction == "up" else ~female(ds, before)
        assert set(before[gaining]) <= set(after)  # the gaining group keeps all its images
        # no oversampling: the class can only shrink, to the documented cap n_gaining / share
        assert len(after) <= len(before)
        n_t, n_o = stereotypical_counts(int(female(ds, before).sum()), int((~female(ds, before)).sum()), spec)
        assert len(after) == n_t + n_o
    summary = bias_summary(ds, rows, spec)
    assert summary["n_Happy"] == int((labels[rows] == "Happy").sum())


def test_stereotypical_levels_are_nested(ds, fold):
    kept = [set(run(ds, fold, BiasSpec("stereotypical", lv, classes=("Happy",)))) for lv in (0, .25, .5, 1)]
    assert all(later <= earlier for earlier, later in pairwise(kept))


@pytest.mark.parametrize("direction", ["up", "down"])
def test_size_matched_stereotypical_keeps_class_sizes_and_moves_only_the_share(ds, fold, direction):
    train, _ = fold
    labels = ds.manifest["label"].to_numpy()
    levels = (0.0, 0.25, 0.5, 1.0)
    specs = [BiasSpec("stereotypical", lv, classes=("Happy", "Focused"), direction=direction, size_level=1.0)
             for lv in levels]
    kept = [run(ds, fold, spec) for spec in specs]
    shrunk = run(ds, fold, BiasSpec("stereotypical", 1.0, classes=("Happy", "Focused"), direction=direction))
    for cls in ("Happy", "Focused"):
        before = train[labels[train] == cls]
        p = female(ds, before).mean()
        sizes = {int((labels[rows] == cls).sum()) for rows in kept}
        # one size at every level: the size the class has at the strongest level, without size matching
        assert sizes == {int((labels[shrunk] == cls).sum())}
        for lv, rows in zip(levels, kept, strict=True):
            after = rows[labels[rows] == cls]
            want = p + lv * (1 - p) if direction == "up" else p * (1 - lv)
            assert abs(female(ds, after).mean() - want) < 1.5 / len(after)
    for rows in kept:  # other classes untouched, nothing drawn from outside the fold
        assert set(train[~np.isin(labels[train], ("Happy", "Focused"))]) <= set(rows) <= set(train)


def test_stereotypical_counts_keep_a_class_without_the_gaining_group():
    spec = BiasSpec("stereotypical", 0.5, classes=("Happy",))
    assert stereotypical_counts(0, 30, spec) == (0, 30)
    assert stereotypical_counts(10, 30, spec) == (10, 6)  # share 0.25 -> 0.625: 10 / 16
    assert stereotypical_counts(10, 30, BiasSpec("stereotypical", 1.0, classes=("Happy",))) == (10, 0)


def test_a_class_without_the_gaining_group_is_kept_and_said(ds, fold, caplog):
    train, _ = fold
    happy = ds.manifest["label"].to_numpy()[train] == "Happy"
    no_women = train[~(happy & female(ds, train))]  # Happy has no woman left to gain share
    spec = BiasSpec("stereotypical", 1.0, classes=("Happy",))
    with caplog.at_level("WARNING", logger="fer_core.bias"):
        rows = run(ds, (no_women, fold[1]), spec)
    np.testing.assert_array_equal(rows, no_women)
    assert "class Happy has no training image of Female, so its share cannot move" in caplog.text


@pytest.fixture(scope="module")
def ds_with_copies(ds, fold):
    """``ds`` where 3 extras carry the image_id of a test image (as if the importer had missed them)."""
    _, test = fold
    manifest = ds.manifest.copy()
    extras = np.flatnonzero(manifest["subset"].ne("base").to_numpy())
    manifest.loc[extras[:3], "image_id"] = manifest["image_id"].to_numpy()[test[:3]]
    return FaceDataset(ds.pixels, manifest, ds.classes, ds.name)


@pytest.mark.parametrize("level", [0.25, 0.5, 1.0])
def test_augmented_adds_the_fraction_of_extras_never_a_test_image(ds_with_copies, fold, level):
    train, test = fold
    data = ds_with_copies
    rows = apply_bias(data, train, BiasSpec("augmented", level), bias_rng(0, 0), test_idx=test)
    added = np.setdiff1d(rows, train)
    assert set(train) <= set(rows)
    assert (data.manifest["subset"].to_numpy()[added] == "extra").all()
    assert female(data, added).all()
    assert len(added) == int(np.floor(37 * level + 0.5))  # 40 extras, 3 copies of test images dropped
    ids = data.manifest["image_id"].to_numpy()
    assert not set(ids[added]) & set(ids[test])


def test_augmented_levels_are_nested(ds, fold):
    kept = [set(run(ds, fold, BiasSpec("augmented", lv))) for lv in (0.25, 0.5, 1.0)]
    assert kept[0] <= kept[1] <= kept[2]


@pytest.mark.parametrize("spec", [
    BiasSpec("representational", 1.0), BiasSpec("augmented", 1.0),
    BiasSpec("stereotypical", 1.0, classes=("Happy",), direction="down"),
    BiasSpec("representational", 0.9, attr="age", group="Senior"),
])
def test_test_rows_are_never_returned(ds, fold, spec):
    _, test = fold
    assert not set(run(ds, fold, spec)) & set(test)


def test_training_rows_that_are_test_rows_are_refused(ds, fold):
    train, test = fold
    with pytest.raises(ValueError, match="also test rows"):
        apply_bias(ds, np.concatenate([train, test[:2]]), BiasSpec("representational", .5), bias_rng(0, 0),
                   test_idx=test)


def test_age_group_target(ds, fold):
    train, _ = fold
    rows = run(ds, fold, BiasSpec("representational", 1.0, attr="age", group="Senior"))
    age = ds.manifest["age"].to_numpy()
    assert not (age[rows] == "Senior").any()
    assert len(rows) == int((age[train] != "Senior").sum())


@pytest.mark.parametrize(("spec", "match"), [
    (BiasSpec("representational", .5, attr="race"), "no attribute 'race'"),
    (BiasSpec("representational", .5, group="Other"), "no group 'Other'"),
    (BiasSpec("stereotypical", .5, classes=("Angry",)), "no class 'Angry'"),
])
def test_check_spec_names_what_is_wrong(ds, spec, match):
    with pytest.raises((KeyError, ValueError), match=match):
        check_spec(ds, spec)


def test_check_spec_augmented_without_extras():
    base_only = make_dataset(n=40, image_size=16)
    with pytest.raises(ValueError, match="extra images"):
        check_spec(base_only, BiasSpec("augmented", 0.5))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "none", "level": 0.5}, "level 0"),
    ({"kind": "representational", "level": 1.5}, "in \\[0, 1\\]"),
    ({"kind": "stereotypical", "level": 0.5}, "classes"),
    ({"kind": "sampling"}, "kind"),
    ({"kind": "stereotypical", "level": .5, "classes": ("Happy",), "direction": "sideways"}, "direction"),
    ({"kind": "representational", "level": .5, "size_level": 1.0}, "stereotypical' only"),
    ({"kind": "stereotypical", "level": 1.0, "classes": ("Happy",), "size_level": 0.5}, "exceeds size_level"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiasSpec(**kwargs)


def test_unknown_group_values_are_not_target(ds, fold):
    train, test = fold
    manifest = ds.manifest.copy()
    manifest.loc[train[:10], "gender"] = None
    data = FaceDataset(ds.pixels, manifest, ds.classes, ds.name)
    rows = apply_bias(data, train, BiasSpec("representational", 1.0), bias_rng(0, 0), test_idx=test)
    assert set(train[:10]) <= set(rows)
    assert pd.isna(data.manifest["gender"].to_numpy()[train[:10]]).all()
