"""Tests for fer_core.synthetic: layout, determinism, planted biases, and that the faces are learnable."""

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from fer_core.config import from_dict
from fer_core.data import FIXED_COLUMNS, image_id, load_dataset, save_dataset
from fer_core.synthetic import AGES, CLASSES, GENDERS, SyntheticConfig, make_dataset, render_faces


@pytest.fixture(scope="module")
def small():
    return make_dataset(n=200, seed=3)


@pytest.fixture(scope="module")
def learn_data():
    """Train and (separately seeded, gender-balanced) test sets, without and with faint female cues."""
    return {bias: (make_dataset(n=1500, seed=1, faint_cues=bias),
                   make_dataset(n=800, seed=2, faint_cues=bias)) for bias in (0.0, 0.8)}


def _fit_predict(train, test, *, epochs=8, seed=0):
    """Train a tiny CNN on ``train`` for a few CPU seconds; return its predictions on ``test``."""
    torch.manual_seed(seed)
    chans = (1, 8, 16, 32, 64)
    layers = []
    for cin, cout in zip(chans, chans[1:], strict=False):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
    model = nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(CLASSES)))

    def standardize(ds):  # (N, 1, H, W), zero mean and unit variance per image
        x = torch.from_numpy(np.array(ds.pixels, dtype=np.float32)).unsqueeze(1)
        return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1.0)

    x, y = standardize(train), torch.from_numpy(np.array(train.labels))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = torch.arange(len(x)).split(64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(batches))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(64):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            return model(standardize(test)).argmax(1).numpy()
    finally:
        torch.set_num_threads(threads)


def _accuracy_by_gender(test, pred):
    correct = pred == test.labels
    female = test.manifest["gender"].eq("Female").to_numpy()
    return correct.mean(), correct[female].mean(), correct[~female].mean()


@pytest.fixture(scope="module")
def cnn_results(learn_data):
    return {bias: _accuracy_by_gender(test, _fit_predict(train, test))
            for bias, (train, test) in learn_data.items()}


def test_same_config_gives_identical_bytes(small):
    again = make_dataset(n=200, seed=3)
    assert again.pixels.tobytes() == small.pixels.tobytes()
    assert again.manifest.equals(small.manifest)


def test_different_seed_gives_different_images(small):
    other = make_dataset(n=200, seed=4)
    assert not set(other.manifest["image_id"]) & set(small.manifest["image_id"])


def test_shapes_dtypes_and_columns(small):
    assert small.pixels.shape == (200, 48, 48) and small.pixels.dtype == np.uint8
    assert list(small.manifest.columns) == [*FIXED_COLUMNS, "gender", "age"]
    assert small.classes == CLASSES == tuple(sorted(CLASSES))
    assert small.name == "synthetic"
    assert small.manifest["source_path"].iloc[7] == "synthetic/7"
    assert set(small.manifest["subset"]) == {"base"}
    assert small.pixels.std() > 20  # not blank


def test_image_ids_are_unique_hashes_of_the_pixels(small):
    ids = small.manifest["image_id"]
    assert ids.is_unique
    assert all(ids.iloc[i] == image_id(small.pixels[i]) for i in (0, 99, 199))


def test_other_image_size():
    ds = make_dataset(n=8, image_size=32)
    assert ds.pixels.shape == (8, 32, 32)


def test_classes_balanced_and_group_shares_as_configured():
    ds = make_dataset(n=802, seed=5, female_share=0.3, age_shares=(0.4, 0.1, 0.2, 0.3))
    m = ds.manifest
    assert sorted(m["label"].value_counts().tolist()) == [200, 200, 201, 201]
    for _, rows in m.groupby("label"):
        assert rows["gender"].eq("Female").mean() == pytest.approx(0.3, abs=0.01)
        shares = rows["age"].value_counts(normalize=True).reindex(list(AGES))
        np.testing.assert_allclose(shares, (0.4, 0.1, 0.2, 0.3), atol=0.01)


def test_overrep_class_sets_the_group_share_inside_that_class_only():
    ds = make_dataset(n=800, seed=6, overrep_class="Happy", overrep_share=0.9)
    female = ds.manifest.groupby("label")["gender"].apply(lambda g: g.eq("Female").mean())
    assert female["Happy"] == pytest.approx(0.9, abs=0.01)
    for cls in ("Focused", "Neutral", "Surprised"):
        assert female[cls] == pytest.approx(0.5, abs=0.01)


