"""Saved models: weights plus everything needed to use them (architecture, classes, size, normalisation).

A checkpoint holds only tensors, strings, numbers and lists, so it loads with
``torch.load(..., weights_only=True)``: loading a model file never runs code from it.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fer_core import __version__
from fer_core.landmarks import MESH_SHA256, LandmarkHead
from fer_core.models import create_model

logger = logging.getLogger(__name__)

FORMAT = "fer-bias-study/model-v1"
_UNSAFE = ("{0}: refused to load: the file holds Python objects beyond tensors and plain values, which "
           "torch.load(weights_only=True) does not run ({1}); it was not written by this tool")
_NO_FILE = "{0}: no such model file; give a .pt file saved by study.kfold, study.tune or study.bias_sweep"
_INIT_ARCH = ("{0}: holds a {1!r} model of width {2}, but training asks for {3!r} of width {4}; weights "
              "transfer only between the same architecture and width (set arch and width to match)")
_NOT_A_MODEL = "{0}: not a fer-bias-study model file (format {1!r}); save one with study.kfold or study.tune"


@dataclass
class SavedModel:
    """A loaded model and the metadata to prepare its inputs and name its outputs."""

    model: nn.Module
    arch: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    mean: float
    std: float
    config: dict
    landmarks: LandmarkHead | None = None  # the face-mesh landmark model averaged in (landmark_weight > 0)

    @property
    def input_norm(self) -> str:
        """How pixels were scaled before ``mean`` and ``std`` (training key ``input_norm``)."""
        return str(self.config.get("input_norm", "dataset"))

    @property
    def face_align(self) -> bool:
        """Whether the network reads faces the face mesh aligned (training key ``face_align``)."""
        return bool(self.config.get("face_align", False))


def save_model(path: str | os.PathLike, model: nn.Module, *, arch: str, classes: tuple[str, ...],
               input_size: tuple[int, int], mean: float, std: float, config: dict | None = None,
               landmarks: LandmarkHead | None = None) -> Path:
    """Write the model file atomically (temporary name, then rename); ``landmarks`` is stored beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": __version__,
        "arch": arch,
        "classes": list(classes),
        "input_size": list(input_size),
        "mean": float(mean),
        "std": float(std),
        "config": dict(config or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if landmarks is not None:  # with the mesh's fingerprint: its features mean nothing to another mesh
        payload["landmarks"] = {"weight": landmarks.weight, "mesh_sha256": MESH_SHA256,
                                "features": landmarks.features,
                                **{k: v.detach().cpu() for k, v in landmarks.state_dict().items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> SavedModel:
    """Load a model file with ``weights_only=True`` and rebuild its architecture."""
    if not Path(path).is_file():
        raise FileNotFoundError(_NO_FILE.format(path))
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not a model
        raise ValueError(_NOT_A_MODEL.format(path, "not a torch.save archive"))
    try:
        payload = torch.load(Path(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(_UNSAFE.format(path, first)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(_NOT_A_MODEL.format(path, fmt))
    config = payload["config"]
    model = create_model(payload["arch"], num_classes=len(payload["classes"]),
                         dropout=float(config.get("dropout", 0.0)), width=float(config.get("width", 1.0)),
                         stem_pool=bool(config.get("stem_pool", True)))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return SavedModel(model, payload["arch"], tuple(payload["classes"]), tuple(payload["input_size"]),
                      payload["mean"], payload["std"], config, _landmark_head(path, payload))


def _landmark_head(path: str | os.PathLike, payload: dict) -> LandmarkHead | None:
    saved = payload.get("landmarks")
    if saved is None:
        return None
    if saved["mesh_sha256"] != MESH_SHA256:
        raise ValueError(f"{path}: its landmark model was fitted on the face mesh {saved['mesh_sha256']}, "
                         f"and this version of the tool runs {MESH_SHA256}; refit it with this version")
    # files saved before landmark_input existed read the points
    head = LandmarkHead(saved["coef"].shape[1], saved["coef"].shape[0], saved["weight"],
                        saved.get("features", "points"))
    head.load_state_dict({k: saved[k] for k in ("center", "scale", "coef", "intercept")})
    return head


def load_weights_into(model: nn.Module, path: str | os.PathLike, *, arch: str, width: float) -> list[str]:
    """Copy a saved model's weights into ``model`` (fine-tuning); return the names left as they were.

    Every tensor whose name and shape agree is copied, so a model saved with other classes gives all but
    its classifier (which stays freshly initialised). The file is loaded as :func:`load_model` does.

    Raises
    ------
    ValueError
        When the file holds another architecture or width.
    """
    saved = load_model(path)
    _check_arch(path, saved.arch, float(saved.config.get("width", 1.0)), [arch], [width])
    target = model.state_dict()
    same = {k: v for k, v in saved.model.state_dict().items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(same, strict=False)
    return sorted(set(target) - set(same))


def check_init(path: str, archs: Iterable[str], widths: Iterable[float], where: str = "") -> None:
    """Refuse, before anything is trained, an ``init`` model that some planned run could not start from.

    ``archs`` and ``widths`` are every architecture and width the command will train (a search's choices,
    a sweep's architectures); nothing is checked when ``path`` is empty. Raises ``ValueError`` as
    :func:`load_weights_into` would, prefixed with ``where`` (the key that asks for the mismatch).
    """
    if not path:
        return
    saved = load_model(path)
    try:
        _check_arch(path, saved.arch, float(saved.config.get("width", 1.0)), archs, widths)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def _check_arch(path: str | os.PathLike, arch: str, width: float, archs: Iterable[str],
                widths: Iterable[float]) -> None:
    """``ValueError`` naming the first architecture or width in the lists that is not the saved one."""
    widths = [float(w) for w in widths]
    for want_arch in archs:
        for want_width in widths:
            if (want_arch, want_width) != (arch, width):
                raise ValueError(_INIT_ARCH.format(path, arch, width, want_arch, want_width))
