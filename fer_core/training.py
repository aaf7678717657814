"""The one training loop: ``train_one_epoch``, ``evaluate`` and ``fit``, reused by every entry point.

Images are decoded once into a tensor that stays on the training device; epochs index into it, so no
file is read after the start. Augmentation runs on training batches only, on the device (random flip,
small shifts, rotations and scaling per image, and brightness/contrast jitter; with ``erase`` > 0 a random
rectangle of that share of the images is blanked; with ``mixup`` > 0 each batch is also blended with a
shuffled copy of itself, its weight drawn from Beta(mixup, mixup)). With ``ema`` > 0 an exponential moving
average of the weights (:class:`torch.optim.swa_utils.AveragedModel`) is what is validated, selected and
returned.
Validation for early stopping is carved from the training data by the caller (see
:func:`fer_core.splits.carve_validation`).

Mitigations of group imbalance are training options here, so every entry point can use them:
``resample`` (draw each epoch with :func:`balancing_weights`: every class the same weight, shared equally
by its known groups), ``reweight`` (the same weights on each example's loss), ``groupdro`` (online group DRO:
exponentiated-gradient weights on the groups' losses, so the worst group dominates) and ``groupheads``
(domain-independent training: one classifier per group on shared features, each image scored by its own
group's classifier, the groups' logits summed to predict; see :class:`fer_core.models.GroupHeads`) and
``adversary`` (a critic learns to tell each image's group from the features and the class; the features
learn, through a reversed gradient ``adv_weight`` times as strong, to keep it from doing so; see
:class:`fer_core.models.Adversary`).

:class:`Trainer` advances one epoch per :meth:`Trainer.step`; ``fit`` loops it and calls
``on_epoch_end(epoch, metrics)`` after each epoch (return ``False`` to stop). The search layer steps
several trainers (one per fold) in lockstep.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_sample_weight
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms.v2 import functional as TF

from fer_core.checkpoint import SavedModel, load_weights_into
from fer_core.config import TrainConfig
from fer_core.fairness import UNKNOWN, accuracy_gap
from fer_core.landmarks import LandmarkHead, align_faces, landmark_features
from fer_core.metrics import macro_f1
from fer_core.models import Adversary, GroupHeads, create_model

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], bool | None]
_EMPTY_HEAD_CELLS = (
    "mitigation 'groupheads': these {0!r} group / class cells have no training image: {1}. That group's "
    "classifier votes only among the classes it saw (see fer_core.models.GroupHeads); the classes it did "
    "not see are learnt from the other groups alone")


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; any other value is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unit_pixels(x: torch.Tensor, input_norm: str = "dataset") -> torch.Tensor:
    """uint8 images (N, H, W) -> float (N, H, W), before the training set's mean and std are taken out.

    ``input_norm`` (a training key): ``"dataset"`` divides by 255; ``"equalize"`` first equalises each
    image's histogram (torchvision), so every face spans the grey range whatever its lighting;
    ``"image"`` standardises each image to its own mean 0 and standard deviation 1 (a flat image gives 0).
    """
    if input_norm == "equalize":
        x = TF.equalize(x.unsqueeze(1)).squeeze(1)
    x = x.float() / 255.0
    if input_norm == "image":
        mean, std = x.mean(dim=(1, 2), keepdim=True), x.std(dim=(1, 2), keepdim=True, correction=0)
        x = (x - mean) / std.clamp_min(1 / 255)
    return x


def _uint8_tensor(pixels: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    # copy: the source may be a read-only memory map or a zero-copy view from Ray's object store
    return torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).to(device)


def input_stats(pixels: np.ndarray, input_norm: str = "dataset") -> tuple[float, float]:
    """Mean and standard deviation of the training images after :func:`unit_pixels` (std 0 -> 1)."""
    if input_norm == "dataset":
        pixels = np.asarray(pixels)
        mean, std = float(pixels.mean() / 255.0), float(pixels.std() / 255.0)
    else:
        x = unit_pixels(_uint8_tensor(pixels), input_norm).double()
        mean, std = float(x.mean()), float(x.std(correction=0))
    return mean, std or 1.0


def to_tensor(pixels: np.ndarray, mean: float, std: float, device: torch.device,
              input_norm: str = "dataset") -> torch.Tensor:
    """uint8 (N, H, W) -> normalised float (N, 1, H, W) on ``device`` (see :func:`unit_pixels`)."""
    x = unit_pixels(_uint8_tensor(pixels, device), input_norm)
    return ((x - mean) / std).unsqueeze(1)


def augment(x: torch.Tensor, strength: float, gen: torch.Generator, erase: float = 0.0) -> torch.Tensor:
    """Random per-image flip, rotation (±10°), shift (±10%), scale (±10%) and brightness/contrast.

    torchvision's transforms draw one set of parameters per call, which would move a whole batch the
    same way; here each image gets its own affine matrix, applied in one ``grid_sample`` call. With
    ``erase`` > 0, each image then has that probability of a random rectangle being blanked
    (:func:`erase_patches`, after the jitter); ``erase`` is not scaled by ``strength``.
    """
    if strength > 0:
        x = _affine_jitter(x, strength, gen)
    return erase_patches(x, erase, gen) if erase > 0 else x


def _affine_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]

    def uniform(scale: float) -> torch.Tensor:  # (B,) in [-scale, scale]
        return (torch.rand(b, generator=gen, device=x.device) * 2 - 1) * scale * strength

    angle, scale = uniform(math.radians(10)), 1 + uniform(0.1)
    flip = torch.where(torch.rand(b, generator=gen, device=x.device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, uniform(0.2)], dim=1),
        torch.stack([sin * flip, cos, uniform(0.2)], dim=1),
    ], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast, brightness = 1 + uniform(0.2), uniform(0.2)
    return out * contrast.view(b, 1, 1, 1) + brightness.view(b, 1, 1, 1)


def erase_patches(x: torch.Tensor, p: float, gen: torch.Generator, area: tuple[float, float] = (0.02, 0.25),
                  ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing per image: with probability ``p``, one rectangle set to 0 (the normalised mean).

    The rectangle covers a uniform share ``area`` of the image, with an aspect ratio log-uniform in
    ``ratio``, at a uniform position (as torchvision's ``RandomErasing`` draws them, which erases the
    same rectangle in a whole batch: here every image draws its own, in one masked fill).
    """
    b, _, h, w = x.shape

    def rand() -> torch.Tensor:
        return torch.rand(b, generator=gen, device=x.device)

    on = rand() < p
    share = area[0] + rand() * (area[1] - area[0])
    log_r = math.log(ratio[0]) + rand() * (math.log(ratio[1]) - math.log(ratio[0]))
    eh = (share * h * w * torch.exp(log_r)).sqrt().round().clamp(1, h)
    ew = (share * h * w / torch.exp(log_r)).sqrt().round().clamp(1, w)
    top, left = (rand() * (h - eh + 1)).floor(), (rand() * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
              & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)) & on.view(b, 1, 1))
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def ema_with_warmup(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """Moving-average update for :class:`AveragedModel` whose decay warms up: ``min(decay, (1+n)/(10+n))``.

    ``n`` is the number of updates so far. Without the warm-up, a decay of 0.99 keeps a quarter of the
    random initial weights after 144 steps (a short run, or an early ASHA rung) and the averaged network
    reads every image as one class. Non-float buffers (batch counters) follow the trained network.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
            return
        n = n.to(averaged[0].dtype)
        weight = 1 - torch.clamp((1 + n) / (10 + n), max=decay)
        for a, c in zip(averaged, current, strict=True):
            a.lerp_(c, weight)

    return update


@dataclass
class FitResult:
    """What ``fit`` returns: the best model (by validation macro-F1), its normalisation and history."""

    model: nn.Module
    mean: float
    std: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    input_norm: str = "dataset"
    landmarks: LandmarkHead | None = None  # fitted after training when ``landmark_weight`` > 0
    face_align: bool = False  # the network reads faces the face mesh aligned (training key face_align)


def known_groups(groups: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The known groups, sorted, and each example's index among them (-1 for ``"unknown"``)."""
    names = np.asarray(groups).astype(str)
    known = sorted(set(names) - {UNKNOWN})
    lookup = {g: i for i, g in enumerate(known)}
    return known, np.array([lookup.get(g, -1) for g in names], dtype=np.int64)


def conditional_entropy(groups: np.ndarray, labels: np.ndarray) -> float:
    """H(group | class) in nats: the cross-entropy of the best guess of the group from the class alone."""
    table = pd.crosstab(labels, groups).to_numpy(dtype=float)  # class x group counts
    return float(np.average(scipy.stats.entropy(table, axis=1), weights=table.sum(1)))


def balancing_weights(labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Per-example weights, mean 1: every class the same total, shared equally by its known groups.

    Images of unknown group (``"unknown"``) keep their natural share of their class: they are neither a
    group to balance nor left out. Without ``groups`` the weights balance the classes alone. A class with
    one known group only (a stereotypical bias can empty a class x group cell) still gets a class's full
    weight, so the number of groups present does not change the class mix the model learns.
    """
    labels = np.asarray(labels)
    weights = compute_sample_weight("balanced", labels)
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        for label in np.unique(labels):
            known = (labels == label) & (groups != UNKNOWN)
            if known.any():
                weights[known] *= compute_sample_weight("balanced", groups[known])
    return weights / weights.mean()


class Trainer:
    """Trains one model on one training set, one epoch per :meth:`step`, with early stopping.

    Parameters
    ----------
    cfg
        The training recipe.
    train_pixels, train_labels
        uint8 images (N, H, W) and int labels (N,) to fit.
    val_pixels, val_labels
        Held-out images for early stopping and model selection (may be empty: then the last epoch wins).
    num_classes
        Number of classes.
    train_groups
        Group of each training example (for the mitigations); ``None`` if unknown.
    val_groups
        Group of each validation example; when given, every epoch also reports ``val_gap``, the
        largest between-group accuracy difference (for fairness-aware search).
    soft_targets
        Teachers' class probabilities for each training example (N, num_classes), for distillation:
        each example's target is then ``1 - distill`` of its label and ``distill`` of these.
    val_blend
        ``(probs, weight)``: another model's class probabilities for each validation example (e.g. the
        landmark model's, fitted without the validation images); every ``val_*`` metric is then that of
        ``1 - weight`` of the network's probabilities plus ``weight`` of these, the blend that will be
        used, and each epoch also reports the network's own ``val_network_macro_f1``. That one picks the
        epoch early stopping keeps with ``cfg.landmark_select = "network"`` (the default), the blend's
        with ``"blend"``; either way :attr:`best_val_score` is the blend's at the kept epoch.
    """

    def __init__(self, cfg: TrainConfig, train_pixels: np.ndarray, train_labels: np.ndarray,
                 val_pixels: np.ndarray, val_labels: np.ndarray, num_classes: int,
                 train_groups: np.ndarray | None = None, val_groups: np.ndarray | None = None,
                 soft_targets: np.ndarray | None = None,
                 val_blend: tuple[np.ndarray, float] | None = None) -> None:
        self.cfg, self.num_classes = cfg, num_classes
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.mean, self.std = input_stats(train_pixels, cfg.input_norm)
        self.x = to_tensor(train_pixels, self.mean, self.std, self.device, cfg.input_norm)
        self.y = torch.as_tensor(train_labels, dtype=torch.long, device=self.device)
        self.targets = None  # class indices (self.y), or label/teacher blends when distilling
        if soft_targets is not None:
            soft = torch.as_tensor(np.asarray(soft_targets), dtype=torch.float32, device=self.device)
            want = (len(self.y), num_classes)
            if soft.shape != want:
                raise ValueError(f"soft_targets: shape {tuple(soft.shape)}, expected {want}")
            self.targets = (1 - cfg.distill) * F.one_hot(self.y, num_classes).float() + cfg.distill * soft
        self.x_val = to_tensor(val_pixels, self.mean, self.std, self.device, cfg.input_norm)
        self.y_val = np.asarray(val_labels)
        self.val_groups = val_groups
        if val_blend is not None and np.shape(val_blend[0]) != (len(self.y_val), num_classes):
            raise ValueError(f"val_blend: shape {np.shape(val_blend[0])}, expected "
                             f"{(len(self.y_val), num_classes)}")
        self.val_blend = val_blend
        self._setup_mitigation(np.asarray(train_labels), train_groups)
        self.model = create_model(cfg.arch, num_classes=num_classes * self.n_heads, dropout=cfg.dropout,
                                  width=cfg.width, stem_pool=cfg.stem_pool)
        if cfg.init:
            fresh = load_weights_into(self.model, cfg.init, arch=cfg.arch, width=cfg.width)
            logger.info("weights from %s%s", cfg.init, f"; left fresh: {fresh}" if fresh else "")
        if self.head_index is not None:
            self.model = GroupHeads(self.model, num_classes, self.n_heads, self.head_cells)
        if self.critic_index is not None:
            self.model = Adversary(self.model, num_classes, self.n_critic)
        self.model = self.model.to(self.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        # the weights that are validated, kept and returned: the trained ones, or their moving average
        self.ema = (AveragedModel(self.model, multi_avg_fn=ema_with_warmup(cfg.ema), use_buffers=True)
                    if cfg.ema > 0 else None)
        self.optimizer = make_optimizer(self.model, cfg)
        self.steps_per_epoch = max(1, len(self.x) // cfg.batch_size)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.amp_dtype = _amp_dtype(self.device) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch, self.best_score, self.best_epoch, self.stale = 0, -math.inf, -1, 0
        self.best_state = copy.deepcopy(self.model.state_dict())
        self.best_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def _setup_mitigation(self, labels: np.ndarray, groups: np.ndarray | None) -> None:
        cfg = self.cfg
        self.sample_weights = self.loss_weights = self.group_index = self.head_index = None
        self.critic_index = None
        self.n_heads = 1
        if cfg.mitigation == "none":
            return
        if groups is None:
            raise ValueError(f"mitigation {cfg.mitigation!r} needs the group of each training image "
                             f"(attribute {cfg.group_attr!r})")
        groups = np.asarray(groups, dtype=object)
        if cfg.mitigation == "resample":
            self.sample_weights = torch.as_tensor(balancing_weights(labels, groups), device=self.device)
        elif cfg.mitigation == "reweight":
            self.loss_weights = torch.as_tensor(balancing_weights(labels, groups), dtype=torch.float32,
                                                device=self.device)
        elif cfg.mitigation == "groupheads":
            # one classifier per known group; an image of unknown group (index n_heads) is scored by
            # their combination, as a test image is
            known, index = known_groups(groups)
            if not known:
                raise ValueError(f"mitigation 'groupheads': no training image has a known "
                                 f"{cfg.group_attr!r} group")
            self.n_heads = len(known)
            self.head_cells = torch.tensor([[bool(np.any((index == i) & (labels == c)))
                                             for c in range(self.num_classes)] for i in range(len(known))])
            empty = [f"{g}/class {c}" for i, g in enumerate(known) for c in range(self.num_classes)
                     if not self.head_cells[i, c]]
            if empty:
                logger.warning(_EMPTY_HEAD_CELLS.format(cfg.group_attr, empty))
            self.head_index = torch.as_tensor(np.where(index < 0, self.n_heads, index), device=self.device)
        elif cfg.mitigation == "adversary":
            # the critic learns the known groups; an image of unknown group (-1) gives it no target
            known, index = known_groups(groups)
            if len(known) < 2:
                raise ValueError(f"mitigation 'adversary': needs training images of at least two known "
                                 f"{cfg.group_attr!r} groups, found {known}")
            self.n_critic = len(known)
            self.critic_index = torch.as_tensor(index, device=self.device)
            self.critic_chance = conditional_entropy(index[index >= 0], labels[index >= 0])
        else:  # groupdro: groups are the attribute's groups (unknown is a group of its own)
            gid = np.unique(groups.astype(str), return_inverse=True)[1]
            self.group_index = torch.as_tensor(gid, device=self.device)
            self.n_groups = int(gid.max()) + 1
            self.q = torch.full((self.n_groups,), 1.0 / self.n_groups, device=self.device)

    @property
    def done(self) -> bool:
        """True once the epoch budget is spent or early stopping triggered."""
        return self.epoch >= self.cfg.epochs or self.stale >= self.cfg.patience

    def step(self) -> dict[str, float]:
        """Train one epoch, validate, keep the best weights; returns the epoch's metrics."""
        start = time.perf_counter()
        metrics = train_one_epoch(self)
        if len(self.y_val):
            own = predict_proba(self.eval_model, self.x_val, self.cfg.batch_size * 4)
            val = score_probs(own, self.y_val, self.num_classes, self.cfg.label_smoothing, self.val_blend)
            metrics.update({f"val_{k}": v for k, v in val.items() if k != "probs"})
            if self.val_blend is not None:
                metrics["val_network_macro_f1"] = macro_f1(self.y_val, own.argmax(1), self.num_classes)
            if self.val_groups is not None:
                metrics["val_gap"] = accuracy_gap(self.y_val, val["probs"].argmax(1), self.val_groups)
        metrics.update(epoch=self.epoch, seconds=time.perf_counter() - start)
        select = "val_network_macro_f1" if self.cfg.landmark_select == "network" else "val_macro_f1"
        score = metrics.get(select, metrics.get("val_macro_f1", float(self.epoch)))
        if score > self.best_score:
            self.best_score, self.best_epoch, self.stale = score, self.epoch, 0
            self.best_state = copy.deepcopy(self.eval_model.state_dict())
            self.best_metrics = dict(metrics)
        else:
            self.stale += 1
        self.history.append(metrics)
        self.epoch += 1
        return metrics

    @property
    def best_val_score(self) -> float:
        """Validation macro-F1 (of the blend, with ``val_blend``) at the kept epoch; else ``best_score``."""
        return self.best_metrics.get("val_macro_f1", self.best_score)

    @property
    def eval_model(self) -> nn.Module:
        """The network that is validated and kept: the moving average with ``ema``, else the trained one."""
        return self.model if self.ema is None else self.ema.module

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly where it stopped (tensors and numbers only)."""
        return {
            "model": self.model.state_dict(), "best_state": self.best_state,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "gen": self.gen.get_state(),
            "q": getattr(self, "q", None), "ema": None if self.ema is None else self.ema.state_dict(),
            "epoch": self.epoch, "best_score": self.best_score,
            "best_epoch": self.best_epoch, "stale": self.stale, "best_metrics": self.best_metrics,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.best_state = state["best_state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["gen"])
        if state["q"] is not None:
            self.q = state["q"].to(self.device)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for key in ("epoch", "best_score", "best_epoch", "stale", "best_metrics", "history"):
            setattr(self, key, state[key])

    def result(self) -> FitResult:
        """The model with the best validation weights restored, as the plain architecture.

        Per-group classifiers (``groupheads``) are combined into one; a critic (``adversary``) is dropped.
        """
        self.model.load_state_dict(self.best_state)
        model = self.model.collapse() if isinstance(self.model, (GroupHeads, Adversary)) else self.model
        model.eval()
        return FitResult(model, self.mean, self.std, self.best_epoch, self.history, self.cfg.input_norm,
                         face_align=self.cfg.face_align)

    def epoch_order(self) -> torch.Tensor:
        """Example indices for one epoch: a permutation, or a balanced draw when resampling."""
        n = len(self.x)
        if self.sample_weights is not None:
            return torch.multinomial(self.sample_weights, n, replacement=True, generator=self.gen)
        return torch.randperm(n, generator=self.gen, device=self.device)

    def mix_weights(self) -> np.ndarray | None:
        """One mixup weight per batch of the coming epoch, Beta(mixup, mixup); ``None`` without mixup.

        Drawn by inverting the Beta CDF at uniforms from the trainer's torch generator (one host sync per
        epoch), so a resumed trainer draws the same weights.
        """
        if self.cfg.mixup <= 0:
            return None
        u = torch.rand(self.steps_per_epoch, generator=self.gen, device=self.device).cpu().numpy()
        return scipy.stats.beta.ppf(u, self.cfg.mixup, self.cfg.mixup)

    def mix(self, xb: torch.Tensor, lam: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``xb`` blended with a shuffled copy of itself, weight ``lam``; returns (inputs, partners)."""
        if lam is None:
            return xb, None
        perm = torch.randperm(len(xb), generator=self.gen, device=self.device)
        return lam * xb + (1 - lam) * xb[perm], perm

    def loss(self, logits: torch.Tensor, idx: torch.Tensor, perm: torch.Tensor | None = None,
             lam: float = 1.0) -> torch.Tensor:
        """Training loss of a batch, with the configured mitigation.

        With mixup partners ``perm``, each input is ``lam`` of example ``idx`` and ``1 - lam`` of
        ``idx[perm]``: its loss is split the same way between the two labels, and each part gets the
        weight (``reweight``), counts toward the group (``groupdro``) or is scored by the classifier
        (``groupheads``, whose ``logits`` are (B, groups, C)) of the example it came from.
        """
        parts = [(1.0, idx)] if perm is None else [(lam, idx), (1.0 - lam, idx[perm])]
        targets = self.y if self.targets is None else self.targets
        losses = [(w, rows, F.cross_entropy(self._logits_of(logits, rows).float(), targets[rows],
                                            reduction="none", label_smoothing=self.cfg.label_smoothing))
                  for w, rows in parts]
        if self.loss_weights is not None:
            return sum(w * (ce * self.loss_weights[rows]).mean() for w, rows, ce in losses)
        if self.group_index is None:
            return sum(w * ce.mean() for w, _, ce in losses)
        sums = torch.zeros(self.n_groups, device=logits.device)
        counts = torch.zeros(self.n_groups, device=logits.device)
        for w, rows, ce in losses:
            g = self.group_index[rows]
            sums.index_add_(0, g, w * ce)
            counts.index_add_(0, g, torch.full_like(ce, w))
        group_loss = sums / counts.clamp(min=1e-12)  # a group absent from the batch has loss 0
        with torch.no_grad():  # exponentiated-gradient ascent on the group weights
            self.q = self.q * torch.exp(self.cfg.dro_eta * group_loss.detach())
            self.q = self.q / self.q.sum()
        return (self.q * group_loss).sum()

    def critic_scale(self) -> float:
        """Strength of the reversed gradient this epoch: ``adv_weight``, reached smoothly from 0.

        ``2 / (1 + exp(-10 p)) - 1`` of it at progress ``p`` through the epoch budget (Ganin & Lempitsky),
        so the features are not pushed before the critic has learnt anything.
        """
        p = self.epoch / self.cfg.epochs
        return self.cfg.adv_weight * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)

    def critic_inputs(self, idx: torch.Tensor, perm: torch.Tensor | None = None, lam: float = 1.0
                      ) -> torch.Tensor:
        """The classes the critic is told (B, C): one-hot, or blended as the mixup inputs are."""
        onehot = F.one_hot(self.y[idx], self.num_classes).float()
        return onehot if perm is None else lam * onehot + (1.0 - lam) * onehot[perm]

    def critic_loss(self, critic: torch.Tensor, idx: torch.Tensor, perm: torch.Tensor | None = None,
                    lam: float = 1.0) -> torch.Tensor:
        """The critic's cross-entropy on the images of known group; 0 for a batch with none.

        With mixup it is split between the two images as the class loss is.
        """
        parts = [(1.0, idx)] if perm is None else [(lam, idx), (1.0 - lam, idx[perm])]
        total = critic.new_zeros((), dtype=torch.float32)
        for w, rows in parts:
            target = self.critic_index[rows]
            summed = F.cross_entropy(critic.float(), target, ignore_index=-1, reduction="sum")
            total = total + w * summed / (target >= 0).sum().clamp(min=1)
        return total

    def _logits_of(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, C) logits to score examples ``rows`` with: with ``groupheads``, each one's group classifier."""
        if self.head_index is None:
            return logits
        # an image of unknown group is scored as a test image is: the groups' logits combined
        with_sum = torch.cat([logits, self.model.combine(logits).unsqueeze(1)], dim=1)
        return with_sum[torch.arange(len(rows), device=logits.device), self.head_index[rows]]