def test_overrep_on_age_rescales_the_other_age_groups():
    ds = make_dataset(n=800, seed=6, bias_attr="age", bias_group="Senior", overrep_class="Focused",
                      overrep_share=0.55, age_shares=(0.7, 0.05, 0.1, 0.15))
    focused = ds.manifest[ds.manifest["label"].eq("Focused")]["age"].value_counts(normalize=True)
    assert focused["Senior"] == pytest.approx(0.55, abs=0.01)
    # the rest keeps Adult : Baby : Children = 0.7 : 0.05 : 0.1
    assert focused["Adult"] == pytest.approx(0.45 * 0.7 / 0.85, abs=0.01)


def test_n_extra_rows_are_all_of_the_bias_group_in_subset_extra():
    ds = make_dataset(n=100, n_extra=40, seed=2)
    extra = ds.extras()
    assert len(ds) == 140 and len(ds.base()) == 100 and len(extra) == 40
    assert set(extra.manifest["subset"]) == {"extra"}
    assert set(extra.manifest["gender"]) == {"Female"}
    assert extra.manifest["label"].value_counts().tolist() == [10] * 4
    assert ds.manifest["image_id"].is_unique
    # adding extras leaves the dataset proper untouched, so runs with and without them pair up
    assert ds.base().pixels.tobytes() == make_dataset(n=100, seed=2).pixels.tobytes()


def test_faint_cues_change_only_the_bias_group():
    plain, biased = make_dataset(n=120, seed=7), make_dataset(n=120, seed=7, faint_cues=0.8)
    same = (plain.pixels == biased.pixels).all(axis=(1, 2))
    female = plain.manifest["gender"].eq("Female").to_numpy()
    neutral = plain.manifest["label"].eq("Neutral").to_numpy()  # no cue to make fainter
    assert same[~female | neutral].all()
    assert not same[female & ~neutral].any()


def test_config_from_toml_style_dict_and_validation():
    cfg = from_dict(SyntheticConfig, {"n": 10, "age_shares": [0.25, 0.25, 0.25, 0.25]}, "data.synthetic")
    assert cfg.age_shares == (0.25, 0.25, 0.25, 0.25)
    with pytest.raises(KeyError, match="nosie"):
        make_dataset(nosie=0.1)
    with pytest.raises(ValueError, match="bias_group"):
        make_dataset(bias_attr="age", bias_group="Female")
    with pytest.raises(ValueError, match="age_shares"):
        make_dataset(age_shares=(0.5, 0.5))
    with pytest.raises(ValueError, match="overrep_class"):
        make_dataset(overrep_class="Angry")


def test_report_counts_and_round_trip(small, tmp_path):
    report = small.report
    assert report["n_images"] == 200 and report["config"]["seed"] == 3
    assert sum(report["counts"]["label"].values()) == 200
    assert set(report["counts"]["gender"]) == set(GENDERS)
    json.dumps(report)
    loaded = load_dataset(save_dataset(small, tmp_path / "syn"), mmap=False)
    assert loaded.classes == CLASSES
    assert loaded.pixels.tobytes() == small.pixels.tobytes()


def test_render_faces_is_deterministic_given_the_generator():
    args = (np.array([0, 1, 2, 3]), np.array(GENDERS * 2), np.array(AGES))
    first = render_faces(*args, np.random.default_rng(0))
    assert first.shape == (4, 48, 48) and first.dtype == np.uint8
    assert np.array_equal(first, render_faces(*args, np.random.default_rng(0)))


def test_global_intensity_statistics_do_not_reveal_the_class(learn_data):
    # A model that ignores the face (brightness, contrast, histogram) stays near chance (0.25).
    def stats(ds):
        x = ds.pixels.reshape(len(ds), -1) / 255.0
        hist = np.stack([np.histogram(r, bins=16, range=(0, 1))[0] for r in x]) / x.shape[1]
        return np.column_stack([x.mean(1), x.std(1), hist])

    train, test = learn_data[0.0]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(stats(train), train.labels)
    assert clf.score(stats(test), test.labels) < 0.35


def test_gender_is_visible_in_the_face(learn_data):
    def coarse(ds):  # 12 x 12 block means, standardized per image
        x = ds.pixels.astype(float).reshape(len(ds), 12, 4, 12, 4).mean((2, 4)).reshape(len(ds), -1)
        return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1)

    train, test = learn_data[0.0]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    clf.fit(coarse(train), train.manifest["gender"])
    assert clf.score(coarse(test), test.manifest["gender"]) > 0.7


def test_small_cnn_learns_well_above_chance_without_group_gap(cnn_results):
    acc, female, male = cnn_results[0.0]
    assert acc > 0.7  # chance is 0.25; measured 0.87-0.88 over 5 runs
    assert abs(male - female) < 0.1  # measured |gap| 0.003-0.035


def test_faint_cues_show_up_as_a_per_group_gap(cnn_results):
    _, female, male = cnn_results[0.8]
    assert male - female > 0.2  # measured 0.37-0.42 (Female ~0.4, Male ~0.8)
