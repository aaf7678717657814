"""``face_align``: the network reads each face turned eyes-level and framed on the face mesh's points."""

import logging

import numpy as np
import pytest

import fer_core.landmarks as landmarks
from fer_core.checkpoint import load_model, save_model
from fer_core.config import SplitConfig, TrainConfig, load_config, to_dict
from fer_core.crossval import run_kfold
from fer_core.training import predict_saved
from tests.conftest import FER4
from tests.helpers import bar_dataset

S = 48


class PlacedMesh(landmarks.FaceMesh):
    """A face mesh whose points are given, not computed: the geometry of :meth:`FaceMesh.align` alone."""

    def __init__(self, points):
        self.points = np.asarray(points, dtype=np.float64)

    def _two_passes(self, image, interpreter=None):
        return self.points


def level_face(size=S):
    """Points spanning the whole image, outer eye corners level at 40% height."""
    rng = np.random.default_rng(0)
    points = np.zeros((landmarks.N_LANDMARKS, 3))
    points[:, :2] = rng.uniform(0.1 * size, 0.9 * size, (landmarks.N_LANDMARKS, 2))
    points[0, :2], points[1, :2] = (0, 0), (size, size)
    points[landmarks.EYE_CORNERS[0], :2] = (0.3 * size, 0.4 * size)
    points[landmarks.EYE_CORNERS[1], :2] = (0.7 * size, 0.4 * size)
    return points


def smooth_image(seed=0):
    """An asymmetric image without sharp edges, so resampling it moves values by little."""
    yy, xx = np.mgrid[0:S, 0:S] / S
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return (120 + 60 * np.sin(3 * xx + phase[0]) * np.cos(2 * yy + phase[1]) + 40 * xx * yy).astype(np.uint8)


def test_a_level_face_filling_its_image_is_left_as_it_is():
    image = smooth_image()
    aligned, kept = PlacedMesh(level_face()).align(image[None])
    assert not kept.any()
    assert np.abs(aligned[0].astype(int) - image).max() <= 1


def test_a_face_turned_a_quarter_is_turned_back():
    upright = smooth_image(1)
    turned = np.rot90(upright)  # turned[i, j] = upright[j, S - 1 - i]
    points = level_face()
    # where each point lies in the turned image (pixel-centre coordinates): (x, y) -> (y, S - x)
    moved = points.copy()
    moved[:, 0], moved[:, 1] = points[:, 1], S - points[:, 0]
    aligned, kept = PlacedMesh(moved).align(turned[None])
    assert not kept.any()
    inner = (slice(2, -2), slice(2, -2))  # bicubic resampling of the padded border differs a little
    assert np.abs(aligned[0][inner].astype(int) - upright[inner]).mean() < 1.0
    assert np.abs(turned[inner].astype(int) - upright[inner]).mean() > 10  # unaligned: far from it (18)


def test_faces_the_mesh_missed_are_kept_and_counted(caplog, monkeypatch):
    tiny = level_face() * 0.2  # points spanning a fifth of the image: no face the size of it
    monkeypatch.setattr(landmarks, "_ALIGNED", {})
    images = np.stack([smooth_image(2), smooth_image(3)])
    with caplog.at_level(logging.WARNING, logger="fer_core.landmarks"):
        out = landmarks.align_faces(images, mesh=PlacedMesh(tiny))
    np.testing.assert_array_equal(out, images)
    assert "2 of 2 faces left unaligned" in caplog.text


def test_non_square_images_are_refused_with_their_shape():
    with pytest.raises(ValueError, match=r"square .*\(1, 48, 40\)"):
        PlacedMesh(level_face()).align(np.zeros((1, 48, 40), np.uint8))


class FlipAligner:
    """A stand-in for the face mesh's alignment: turns each image upside down, counting the images."""

    calls = 0

    def align(self, pixels):
        FlipAligner.calls += len(pixels)
        return np.ascontiguousarray(np.asarray(pixels)[:, ::-1]), np.zeros(len(pixels), dtype=bool)


def test_training_testing_and_saved_models_all_read_aligned_faces(monkeypatch, tmp_path):
    monkeypatch.setattr(landmarks, "FaceMesh", FlipAligner)
    monkeypatch.setattr(landmarks, "_ALIGNED", {})
    FlipAligner.calls = 0
    ds = bar_dataset(64)
    cfg = TrainConfig(arch="main", epochs=4, batch_size=16, face_align=True)
    _, preds, runs = run_kfold(cfg, SplitConfig(k=2), ds)
    assert FlipAligner.calls == len(ds)  # every image aligned, each once per process
    run = runs[0]
    path = save_model(tmp_path / "m.pt", run.result.model, arch="main", classes=ds.classes,
                      input_size=ds.image_size, mean=run.result.mean, std=run.result.std, config=to_dict(cfg))
    saved = load_model(path)
    assert saved.face_align
    test = preds[preds.fold == 0]
    rows = ds.manifest.reset_index().set_index("image_id").loc[test.image_id, "index"].to_numpy()
    columns = [f"p_{c}" for c in ds.classes]
    # the model file reads raw images as the fold's test did: aligned first
    np.testing.assert_allclose(predict_saved(saved, ds.pixels[rows], test.image_id.to_numpy()),
                               test[columns].to_numpy(), atol=1e-5)
    # ...and an aligned image is not the raw one: without aligning, the same model predicts otherwise
    saved.config["face_align"] = False
    assert not np.allclose(predict_saved(saved, ds.pixels[rows]), test[columns].to_numpy(), atol=1e-5)


def test_face_align_must_be_a_boolean():
    with pytest.raises(TypeError, match="face_align"):
        load_config(TrainConfig, None, ["face_align=yes"])
    assert load_config(TrainConfig, None, ["face_align=true"]).face_align


@pytest.mark.realdata
def test_aligned_fer4_faces_have_level_eyes(fer4_and_mesh):
    from PIL import Image

    every = sorted((FER4 / "Data").rglob("*.png"))
    files = every[:: len(every) // 40][:40]
    faces = np.stack([np.asarray(Image.open(f).convert("L").resize((S, S))) for f in files])
    turned = np.stack([np.asarray(Image.fromarray(f).rotate(20, resample=Image.Resampling.BICUBIC))
                       for f in faces])  # 20 degrees counter-clockwise, corners filled black
    mesh = landmarks.FaceMesh()

    def eye_line(images):  # degrees, as the mesh sees them
        points = mesh(images)
        d = points[:, landmarks.EYE_CORNERS[1], :2] - points[:, landmarks.EYE_CORNERS[0], :2]
        return np.degrees(np.arctan2(d[:, 1], d[:, 0]))

    before = eye_line(turned)
    aligned, kept = mesh.align(turned)
    after = eye_line(aligned)
    assert np.median(np.abs(before)) > 15
    assert not kept.any()
    assert np.median(np.abs(after)) < 3, f"eye lines after aligning: {np.round(after, 1)}"