def train_one_epoch(tr: Trainer) -> dict[str, float]:
    """One pass over the training data of ``tr``; returns ``train_loss`` and ``lr``.

    With ``adversary`` also ``critic_loss`` (included in ``train_loss``) and ``critic_chance``, the loss
    of a critic that knows only each class's group shares (the entropy of the group given the class).
    """
    model, cfg = tr.model.train(), tr.cfg
    order = tr.epoch_order()
    lams = tr.mix_weights()
    scale = tr.critic_scale() if tr.critic_index is not None else 0.0
    total = torch.zeros((), device=tr.device)
    critic_total = torch.zeros((), device=tr.device)
    for i in range(tr.steps_per_epoch):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        lam = None if lams is None else float(lams[i])
        xb, perm = tr.mix(augment(tr.x[idx], cfg.aug_strength, tr.gen, cfg.erase), lam)
        w = 1.0 if lam is None else lam
        loss, critic_loss = batch_loss(tr, xb, idx, perm, w, scale)
        if critic_loss is not None:
            critic_total += critic_loss.detach()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scaler.scale(loss).backward()
        if cfg.sam > 0:
            sam_second_pass(tr, xb, idx, perm, w, scale)
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        tr.scheduler.step()
        if tr.ema is not None:
            tr.ema.update_parameters(model)
        total += loss.detach()
    # one host sync per epoch, not per batch
    metrics = {"train_loss": float(total) / tr.steps_per_epoch, "lr": tr.optimizer.param_groups[0]["lr"]}
    if tr.critic_index is not None:  # the critic's loss, next to what it is when it has learnt nothing
        metrics.update(critic_loss=float(critic_total) / tr.steps_per_epoch, critic_chance=tr.critic_chance)
    return metrics


