"""Tiny datasets for tests: images whose class is a bright bar, so any CNN can learn it in seconds."""

import numpy as np
import pandas as pd

from fer_core.data import FaceDataset, image_id
from fer_core.landmarks import MESH_FEATURES, N_LANDMARKS

CLASSES = ("Focused", "Happy", "Neutral", "Surprised")


def bar_images(n: int, seed: int = 0, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Noise images with a bright horizontal bar whose row band encodes the class (4 classes)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    rng.shuffle(y)
    x = rng.integers(0, 80, (n, size, size)).astype(np.uint8)
    band = size // 4
    for i, c in enumerate(y):
        x[i, c * band + 2:c * band + band - 2] = 230
    return x, y


def bar_dataset(n: int = 80, seed: int = 0) -> FaceDataset:
    x, y = bar_images(n, seed)
    genders = np.where(np.arange(n) % 2 == 0, "Female", "Male")
    manifest = pd.DataFrame({
        "image_id": [image_id(p) for p in x],
        "label": np.asarray(CLASSES)[y],
        "source_path": [f"bars/{i}.png" for i in range(n)],
        "subset": "base",
        "gender": genders,
        "age": pd.Series(["Adult"] * n, dtype=object),
    })
    return FaceDataset(pixels=x, manifest=manifest, classes=CLASSES, name="bars")


class BarMesh:
    """A stand-in for the face mesh: 468 'landmarks' that follow the brightness of each image row.

    The bar images of the tests encode their class in the row of a bright bar, so these points carry the
    class, as a real face's geometry carries its expression; no model file is needed.
    """

    calls = 0

    def __call__(self, pixels):
        BarMesh.calls += len(pixels)
        rows = np.asarray(pixels, dtype=np.float64).mean(axis=2)  # (N, H)
        rows = np.repeat(rows, -(-N_LANDMARKS // rows.shape[1]), axis=1)[:, :N_LANDMARKS]
        points = np.zeros((len(pixels), N_LANDMARKS, 3))
        points[:, :, 0] = np.arange(N_LANDMARKS) + rows / 50.0
        points[:, :, 1] = np.sin(np.arange(N_LANDMARKS)) + rows / 70.0
        return points

    def embed(self, pixels):
        """Stand-in inner layers: each image row's brightness, repeated, on a fixed pattern."""
        BarMesh.calls += len(pixels)
        rows = np.asarray(pixels, dtype=np.float64).mean(axis=2)
        rows = np.repeat(rows, -(-MESH_FEATURES // rows.shape[1]), axis=1)[:, :MESH_FEATURES]
        return (np.cos(np.arange(MESH_FEATURES)) + rows / 60.0).astype(np.float32)
