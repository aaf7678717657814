"""Model registry: three CNN architectures for 48x48 single-channel faces, on shared building blocks.

``create_model(name, num_classes=4, in_chans=1, width=1.0, stem_pool=True)`` builds a registered architecture
(``width`` scales every layer's channels, keeping the architecture's shape; ``stem_pool=False`` runs the
stages at the input's full resolution); ``list_models()`` names them. Every
model ends in global average pooling, so it accepts any input size, and has no dense layer sized by the
image (the old scripts' 160,000-input dense layer on upscaled images is gone).

- ``main``: a compact conv net, three stages of two 3x3 convolutions.
- ``variant1``: deeper, four stages of three 3x3 convolutions.
- ``variant2``: larger kernels, three stages of two 5x5 convolutions (7x7 stem), narrower so that its
  cost stays comparable.

:class:`GroupHeads` gives any of them one classifier per group of a protected attribute, for the
``groupheads`` mitigation (domain-independent training); once trained it collapses into the plain
architecture. :class:`Adversary` adds a critic that tries to tell each image's group from the features
the classifier sees, for the ``adversary`` mitigation; once trained it too is the plain architecture.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_UNKNOWN_MODEL = "unknown model {0!r}; known: {1}"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered architectures, in registration order."""
    return list(_MODELS)


def create_model(name: str, *, num_classes: int = 4, in_chans: int = 1, dropout: float = 0.3,
                 width: float = 1.0, stem_pool: bool = True) -> nn.Module:
    """Build the architecture ``name``; raises ``KeyError`` naming the known ones for an unknown name.

    ``width`` multiplies the channels of every convolution (rounded, at least 8): the same architecture,
    wider or narrower. ``stem_pool=False`` drops the 2x2 pooling after the stem: the same weights, every
    stage at twice the resolution, four times the FLOPs.
    """
    if name not in _MODELS:
        raise KeyError(_UNKNOWN_MODEL.format(name, list_models()))
    if width <= 0:
        raise ValueError(f"model width multiplier must be > 0, got {width!r}")
    return _MODELS[name](num_classes=num_classes, in_chans=in_chans, dropout=dropout, width=width,
                         stem_pool=stem_pool)


