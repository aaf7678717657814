import numpy as np
import pytest

from fer_core.splits import carve_validation, kfold_splits


def test_folds_partition_and_stratify():
    y = np.repeat(np.arange(4), [50, 30, 40, 20])
    ids = np.arange(len(y)).astype(str)
    seen = []
    for train, test in kfold_splits(y, ids, k=5, split_seed=3):
        assert not set(train) & set(test)
        seen.extend(test)
        # each class's share in the test fold is within one image of its share overall
        for c, n in enumerate([50, 30, 40, 20]):
            assert abs((y[test] == c).sum() - n / 5) <= 1
    assert sorted(seen) == list(range(len(y)))


def test_same_pixel_hash_never_on_both_sides():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    ids = np.array([f"h{i // 3}" for i in range(120)])  # triples share a hash
    y = y[np.arange(120) // 3 * 3]  # copies share a label
    for train, test in kfold_splits(y, ids, k=4, split_seed=0):
        assert not set(ids[train]) & set(ids[test])
    fit_idx, val_idx = carve_validation(y, ids, 0.2, seed=1)
    assert not set(ids[fit_idx]) & set(ids[val_idx])
    assert 0.1 < len(val_idx) / len(y) < 0.3


def test_split_seed_reproducible_and_changes_folds():
    y = np.repeat(np.arange(2), 30)
    ids = np.arange(60).astype(str)
    a = [t.tolist() for _, t in kfold_splits(y, ids, 3, 0)]
    assert a == [t.tolist() for _, t in kfold_splits(y, ids, 3, 0)]
    assert a != [t.tolist() for _, t in kfold_splits(y, ids, 3, 1)]


def test_too_few_images_for_k_is_explained():
    with pytest.raises(ValueError, match="fewer than k=5"):
        list(kfold_splits(np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]), np.arange(10), 5, 0))


def test_too_few_images_names_the_class_when_names_are_given():
    labels, ids = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]), np.arange(10)
    with pytest.raises(ValueError, match="class 'Happy' has 3 images, fewer than k=5"):
        kfold_splits(labels, ids, 5, 0, ("Happy", "Neutral"))  # checked at the call, before any fold


def test_a_tiny_class_does_not_enlarge_the_validation_carve(caplog):
    labels = np.repeat(np.arange(4), [5, 300, 300, 300])
    ids = np.arange(len(labels)).astype(str)
    with caplog.at_level("WARNING", logger="fer_core.splits"):
        fit_idx, val_idx = carve_validation(labels, ids, 0.1, seed=0)
    assert "class 0 has 5 training images" in caplog.text
    # each large class gives a tenth (the tiny one used to set the carve to a fifth of every class)
    np.testing.assert_array_equal(np.bincount(labels[val_idx], minlength=4)[1:], [30, 30, 30])
    assert sorted([*fit_idx, *val_idx]) == list(range(len(labels)))
    # every class smaller than the ten parts a tenth needs: as many parts as the largest class has
    small = np.repeat(np.arange(3), [6, 8, 4])
    fit_idx, val_idx = carve_validation(small, np.arange(len(small)).astype(str), 0.1, seed=0)
    assert len(val_idx) in (2, 3) and sorted([*fit_idx, *val_idx]) == list(range(len(small)))
    with pytest.raises(ValueError, match="class 0 has 1 training image, too few to hold one out"):
        carve_validation(np.repeat(np.arange(2), [1, 50]), np.arange(51).astype(str), 0.1, seed=0)
