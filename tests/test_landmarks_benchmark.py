"""benchmarks/landmarks_fer4.py: per-face landmark features and their out-of-fold classifier."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLASSES = ["Focused", "Happy", "Neutral", "Surprised"]
_spec = importlib.util.spec_from_file_location(
    "landmarks_fer4", Path(__file__).resolve().parents[1] / "benchmarks" / "landmarks_fer4.py")
landmarks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(landmarks)


def _faces(n: int, rng: np.random.Generator) -> np.ndarray:
    faces = rng.normal(size=(n, landmarks.N_LANDMARKS, 3))
    left, right = landmarks.EYE_CORNERS
    faces[:, left, :2] += [-3.0, 0.0]  # eye corners apart, so the eye line is well defined
    faces[:, right, :2] += [3.0, 0.0]
    return faces


def test_features_ignore_position_rotation_and_size_of_the_face():
    rng = np.random.default_rng(0)
    faces = _faces(5, rng)
    angle = rng.uniform(-np.pi / 3, np.pi / 3, size=5)
    turn = np.stack([np.stack([np.cos(angle), -np.sin(angle)], -1),
                     np.stack([np.sin(angle), np.cos(angle)], -1)], -2)
    moved = faces.copy()
    moved[:, :, :2] = np.einsum("nij,nkj->nki", turn, faces[:, :, :2])
    moved *= rng.uniform(0.2, 5.0, size=(5, 1, 1))
    moved[:, :, :2] += rng.normal(scale=10, size=(5, 1, 2))
    np.testing.assert_allclose(landmarks.normalise(moved, 3), landmarks.normalise(faces, 3), atol=1e-9)
    # a different face gives different features
    assert not np.allclose(landmarks.normalise(faces[[1]]), landmarks.normalise(faces[[0]]))


def test_no_face_stays_missing():
    faces = _faces(3, np.random.default_rng(1))
    faces[1] = np.nan
    features = landmarks.normalise(faces)
    assert features.shape == (3, landmarks.N_LANDMARKS * 2)
    assert np.isnan(features[1]).all() and not np.isnan(features[[0, 2]]).any()


def _separable(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.asarray(CLASSES)[np.arange(n) % 4]
    centres = rng.normal(scale=3, size=(4, 6))
    features = centres[np.arange(n) % 4] + rng.normal(size=(n, 6))
    folds = rng.permutation(np.arange(n) % 3)
    return features, labels, folds


def test_a_folds_probabilities_do_not_depend_on_its_own_labels():
    features, labels, folds = _separable(96, 0)
    probs = landmarks.landmark_probabilities(features, labels, folds, CLASSES)
    # learnt from the other folds: the separable classes are recognised
    assert (np.asarray(CLASSES)[probs.argmax(1)] == labels).mean() > 0.9
    np.testing.assert_allclose(probs.sum(1), 1.0)
    scrambled = labels.copy()
    scrambled[folds == 0] = np.random.default_rng(1).permutation(labels[folds == 0])
    again = landmarks.landmark_probabilities(features, scrambled, folds, CLASSES)
    np.testing.assert_allclose(again[folds == 0], probs[folds == 0])
    assert not np.allclose(again[folds != 0], probs[folds != 0])  # fold 0's labels do train the others


def test_an_image_with_no_face_gets_the_fitted_class_shares():
    features, labels, folds = _separable(96, 2)
    labels[(folds != 0) & (labels == "Happy")] = "Focused"  # no Happy image is fitted for fold 0
    features[np.flatnonzero(folds == 0)[:3]] = np.nan
    probs = landmarks.landmark_probabilities(features, labels, folds, CLASSES)
    fitted = labels[folds != 0]
    expected = [np.mean(fitted == c) for c in CLASSES]
    np.testing.assert_allclose(probs[np.flatnonzero(folds == 0)[:3]], [expected] * 3)
    assert expected[1] == 0 and expected[0] > expected[2]
    assert (probs[folds == 0, 1] == 0).all()  # the class it never saw is never predicted


def test_score_refuses_landmarks_of_other_images(tmp_path, monkeypatch, capsys):
    pixels = np.zeros((4, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    pd.DataFrame({"image_id": list("abcd"), "label": CLASSES}).to_parquet(tmp_path / "manifest.parquet")
    preds = pd.DataFrame({"arch": "main", "fold": [0, 0, 1, 1], "image_id": list("abcd"),
                          "y_true": CLASSES, **{f"p_{c}": 0.25 for c in CLASSES}})
    preds.to_parquet(tmp_path / "predictions.parquet")
    other = pixels.copy()
    other[0, 0, 0] = 1
    np.savez(tmp_path / "mesh.npz", landmarks=np.zeros((4, landmarks.N_LANDMARKS, 3), np.float32),
             pixels_sha256=landmarks.pixels_fingerprint(other), size=192, mediapipe="0.10.14")
    monkeypatch.setattr(sys, "argv", ["landmarks_fer4.py", "score", "--data", str(tmp_path), "--landmarks",
                                      str(tmp_path / "mesh.npz"), str(tmp_path / "predictions.parquet")])
    with pytest.raises(SystemExit, match="other images than"):
        landmarks.main()


def _random_dataset(folder, n, rng):
    """A canonical dataset of ``n`` noise images in ``folder``, classes in turn: (pixels, ids, labels)."""
    pixels = rng.integers(0, 255, size=(n, 8, 8), dtype=np.uint8)
    np.save(folder / "pixels.npy", pixels)
    ids = [f"img{i}" for i in range(n)]
    labels = np.asarray(CLASSES)[np.arange(n) % 4]
    pd.DataFrame({"image_id": ids, "label": labels}).to_parquet(folder / "manifest.parquet")
    return pixels, ids, labels


def test_score_averages_the_cnn_with_the_landmarks(tmp_path, monkeypatch, capsys):
    n = 48
    rng = np.random.default_rng(3)
    pixels, ids, labels = _random_dataset(tmp_path, n, rng)
    faces = _faces(n, rng)
    faces[:, 10, :2] += np.stack([np.arange(n) % 4 * 2.0, np.zeros(n)], -1)  # the class moves one landmark
    np.savez(tmp_path / "mesh.npz", landmarks=faces.astype(np.float32), size=192, mediapipe="0.10.14",
             pixels_sha256=landmarks.pixels_fingerprint(pixels))
    # a CNN that knows nothing: every class equally likely, so the average decides as the landmarks do
    preds = pd.DataFrame({"arch": "main", "fold": np.arange(n) % 3, "image_id": ids, "y_true": labels,
                          "gender": np.where(np.arange(n) % 2, "Male", "Female"),
                          **{f"p_{c}": 0.25 for c in CLASSES}})
    preds.to_parquet(tmp_path / "predictions.parquet")
    monkeypatch.setattr(sys, "argv", ["landmarks_fer4.py", "score", "--data", str(tmp_path), "--landmarks",
                                      str(tmp_path / "mesh.npz"), str(tmp_path / "predictions.parquet")])
    landmarks.main()
    lines = {line.split(" per fold ")[0].strip(): line for line in capsys.readouterr().out.splitlines()
             if " per fold " in line}
    assert set(lines) == {"main", "main landmarks", "main + landmarks"}

    def per_fold(name):
        return lines[name].split(" per fold ")[1].split("]")[0]

    assert per_fold("main + landmarks") == per_fold("main landmarks")
    assert per_fold("main landmarks") != per_fold("main")
    assert "gender gap (Male - Female accuracy)" in lines["main + landmarks"]


def test_gender_gap_per_fold_is_male_minus_female_accuracy():
    rng = np.random.default_rng(4)
    n = 80
    rows = pd.DataFrame({"fold": np.arange(n) % 2, "y_true": rng.choice(CLASSES, n),
                         "gender": rng.choice(["Male", "Female", None], n)})
    probs = rng.dirichlet(np.ones(4), n)
    for j, c in enumerate(CLASSES):
        rows[f"p_{c}"] = probs[:, j]
    gaps = landmarks.gender_gaps(rows, CLASSES)
    right = rows["y_true"].to_numpy() == np.asarray(CLASSES)[probs.argmax(1)]
    for fold in (0, 1):
        acc = {g: right[(rows["fold"] == fold) & (rows["gender"] == g)].mean() for g in ("Male", "Female")}
        assert gaps[fold] == pytest.approx(acc["Male"] - acc["Female"])
    assert landmarks.gender_gaps(rows.drop(columns="gender"), CLASSES) is None


def test_score_names_a_missing_or_foreign_file(tmp_path, monkeypatch):
    np.save(tmp_path / "pixels.npy", np.zeros((2, 8, 8), dtype=np.uint8))
    pd.DataFrame({"image_id": ["a", "b"], "label": CLASSES[:2]}).to_parquet(tmp_path / "manifest.parquet")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))

    def run(landmarks_file, predictions):
        monkeypatch.setattr(sys, "argv", ["landmarks_fer4.py", "score", "--data", str(tmp_path),
                                          "--landmarks", str(landmarks_file), str(predictions)])
        with pytest.raises(SystemExit) as err:
            landmarks.main()
        return str(err.value)

    assert "missing.npz: no such file" in run(tmp_path / "missing.npz", tmp_path / "p.parquet")
    assert "other.npz: not a landmarks file" in run(tmp_path / "other.npz", tmp_path / "p.parquet")


def test_runs_of_one_architecture_are_told_apart_by_name(tmp_path):
    rows = {"arch": "main", "fold": [0, 1], "image_id": ["a", "b"], "y_true": CLASSES[:2],
            **{f"p_{c}": 0.25 for c in CLASSES}}
    pd.DataFrame({**rows, "seed": 0}).to_parquet(tmp_path / "s0.parquet")
    pd.DataFrame({**rows, "seed": 1}).to_parquet(tmp_path / "s1.parquet")
    frame = landmarks.load_predictions([f"seed0={tmp_path / 's0.parquet'}",
                                        f"seed1={tmp_path / 's1.parquet'}"])
    assert sorted(frame["arch"].unique()) == ["seed0", "seed1"] and len(frame) == 4
    with pytest.raises(SystemExit, match="given twice"):
        landmarks.load_predictions([str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet")])


def test_models_splits_a_landmark_run_into_cnn_and_landmarks(tmp_path, monkeypatch, capsys):
    import fer_core.landmarks as tool
    from fer_core.data import save_dataset
    from study import kfold
    from tests.helpers import BarMesh, bar_dataset

    monkeypatch.setattr(tool, "FaceMesh", BarMesh)
    monkeypatch.setattr(tool, "_FEATURES", {})
    save_dataset(bar_dataset(60), tmp_path / "bars")
    for name, weight, kind in (("plain", 0.0, "points"), ("mesh", 0.5, "points"), ("inner", 0.5, "mesh")):
        assert kfold.main(["--data", str(tmp_path / "bars"), "--arch", "main", "--out", str(tmp_path / name),
                           "k=2", "epochs=1", "batch_size=16", f"landmark_weight={weight}",
                           f"landmark_input={kind}"]) == 0
    capsys.readouterr()

    def run(name):
        monkeypatch.setattr(sys, "argv", ["landmarks_fer4.py", "models", str(tmp_path / name),
                                          "--data", str(tmp_path / "bars")])
        landmarks.main()
        return capsys.readouterr().out

    with pytest.raises(SystemExit, match="fold0.pt: no landmark model"):
        run("plain")
    lines = {line.split("  per fold")[0].strip(): line for line in run("mesh").splitlines()}
    assert set(lines) == {"CNN", "landmarks (points)", "+ landmarks (weight 0.5)"}
    folds = pd.read_parquet(tmp_path / "mesh" / "folds.parquet").sort_values("fold")
    # the averaged row is the run's own test macro-F1, fold by fold
    assert str(np.round(folds["macro_f1"].to_numpy(), 4).tolist()) in lines["+ landmarks (weight 0.5)"]
    # a run whose landmark model read the mesh's inner layers is split with those
    lines = {line.split("  per fold")[0].strip(): line for line in run("inner").splitlines()}
    assert set(lines) == {"CNN", "landmarks (mesh)", "+ landmarks (weight 0.5)"}
    folds = pd.read_parquet(tmp_path / "inner" / "folds.parquet").sort_values("fold")
    assert str(np.round(folds["macro_f1"].to_numpy(), 4).tolist()) in lines["+ landmarks (weight 0.5)"]


def test_score_reads_the_mesh_inner_layers_with_input_mesh(tmp_path, monkeypatch, capsys):
    n = 48
    rng = np.random.default_rng(5)
    pixels, ids, labels = _random_dataset(tmp_path, n, rng)
    codes = np.arange(n) % 4
    inner = rng.normal(size=(n, 30))
    inner[np.arange(n), codes] += 4.0  # the class is in the inner layers; the points below are noise
    common = dict(landmarks=_faces(n, rng).astype(np.float32),
                  pixels_sha256=landmarks.pixels_fingerprint(pixels), mesh_sha256="0" * 64)
    np.savez(tmp_path / "mesh.npz", inner=inner.astype(np.float32), **common)
    np.savez(tmp_path / "old.npz", **common)
    preds = pd.DataFrame({"arch": "main", "fold": np.arange(n) % 3, "image_id": ids, "y_true": labels,
                          **{f"p_{c}": 0.25 for c in CLASSES}})
    preds.to_parquet(tmp_path / "predictions.parquet")

    def run(file, *extra):
        argv = ["landmarks_fer4.py", "score", "--data", str(tmp_path), "--landmarks", str(tmp_path / file),
                *extra, str(tmp_path / "predictions.parquet")]
        monkeypatch.setattr(sys, "argv", argv)
        landmarks.main()
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith("main landmarks"))
        return float(line.split(" mean ")[1].split()[0]), out

    mesh_score, out = run("mesh.npz", "--input", "mesh")
    assert "the mesh's inner layers" in out
    points_score, _ = run("mesh.npz")
    assert mesh_score > 0.6 and points_score < 0.5  # chance: 0.25
    with pytest.raises(SystemExit, match="old.npz.*inner layers.*extract again"):
        run("old.npz", "--input", "mesh")