def conv_bn(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    """Convolution (no bias), batch norm, ReLU; 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def stage(cin: int, cout: int, depth: int, kernel: int = 3, pool: bool = True) -> nn.Sequential:
    """``depth`` conv_bn layers, then 2x2 max pooling (halves H and W)."""
    layers = [conv_bn(cin if i == 0 else cout, cout, kernel) for i in range(depth)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Stem, a sequence of stages, global average pooling, dropout, linear classifier.

    Parameters
    ----------
    widths
        Output channels of each stage.
    depth
        Convolutions per stage.
    kernel
        Kernel size inside the stages.
    stem_kernel, stem_width
        Kernel and output channels of the first convolution.
    width
        Multiplier applied to ``widths`` and ``stem_width``.
    stem_pool
        2x2 max pooling after the stem (else an identity, so the parameter names stay the same).
    """

    def __init__(self, widths: list[int], depth: int, kernel: int, stem_kernel: int, stem_width: int,
                 num_classes: int, in_chans: int, dropout: float, width: float = 1.0, stem_pool: bool = True
                 ) -> None:
        super().__init__()
        self.num_classes = num_classes
        widths = [_scaled(w, width) for w in widths]
        stem_width = _scaled(stem_width, width)
        # 48x48 -> 24x24 right after the stem by default: full-resolution stages cost 4x the FLOPs and
        # were not measurably better on fer4 (README, "Recipe probes").
        self.stem = nn.Sequential(conv_bn(in_chans, stem_width, stem_kernel),
                                  nn.MaxPool2d(2) if stem_pool else nn.Identity())
        cins = [stem_width, *widths[:-1]]
        stages = [stage(ci, co, depth, kernel) for ci, co in zip(cins, widths, strict=True)]
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(widths[-1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, C, H, W)."""
        return self.head(self.stages(self.stem(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the linear classifier sees (B, channels): pooled, after dropout.

        ``head[-1]`` of it is ``forward``.
        """
        return self.head[:-1](self.stages(self.stem(x)))


class GroupHeads(nn.Module):
    """One linear classifier per group on a shared network: domain-independent training.

    Wraps a network built with ``num_classes * n_groups`` outputs (Wang et al., "Towards fairness in
    visual recognition", CVPR 2020). :meth:`group_logits` gives each group's own class logits
    (B, n_groups, num_classes): training scores an image with its group's classifier only, so a class
    that one group dominates in the training data cannot be learnt as "this group's faces". ``forward``
    returns the sum over the groups' logits (B, num_classes), the prediction for a face whose group is not
    known (at test time it never is).

    ``cells`` (n_groups, num_classes, bool) says which classes each group had training images of. A
    group's classifier learns never to predict a class it never saw, and summed into every prediction
    it would pull that class down for everybody; so where a group lacks classes, its classifier votes
    only among the classes it saw, with its logits centred over them (a classifier's logits are defined
    up to a constant per image, which the centring removes), and not at all on the others. With every
    cell filled the prediction is the plain sum.

    Both rules are linear, so the prediction is itself one linear layer: :meth:`collapse` returns the plain
    network with ``num_classes`` outputs that computes exactly ``forward``, which is what is saved,
    evaluated and ensembled.
    """

    def __init__(self, net: nn.Module, num_classes: int, n_groups: int, cells: torch.Tensor | None = None
                 ) -> None:
        super().__init__()
        if net.head[-1].out_features != num_classes * n_groups:
            raise ValueError(f"GroupHeads: the network has {net.head[-1].out_features} outputs, "
                             f"expected {num_classes} classes x {n_groups} groups")
        self.net, self.num_classes, self.n_groups = net, num_classes, n_groups
        self.register_buffer("mix", None if cells is None or bool(cells.all()) else _vote_matrix(cells),
                             persistent=False)

    def group_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_groups, num_classes): row g is group g's classifier."""
        return self.net(x).view(len(x), self.n_groups, self.num_classes)

    def combine(self, group_logits: torch.Tensor) -> torch.Tensor:
        """(B, n_groups, C) -> (B, C): the groups' logits summed, each over the classes it saw."""
        if self.mix is None:
            return group_logits.sum(1)
        return torch.einsum("gyc,bgc->by", self.mix, group_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a face of unknown group: :meth:`combine` of :meth:`group_logits`."""
        return self.combine(self.group_logits(x))

    def collapse(self) -> nn.Module:
        """The wrapped network with one classifier computing ``forward`` (the groups' combined)."""
        net = copy.deepcopy(self.net)
        old = net.head[-1]
        new = nn.Linear(old.in_features, self.num_classes).to(old.weight.device)
        weight = old.weight.view(self.n_groups, self.num_classes, -1)
        bias = old.bias.view(self.n_groups, self.num_classes)
        with torch.no_grad():
            if self.mix is None:
                new.weight.copy_(weight.sum(0))
                new.bias.copy_(bias.sum(0))
            else:
                new.weight.copy_(torch.einsum("gyc,gcf->yf", self.mix, weight))
                new.bias.copy_(torch.einsum("gyc,gc->y", self.mix, bias))
        net.head[-1] = new
        net.num_classes = self.num_classes
        return net


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``-scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged forward; backward, its gradient times ``-scale``.

    Whatever is trained to minimise a loss of it pushes ``x`` to *raise* that loss, ``scale`` times as
    hard: the gradient reversal layer of Ganin & Lempitsky (ICML 2015).
    """
    return _ReverseGrad.apply(x, scale)


class Adversary(nn.Module):
    """A network and a critic that guesses each training image's group from the network's features.

    The critic (a small MLP) sees the features the classifier sees and the image's class (one-hot, or the
    mixup blend of two), so it can only win on what the features say about the group *inside* a class:
    the equalized-odds form of adversarial debiasing (Zhang, Lemoine & Mitchell, AIES 2018). Its own
    weights learn to minimise its loss; through :func:`reverse_grad` the network's features learn to
    maximise it, so "this face is a man's" is trained out of what the classifier can use, while the
    class itself stays. ``forward`` is the network alone, and :meth:`collapse` returns it: the critic is
    used only in training.
    """

    def __init__(self, net: nn.Module, num_classes: int, n_groups: int, hidden: int = 64) -> None:
        super().__init__()
        if not hasattr(net, "features"):
            raise TypeError(f"Adversary needs a network with a features() method, got {type(net).__name__}")
        self.net, self.num_classes, self.n_groups = net, num_classes, n_groups
        width = net.head[-1].in_features
        self.critic = nn.Sequential(nn.Linear(width + num_classes, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, n_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes): the network alone."""
        return self.net(x)

    def logits_and_critic(self, x: torch.Tensor, classes: torch.Tensor, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, C) and the critic's group logits (B, n_groups).

        ``classes`` (B, C) is each image's class, one-hot or blended; the features get the critic's
        gradient reversed and multiplied by ``scale``.
        """
        feats = self.net.features(x)
        critic = self.critic(torch.cat([reverse_grad(feats, scale), classes.to(feats.dtype)], dim=1))
        return self.net.head[-1](feats), critic

    def collapse(self) -> nn.Module:
        """The trained network without the critic."""
        return copy.deepcopy(self.net)


def _vote_matrix(cells: torch.Tensor) -> torch.Tensor:
    """(G, C, C): group g's contribution to class y is ``mix[g, y] @ logits[g]``.

    For a group with every class, the identity; otherwise its logit of y minus the mean of its logits over
    the classes it saw, for those classes only (rows of unseen classes are 0).
    """
    m = cells.float()
    eye = torch.eye(cells.shape[1])
    centred = torch.diag_embed(m) - m.unsqueeze(2) * m.unsqueeze(1) / m.sum(1).clamp(min=1).view(-1, 1, 1)
    full = cells.all(1).view(-1, 1, 1)
    return torch.where(full, eye, centred)


def _scaled(channels: int, width: float) -> int:
    return max(8, round(channels * width))


@register_model
def main(**kwargs) -> nn.Module:
    """Compact: 3x3 stem (16), then 3 stages (32, 64, 128 channels) of two 3x3 convolutions."""
    return ConvNet([32, 64, 128], depth=2, kernel=3, stem_kernel=3, stem_width=16, **kwargs)


@register_model
def variant1(**kwargs) -> nn.Module:
    """Deeper: 3x3 stem (16), then 4 stages (32, 64, 128, 192 channels) of three 3x3 convolutions."""
    return ConvNet([32, 64, 128, 192], depth=3, kernel=3, stem_kernel=3, stem_width=16, **kwargs)


@register_model
def variant2(**kwargs) -> nn.Module:
    """Larger kernels: 7x7 stem (16), then 3 stages (24, 48, 96 channels) of two 5x5 convolutions."""
    return ConvNet([24, 48, 96], depth=2, kernel=5, stem_kernel=7, stem_width=16, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, input_size: tuple[int, int] = (48, 48), in_chans: int = 1) -> int:
    """Forward FLOPs for one image (multiply-add counted as 2), via torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, in_chans, *input_size))
    return int(counter.get_total_flops())