def batch_loss(tr: Trainer, xb: torch.Tensor, idx: torch.Tensor, perm: torch.Tensor | None, w: float,
               scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training loss of one prepared batch, and the critic's part of it (``None`` without a critic)."""
    model = tr.model
    with torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.float32,
                        enabled=tr.amp_dtype is not None):
        if tr.critic_index is not None:
            logits, critic = model.logits_and_critic(xb, tr.critic_inputs(idx, perm, w), scale)
            critic_loss = tr.critic_loss(critic, idx, perm, w)
            return tr.loss(logits, idx, perm, w) + critic_loss, critic_loss
        logits = model.group_logits(xb) if tr.head_index is not None else model(xb)
        return tr.loss(logits, idx, perm, w), None


def sam_second_pass(tr: Trainer, xb: torch.Tensor, idx: torch.Tensor, perm: torch.Tensor | None, w: float,
                    scale: float) -> None:
    """Sharpness-aware minimisation (Foret et al., ICLR 2021): the gradient at the worst weights nearby.

    The weights are moved ``sam`` (a radius) along the batch's gradient, the same batch's loss is taken
    again there, and its gradient is what the optimizer then applies at the original weights. The second
    pass leaves batch-norm statistics and group DRO's weights as the first pass set them, so each step
    updates them once. Costs a second forward and backward pass per batch.
    """
    params = [p for p in tr.model.parameters() if p.grad is not None]
    with torch.no_grad():
        grads = [p.grad / tr.scaler.get_scale() for p in params]  # unscaled (the scale is 1 without fp16)
        norm = torch.nn.utils.get_total_norm(grads)
        # an overflowed fp16 step (skipped by the scaler anyway) moves nothing, without a host sync
        steps = [torch.nan_to_num(g * (tr.cfg.sam / (norm + 1e-12)), nan=0.0, posinf=0.0, neginf=0.0)
                 for g in grads]
        for p, e in zip(params, steps, strict=True):
            p.add_(e)
    # batch-norm statistics and group DRO's weights are put back as the first pass left them
    buffers = list(tr.model.buffers())
    kept, q = [b.clone() for b in buffers], getattr(tr, "q", None)
    try:
        tr.optimizer.zero_grad(set_to_none=True)
        loss, _ = batch_loss(tr, xb, idx, perm, w, scale)
        tr.scaler.scale(loss).backward()
    finally:
        if q is not None:
            tr.q = q
        with torch.no_grad():
            for b, k in zip(buffers, kept, strict=True):
                b.copy_(k)
            for p, e in zip(params, steps, strict=True):
                p.sub_(e)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256, flip_tta: bool = True
                  ) -> np.ndarray:
    """Softmax probabilities (N, C) for prepared inputs ``x`` (N, 1, H, W).

    With ``flip_tta`` the probabilities of each image and its mirror image are averaged (faces are
    symmetric enough that training already uses flips); used alike for validation, test and new data.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        probs = F.softmax(model(xb).float(), dim=1)
        if flip_tta:
            probs = (probs + F.softmax(model(xb.flip(-1)).float(), dim=1)) / 2
        out.append(probs.cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_classes))


def predict_saved(saved: SavedModel, pixels: np.ndarray, image_ids: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities of a saved model for raw (N, H, W) pixels, its landmark model averaged in.

    A model trained with ``face_align`` reads the faces the face mesh aligned. ``image_ids`` (content
    hashes) let the mesh run once per image and process.
    """
    device = next(saved.model.parameters()).device
    network_input = align_faces(pixels, image_ids) if saved.face_align else pixels
    probs = predict_proba(saved.model, to_tensor(network_input, saved.mean, saved.std, device,
                                                 saved.input_norm))
    if saved.landmarks is not None:
        features = landmark_features(pixels, image_ids, kind=saved.landmarks.features)
        probs = saved.landmarks.blend(probs, features)
    return probs


