"""The face-mesh landmark model averaged into the CNN's probabilities (``landmark_weight``)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedGroupKFold

import fer_core.crossval as crossval
import fer_core.landmarks as landmarks
from fer_core.checkpoint import load_model, save_model
from fer_core.config import SplitConfig, TrainConfig
from fer_core.training import predict_saved
from tests.conftest import FER4
from tests.helpers import BarMesh, bar_dataset


@pytest.fixture
def bar_mesh(monkeypatch):
    monkeypatch.setattr(landmarks, "FaceMesh", BarMesh)
    monkeypatch.setattr(landmarks, "_FEATURES", {})
    BarMesh.calls = 0
    return BarMesh


def _features_and_labels(n=120, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    features = rng.normal(size=(n, 10)) + labels[:, None] * rng.normal(size=10)
    return features, labels


def test_head_predicts_as_the_sklearn_model_it_was_fitted_from():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = _features_and_labels()
    head = landmarks.fit_landmark_head(features, labels, 4, weight=0.5, seed=3)
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                          {"logisticregression__C": [0.01, 0.1, 1.0]}, scoring="f1_macro",
                          cv=StratifiedKFold(3, shuffle=True, random_state=3)).fit(features, labels)
    new = np.random.default_rng(1).normal(size=(7, 10))
    np.testing.assert_allclose(head.predict_proba(new), search.predict_proba(new), atol=1e-9)
    cnn = np.full((7, 4), 0.25)
    np.testing.assert_allclose(head.blend(cnn, new), 0.5 * cnn + 0.5 * search.predict_proba(new), atol=1e-9)


@pytest.mark.parametrize("present", [[0, 2], [0, 1, 3]])
def test_a_class_absent_from_training_is_never_predicted(present):
    features, labels = _features_and_labels()
    keep = np.isin(labels, present)
    head = landmarks.fit_landmark_head(features[keep], labels[keep], 4, weight=1.0)
    probs = head.predict_proba(features)
    absent = [c for c in range(4) if c not in present]
    assert np.all(probs[:, absent] == 0)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    # the present classes are told apart as on the fitted images
    assert (probs.argmax(1)[keep] == labels[keep]).mean() > 0.9


def test_one_class_is_refused():
    features, labels = _features_and_labels()
    with pytest.raises(ValueError, match="at least 2 classes"):
        landmarks.fit_landmark_head(features[labels == 1], labels[labels == 1], 4, weight=0.5)


def _symmetric_faces(n=160, seed=0):
    """Faces built from 234 mirror pairs (x, y), (-x, y), in a shuffled point order, whose class moves the
    points of the left half only (so a face and its mirror image differ), with their true partner map."""
    rng = np.random.default_rng(seed)
    half = landmarks.N_LANDMARKS // 2
    # one pair per row, 0.2 apart, so a point's partner is the nearest point to its reflection
    template = np.stack([rng.uniform(0.1, 1.0, size=half), 0.2 * rng.permutation(half)], axis=1)
    order = rng.permutation(landmarks.N_LANDMARKS)  # order[j]: where pair j's left point is; right: j + half
    points = np.zeros((n, landmarks.N_LANDMARKS, 2))
    labels = np.arange(n) % 4
    left = template + labels[:, None, None] * 0.005 * rng.normal(size=(1, half, 2))
    points[:, order[:half]] = left + 0.002 * rng.normal(size=left.shape)
    points[:, order[half:]] = template * np.array([-1.0, 1.0]) + 0.002 * rng.normal(size=left.shape)
    partners = np.empty(landmarks.N_LANDMARKS, dtype=int)
    partners[order[:half]], partners[order[half:]] = order[half:], order[:half]
    return points.reshape(n, -1), labels, partners


def test_mirror_partners_are_found_and_mirroring_twice_gives_the_face_back():
    features, _, partners = _symmetric_faces()
    found = landmarks.mirror_partners(features)
    np.testing.assert_array_equal(found, partners)
    mirrored = landmarks.mirror_features(features, found).reshape(len(features), -1, 2)
    points = features.reshape(len(features), -1, 2)
    np.testing.assert_array_equal(mirrored[:, partners, 0], -points[:, :, 0])
    np.testing.assert_array_equal(mirrored[:, partners, 1], points[:, :, 1])
    np.testing.assert_array_equal(landmarks.mirror_features(mirrored.reshape(len(features), -1), found),
                                  features)


def test_a_head_fitted_with_mirror_images_predicts_a_face_as_its_mirror(monkeypatch):
    features, labels, partners = _symmetric_faces()
    mirrored = landmarks.mirror_features(features, partners)
    splits = []
    real_split = StratifiedGroupKFold.split

    def spy(self, x, y=None, groups=None):
        for fit, val in real_split(self, x, y, groups):
            splits.append((fit, val))
            yield fit, val

    monkeypatch.setattr(StratifiedGroupKFold, "split", spy)
    plain = landmarks.fit_landmark_head(features, labels, 4, weight=1.0)
    assert not splits  # without mirror images the search for C splits faces as before
    both = landmarks.fit_landmark_head(features, labels, 4, weight=1.0, mirror=True)
    # the class lives in the left half only, so a plain head tells a face from its mirror image ...
    assert np.abs(plain.predict_proba(features) - plain.predict_proba(mirrored)).max() > 0.3
    # ... and one fitted on both is (up to the solver's tolerance) blind to the side
    np.testing.assert_allclose(both.predict_proba(features), both.predict_proba(mirrored), atol=1e-3)
    assert (both.predict_proba(features).argmax(1) == labels).mean() > 0.9
    assert len(splits) == 3
    for fit, val in splits:  # a face and its mirror (row i and row i + n) are never split apart
        assert not set(fit % len(labels)) & set(val % len(labels))


def test_landmark_mirror_reaches_the_landmark_model(bar_mesh, monkeypatch):
    seen = []
    real = crossval.fit_landmark_head

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mirror"))
        return real(*args, **kwargs)

    monkeypatch.setattr(crossval, "fit_landmark_head", spy)
    cfg = TrainConfig(epochs=1, batch_size=16, landmark_weight=0.5, landmark_mirror=True)
    crossval.run_kfold(cfg, SplitConfig(k=2), bar_dataset(40))
    assert seen == [True] * 4  # per fold: the model that scores validation, and the one kept


def test_landmark_weight_out_of_range_names_the_key():
    with pytest.raises(ValueError, match="landmark_weight"):
        TrainConfig(landmark_weight=1.5)
    with pytest.raises(ValueError, match="landmark_input.*'points', 'mesh'.*'pixels'"):
        TrainConfig(landmark_input="pixels")
    with pytest.raises(ValueError, match="landmark_mirror.*landmark_input"):
        TrainConfig(landmark_weight=0.5, landmark_input="mesh", landmark_mirror=True)
    with pytest.raises(ValueError, match="landmark_select.*'blend', 'network'.*'cnn'"):
        TrainConfig(landmark_select="cnn")


def test_each_landmark_input_is_computed_once_per_image_and_kind(bar_mesh):
    ds = bar_dataset(12)
    ids = ds.manifest["image_id"].to_numpy()
    points = landmarks.landmark_features(ds.pixels, ids)
    inner = landmarks.landmark_features(ds.pixels, ids, kind="mesh")
    assert points.shape == (12, 2 * landmarks.N_LANDMARKS) and inner.shape == (12, landmarks.MESH_FEATURES)
    again = landmarks.landmark_features(ds.pixels[::-1], ids[::-1], kind="mesh")
    assert BarMesh.calls == 24  # once per image for each kind, not again
    np.testing.assert_array_equal(again, inner[::-1])
    np.testing.assert_array_equal(inner, BarMesh().embed(ds.pixels))


def test_test_fold_never_reaches_the_landmark_model(bar_mesh, monkeypatch):
    ds = bar_dataset(60)
    fitted = []
    real = crossval.fit_landmark_head

    def spy(features, labels, *args, **kwargs):
        fitted.append({tuple(np.round(row, 9)) for row in features})
        return real(features, labels, *args, **kwargs)

    monkeypatch.setattr(crossval, "fit_landmark_head", spy)
    cfg = TrainConfig(epochs=1, batch_size=16, landmark_weight=0.5)
    _, preds, runs = crossval.run_kfold(cfg, SplitConfig(k=3), ds)
    features = landmarks.normalise(BarMesh()(ds.pixels))
    row_of = {image: i for i, image in enumerate(ds.manifest["image_id"])}
    assert len(fitted) == 2 * 3  # per fold: one to score the validation images, then the one kept
    for fold in range(3):
        for_val, kept = fitted[2 * fold], fitted[2 * fold + 1]
        tested = {tuple(np.round(features[i], 9))
                  for i in preds.loc[preds["fold"] == fold, "image_id"].map(row_of)}
        assert tested and not tested & kept and not tested & for_val
        assert len(kept) == len(ds) - len(tested)  # every other image, validation ones included
        assert for_val < kept and len(kept - for_val) == round(0.1 * len(kept))  # not the validation ones
        assert runs[fold].result.landmarks is not None


def test_validation_scores_the_blend_with_the_landmark_model(bar_mesh):
    from sklearn.metrics import f1_score

    from fer_core.training import Trainer, predict_proba

    ds = bar_dataset(60)
    x, y = np.array(ds.pixels), np.array(ds.labels)  # writable copies, as the fold indexing makes
    cfg = TrainConfig(epochs=3, batch_size=16, landmark_weight=0.3, patience=3)
    rng = np.random.default_rng(0)
    other = rng.dirichlet(np.ones(4), size=20)  # another model's probabilities for the validation images
    tr = Trainer(cfg, x[20:], y[20:], x[:20], y[:20], 4, val_blend=(other, 0.3))
    losses = []
    for _ in range(3):
        metrics = tr.step()
        losses.append(metrics["train_loss"])
        blend = 0.7 * predict_proba(tr.eval_model, tr.x_val) + 0.3 * other
        assert metrics["val_macro_f1"] == pytest.approx(f1_score(y[:20], blend.argmax(1), average="macro"))
        assert metrics["val_accuracy"] == pytest.approx((blend.argmax(1) == y[:20]).mean())
    plain = Trainer(cfg, x[20:], y[20:], x[:20], y[:20], 4)  # (each Trainer seeds torch anew)
    assert [plain.step()["train_loss"] for _ in range(3)] == pytest.approx(losses)  # training is untouched
    with pytest.raises(ValueError, match="val_blend: shape"):
        Trainer(cfg, x[20:], y[20:], x[:20], y[:20], 4, val_blend=(other[:5], 0.3))


@pytest.mark.parametrize("select", ["blend", "network"])
def test_landmark_select_says_whose_validation_score_keeps_the_epoch(select):
    from sklearn.metrics import f1_score

    from fer_core.training import Trainer, predict_proba

    ds = bar_dataset(60)
    x, y = np.array(ds.pixels), np.array(ds.labels)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.01, landmark_weight=0.5, landmark_select=select,
                      patience=6)
    other = np.eye(4)[y[:20]]  # a landmark model that is always right: every blend scores 1.0
    tr = Trainer(cfg, x[20:], y[20:], x[:20], y[:20], 4, val_blend=(other, 0.9))
    own, blend = [], []
    while not tr.done:
        metrics = tr.step()
        mine = f1_score(y[:20], predict_proba(tr.eval_model, tr.x_val).argmax(1), average="macro")
        assert metrics["val_network_macro_f1"] == pytest.approx(mine)
        own.append(mine)
        blend.append(metrics["val_macro_f1"])
    assert blend == pytest.approx([1.0] * 6)
    assert int(np.argmax(own)) > 0  # (the network does improve here, so the two choices differ)
    # "blend" keeps the first epoch at the blend's best; "network" the network's own best epoch
    assert tr.best_epoch == (0 if select == "blend" else int(np.argmax(own)))
    assert tr.best_val_score == pytest.approx(1.0)  # reported either way: the blend's, at the kept epoch
    assert tr.best_score == pytest.approx(1.0 if select == "blend" else max(own))


def _features(kind, pixels):
    """What the landmark model of ``landmark_input = kind`` reads, from the stand-in mesh directly."""
    return landmarks.normalise(BarMesh()(pixels)) if kind == "points" else BarMesh().embed(pixels)


@pytest.mark.parametrize("kind", ["points", "mesh"])
def test_predictions_are_the_weighted_average_of_cnn_and_landmarks(bar_mesh, kind):
    ds = bar_dataset(60)
    cfg = TrainConfig(epochs=1, batch_size=16, landmark_weight=0.3, landmark_input=kind)
    _, preds, runs = crossval.run_kfold(cfg, SplitConfig(k=3), ds)
    cols = [f"p_{c}" for c in ds.classes]
    for run in runs:
        rows = preds["fold"] == run.fold
        idx = ds.manifest.reset_index().set_index("image_id").loc[preds.loc[rows, "image_id"], "index"]
        pixels = ds.pixels[idx.to_numpy()]
        head, run.result.landmarks = run.result.landmarks, None
        saved_free = crossval.score_fold(ds, idx.to_numpy(), run.result, run.fold)  # the CNN alone
        cnn = saved_free.predictions[cols].to_numpy(np.float64)
        assert head.features == kind and head.coef.shape[1] == _features(kind, pixels[:1]).shape[1]
        mesh = head.predict_proba(_features(kind, pixels))
        np.testing.assert_allclose(preds.loc[rows, cols].to_numpy(np.float64), 0.7 * cnn + 0.3 * mesh,
                                   atol=1e-5)


@pytest.mark.parametrize("kind", ["points", "mesh"])
def test_saved_model_keeps_its_landmark_model(bar_mesh, tmp_path, kind):
    ds = bar_dataset(60)
    cfg = TrainConfig(epochs=1, batch_size=16, landmark_weight=0.5, landmark_input=kind)
    _, preds, runs = crossval.run_kfold(cfg, SplitConfig(k=3), ds)
    run = runs[0]
    path = save_model(tmp_path / "m.pt", run.result.model, arch="main", classes=ds.classes,
                      input_size=ds.image_size, mean=run.result.mean, std=run.result.std,
                      landmarks=run.result.landmarks)
    raw = torch.load(path, weights_only=True)  # tensors and plain values only
    assert raw["landmarks"]["mesh_sha256"] == landmarks.MESH_SHA256
    saved = load_model(path)
    assert saved.landmarks.weight == 0.5 and saved.landmarks.features == kind
    rows = (preds["fold"] == 0).to_numpy()
    idx = ds.manifest.reset_index().set_index("image_id").loc[preds.loc[rows, "image_id"], "index"].to_numpy()
    probs = predict_saved(saved, ds.pixels[idx])
    np.testing.assert_allclose(probs, preds.loc[rows, [f"p_{c}" for c in ds.classes]].to_numpy(), atol=1e-5)
    # a file saved before landmark_input existed has no "features": it read the points
    old = {**raw, "landmarks": {k: v for k, v in raw["landmarks"].items() if k != "features"}}
    torch.save(old, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").landmarks.features == "points"
    # a file fitted on another face mesh is refused, naming the file
    raw["landmarks"]["mesh_sha256"] = "0" * 64
    torch.save(raw, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*refit"):
        load_model(tmp_path / "other.pt")


def test_landmarks_are_computed_once_per_image(bar_mesh):
    ds = bar_dataset(20)
    ids = ds.manifest["image_id"].to_numpy()
    first = landmarks.landmark_features(ds.pixels, ids)
    again = landmarks.landmark_features(ds.pixels[::-1], ids[::-1])
    assert BarMesh.calls == 20
    np.testing.assert_array_equal(again, first[::-1])


def test_missing_model_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(landmarks.ENV_VAR, str(tmp_path / "none.tflite"))
    with pytest.raises(FileNotFoundError, match="study.landmarks fetch"):
        landmarks.check_mesh_model()
    (tmp_path / "none.tflite").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="sha256"):
        landmarks.check_mesh_model()
    done = subprocess.run([sys.executable, "-m", "study.landmarks", "check"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and "none.tflite" in done.stderr and "sha256" in done.stderr


@pytest.mark.realdata
def test_the_face_mesh_places_eyes_nose_and_mouth_on_fer4_faces(fer4_and_mesh):
    from PIL import Image

    every = sorted((FER4 / "Data").rglob("*.png"))
    files = every[:: len(every) // 100][:100]  # every class folder, evenly
    pixels = np.stack([np.asarray(Image.open(f).convert("L").resize((48, 48))) for f in files])
    points = landmarks.FaceMesh()(pixels)
    right_eye, left_eye, nose, mouth = points[:, 33], points[:, 263], points[:, 1], points[:, 13]
    # the subject's right eye is on the image's left; the nose between the eyes; the mouth below both
    ordered = ((right_eye[:, 0] < nose[:, 0]) & (nose[:, 0] < left_eye[:, 0])
               & (mouth[:, 1] > right_eye[:, 1]) & (mouth[:, 1] > left_eye[:, 1]))
    assert ordered.mean() >= 0.95, f"{(~ordered).sum()} of {len(files)} faces out of order"
    # a face moved inside its image moves its landmarks with it
    shifted = np.roll(pixels, 3, axis=2)
    moved = landmarks.FaceMesh()(shifted)
    dx = np.median(moved[:, :, 0] - points[:, :, 0])
    assert abs(dx * 48 - 3) < 1.0


@pytest.mark.realdata
def test_the_mesh_inner_layers_tell_fer4_expressions_apart(fer4_and_mesh):
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    files, labels = [], []
    for label, folder in enumerate(sorted((FER4 / "Data").iterdir())):
        every = sorted(folder.glob("*.png"))
        files += every[:: len(every) // 60][:60]  # 60 faces per class, evenly through the folder
        labels += [label] * 60
    pixels = np.stack([np.asarray(Image.open(f).convert("L").resize((48, 48))) for f in files])
    mesh = landmarks.FaceMesh()
    inner = mesh.embed(pixels)
    assert inner.shape == (240, landmarks.MESH_FEATURES) and np.isfinite(inner).all()
    # reading the inner layers leaves the points as they were
    np.testing.assert_allclose(mesh(pixels[:10]), landmarks.FaceMesh()(pixels[:10]), atol=1e-6)
    # a linear model on them reads the expression far above chance (0.25), as on all of fer4 (0.81)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
    score = cross_val_score(model, inner, labels, cv=3, scoring="f1_macro").mean()
    assert score > 0.5, f"macro-F1 {score:.3f} from the mesh's inner layers"


def test_tune_trials_fit_the_landmark_model_without_their_test_folds(bar_mesh, monkeypatch):
    from study.experiment import load_experiment
    from study.trainable import final_scores, make_trainers, step_report

    ds = bar_dataset(48)
    exp = load_experiment(None, ["split.k=3", "train.epochs=1", "train.batch_size=8"])
    fitted = []
    real = crossval.fit_landmark_head
    monkeypatch.setattr(crossval, "fit_landmark_head",
                        lambda features, *a, **k: fitted.append(len(features)) or real(features, *a, **k))
    trainers, tests = make_trainers(exp, ds, {"arch": "main", "landmark_weight": 0.5,
                                              "landmark_select": "network"})
    # each fold's validation is scored with a landmark model fitted on the fold's fitted images only
    assert fitted == [len(tr.y) for tr in trainers]
    assert all(tr.val_blend is not None and len(tr.val_blend[0]) == len(tr.y_val) for tr in trainers)
    report = step_report(trainers)
    # the network's own score kept the epoch; ASHA and selection are told the blend's score there
    kept = [tr.history[tr.best_epoch] for tr in trainers]
    assert report["score"] == pytest.approx(np.mean([m["val_macro_f1"] for m in kept]))
    assert [tr.best_score for tr in trainers] == [m["val_network_macro_f1"] for m in kept]
    fitted.clear()
    scores = final_scores(exp, ds, trainers, tests)
    assert fitted == [len(ds) - len(test) for test in tests]
    assert 0 <= scores["cv_macro_f1"] <= 1


def test_sample_weight_fits_the_weighted_sklearn_model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = _features_and_labels()
    weights = np.where(labels == 2, 5.0, 1.0)
    head = landmarks.fit_landmark_head(features, labels, 4, weight=1.0, seed=3, sample_weight=weights)
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                          {"logisticregression__C": [0.01, 0.1, 1.0]}, scoring="f1_macro",
                          cv=StratifiedKFold(3, shuffle=True, random_state=3))
    search.fit(features, labels, logisticregression__sample_weight=weights)
    new = np.random.default_rng(1).normal(size=(50, 10))
    np.testing.assert_allclose(head.predict_proba(new), search.predict_proba(new), atol=1e-9)
    plain = landmarks.fit_landmark_head(features, labels, 4, weight=1.0, seed=3)
    assert np.abs(head.predict_proba(new) - plain.predict_proba(new)).max() > 1e-3  # the weights count
    with pytest.raises(ValueError, match="one weight per face"):
        landmarks.fit_landmark_head(features, labels, 4, weight=1.0, sample_weight=weights[:-1])


@pytest.mark.parametrize("mitigation", ["none", "resample", "reweight", "groupdro"])
def test_weighting_mitigations_weight_the_landmark_model_as_the_cnn(bar_mesh, monkeypatch, mitigation):
    ds = bar_dataset(60)
    ds.manifest.loc[ds.manifest.index[:20], "gender"] = "Male"  # unequal class x gender cells
    features = landmarks.normalise(BarMesh()(ds.pixels))
    row_of = {tuple(np.round(row, 9)): i for i, row in enumerate(features)}
    seen = []
    real = crossval.fit_landmark_head

    def spy(features, labels, *args, sample_weight=None, **kwargs):
        seen.append(([row_of[tuple(np.round(row, 9))] for row in features], sample_weight))
        return real(features, labels, *args, sample_weight=sample_weight, **kwargs)

    monkeypatch.setattr(crossval, "fit_landmark_head", spy)
    cfg = TrainConfig(epochs=1, batch_size=16, landmark_weight=0.5, mitigation=mitigation)
    crossval.run_kfold(cfg, SplitConfig(k=2), ds)
    assert len(seen) == 4
    for rows, weights in seen:
        if mitigation in ("none", "groupdro"):
            assert weights is None
            continue
        fitted = ds.manifest.iloc[rows]
        by_class = fitted.groupby("label")["gender"]
        cell_size = fitted.groupby(["label", "gender"])["gender"].transform("size")
        # every class the same total, split equally among the groups it has (no gender is unknown here)
        want = len(fitted) / by_class.ngroups / by_class.transform("nunique") / cell_size
        assert cell_size.nunique() > 2 and len(set(np.round(weights, 9))) > 1
        np.testing.assert_allclose(weights, want.to_numpy())