def evaluate(model: nn.Module, x: torch.Tensor, y: np.ndarray, num_classes: int,
             batch_size: int = 256, label_smoothing: float = 0.0,
             blend: tuple[np.ndarray, float] | None = None) -> dict:
    """Loss, accuracy and macro-F1 of ``model`` on prepared inputs; ``probs`` holds the (N, C) softmax.

    With ``blend = (other, weight)`` they are those of ``1 - weight`` of the softmax plus ``weight`` of
    ``other`` (N, C), and ``probs`` is that blend.
    """
    return score_probs(predict_proba(model, x, batch_size), y, num_classes, label_smoothing, blend)


def score_probs(probs: np.ndarray, y: np.ndarray, num_classes: int, label_smoothing: float = 0.0,
                blend: tuple[np.ndarray, float] | None = None) -> dict:
    """:func:`evaluate` on class probabilities (N, C) already predicted."""
    if blend is not None:
        probs = (1.0 - blend[1]) * probs + blend[1] * np.asarray(blend[0])
    y = np.asarray(y)
    pred = probs.argmax(1)
    loss = F.cross_entropy(torch.log(torch.as_tensor(probs).clamp_min(1e-12)), torch.as_tensor(y),
                           label_smoothing=label_smoothing)
    return {"loss": float(loss), "accuracy": float((pred == y).mean()),
            "macro_f1": macro_f1(y, pred, num_classes), "probs": probs}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum); no weight decay on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-batch learning-rate schedule over the whole epoch budget."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def fit(cfg: TrainConfig, train_pixels: np.ndarray, train_labels: np.ndarray, val_pixels: np.ndarray,
        val_labels: np.ndarray, num_classes: int, *, train_groups: np.ndarray | None = None,
        soft_targets: np.ndarray | None = None, on_epoch_end: EpochCallback | None = None,
        val_blend: tuple[np.ndarray, float] | None = None) -> FitResult:
    """Train with early stopping on the validation set; returns the best model.

    ``on_epoch_end(epoch, metrics)`` is called after every epoch; returning ``False`` stops training.
    ``soft_targets``: the teachers' probabilities for distillation; ``val_blend``: probabilities blended
    into every validation score (both: see :class:`Trainer`).
    """
    trainer = Trainer(cfg, train_pixels, train_labels, val_pixels, val_labels, num_classes, train_groups,
                      soft_targets=soft_targets, val_blend=val_blend)
    while not trainer.done:
        metrics = trainer.step()
        if on_epoch_end is not None and on_epoch_end(metrics["epoch"], metrics) is False:
            break
    network = trainer.best_metrics.get("val_network_macro_f1")
    logger.info("best epoch %d of %d, counting from 1 (val macro-F1 %.3f%s)", trainer.best_epoch + 1,
                trainer.epoch, trainer.best_val_score, "" if network is None else f"; network {network:.3f}")
    return trainer.result()
